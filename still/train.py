"""Trainer plumbing both runners (finetune/sft.py, distill/kd.py) share.

Arguments (`training_arguments`, precision, kernels), the planned number of steps, the LoRA
config, the batch collator for packed or padded data, the token-normalised loss every
`compute_loss` here returns, and the tail of a run: save the adapter or model, print the
summary, score the recipe's eval tasks, close the tracker. Each runner still reads top to
bottom; only what would otherwise be written twice lives here.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from still import data as data_module
from still.attention import implementation, sliding_window
from still.errors import StillError
from still.formats import TURN_PROBE, special_token_ids
from still.fsutil import umask_modes
from still.losses import per_token_loss
from still.rundir import RunDir
from still.sections import DataSection, LoraSection, TrainSection
from still.tracking import finish_training_run

# transformers 5.2x renamed TrainingArguments.gradient_checkpointing (the old name now warns).
CHECKPOINTING_ARGUMENT = (
    "activation_checkpointing"
    if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
    else "gradient_checkpointing"
)


# --------------------------------------------------------------------------- arguments
def precision_flags(train: TrainSection) -> dict:
    """bf16 on a GPU that supports it, fp32 on CPU, unless the recipe says otherwise."""
    precision = train.precision
    on_gpu = torch.cuda.is_available()
    if precision == "auto":
        precision = "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "fp32"
    if precision in ("bf16", "fp16") and not on_gpu:
        raise StillError(
            f"train.precision: {precision} needs a GPU; this machine has none",
            hint="use precision: auto (fp32 on CPU)",
        )
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def kernel_flags(train: TrainSection) -> dict:
    """torch.compile and Liger, each opt-in; Liger's Triton kernels need CUDA and the package."""
    if train.liger_kernel:
        if not torch.cuda.is_available():
            raise StillError(
                "train.liger_kernel: true needs a CUDA GPU; this machine has none",
                hint="set liger_kernel: false on CPU",
            )
        if importlib.util.find_spec("liger_kernel") is None:
            raise StillError(
                "train.liger_kernel: true but liger-kernel is not installed",
                hint="pip install 'still[gpu]' (or liger-kernel), or set liger_kernel: false",
            )
    return {"torch_compile": train.torch_compile, "use_liger_kernel": train.liger_kernel}


def training_arguments(
    recipe, run: RunDir, *, has_eval: bool, total_steps: int, report: list[str]
) -> TrainingArguments:
    train = recipe.train
    # Fractions below 1 are read by Trainer as a share of the total steps.
    save_steps = train.save_steps or 0.25
    eval_steps = train.eval_steps
    return TrainingArguments(
        output_dir=str(run.checkpoints),
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        learning_rate=train.lr,
        max_steps=train.max_steps or -1,
        num_train_epochs=train.epochs,
        warmup_steps=math.ceil(train.warmup_ratio * total_steps),
        lr_scheduler_type=train.scheduler,
        optim=train.optimizer,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        seed=train.seed,
        data_seed=train.seed,
        **{CHECKPOINTING_ARGUMENT: train.gradient_checkpointing},
        eval_strategy="steps" if (has_eval and eval_steps) else "no",
        eval_steps=eval_steps,
        eval_on_start=has_eval,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=None,  # still.checkpoint prunes, and only once a newer one is complete
        logging_steps=train.logging_steps,
        logging_first_step=True,
        # Packed batches hold no padding, and their attention_mask is an additive 4-D float
        # mask that Trainer's "non_padding" count would sum; count every input token there.
        include_num_input_tokens_seen="all" if recipe.data.packing else "non_padding",
        report_to=report,
        run_name=recipe.name,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        # the process group exists by now (launch.join_process_group); same timeout, one source
        ddp_timeout=recipe.distributed.timeout_s,
        use_cpu=not torch.cuda.is_available(),
        **precision_flags(train),
        **kernel_flags(train),
    )


def planned_steps(recipe, n_train: int) -> int:
    """Optimizer steps for this run (per process world of one; Trainer recounts under DDP)."""
    train = recipe.train
    if train.max_steps:
        return train.max_steps
    per_step = train.batch_size * train.grad_accum
    return max(1, math.ceil(train.epochs * math.ceil(n_train / per_step)))


def template_tokens(tokenizer, chat_template: str | None = None) -> list[int]:
    """The special tokens a chat template writes around turns (not bos, eos or pad)."""
    if not (chat_template or tokenizer.chat_template):
        raise StillError(
            "lora.train_tokens: template, but the tokenizer has no chat template",
            hint="set data.chat_template, or list the tokens: lora.train_tokens: [<tok>]",
        )
    text = tokenizer.apply_chat_template(
        TURN_PROBE, chat_template=chat_template, tokenize=False, add_generation_prompt=False
    )
    plain = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    special = special_token_ids(tokenizer)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return sorted({i for i in ids if i in special and i not in plain})


def train_token_ids(lora: LoraSection, tokenizer, chat_template: str | None = None) -> list[int]:
    """lora.train_tokens as token ids, each checked against the tokenizer."""
    if not lora.train_tokens:
        return []
    if lora.train_tokens == "template":
        return template_tokens(tokenizer, chat_template)
    vocab = tokenizer.get_vocab()
    ids = []
    for token in lora.train_tokens:
        if token not in vocab:
            close = difflib.get_close_matches(token, list(vocab), n=1)
            raise StillError(
                f"lora.train_tokens: {token!r} is not a token of the tokenizer",
                hint=f"did you mean {close[0]!r}?" if close else "list tokens the tokenizer has",
            )
        ids.append(vocab[token])
    return ids


def lora_config(lora: LoraSection, method: str, train_tokens: list[int] | None = None):
    """PEFT's LoraConfig; `train_tokens` (ids from `train_token_ids`) train those embedding rows
    too (and a tied output head's), the rest of the embedding staying frozen."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target,
        use_rslora=lora.rslora,
        use_dora=lora.dora or method == "dora",
        modules_to_save=lora.modules_to_save or None,
        trainable_token_indices=train_tokens or None,
        task_type="CAUSAL_LM",
    )


def fused_expert_weights(model) -> dict[str, int]:
    """A mixture of experts' fused weights, name -> size: 3-D parameters ([experts, out, in],
    e.g. transformers 5's Qwen3MoeExperts.gate_up_proj) that are no nn.Linear, so `all-linear`
    reaches them only where PEFT maps them to `target_parameters`."""
    return {
        f"{name}.{parameter_name}" if name else parameter_name: parameter.numel()
        for name, module in model.named_modules()
        if not isinstance(module, torch.nn.modules.conv._ConvNd)
        for parameter_name, parameter in module.named_parameters(recurse=False)
        if parameter.dim() == 3
    }


def _adapted_parameters(model) -> set[str]:
    """The parameters PEFT's ParamWrappers adapt, named as in the unwrapped model."""
    names = set()
    for name, module in model.get_base_model().named_modules():
        parameter_name = getattr(module, "parameter_name", None)
        if parameter_name and hasattr(module, "lora_A"):
            path = [part for part in name.split(".") if part != "base_layer"]
            names.add(".".join([*path, parameter_name]))
    return names


def _expert_summary(model, experts: dict[str, int]) -> str:
    patterns = dict.fromkeys(re.sub(r"\.\d+\.", ".*.", name) for name in experts)
    share = 100 * sum(experts.values()) / sum(p.numel() for p in model.parameters())
    names = ", ".join(patterns)
    return f"{type(model).__name__}'s fused expert weights ({names}: {share:.0f}% of its weights)"


def add_lora(model, config):
    """`get_peft_model(model, config)`, refusing an adapter that would quietly leave a mixture
    of experts' expert weights frozen, or crash on them. `all-linear` wraps nn.Linear modules;
    fused experts are 3-D parameters, which PEFT adapts (as `target_parameters`) only for the
    model types it maps (Qwen3-MoE, Mixtral, ...; not e.g. GPT-OSS), and never with DoRA or
    dropout."""
    from peft import __version__ as peft_version
    from peft import get_peft_model

    experts = fused_expert_weights(model)
    all_linear = isinstance(config.target_modules, str) and config.target_modules == "all-linear"
    if not (experts and all_linear):
        return get_peft_model(model, config)
    summary = _expert_summary(model, experts)
    linear_only = "or name linear modules in lora.target, e.g. [q_proj, v_proj]"
    if config.use_dora:
        raise StillError(
            f"method: dora cannot adapt {summary}: PEFT has DoRA for linear layers only",
            hint=f"use method: lora with lora.dropout: 0 (it adapts them), full, {linear_only}",
        )
    if config.lora_dropout:
        raise StillError(
            f"lora.dropout: {config.lora_dropout:g} cannot apply to {summary}: PEFT adapts them "
            "without dropout",
            hint=f"set lora.dropout: 0, {linear_only}",
        )
    adapted = get_peft_model(model, config)
    if set(experts) - _adapted_parameters(adapted):
        raise StillError(
            f"lora.target: all-linear leaves {summary} without an adapter: PEFT {peft_version} "
            "does not map this model's experts",
            hint=f"use method: full, {linear_only}",
        )
    return adapted


# --------------------------------------------------------------------------- batches
def collator_for(data: DataSection, tokenizer, attention: str, *models):
    """Padded batches, or packed ones kept apart by `attention` ("position_ids" or
    "block_mask", from `still.attention.packed_attention`, which the runner calls first: it
    is the one that switches the models' attention). Pure: the models are only read."""
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    if not data.packing:
        return data_module.PaddedCollator(pad_id)
    if attention == "block_mask":
        # One 4-D mask serves every layer, so sliding-window layers would see the whole example.
        for model in models:
            window = sliding_window(model) if model is not None else None
            if window is not None and data.max_len > window:
                raise StillError(
                    f"packing with {implementation(model)} attention cannot keep this model's "
                    f"sliding window ({window} tokens) inside examples of up to data.max_len "
                    f"{data.max_len} tokens",
                    hint=f"use attn_implementation: sdpa (the default), data.max_len: {window}, "
                    "or packing: false",
                )
    # The additive mask must match the query dtype: CUDA sdpa refuses fp32 masks with bf16.
    return data_module.PackedCollator(
        pad_id, attention=attention, mask_dtype=models[0].dtype, row_tokens=data.pack_row_tokens
    )


# --------------------------------------------------------------------------- loss
def token_mean_loss(trainer: Trainer, model, loss_sum, n_tokens, num_items_in_batch):
    """A loss sum over a micro-batch's label tokens → what Trainer backpropagates: normalised by
    the label tokens of the whole accumulated step across processes (Trainer's
    `loss_is_scaled_for_ga = True` contract)."""
    return per_token_loss(
        loss_sum,
        n_tokens,
        num_items_in_batch=num_items_in_batch,
        training=model.training,
        # unset before the first step
        accumulation_steps=getattr(trainer, "current_gradient_accumulation_steps", 1),
        num_processes=trainer.accelerator.num_processes,
        average_across_devices=trainer.args.average_tokens_across_devices,
    )


def zero_stage(trainer: Trainer) -> int | None:
    if not trainer.is_deepspeed_enabled:
        return None
    return trainer.accelerator.state.deepspeed_plugin.zero_stage


# --------------------------------------------------------------------------- save + finish
def save_final(
    trainer: Trainer, tokenizer, run: RunDir, *, full: bool, chat_template: str | None = None
) -> Path:
    """The adapter (PEFT format) or the full model, with its tokenizer, in the run dir. A
    `chat_template` the run trained with (data.chat_template) is saved as the tokenizer's, so
    eval, generate and a distillation from this model render the turns it learned."""
    target = run.final_dir(full=full)
    trainer.save_model(str(target))
    if trainer.is_world_process_zero():
        if chat_template:
            tokenizer.chat_template = chat_template
        tokenizer.save_pretrained(target)
        if (target / "latest").exists():
            consolidate_zero3(trainer, target)
        umask_modes(target)  # safetensors writes its files owner-only (see still.fsutil)
    return target


def consolidate_zero3(trainer: Trainer, target: Path) -> None:
    """ZeRO-3 saves a full model as DeepSpeed shards; rewrite it as a plain HF model dir.

    DeepSpeed's own reader rebuilds the fp32 weights from the shards on this (main) process,
    so no rank needs the whole model in accelerator memory.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state_dict = get_fp32_state_dict_from_zero_checkpoint(str(target))
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.save_pretrained(target, state_dict=state_dict, safe_serialization=True)
    for leftover in [*target.glob("global_step*"), target / "latest", *target.glob("zero_to_*.py")]:
        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()


def format_summary(summary: dict) -> str:
    return ", ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()
    )


def finish_run(
    trainer: Trainer,
    recipe,
    run: RunDir,
    result,
    final_eval: dict,
    *,
    evaluate: Callable[[RunDir, list[str]], None],
    regression: Callable[[RunDir, object], dict] | None = None,
) -> dict:
    """The closing summary line, then `evaluate(run, recipe.eval_tasks)` on the saved run (main
    process), then `regression(run, recipe)` (the forgetting check, whose numbers join the
    summary), then the tracker's model artifact. The runner passes the scorers (eval's), so
    this core module needs nothing above it."""
    summary = {"train_loss": result.training_loss, **final_eval, "steps": trainer.state.global_step}
    if trainer.is_world_process_zero():
        print(f"still: done: {run.path} ({format_summary(summary)})")
        if recipe.eval_tasks or getattr(recipe, "regression_tasks", None):
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            # Training is over: the saved model loads whole here. Left set, ZeRO-3's config would
            # partition that load across ranks that have already finished.
            unset_hf_deepspeed_config()
        if recipe.eval_tasks:
            evaluate(run, recipe.eval_tasks)
        if regression is not None and getattr(recipe, "regression_tasks", None):
            summary.update(regression(run, recipe))
        finish_training_run(run, summary)  # model artifact + lineage, then the W&B run ends
    return summary
