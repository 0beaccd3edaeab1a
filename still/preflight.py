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
from still.shipped_configs import has_shipped_config, shipped_config

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


# bitsandbytes NF4 with double quantization: 4 bits per weight plus 0.127 bits of quantization
# constants (Dettmers et al. 2023, QLoRA, section 3).
NF4_BYTES = (4 + 0.127) / 8
# Activations kept for backward, per token per hidden unit per layer, in bytes at 16 bits:
# 34 (Korthikanti et al. 2022, Reducing Activation Recomputation, without the attention-score
# term that flash / sdpa attention never stores).
ACTIVATION_BYTES = 34
# Optimizer state values per trainable parameter (each at the parameter's dtype, or fp32 under
# DeepSpeed, which also keeps an fp32 master copy).
OPTIMIZER_STATES = {
    "adamw_torch": 2,
    "adamw_torch_fused": 2,
    "adamw_8bit": 2,
    "adafactor": 0,
    "sgd": 0,
}
SHARDED = ("zero3", "fsdp")


def world_size(recipe) -> int:
    """Processes the recipe's distributed section launches (1 when it names none)."""
    dist = recipe.distributed
    return (dist.num_processes or 1) * dist.num_machines


def _embedding_params(model) -> int:
    tensors = {
        id(m.weight): m.weight
        for m in (model.get_input_embeddings(), model.get_output_embeddings())
        if m is not None
    }
    return sum(t.numel() for t in tensors.values())


def _quantized_params(model) -> int:
    """What QLoRA stores in 4 bits: the frozen nn.Linear weights; the output head, embeddings,
    norms and the adapters stay 16-bit (bitsandbytes skips the head)."""
    head = model.get_output_embeddings()
    skip = {id(head.weight)} if head is not None else set()
    return sum(
        m.weight.numel()
        for m in model.modules()
        if isinstance(m, torch.nn.Linear)
        and not m.weight.requires_grad
        and id(m.weight) not in skip
    )


def _state_memory(recipe, model, weight_bytes: int) -> dict:
    """Weights, gradients and optimizer state per device, after ZeRO / FSDP sharding."""
    total, trainable = parameter_counts(model)
    dist, world = recipe.distributed, world_size(recipe)
    adapter = getattr(recipe, "method", "full") != "full"
    quantized = _quantized_params(model) if getattr(recipe, "method", None) == "qlora" else 0
    # PEFT keeps adapters in fp32 under a 16-bit base; full training keeps the model's dtype.
    trainable_bytes = 4 if adapter else weight_bytes
    weights = (
        (total - trainable - quantized) * weight_bytes
        + quantized * NF4_BYTES
        + trainable * trainable_bytes
    )
    states = OPTIMIZER_STATES[recipe.train.optimizer]
    state_bytes = 1 if recipe.train.optimizer == "adamw_8bit" else trainable_bytes
    optimizer = trainable * states * state_bytes
    if dist.strategy in ("zero2", "zero3"):
        master = 4 if trainable_bytes < 4 else 0  # DeepSpeed's fp32 copy of 16-bit weights
        optimizer = trainable * (states * max(state_bytes, 4) + master)
    grads = trainable * trainable_bytes
    if dist.strategy in ("zero2", *SHARDED):
        grads, optimizer = grads / world, optimizer / world
    if dist.offload_optimizer != "none":
        optimizer = 0
    gathered = 0
    if dist.strategy in SHARDED:
        weights = 0 if dist.offload_params != "none" else weights / world
        layers = max(_layers(model.config), 1)
        gathered = (total - _embedding_params(model)) / layers * weight_bytes  # one layer whole
    return {"weights": weights + gathered, "grads_optimizer": grads + optimizer}


def _text_config(config):
    return getattr(config, "text_config", None) or config


def _layers(config) -> int:
    return getattr(_text_config(config), "num_hidden_layers", 0)


def memory_estimate(recipe, model, micro_tokens: float, *, teacher=None) -> dict:
    """Bytes per device for one micro-batch of `micro_tokens` tokens: weights, gradients and
    optimizer state, activations kept for backward, the loss's logits, and a distill recipe's
    frozen teacher. Rough, stated as such wherever it is printed."""
    config = _text_config(model.config)
    hidden = getattr(config, "hidden_size", 0)
    layers, vocab = _layers(config), getattr(config, "vocab_size", 0)
    weight_bytes = 2 if recipe.train.precision in ("bf16", "fp16") else 4
    memory = _state_memory(recipe, model, weight_bytes)
    per_layer = micro_tokens * hidden * ACTIVATION_BYTES * weight_bytes / 2
    if recipe.train.gradient_checkpointing:
        # each layer's input is kept; one layer at a time is recomputed whole in backward
        memory["activations"] = micro_tokens * hidden * weight_bytes * layers + per_layer
    else:
        memory["activations"] = per_layer * layers
    chunk = getattr(recipe.train, "loss_chunk_size", None)
    if recipe.kind == "finetune" and recipe.distributed.strategy in SHARDED:
        chunk = None  # a sharded head trains with the model's own loss (finetune/sft.py)
    rows = min(chunk, micro_tokens) if chunk else micro_tokens
    # fp32 logits, their log-softmax and its gradient (and the teacher's log-probs in KD)
    memory["logits"] = rows * vocab * 4 * (3 if teacher is None else 4)
    if teacher is not None:
        memory["teacher"] = _teacher_memory(recipe, teacher, micro_tokens, weight_bytes)
    return memory


def _teacher_memory(recipe, teacher, micro_tokens: float, weight_bytes: int) -> float:
    """A frozen teacher: its weights (whole, or sharded with `distributed.teacher: shard`) and
    the last hidden states the chunked KD loss reads."""
    total, _ = parameter_counts(teacher)
    shard = getattr(recipe.distributed, "teacher", "auto") == "shard"
    hidden = getattr(_text_config(teacher.config), "hidden_size", 0)
    weights = total * weight_bytes / (world_size(recipe) if shard else 1)
    return weights + micro_tokens * hidden * weight_bytes


def estimate(recipe, model, train, total_steps: int, *, teacher=None) -> dict:
    """Memory per device and time for the configured steps (rough, stated as such)."""
    total, trainable = parameter_counts(model)
    stats = train.stats
    tokens_per_example = stats.tokens / max(stats.examples, 1)
    micro_tokens = tokens_per_example * recipe.train.batch_size
    memory = memory_estimate(recipe, model, micro_tokens, teacher=teacher)
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


def _model_line(est: dict, method: str, label: str = "model") -> str:
    share = 100 * est["trainable"] / max(est["params"], 1)
    return (
        f"  {label} {est['params'] / 1e6:.1f}M parameters, {est['trainable'] / 1e6:.2f}M trainable "
        f"({share:.2f}%), method {method}"
    )


def memory_line(memory: dict) -> str:
    """The memory line of the report; the catalog recipes quote its total in their header."""
    parts = [
        f"weights {_gib(memory['weights'])}",
        f"grads+optimizer {_gib(memory['grads_optimizer'])}",
        f"activations {_gib(memory['activations'])}",
        f"logits {_gib(memory['logits'])}",
    ]
    if "teacher" in memory:
        parts.append(f"teacher {_gib(memory['teacher'])}")
    return (
        f"  memory ~{_gib(sum(memory.values()))} GiB per device ({', '.join(parts)}); "
        "rough estimate"
    )


def print_report(
    recipe, tokenizer, train, eval_data, *, model, total_steps: int, teacher=None
) -> dict:
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
    est = estimate(recipe, model, train, total_steps, teacher=teacher)
    lines.append(_model_line(est, getattr(recipe, "method", "full")))
    lines.append(memory_line(est["memory"]))
    lines.append(
        f"  time ~{est['seconds'] / 60:.1f} min for {total_steps} steps "
        f"(~{est['tokens']:,.0f} tokens at ~{est['tokens_per_s']:.0f} tokens/s "
        f"on {est['device']}); "
        f"rough estimate"
    )
    if is_main_process():
        print("\n".join(lines), flush=True)
    return est


# --------------------------------------------------------------------------- real sizes offline
def _roles(recipe) -> list[tuple[str, object]]:
    if recipe.kind == "finetune":
        return [("model", recipe.model)]
    return [("teacher", recipe.teacher), ("student", recipe.student)]


def _only_shipped(spec) -> bool:
    """A hub id this machine cannot read (offline, not cached) whose config `still` ships."""
    if not has_shipped_config(getattr(spec, "ref", None)):
        return False
    try:
        models.resolve(spec.ref, key=models.section_key(spec))
    except StillError:
        return True
    return False


def _shipped_model(recipe, role: str, spec):
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(shipped_config(spec.ref))
    model.tie_weights()
    method = getattr(recipe, "method", "full")
    if role != "teacher" and method != "full":
        from peft import get_peft_model

        from still.train import lora_config

        model = get_peft_model(model, lora_config(recipe.lora, method))  # no tokenizer: no rows
    return model


def shipped_estimate(recipe) -> tuple[dict, list[str]]:
    """Parameters and memory of `recipe` at its models' real sizes, from the configs `still`
    ships (still/configs/) on the meta device: no weights, no tokenizer, so no data is read and
    every example counts as data.max_len tokens, the most it can hold (packed or not, a
    micro-batch is batch_size examples). The estimate and the report's lines; the catalog
    recipes quote both numbers in their header."""
    roles = _roles(recipe)
    built = {role: _shipped_model(recipe, role, spec) for role, spec in roles}
    role = "model" if recipe.kind == "finetune" else "student"
    model, teacher = built[role], built.get("teacher")
    refuse_beyond_model(recipe, model.config, role=role)
    row_tokens = recipe.data.max_len
    memory = memory_estimate(recipe, model, row_tokens * recipe.train.batch_size, teacher=teacher)
    total, trainable = parameter_counts(model)
    est = {"params": total, "trainable": trainable, "memory": memory}
    refs = ", ".join(f"{name}.ref {spec.ref}" for name, spec in roles)
    lines = [
        f"still check: {recipe.name} ({recipe.kind})",
        f"  real size from shipped configs (still/configs/; {refs} not downloaded): meta-device "
        f"models, no weights or tokenizer, so the data is not read; each example counted as "
        f"{row_tokens:,} tokens (data.max_len), {world_size(recipe)} process(es)",
        _model_line(est, getattr(recipe, "method", "full")),
    ]
    if teacher is not None:
        lines.append(f"  teacher {parameter_counts(teacher)[0] / 1e6:.1f}M parameters, frozen")
    lines.append(memory_line(memory))
    lines.append("  time: not estimated here (the speed measured is this machine's, not the GPU's)")
    return est, lines


def estimate_summary(est: dict) -> str:
    """`~M GiB per device, P parameters (T trainable)`: what a catalog recipe's header quotes."""
    return (
        f"~{_gib(sum(est['memory'].values()))} GiB per device, {est['params'] / 1e6:.1f}M "
        f"parameters ({est['trainable'] / 1e6:.2f}M trainable)"
    )


def print_shipped_report(recipe) -> dict | None:
    """`still check` where every model of the recipe is a hub id this machine has not
    downloaded but whose real config `still` ships: `shipped_estimate`, printed. None when the
    recipe's models are not all such ids: then the normal check runs (and says what is
    missing)."""
    if not all(_only_shipped(spec) for _, spec in _roles(recipe)):
        return None
    est, lines = shipped_estimate(recipe)
    if is_main_process():
        print("\n".join(lines), flush=True)
    return est
