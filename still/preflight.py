"""Preflight: the report `still check` prints and `still run` prints first — what the data
looks like to the model, what will train, and what it will cost — before any step is spent.

Each runner's `check` (finetune/sft.py, distill/kd.py) builds what it would train and hands it
here. The refusals (no token carries loss, every example truncated away) are raised by
`still.data.prepare`; this module reports and estimates.
"""

from __future__ import annotations

import time
from functools import lru_cache

import torch

from still import data as data_module
from still import models
from still.errors import StillError
from still.launch import is_main_process

# Achieved share of the measured matmul throughput during training. CPU: on the idle 2-core
# CI machine a 768x768 fp32 matmul ran at 188 GFLOP/s and LoRA on SmolLM2-135M trained at
# 121 tokens/s over 8 steps = 0.36 of it (2026-11-23). GPU: an uncalibrated guess. Rough.
CPU_EFFICIENCY = 0.35
GPU_EFFICIENCY = 0.35


def meta_model(spec, *, adapter=None):
    """The model of a recipe's model section on the meta device, with `adapter` (a peft
    config) attached when given: shapes and counts, no weights."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    resolved = models.resolve(
        spec.ref, allow_pickle=spec.allow_pickle, key=models.section_key(spec)
    )
    config = AutoConfig.from_pretrained(resolved.weights, trust_remote_code=spec.trust_remote_code)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=spec.trust_remote_code)
    model.tie_weights()  # on the meta device ties are not applied by from_config
    if adapter is not None:
        from still.train import add_lora

        model = add_lora(model, adapter)
    return model


def parameter_counts(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


@lru_cache(maxsize=1)
def measured_matmul_flops() -> tuple[float, str]:
    """FLOP/s of a plain fp32 (CPU) or bf16 (GPU) matmul on this machine, measured in ~0.3 s."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    size = 4096 if device == "cuda" else 768
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.3:
        a @ b
        reps += 1
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    name = (
        torch.cuda.get_device_name()
        if device == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)"
    )
    return 2 * size**3 * reps / seconds, name


def estimate(recipe, model, train, total_steps: int) -> dict:
    """Memory per device and time for the configured steps (rough, stated as such)."""
    total, trainable = parameter_counts(model)
    config = model.config
    hidden = getattr(config, "hidden_size", 0)
    layers = getattr(config, "num_hidden_layers", 0)
    vocab = getattr(config, "vocab_size", 0)
    stats = train.stats
    tokens_per_example = stats.tokens / max(stats.examples, 1)
    micro_tokens = tokens_per_example * recipe.train.batch_size
    weight_bytes = 2 if recipe.train.precision in ("bf16", "fp16") else 4
    # Adam: fp32 gradient + two moments per trainable parameter.
    memory = {
        "weights": total * weight_bytes,
        "grads_optimizer": trainable * 12,
        # ~34 bytes per token per hidden unit per layer in 16-bit (Korthikanti et al.), ×2 fp32.
        "activations": micro_tokens * hidden * layers * 34 * (weight_bytes / 2),
        # logits, their log-softmax and gradient, in fp32.
        "logits": micro_tokens * vocab * 4 * 3,
    }
    flops_per_token = (6 if trainable == total else 4) * total
    tokens = micro_tokens * recipe.train.grad_accum * total_steps
    peak, device = measured_matmul_flops()
    efficiency = GPU_EFFICIENCY if torch.cuda.is_available() else CPU_EFFICIENCY
    tokens_per_s = peak * efficiency / flops_per_token
    return {
        "params": total,
        "trainable": trainable,
        "memory": memory,
        "tokens": tokens,
        "tokens_per_s": tokens_per_s,
        "seconds": tokens / tokens_per_s,
        "device": device,
    }


# --------------------------------------------------------------------------- size limits
# Where a config states how many positions the model was built for, by family.
POSITION_LIMIT_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "seq_length",
    "n_ctx",
)


def position_limit(config) -> tuple[int, str] | None:
    """(positions, config key) the model was built for, or None where its config says nothing."""
    config = getattr(config, "text_config", None) or config
    # the key as config.json spells it (GPT-2's n_positions is also max_position_embeddings)
    stored = config.to_dict() if hasattr(config, "to_dict") else vars(config)
    for key in sorted(POSITION_LIMIT_KEYS, key=lambda k: k not in stored):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value, key
    return None


def _recipe_line(recipe, key_path: tuple[str, ...]) -> str:
    """`file:line` of `key_path` in the recipe's own file, else the file (or 'the recipe')."""
    source = recipe.source_path
    if not source:
        return "the recipe"
    line = recipe.own_line(key_path)
    return f"{source}:{line}" if line else source


def refuse_beyond_model(recipe, config, *, role: str = "model") -> None:
    """Every size-like setting against what `role`'s config says the model can take. Called
    by `still check` and before the first step of `still run`, so a run cannot start with a
    length the model was never built for."""
    spec = getattr(recipe, role, None)
    ref = getattr(spec, "ref", None) or role
    limit = position_limit(config)
    if limit is not None:
        positions, key = limit
        sizes = [(("data", "max_len"), recipe.data.max_len)]
        on_policy = getattr(getattr(recipe, "distill", None), "on_policy_max_new_tokens", None)
        if on_policy:
            sizes.append((("distill", "on_policy_max_new_tokens"), on_policy))
        for key_path, value in sizes:
            if value > positions:
                raise StillError(
                    f"{_recipe_line(recipe, key_path)}: {'.'.join(key_path)} {value} is beyond "
                    f"the {role}'s position limit {positions} ({key} of {ref})",
                    hint=f"set {'.'.join(key_path)} to at most {positions}",
                )
    hidden = getattr(getattr(config, "text_config", None) or config, "hidden_size", None)
    lora = getattr(recipe, "lora", None)
    # the adapter is on the trained model, never on a distill teacher
    trained = role != "teacher" and getattr(recipe, "method", "full") != "full"
    if trained and lora is not None and hidden:
        if lora.r > hidden:
            raise StillError(
                f"{_recipe_line(recipe, ('lora', 'r'))}: lora.r {lora.r} is above the {role}'s "
                f"hidden size {hidden} ({ref}), so the adapter cannot have that rank",
                hint=f"set lora.r below {hidden}, or method: full",
            )


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def print_report(recipe, tokenizer, train, eval_data, *, model, total_steps: int) -> dict:
    refuse_beyond_model(
        recipe, model.config, role="model" if recipe.kind == "finetune" else "student"
    )
    lines = [f"still check: {recipe.name} ({recipe.kind})"]
    for label, prepared in (("train", train), ("eval", eval_data)):
        if prepared is None:
            continue
        s = prepared.stats
        share = 100 * s.loss_tokens / max(s.tokens, 1)
        lines.append(
            f"  data {label:5} {s.examples:,} examples from {s.rows:,} rows, {s.tokens:,} tokens "
            f"({share:.1f}% carry loss); truncated {s.truncated}, dropped {s.dropped_too_long} too "
            f"long + {s.dropped_no_loss} without loss tokens, bad rows {s.bad_rows}"
        )
        for example in s.bad_row_examples[:3]:
            lines.append(f"             skipped: {example}")
    lines.append(
        "  eos trained: "
        + ("yes" if train.stats.eos_trained else "NO: the model may not learn to stop")
    )
    first = train.dataset[0]
    rendered = data_module.render_loss_mask(tokenizer, first["input_ids"], first["labels"])
    lines.append("  example (loss-carrying tokens marked):")
    lines.extend("    " + line for line in rendered.splitlines())
    est = estimate(recipe, model, train, total_steps)
    share = 100 * est["trainable"] / max(est["params"], 1)
    lines.append(
        f"  model {est['params'] / 1e6:.1f}M parameters, {est['trainable'] / 1e6:.2f}M trainable "
        f"({share:.2f}%), method {getattr(recipe, 'method', 'full')}"
    )
    mem = est["memory"]
    lines.append(
        f"  memory ~{_gib(sum(mem.values()))} GiB per device (weights {_gib(mem['weights'])}, "
        f"grads+optimizer {_gib(mem['grads_optimizer'])}, activations {_gib(mem['activations'])}, "
        f"logits {_gib(mem['logits'])}); rough estimate"
    )
    lines.append(
        f"  time ~{est['seconds'] / 60:.1f} min for {total_steps} steps "
        f"(~{est['tokens']:,.0f} tokens at ~{est['tokens_per_s']:.0f} tokens/s "
        f"on {est['device']}); "
        f"rough estimate"
    )
    if is_main_process():
        print("\n".join(lines), flush=True)
    return est
