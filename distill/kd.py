"""Logit distillation: a frozen teacher's token distributions taught to a (smaller) student.

Reads top to bottom: config → setup (teacher, tokenizer check, student, data) → loss → train
→ save. The loss never materialises [tokens × vocab] logits for the whole batch: both models
return their final hidden states and `fused_kd_loss` applies each lm_head chunk by chunk.
Same data pipeline and masks as fine-tuning: KD and CE count only loss-carrying tokens.
"""

from __future__ import annotations

import random

import torch
from transformers import Trainer, set_seed

from distill import xtok
from distill.batches import prompts_and_budgets, with_example_ids
from distill.cache import TeacherCache
from distill.chooser import print_candidates, probe
from distill.losses import FusedKDLoss, cached_kd_loss, fused_kd_loss, kd_loss
from distill.retention import evaluate_with_retention
from distill.teacher import (
    load_teacher,
    place_teacher,
    refuse_transformed_logits,
    shared_vocab_size,
)
from distill.width import pruned_student
from eval.checks import check_recipe_tasks
from eval.regression import check_regression
from still import data as data_module
from still import models
from still.attention import packed_attention
from still.checkpoint import reliability_callbacks, resume_checkpoint, stopped_by_signal
from still.errors import StillError
from still.launch import is_main_process
from still.losses import IGNORE_INDEX
from still.preflight import print_report
from still.recipe import DistillRecipe
from still.rundir import RunDir
from still.tracking import start_tracking
from still.train import (
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
def recipe_student(recipe: DistillRecipe, teacher, tokenizer, calibration):
    """A model reference, or a student carved from the teacher's layers; then LoRA or full."""
    spec = recipe.student
    if spec.init is not None:
        student, report = pruned_student(teacher, spec.init, calibration)
        student_tokenizer = tokenizer
        if is_main_process():
            print(f"still: {report.summary()}")
    else:
        student, student_tokenizer = models.load_from_section(spec)
        report = None
    if recipe.method == "lora":
        from peft import get_peft_model

        tokens = train_token_ids(recipe.lora, student_tokenizer, recipe.data.chat_template)
        student = get_peft_model(student, lora_config(recipe.lora, "lora", tokens))
    return student, student_tokenizer, report


def calibration_batches(recipe: DistillRecipe, train_data):
    """A few training examples for layer-importance scores (only when they are needed)."""
    init = recipe.student.init
    if init is None or (init.strategy != "importance" and init.prune == "depth"):
        return None
    count = min(init.calibration_samples, len(train_data.dataset))
    rows = train_data.dataset.select(range(count))
    return [{"input_ids": torch.tensor([row["input_ids"]])} for row in rows]


def _number_examples(*splits) -> None:
    """An example_id column: the row of each example in the teacher cache's split."""
    for prepared in splits:
        if prepared is not None:
            ids = list(range(len(prepared.dataset)))
            prepared.dataset = prepared.dataset.add_column("example_id", ids)


def open_caches(recipe: DistillRecipe, tokenizer, cross=None) -> dict:
    """The teacher cache's splits this recipe trains and evaluates on, checked to fit it
    (across tokenizers, also the pair, the teacher's template and the vocabulary map)."""
    caches = {"train": TeacherCache.open(recipe, tokenizer, "train", cross)}
    if recipe.data.eval is not None:
        caches["eval"] = TeacherCache.open(recipe, tokenizer, "eval", cross)
    return caches


# --------------------------------------------------------------------------- loss
class KDTrainer(Trainer):
    """Trainer whose loss is KD (+ optional hard-label CE) against a frozen teacher."""

    # compute_loss normalises by the global number of loss tokens itself.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        *args,
        teacher,
        distill,
        vocab_size: int,
        loss_chunk_size: int,
        teacher_placement: str = "auto",
        teacher_cache: dict | None = None,
        cross_tokenizer: xtok.CrossTokenizer | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.cross_tokenizer = cross_tokenizer  # None: one vocabulary, the fused loss below
        self.teacher_cache = teacher_cache  # split -> TeacherCache, instead of a teacher model
        if teacher_cache is not None and zero_stage(self) == 3:
            raise StillError(
                "distill.teacher_cache does not work under zero3 yet (the student's head "
                "is partitioned)",
                hint="use strategy ddp or zero2 with a teacher cache",
            )
        self.teacher = None if teacher is None else self._place_teacher(teacher, teacher_placement)
        # The same draws on every rank, so all ranks generate (or not) at the same step.
        self._on_policy_draws = random.Random(self.args.seed)
        self._on_policy_counts = {"batches": 0, "on_policy": 0}
        self.distill = distill
        self.loss_chunk_size = loss_chunk_size
        self.vocab_size = vocab_size
        self._component_sums = {"kd": 0.0, "ce": 0.0, "tokens": 0.0}

    def _place_teacher(self, teacher, choice: str):
        """A copy per process, or sharded like the student under ZeRO-3 / FSDP."""
        stage = zero_stage(self)
        if stage is not None:
            strategy = f"zero{stage}"
        elif self.is_fsdp_enabled:
            strategy = "fsdp"
        else:
            strategy = "ddp" if self.accelerator.num_processes > 1 else "single"
        state = self.accelerator.state
        return place_teacher(
            teacher,
            choice,
            strategy=strategy,
            device=self.args.device,
            num_processes=self.accelerator.num_processes,
            deepspeed_plugin=state.deepspeed_plugin if stage is not None else None,
            fsdp_plugin=state.fsdp_plugin if self.is_fsdp_enabled else None,
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        inputs.pop("length", None)
        inputs.pop("skip_logits", None)  # Trainer's hint to Liger's loss, which is not used here
        example_ids = inputs.pop("example_ids", None)
        examples = inputs.pop("examples", None)  # across tokenizers: to re-render samples
        if model.training and self._draw_on_policy():
            inputs, labels = self._student_answers(model, inputs, labels, examples)
            # Trainer counted the dataset answers' tokens; these answers have their own count
            num_items_in_batch = None
        teacher_inputs = {key: inputs.pop(key) for key in xtok.BATCH_KEYS if key in inputs}
        # logits_to_keep=1: the models skip their own full-vocab projection; we do it chunked.
        student_out = model(**inputs, logits_to_keep=1, output_hidden_states=True)
        if self.teacher_cache is not None:
            out = self._cached_loss(model, student_out, labels, example_ids)
            return self._normalise(out, model, num_items_in_batch, student_out, return_outputs)
        if self.cross_tokenizer is not None:
            out = xtok.cross_tokenizer_loss(self, model, student_out, labels, teacher_inputs)
            return self._normalise(out, model, num_items_in_batch, student_out, return_outputs)
        with torch.no_grad():
            teacher_out = self.teacher(**inputs, logits_to_keep=1, output_hidden_states=True)
        # position i predicts token i + 1
        student_hidden = student_out.hidden_states[-1][:, :-1].reshape(
            -1, student_out.hidden_states[-1].shape[-1]
        )
        teacher_hidden = teacher_out.hidden_states[-1][:, :-1].reshape(
            -1, teacher_out.hidden_states[-1].shape[-1]
        )
        target = labels[:, 1:].reshape(-1)
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        teacher_head = getattr(self.teacher, "module", self.teacher).get_output_embeddings()
        if head.weight.numel() == 0 or teacher_head.weight.numel() == 0:
            # ZeRO-3 partitions the heads; only a call of the module gathers them.
            out = self._unfused_loss(head, teacher_head, student_hidden, teacher_hidden, target)
        else:
            out = self._fused_loss(head, teacher_head, student_hidden, teacher_hidden, target)
        return self._normalise(out, model, num_items_in_batch, student_out, return_outputs)

    def _draw_on_policy(self) -> bool:
        self._on_policy_counts["batches"] += 1
        ratio = self.distill.on_policy_ratio
        chosen = ratio > 0 and self._on_policy_draws.random() < ratio
        self._on_policy_counts["on_policy"] += chosen
        return chosen

    def _student_answers(self, model, inputs, labels, examples=None):
        """GKD: the batch's prompts answered by the student itself; the teacher then scores
        those answers token by token. Loss on the sampled tokens (and the end-of-turn token)."""
        student = self.accelerator.unwrap_model(model)
        tokenizer = self.processing_class
        prompts, budgets = prompts_and_budgets(inputs, labels)
        limit = self.distill.on_policy_max_new_tokens
        budgets = [min(b, limit) if limit else b for b in budgets]
        pad = models.pad_token_id(tokenizer)
        ids, mask = data_module.left_padded(prompts, pad)
        width = ids.shape[1]
        device = inputs["input_ids"].device
        was_training = student.training
        student.eval()
        with torch.no_grad():
            generated = student.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max(budgets),
                do_sample=True,
                temperature=self.distill.on_policy_temperature,
                top_k=0,
                top_p=1.0,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
                synced_gpus=zero_stage(self) == 3,
            )[:, width:].tolist()
        student.train(was_training)
        features = []
        for prompt, budget, sample in zip(prompts, budgets, generated):
            sample = sample[:budget]
            if tokenizer.eos_token_id in sample:  # up to and including the end of the turn
                sample = sample[: sample.index(tokenizer.eos_token_id) + 1]
            features.append(
                {"input_ids": prompt + sample, "labels": [IGNORE_INDEX] * len(prompt) + sample}
            )
        if self.cross_tokenizer is not None:  # both models re-tokenize the samples' text
            features = xtok.sample_features(self.cross_tokenizer, examples, features, prompts)
        batch = self._prepare_inputs(self.data_collator(features))
        labels = batch.pop("labels")
        batch.pop("example_ids", None)
        return batch, labels

    def _normalise(self, out: FusedKDLoss, model, num_items_in_batch, student_out, return_outputs):
        """Loss sums → the loss Trainer backpropagates, normalised by the global token count."""
        loss = token_mean_loss(self, model, out.loss, out.n_tokens, num_items_in_batch)
        if model.training:
            self._component_sums["kd"] += float(out.kd_sum)
            self._component_sums["ce"] += float(out.ce_sum)
            self._component_sums["tokens"] += float(out.n_tokens)
        return (loss, student_out) if return_outputs else loss

    def _cached_loss(self, model, student_out, labels, example_ids) -> FusedKDLoss:
        """KD against the teacher cache's rows for this batch's examples (see distill/cache.py)."""
        cache = self.teacher_cache["train" if model.training else "eval"]
        hidden = student_out.hidden_states[-1][:, :-1]
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        d = self.distill
        if self.cross_tokenizer is not None:
            return xtok.cached_cross_tokenizer_loss(self, head, hidden, labels, cache, example_ids)
        log_probs, ids, rest_log = cache.rows(example_ids.tolist())
        return cached_kd_loss(
            hidden.reshape(-1, hidden.shape[-1]),
            head.weight,
            log_probs,
            ids,
            rest_log,
            labels[:, 1:].reshape(-1),
            divergence=d.loss,
            temperature=d.temperature,
            beta=d.beta,
            alpha=d.alpha,
            kd_weight=d.kd_weight,
            ce_weight=d.ce_weight,
            vocab_size=self.vocab_size,
            chunk_size=self.loss_chunk_size,
            student_head_bias=getattr(head, "bias", None),
        )

    def _fused_loss(
        self, head, teacher_head, student_hidden, teacher_hidden, target
    ) -> FusedKDLoss:
        d = self.distill
        return fused_kd_loss(
            student_hidden,
            head.weight,
            teacher_hidden.to(student_hidden.dtype),
            teacher_head.weight.to(head.weight.dtype),
            target,
            divergence=d.loss,
            temperature=d.temperature,
            beta=d.beta,
            alpha=d.alpha,
            kd_weight=d.kd_weight,
            ce_weight=d.ce_weight,
            vocab_size=self.vocab_size,
            chunk_size=self.loss_chunk_size,
            student_head_bias=getattr(head, "bias", None),
            teacher_head_bias=getattr(teacher_head, "bias", None),
        )

    def _unfused_loss(
        self, head, teacher_head, student_hidden, teacher_hidden, target
    ) -> FusedKDLoss:
        """Same sums from full logits: costs [tokens x vocab] memory, used only under ZeRO-3."""
        d, vocab = self.distill, self.vocab_size
        student_logits = head(student_hidden)[:, :vocab].float()
        with torch.no_grad():
            teacher_logits = teacher_head(teacher_hidden)[:, :vocab].float()
        mask = target != IGNORE_INDEX
        kd_sum = kd_loss(
            student_logits,
            teacher_logits,
            mask,
            divergence=d.loss,
            temperature=d.temperature,
            beta=d.beta,
            alpha=d.alpha,
            reduction="sum",
        )
        ce_sum = torch.nn.functional.cross_entropy(
            student_logits, target, ignore_index=IGNORE_INDEX, reduction="sum"
        )
        loss = d.kd_weight * kd_sum + d.ce_weight * ce_sum
        return FusedKDLoss(loss, kd_sum.detach(), ce_sum.detach(), mask.sum())

    def log(self, logs, *args, **kwargs):
        sums = self._component_sums
        if sums["tokens"] and "loss" in logs:
            logs["kd_loss"] = sums["kd"] / sums["tokens"]
            logs["ce_loss"] = sums["ce"] / sums["tokens"]
            if self.distill.on_policy_ratio > 0:
                counts = self._on_policy_counts
                logs["on_policy_fraction"] = counts["on_policy"] / max(counts["batches"], 1)
                self._on_policy_counts = {"batches": 0, "on_policy": 0}
            self._component_sums = {"kd": 0.0, "ce": 0.0, "tokens": 0.0}
        super().log(logs, *args, **kwargs)


# --------------------------------------------------------------------------- check, train, save
def data_and_student(recipe: DistillRecipe, teacher, tokenizer, mode, student_tokenizer):
    """Prepared splits, the student, its carve report, and the cross-tokenizer setup (None with
    one vocabulary: then the data is the teacher's tokenizer's, exactly as before)."""
    if mode is None:
        train_data = data_module.prepare(recipe.data, tokenizer, split="train")
        eval_data = data_module.prepare(recipe.data, tokenizer, split="eval")
        student, student_tokenizer, carve = recipe_student(
            recipe, teacher, tokenizer, calibration_batches(recipe, train_data)
        )
        return train_data, eval_data, student, student_tokenizer, carve, None
    # Across tokenizers the student's tokenizer and template make the examples and loss mask.
    train_data = data_module.prepare(recipe.data, student_tokenizer, split="train")
    eval_data = data_module.prepare(recipe.data, student_tokenizer, split="eval")
    student, _, carve = recipe_student(recipe, teacher, student_tokenizer, None)
    cross = xtok.build(recipe, mode, teacher, tokenizer, student, student_tokenizer)
    for split, prepared in (("train", train_data), ("eval", eval_data)):
        if prepared is not None:
            xtok.add_teacher_columns(recipe.data, split, prepared, cross)
    xtok.require_alignment(cross, recipe)
    if is_main_process():
        print(f"still: {cross.summary()}")
    return train_data, eval_data, student, student_tokenizer, carve, cross


def check(recipe: DistillRecipe, probe_steps: int | None = None) -> None:
    """`still check` for distill: data report, the student that would be built, estimates;
    across tokenizers also the vocabulary overlap and the aligned and exact-match shares.
    With `probe_steps`, each student candidate also trains that many steps (chooser.probe)."""
    check_recipe_tasks(recipe)  # the eval_tasks the run ends with, before any model loads
    teacher, tokenizer = load_teacher(recipe)
    mode, student_tokenizer = xtok.cross_tokenizer_mode(recipe, tokenizer)
    train_data, eval_data, student, student_tokenizer, _, cross = data_and_student(
        recipe, teacher, tokenizer, mode, student_tokenizer
    )
    if cross is None:
        shared_vocab_size(tokenizer, student_tokenizer, teacher, student)
    total_steps = planned_steps(recipe, len(train_data.dataset))
    print_report(
        recipe,
        student_tokenizer if cross is not None else tokenizer,
        train_data,
        eval_data,
        model=student,
        total_steps=total_steps,
    )
    print_candidates(recipe, teacher, student, train_data, total_steps)
    if probe_steps:
        print("\n".join(probe(recipe, teacher, student, probe_steps, run)))


def _teacher_and_tokenizer(recipe: DistillRecipe):
    if recipe.distill.teacher_cache is not None and recipe.student.init is None:
        # the teacher's weights are not needed at all
        return None, models.load_tokenizer(
            recipe.teacher.ref, trust_remote_code=recipe.teacher.trust_remote_code
        )
    return load_teacher(recipe)


def _lineage(recipe: DistillRecipe, run: RunDir, carve, cross=None) -> dict:
    student_ref = models.absolute_ref(recipe.student.ref) if recipe.student.ref else None
    return run.write_lineage(
        recipe,
        teacher=models.absolute_ref(recipe.teacher.ref),
        student=student_ref,
        base=student_ref if recipe.method == "lora" else None,
        carved=None
        if carve is None
        else {"kept_layers": carve.kept_layers, "param_fraction": carve.param_fraction},
        method=recipe.method,
        **({} if cross is None else {"cross_tokenizer": cross.lineage()}),
    )


def run(
    recipe: DistillRecipe, run: RunDir, *, resume: bool = False, attention: str = "auto"
) -> dict:
    # Trainer seeds only when it is created; carving and adapter init happen before that.
    check_recipe_tasks(recipe)
    set_seed(recipe.train.seed)
    cached = recipe.distill.teacher_cache is not None
    teacher, tokenizer = _teacher_and_tokenizer(recipe)
    mode, student_tokenizer = xtok.cross_tokenizer_mode(recipe, tokenizer)
    # one vocabulary: a cache that does not fit fails before the data and the student load
    caches = open_caches(recipe, tokenizer) if cached and mode is None else None
    train_data, eval_data, student, student_tokenizer, carve, cross = data_and_student(
        recipe, teacher, tokenizer, mode, student_tokenizer
    )
    if cached:
        caches = caches or open_caches(recipe, tokenizer, cross)  # across: needs the alignment
        teacher = None  # carved from it if asked; the loss reads the cache
        _number_examples(train_data, eval_data)
    if cross is None:
        vocab_size = shared_vocab_size(tokenizer, student_tokenizer, teacher, student)
    else:  # the student's tokenizer is the one its data, collator and saved model use
        vocab_size, tokenizer = cross.mapping.student_vocab, student_tokenizer
    refuse_transformed_logits(teacher=teacher, student=student)
    total_steps = planned_steps(recipe, len(train_data.dataset))
    print_report(recipe, tokenizer, train_data, eval_data, model=student, total_steps=total_steps)

    lineage = _lineage(recipe, run, carve, cross)
    tracking = start_tracking(recipe, run, job_type="distill", lineage=lineage)
    # The teacher reads its own padded batches across tokenizers: only the student is packed.
    packed_teacher = teacher if cross is None else None
    isolation = (
        packed_attention(student, packed_teacher, choice=attention) if recipe.data.packing else None
    )
    collator = collator_for(recipe.data, tokenizer, isolation, student, packed_teacher)
    if cross is not None:
        collator = xtok.with_teacher_inputs(collator, models.pad_token_id(cross.teacher_tokenizer))
    args = training_arguments(
        recipe,
        run,
        has_eval=eval_data is not None,
        total_steps=total_steps,
        report=tracking.report_to,
    )
    trainer = KDTrainer(
        model=student,
        args=args,
        train_dataset=train_data.dataset,
        eval_dataset=eval_data.dataset if eval_data else None,
        data_collator=with_example_ids(collator) if cached else collator,
        processing_class=tokenizer,
        callbacks=[*tracking.callbacks, *reliability_callbacks(recipe.train)],
        teacher=teacher,
        distill=recipe.distill,
        loss_chunk_size=recipe.train.loss_chunk_size,
        vocab_size=vocab_size,
        teacher_placement=recipe.distributed.teacher,
        teacher_cache=caches,
        cross_tokenizer=cross,
    )
    checkpoint = resume_checkpoint(run) if resume else None
    result = trainer.train(resume_from_checkpoint=checkpoint)
    if stopped_by_signal(trainer, recipe):  # saved a complete checkpoint; --resume continues
        return {
            "summary": {"steps": trainer.state.global_step, "stopped": True},
            "lineage": lineage,
        }
    final_eval = trainer.evaluate() if eval_data is not None else {}
    # A carved student has no saved base for an adapter to point at: save it merged.
    if recipe.method == "lora" and carve is not None:
        trainer.model = trainer.model.merge_and_unload()
    save_final(
        trainer,
        tokenizer,
        run,
        full=recipe.method == "full" or carve is not None,
        chat_template=recipe.data.chat_template,  # the student's
    )
    evaluate = evaluate_with_retention(recipe.teacher.ref)
    summary = finish_run(
        trainer, recipe, run, result, final_eval, evaluate=evaluate, regression=check_regression
    )
    return {"summary": summary, "lineage": lineage}
