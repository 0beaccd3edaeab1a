"""Supervised fine-tuning: LoRA / DoRA / rsLoRA / QLoRA / full, on HF Trainer + PEFT.

Reads top to bottom: config → setup (tokenizer, data, preflight, model) → train → save.
The loss is token-level cross entropy over the label mask that `still.data` built, computed
from hidden states in chunks (`still.losses`), normalised by the number of loss tokens across
accumulation steps and processes.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments, set_seed

from still import data as data_module
from still import models
from still.attention import implementation, packed_attention, sliding_window
from still.errors import StillError
from still.losses import linear_cross_entropy, per_token_loss
from still.preflight import print_report
from still.checkpoint import reliability_callbacks, resume_checkpoint, stopped_by_signal
from still.rundir import absolute_ref, format_summary, write_lineage
from still.sections import DataSection, FinetuneRecipe, LoraSection, TrainSection
from still.tracking import finish_training_run, start_tracking


# --------------------------------------------------------------------------- config
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
            raise StillError("train.liger_kernel: true needs a CUDA GPU; this machine has none",
                             hint="set liger_kernel: false on CPU")
        import importlib.util

        if importlib.util.find_spec("liger_kernel") is None:
            raise StillError("train.liger_kernel: true but liger-kernel is not installed",
                             hint="pip install 'still[gpu]' (or liger-kernel), or set liger_kernel: false")
    return {"torch_compile": train.torch_compile, "use_liger_kernel": train.liger_kernel}


# transformers 5.2x renamed TrainingArguments.gradient_checkpointing (the old name now warns).
CHECKPOINTING_ARGUMENT = ("activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
                          else "gradient_checkpointing")


def training_arguments(
    recipe, run_dir: Path, *, has_eval: bool, total_steps: int, report: list[str]
) -> TrainingArguments:
    train = recipe.train
    # Fractions below 1 are read by Trainer as a share of the total steps.
    save_steps = train.save_steps or 0.25
    eval_steps = train.eval_steps
    return TrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
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


# --------------------------------------------------------------------------- setup
def lora_config(lora: LoraSection, method: str):
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target,
        use_rslora=lora.rslora,
        use_dora=lora.dora or method == "dora",
        modules_to_save=lora.modules_to_save or None,
        task_type="CAUSAL_LM",
    )


def quantization_config(method: str):
    if method != "qlora":
        return None
    if not torch.cuda.is_available():
        raise StillError(
            "method: qlora needs a CUDA GPU (bitsandbytes 4-bit); this machine has none",
            hint="use method: lora on CPU",
        )
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def build_model(recipe: FinetuneRecipe):
    """The base model with a fresh trainable adapter (or all weights trainable for `full`)."""
    model, _ = models.load_from_section(
        recipe.model, quantization_config=quantization_config(recipe.method), trainable_adapter=True
    )
    if recipe.method == "full":
        if hasattr(model, "peft_config"):
            raise StillError("method: full cannot train on top of an adapter", hint="merge it first: `still merge`")
        return model
    if hasattr(model, "peft_config"):
        # A run dir with an adapter as the base: keep training that adapter.
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    if recipe.method == "qlora":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=recipe.train.gradient_checkpointing
        )
    return get_peft_model(model, lora_config(recipe.lora, recipe.method))


def collator_for(data: DataSection, tokenizer, *models):
    """Padded batches, or packed ones kept apart the way every model that reads them can.

    Packing switches sdpa decoders to packed sdpa (per-example attention, no mask) and uses
    position_ids alone for them and flash-attention; other attention gets the block-diagonal
    mask (see `still.attention` and DESIGN.md, measured traps).
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if not data.packing:
        return data_module.PaddedCollator(pad_id)
    attention = packed_attention(*models)
    if attention == "block_mask":
        # One 4-D mask serves every layer, so sliding-window layers would see the whole example.
        for model in models:
            window = sliding_window(model) if model is not None else None
            if window is not None and data.max_len > window:
                raise StillError(
                    f"packing with {implementation(model)} attention cannot keep this model's sliding window "
                    f"({window} tokens) inside examples of up to data.max_len {data.max_len} tokens",
                    hint=f"use attn_implementation: sdpa (the default), data.max_len: {window}, or packing: false")
    # The additive mask must match the query dtype: CUDA sdpa refuses fp32 masks with bf16.
    return data_module.PackedCollator(pad_id, attention=attention, mask_dtype=models[0].dtype,
                                      row_tokens=data.pack_row_tokens)


# --------------------------------------------------------------------------- loss
class FinetuneTrainer(Trainer):
    """Trainer whose loss is cross entropy from hidden states, chunked (still.losses).

    The model is asked for its last hidden states and one position of logits; the label tokens'
    rows then go through the output head a chunk at a time. The value and gradients equal the
    model's own loss; prompt positions skip the head, and [tokens × vocab] logits never exist.
    """

    # compute_loss normalises by the global number of loss tokens itself.
    loss_is_scaled_for_ga = True

    def __init__(self, *args, loss_chunk_size: int | None, **kwargs):
        super().__init__(*args, **kwargs)
        sharded = self.is_fsdp_enabled or (
            self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3)
        # ZeRO-3 and FSDP gather the head's weight only inside its own forward; a model that
        # transforms its logits after the head (or cannot return just one position) needs its
        # own loss.
        self.loss_chunk_size = None if sharded else loss_chunk_size
        if self.loss_chunk_size and not models.logits_are_head_output(self.model):
            self.loss_chunk_size = None
            if self.is_world_process_zero():
                print("still: this model's logits are not its output head alone (e.g. soft-capped); "
                      "training with its own full-logits loss (train.loss_chunk_size ignored)")
        if self.loss_chunk_size is None:
            self.loss_is_scaled_for_ga = None  # Trainer's own rule for the model's loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.loss_chunk_size is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs.pop("labels")
        inputs.pop("skip_logits", None)  # Trainer's hint to Liger's loss, which is not used here
        outputs = model(**inputs, logits_to_keep=1, output_hidden_states=True)
        hidden = outputs.hidden_states[-1][:, :-1]  # position i predicts token i + 1
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        loss_sum, n_tokens = linear_cross_entropy(
            hidden, head.weight, labels[:, 1:], bias=getattr(head, "bias", None), chunk_size=self.loss_chunk_size
        )
        loss = per_token_loss(
            loss_sum, n_tokens, num_items_in_batch=num_items_in_batch, training=model.training,
            accumulation_steps=getattr(self, "current_gradient_accumulation_steps", 1),  # unset before step 1
            num_processes=self.accelerator.num_processes,
            average_across_devices=self.args.average_tokens_across_devices,
        )
        return (loss, outputs) if return_outputs else loss


def build_trainer(recipe: FinetuneRecipe, model, tokenizer, train_data, eval_data, args, callbacks) -> Trainer:
    """The Trainer `run` trains with (the benchmarks build theirs here too)."""
    return FinetuneTrainer(
        model=model,
        args=args,
        train_dataset=train_data.dataset,
        eval_dataset=eval_data.dataset if eval_data else None,
        data_collator=collator_for(recipe.data, tokenizer, model),
        processing_class=tokenizer,
        callbacks=callbacks,
        loss_chunk_size=recipe.train.loss_chunk_size,
    )


# --------------------------------------------------------------------------- train + save
def run(recipe: FinetuneRecipe, run_dir: Path, *, resume: bool = False) -> dict:
    tokenizer = models.load_tokenizer(recipe.model.ref, trust_remote_code=recipe.model.trust_remote_code)
    train_data = data_module.prepare(recipe.data, tokenizer, split="train")
    eval_data = data_module.prepare(recipe.data, tokenizer, split="eval")
    # Trainer seeds only when it is created; the adapter's random init happens before that.
    set_seed(recipe.train.seed)
    model = build_model(recipe)
    total_steps = planned_steps(recipe, len(train_data.dataset))
    print_report(recipe, tokenizer, train_data, eval_data, model=model, total_steps=total_steps)

    lineage = write_lineage(run_dir, recipe, base=absolute_ref(recipe.model.ref), method=recipe.method)
    tracking = start_tracking(recipe, run_dir, job_type="finetune", lineage=lineage)
    args = training_arguments(
        recipe, run_dir, has_eval=eval_data is not None, total_steps=total_steps, report=tracking.report_to
    )
    trainer = build_trainer(recipe, model, tokenizer, train_data, eval_data, args,
                            [*tracking.callbacks, *reliability_callbacks(recipe.train)])
    checkpoint = resume_checkpoint(run_dir) if resume else None
    result = trainer.train(resume_from_checkpoint=checkpoint)
    if stopped_by_signal(trainer, recipe):  # saved a complete checkpoint; --resume continues
        return {"summary": {"steps": trainer.state.global_step, "stopped": True}, "lineage": lineage}
    final_eval = trainer.evaluate() if eval_data is not None else {}
    save_final(trainer, tokenizer, run_dir, full=recipe.method == "full")
    return {"summary": finish_run(trainer, recipe, run_dir, result, final_eval), "lineage": lineage}


def finish_run(trainer: Trainer, recipe, run_dir: Path, result, final_eval: dict) -> dict:
    """The closing summary line, then the recipe's eval_tasks on the saved run (main process)."""
    summary = {"train_loss": result.training_loss, **final_eval, "steps": trainer.state.global_step}
    if trainer.is_world_process_zero():
        print(f"still: done: {run_dir} ({format_summary(summary)})")
        if recipe.eval_tasks:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            from eval.run import evaluate_run

            # Training is over: the saved model loads whole here. Left set, ZeRO-3's config would
            # partition that load across ranks that have already finished.
            unset_hf_deepspeed_config()
            evaluate_run(run_dir, recipe.eval_tasks)
        finish_training_run(run_dir, summary)  # model artifact + lineage, then the W&B run ends
    return summary


def save_final(trainer: Trainer, tokenizer, run_dir: Path, *, full: bool) -> Path:
    """The adapter (PEFT format) or the full model, with its tokenizer, in the run dir."""
    target = run_dir / ("model" if full else "adapter")
    trainer.save_model(str(target))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(target)
        if (target / "latest").exists():
            consolidate_zero3(trainer, target)
    return target


def consolidate_zero3(trainer: Trainer, target: Path) -> None:
    """ZeRO-3 saves a full model as DeepSpeed shards; rewrite it as a plain HF model dir.

    DeepSpeed's own reader rebuilds the fp32 weights from the shards on this (main) process,
    so no rank needs the whole model in accelerator memory.
    """
    import shutil

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state_dict = get_fp32_state_dict_from_zero_checkpoint(str(target))
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.save_pretrained(target, state_dict=state_dict, safe_serialization=True)
    for leftover in [*target.glob("global_step*"), target / "latest", *target.glob("zero_to_*.py")]:
        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
