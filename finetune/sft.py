"""Supervised fine-tuning: LoRA / DoRA / rsLoRA / QLoRA / full, on HF Trainer + PEFT.

Reads top to bottom: setup (tokenizer, data, preflight, model) → loss → train → save.
The loss is token-level cross entropy over the label mask that `still.data` built, computed
from hidden states in chunks (`still.losses`), normalised by the number of loss tokens across
accumulation steps and processes. The Trainer plumbing it shares with distillation (arguments,
collator, save and finish) is in `still/train.py`.
"""

from __future__ import annotations

import torch
from transformers import Trainer, set_seed

from eval.checks import check_recipe_tasks
from eval.regression import check_regression
from eval.run import evaluate_run
from still import data as data_module
from still import models
from still.attention import packed_attention
from still.checkpoint import reliability_callbacks, resume_checkpoint, stopped_by_signal
from still.errors import StillError
from still.losses import linear_cross_entropy
from still.preflight import meta_model, print_report
from still.recipe import FinetuneRecipe
from still.rundir import RunDir
from still.tracking import start_tracking
from still.train import (
    add_lora,
    collator_for,
    finish_run,
    lora_config,
    planned_steps,
    save_final,
    token_mean_loss,
    train_token_ids,
    training_arguments,
    zero_stage,
)


# --------------------------------------------------------------------------- setup
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


def build_model(recipe: FinetuneRecipe, tokenizer=None):
    """The base model with a fresh trainable adapter (or all weights trainable for `full`)."""
    model, _ = models.load_from_section(
        recipe.model, quantization_config=quantization_config(recipe.method), trainable_adapter=True
    )
    if recipe.method == "full":
        if hasattr(model, "peft_config"):
            raise StillError(
                "method: full cannot train on top of an adapter",
                hint="merge it first: `still merge`",
            )
        return model
    if hasattr(model, "peft_config"):
        # A run dir with an adapter as the base: keep training that adapter.
        return model
    from peft import prepare_model_for_kbit_training

    if recipe.method == "qlora":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=recipe.train.gradient_checkpointing
        )
    tokens = train_token_ids(recipe.lora, tokenizer, recipe.data.chat_template)
    return add_lora(model, lora_config(recipe.lora, recipe.method, tokens))


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
        sharded = self.is_fsdp_enabled or zero_stage(self) == 3
        # ZeRO-3 and FSDP gather the head's weight only inside its own forward; a model that
        # transforms its logits after the head (or cannot return just one position) needs its
        # own loss.
        self.loss_chunk_size = None if sharded else loss_chunk_size
        if self.loss_chunk_size and not models.logits_are_head_output(self.model):
            self.loss_chunk_size = None
            if self.is_world_process_zero():
                print(
                    "still: this model's logits are not its output head alone (e.g. "
                    "soft-capped); training with its own full-logits loss "
                    "(train.loss_chunk_size ignored)"
                )
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
            hidden,
            head.weight,
            labels[:, 1:],
            bias=getattr(head, "bias", None),
            chunk_size=self.loss_chunk_size,
        )
        loss = token_mean_loss(self, model, loss_sum, n_tokens, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss


def build_trainer(
    recipe: FinetuneRecipe,
    model,
    tokenizer,
    train_data,
    eval_data,
    args,
    callbacks,
    *,
    attention: str = "auto",
) -> Trainer:
    """The Trainer `run` trains with; `attention` is how packed examples are kept apart
    (`still.attention.packed_attention`: auto, block_mask or loop)."""
    isolation = packed_attention(model, choice=attention) if recipe.data.packing else None
    return FinetuneTrainer(
        model=model,
        args=args,
        train_dataset=train_data.dataset,
        eval_dataset=eval_data.dataset if eval_data else None,
        data_collator=collator_for(recipe.data, tokenizer, isolation, model),
        processing_class=tokenizer,
        callbacks=callbacks,
        loss_chunk_size=recipe.train.loss_chunk_size,
    )


# --------------------------------------------------------------------------- check, train, save
def check(recipe: FinetuneRecipe) -> None:
    """`still check`: prepare the data and describe the run without loading any weights."""
    check_recipe_tasks(recipe)  # what the end-of-run eval will read, checked now
    tokenizer = models.load_tokenizer(
        recipe.model.ref, trust_remote_code=recipe.model.trust_remote_code
    )
    train = data_module.prepare(recipe.data, tokenizer, split="train")
    eval_data = data_module.prepare(recipe.data, tokenizer, split="eval")
    adapter = (
        None
        if recipe.method == "full"
        else lora_config(
            recipe.lora,
            recipe.method,
            train_token_ids(recipe.lora, tokenizer, recipe.data.chat_template),
        )
    )
    model = meta_model(recipe.model, adapter=adapter)
    print_report(
        recipe,
        tokenizer,
        train,
        eval_data,
        model=model,
        total_steps=planned_steps(recipe, len(train.dataset)),
    )


def run(
    recipe: FinetuneRecipe, run: RunDir, *, resume: bool = False, attention: str = "auto"
) -> dict:
    check_recipe_tasks(recipe)  # a task that cannot be scored fails now, not after training
    tokenizer = models.load_tokenizer(
        recipe.model.ref, trust_remote_code=recipe.model.trust_remote_code
    )
    train_data = data_module.prepare(recipe.data, tokenizer, split="train")
    eval_data = data_module.prepare(recipe.data, tokenizer, split="eval")
    # Trainer seeds only when it is created; the adapter's random init happens before that.
    set_seed(recipe.train.seed)
    model = build_model(recipe, tokenizer)
    total_steps = planned_steps(recipe, len(train_data.dataset))
    print_report(recipe, tokenizer, train_data, eval_data, model=model, total_steps=total_steps)

    lineage = run.write_lineage(
        recipe, base=models.absolute_ref(recipe.model.ref), method=recipe.method
    )
    tracking = start_tracking(recipe, run, job_type="finetune", lineage=lineage)
    args = training_arguments(
        recipe,
        run,
        has_eval=eval_data is not None,
        total_steps=total_steps,
        report=tracking.report_to,
    )
    trainer = build_trainer(
        recipe,
        model,
        tokenizer,
        train_data,
        eval_data,
        args,
        [*tracking.callbacks, *reliability_callbacks(recipe.train)],
        attention=attention,
    )
    checkpoint = resume_checkpoint(run) if resume else None
    result = trainer.train(resume_from_checkpoint=checkpoint)
    if stopped_by_signal(trainer, recipe):  # saved a complete checkpoint; --resume continues
        return {
            "summary": {"steps": trainer.state.global_step, "stopped": True},
            "lineage": lineage,
        }
    final_eval = trainer.evaluate() if eval_data is not None else {}
    save_final(
        trainer,
        tokenizer,
        run,
        full=recipe.method == "full",
        chat_template=recipe.data.chat_template,
    )
    summary = finish_run(
        trainer, recipe, run, result, final_eval, evaluate=evaluate_run, regression=check_regression
    )
    return {"summary": summary, "lineage": lineage}
