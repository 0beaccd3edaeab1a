"""Logit distillation: a frozen teacher's token distributions taught to a (smaller) student.

Reads top to bottom: config → setup (teacher, tokenizer check, student, data) → loss → train
→ save. The loss never materialises [tokens × vocab] logits for the whole batch: both models
return their final hidden states and `fused_kd_loss` applies each lm_head chunk by chunk.
Same data pipeline and masks as fine-tuning: KD and CE count only loss-carrying tokens.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from transformers import Trainer, set_seed

from distill.cache import TeacherCache
from distill.losses import IGNORE_INDEX, FusedKDLoss, cached_kd_loss, fused_kd_loss, kd_loss
from distill.student import carve_student
from finetune.sft import (
    collator_for,
    finish_run,
    lora_config,
    planned_steps,
    save_final,
    training_arguments,
)
from still import data as data_module
from still import launch
from still import models
from still.errors import StillError
from still.losses import per_token_loss
from still.preflight import print_report
from still.checkpoint import reliability_callbacks, resume_checkpoint, stopped_by_signal
from still.rundir import absolute_ref, is_main_process, write_lineage
from still.sections import DistillRecipe
from still.tracking import start_tracking


# --------------------------------------------------------------------------- setup
def load_teacher(recipe: DistillRecipe):
    """Frozen, eval mode, adapter merged (fp32 merge is exact enough and makes it faster)."""
    teacher, tokenizer = models.load_from_section(recipe.teacher)
    if hasattr(teacher, "merge_and_unload"):
        teacher = teacher.merge_and_unload()
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher, tokenizer


def shared_vocab_size(teacher_tokenizer, student_tokenizer, teacher, student) -> int:
    """Logit KD needs one vocabulary. Embedding rows past the tokenizer (padding) are ignored."""
    if teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise StillError(
            f"teacher and student tokenizers differ ({len(teacher_tokenizer)} vs "
            f"{len(student_tokenizer)} tokens): logit KD needs one vocabulary",
            hint="use sequence-level KD (teacher-written data + finetune) for different tokenizers",
        )
    vocab = len(teacher_tokenizer)
    # from a teacher cache, the teacher's head is the tokenizer's vocabulary as cached
    teacher_rows = vocab if teacher is None else teacher.get_output_embeddings().weight.shape[0]
    student_rows = student.get_output_embeddings().weight.shape[0]
    if min(teacher_rows, student_rows) < vocab:
        raise StillError(f"an output layer has fewer rows ({min(teacher_rows, student_rows)}) than the tokenizer ({vocab})")
    if teacher_rows != student_rows and is_main_process():
        print(f"still: vocab padding differs (teacher {teacher_rows}, student {student_rows} rows); KD uses the {vocab} real tokens")
    return vocab


def build_student(recipe: DistillRecipe, teacher, tokenizer, calibration):
    """A model reference, or a student carved from the teacher's layers; then LoRA or full."""
    spec = recipe.student
    if spec.init is not None:
        student, report = carve_student(teacher, spec.init, calibration)
        student_tokenizer = tokenizer
        if is_main_process():
            print(f"still: {report.summary()}")
    else:
        student, student_tokenizer = models.load_from_section(spec)
        report = None
    if recipe.method == "lora":
        from peft import get_peft_model

        student = get_peft_model(student, lora_config(recipe.lora, "lora"))
    return student, student_tokenizer, report


def refuse_transformed_logits(**roles) -> None:
    """The fused KD loss builds logits as head(hidden); a model that soft-caps or scales them
    after its head would be distilled against the wrong distribution. (A teacher cache stores
    the teacher's real logits, so then only the student is checked.)"""
    for role, model in roles.items():
        if model is None:
            continue
        head = model.get_output_embeddings()
        if head is not None and head.weight.numel() == 0:
            continue  # partitioned by ZeRO-3 at load: the unfused path calls the head itself
        if not models.logits_are_head_output(model):
            raise StillError(
                f"the {role}'s logits are not its output head alone (e.g. Gemma-2's soft-capping or "
                f"Cohere's scaling); the fused KD loss would distil the wrong distribution",
                hint="distil between models whose logits come straight from the head (not supported yet)",
            )


def calibration_batches(recipe: DistillRecipe, train_data):
    """A few training examples for layer-importance scores (only when they are needed)."""
    init = recipe.student.init
    if init is None or init.strategy != "importance":
        return None
    count = min(init.calibration_samples, len(train_data.dataset))
    rows = train_data.dataset.select(range(count))
    return [{"input_ids": torch.tensor([row["input_ids"]])} for row in rows]


def open_caches(recipe: DistillRecipe, tokenizer) -> dict:
    """The teacher cache's splits this recipe trains and evaluates on, checked to fit it."""
    caches = {"train": TeacherCache.open(recipe, tokenizer, "train")}
    if recipe.data.eval is not None:
        caches["eval"] = TeacherCache.open(recipe, tokenizer, "eval")
    return caches


def prompts_and_budgets(inputs: dict, labels: torch.Tensor) -> tuple[list[list[int]], list[int]]:
    """Each example's prompt (its tokens before the first trained one) and how many tokens its
    dataset answer had, from a padded [B, L] batch or a packed [1, N] one (position_ids)."""
    input_ids = inputs["input_ids"]
    if "position_ids" in inputs:  # packed rows: examples restart at position 0
        rows = []
        for row in range(input_ids.shape[0]):
            starts = (inputs["position_ids"][row] == 0).nonzero().flatten().tolist() + [input_ids.shape[1]]
            rows += [(input_ids[row, a:b], labels[row, a:b]) for a, b in zip(starts, starts[1:])]
    else:
        lengths = inputs["attention_mask"].sum(-1).tolist() if "attention_mask" in inputs else None
        rows = [(input_ids[i, : lengths[i] if lengths else None], labels[i, : lengths[i] if lengths else None])
                for i in range(input_ids.shape[0])]
    prompts, budgets = [], []
    for ids, example_labels in rows:
        trained = (example_labels[1:] != IGNORE_INDEX).nonzero().flatten() + 1
        first = int(trained[0]) if len(trained) else len(ids)
        end = int(trained[-1]) + 1 if len(trained) else len(ids)  # a row's padding is not the answer
        prompts.append(ids[:first].tolist())
        budgets.append(max(1, end - first))
    return prompts, budgets


def with_example_ids(collator):
    """A collator that also hands the batch's dataset indices on (to find cached teacher rows)."""

    def collate(features: list[dict]) -> dict:
        batch = collator([{k: v for k, v in f.items() if k != "example_id"} for f in features])
        batch["example_ids"] = torch.tensor([f["example_id"] for f in features])
        return batch

    return collate


# --------------------------------------------------------------------------- loss
class KDTrainer(Trainer):
    """Trainer whose loss is KD (+ optional hard-label CE) against a frozen teacher."""

    # compute_loss normalises by the global number of loss tokens itself.
    loss_is_scaled_for_ga = True

    def __init__(self, *args, teacher, distill, vocab_size: int, teacher_placement: str = "auto",
                 teacher_cache: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher_cache = teacher_cache  # split -> TeacherCache, instead of a teacher model
        if teacher_cache is not None and self.is_deepspeed_enabled and \
                self.accelerator.state.deepspeed_plugin.zero_stage == 3:
            raise StillError("distill.teacher_cache does not work under zero3 yet (the student's head "
                             "is partitioned)", hint="use strategy ddp or zero2 with a teacher cache")
        self.teacher = None if teacher is None else self._place_teacher(teacher, teacher_placement)
        # The same draws on every rank, so all ranks generate (or not) at the same step.
        self._on_policy_draws = random.Random(self.args.seed)
        self._on_policy_counts = {"batches": 0, "on_policy": 0}
        self.distill = distill
        self.vocab_size = vocab_size
        self._component_sums = {"kd": 0.0, "ce": 0.0, "tokens": 0.0}

    def _place_teacher(self, teacher, choice: str):
        """A copy per process, or sharded like the student under ZeRO-3 / FSDP (see launch.py)."""
        if self.is_deepspeed_enabled:
            stage = self.accelerator.state.deepspeed_plugin.zero_stage
            strategy = f"zero{stage}"
        else:
            strategy = "fsdp" if self.is_fsdp_enabled else ("ddp" if self.accelerator.num_processes > 1 else "single")
        teacher_bytes = sum(p.numel() * p.element_size() for p in teacher.parameters())
        device_bytes = launch.device_memory_bytes(self.args.device)
        placement = launch.teacher_placement(choice, strategy, teacher_bytes, device_bytes)
        if strategy in ("zero3", "fsdp") and is_main_process():
            done = {"replicate": "replicated", "shard": "sharded"}[placement]
            print(f"still: teacher ({launch.describe_bytes(teacher_bytes)} of weights) {done} "
                  f"across {self.accelerator.num_processes} process(es) "
                  f"[{launch.describe_bytes(device_bytes)} per device; distributed.teacher: {choice}]")
        if placement == "replicate":
            return teacher.to(self.args.device)
        if strategy == "zero3":
            return launch.shard_teacher_deepspeed(teacher, self.accelerator.state.deepspeed_plugin)
        return launch.shard_teacher_fsdp(teacher, self.args.device, self.accelerator.state.fsdp_plugin)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        inputs.pop("length", None)
        inputs.pop("skip_logits", None)  # Trainer's hint to Liger's loss, which is not used here
        example_ids = inputs.pop("example_ids", None)
        if model.training and self._draw_on_policy():
            inputs, labels = self._student_answers(model, inputs, labels)
            # Trainer counted the dataset answers' tokens; these answers have their own count
            num_items_in_batch = None
        # logits_to_keep=1: the models skip their own full-vocab projection; we do it chunked.
        student_out = model(**inputs, logits_to_keep=1, output_hidden_states=True)
        if self.teacher_cache is not None:
            out = self._cached_loss(model, student_out, labels, example_ids)
            return self._normalise(out, model, num_items_in_batch, student_out, return_outputs)
        with torch.no_grad():
            teacher_out = self.teacher(**inputs, logits_to_keep=1, output_hidden_states=True)
        # position i predicts token i + 1
        student_hidden = student_out.hidden_states[-1][:, :-1].reshape(-1, student_out.hidden_states[-1].shape[-1])
        teacher_hidden = teacher_out.hidden_states[-1][:, :-1].reshape(-1, teacher_out.hidden_states[-1].shape[-1])
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

    def _student_answers(self, model, inputs, labels):
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
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max(budgets), do_sample=True,
                temperature=self.distill.on_policy_temperature, top_k=0, top_p=1.0,
                pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                synced_gpus=self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3,
            )[:, width:].tolist()
        student.train(was_training)
        features = []
        for prompt, budget, sample in zip(prompts, budgets, generated):
            sample = sample[:budget]
            if tokenizer.eos_token_id in sample:  # up to and including the end of the turn
                sample = sample[: sample.index(tokenizer.eos_token_id) + 1]
            features.append({"input_ids": prompt + sample, "labels": [IGNORE_INDEX] * len(prompt) + sample})
        batch = self._prepare_inputs(self.data_collator(features))
        labels = batch.pop("labels")
        batch.pop("example_ids", None)
        return batch, labels

    def _normalise(self, out: FusedKDLoss, model, num_items_in_batch, student_out, return_outputs):
        """Loss sums → the loss Trainer backpropagates, normalised by the global token count."""
        loss = per_token_loss(
            out.loss, out.n_tokens, num_items_in_batch=num_items_in_batch, training=model.training,
            accumulation_steps=getattr(self, "current_gradient_accumulation_steps", 1),  # unset before step 1
            num_processes=self.accelerator.num_processes,
            average_across_devices=self.args.average_tokens_across_devices,
        )
        if model.training:
            self._component_sums["kd"] += float(out.kd_sum)
            self._component_sums["ce"] += float(out.ce_sum)
            self._component_sums["tokens"] += float(out.n_tokens)
        return (loss, student_out) if return_outputs else loss

    def _cached_loss(self, model, student_out, labels, example_ids) -> FusedKDLoss:
        """KD against the teacher cache's rows for this batch's examples (see distill/cache.py)."""
        cache = self.teacher_cache["train" if model.training else "eval"]
        log_probs, ids, rest_log = cache.rows(example_ids.tolist())
        hidden = student_out.hidden_states[-1][:, :-1]
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        d = self.distill
        return cached_kd_loss(
            hidden.reshape(-1, hidden.shape[-1]), head.weight, log_probs, ids, rest_log,
            labels[:, 1:].reshape(-1), divergence=d.loss, temperature=d.temperature, beta=d.beta,
            alpha=d.alpha, kd_weight=d.kd_weight, ce_weight=d.ce_weight, vocab_size=self.vocab_size,
            chunk_size=d.chunk_size, student_head_bias=getattr(head, "bias", None),
        )

    def _fused_loss(self, head, teacher_head, student_hidden, teacher_hidden, target) -> FusedKDLoss:
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
            chunk_size=d.chunk_size,
            student_head_bias=getattr(head, "bias", None),
            teacher_head_bias=getattr(teacher_head, "bias", None),
        )

    def _unfused_loss(self, head, teacher_head, student_hidden, teacher_hidden, target) -> FusedKDLoss:
        """Same sums from full logits: costs [tokens x vocab] memory, used only under ZeRO-3."""
        d, vocab = self.distill, self.vocab_size
        student_logits = head(student_hidden)[:, :vocab].float()
        with torch.no_grad():
            teacher_logits = teacher_head(teacher_hidden)[:, :vocab].float()
        mask = target != -100
        kd_sum = kd_loss(
            student_logits, teacher_logits, mask, divergence=d.loss, temperature=d.temperature,
            beta=d.beta, alpha=d.alpha, reduction="sum",
        )
        ce_sum = torch.nn.functional.cross_entropy(student_logits, target, ignore_index=-100, reduction="sum")
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


# --------------------------------------------------------------------------- train + save
def preflight(recipe: DistillRecipe) -> None:
    """`still check` for distill: data report, the student that would be built, estimates."""
    teacher, tokenizer = load_teacher(recipe)
    train_data = data_module.prepare(recipe.data, tokenizer, split="train")
    eval_data = data_module.prepare(recipe.data, tokenizer, split="eval")
    student, student_tokenizer, _ = build_student(recipe, teacher, tokenizer, calibration_batches(recipe, train_data))
    shared_vocab_size(tokenizer, student_tokenizer, teacher, student)
    print_report(recipe, tokenizer, train_data, eval_data, model=student, total_steps=planned_steps(recipe, len(train_data.dataset)))


def run(recipe: DistillRecipe, run_dir: Path, *, resume: bool = False) -> dict:
    # Trainer seeds only when it is created; carving and adapter init happen before that.
    set_seed(recipe.train.seed)
    cached = recipe.distill.teacher_cache is not None
    if cached and recipe.student.init is None:  # the teacher's weights are not needed at all
        teacher = None
        tokenizer = models.load_tokenizer(recipe.teacher.ref, trust_remote_code=recipe.teacher.trust_remote_code)
    else:
        teacher, tokenizer = load_teacher(recipe)
    caches = open_caches(recipe, tokenizer) if cached else None
    train_data = data_module.prepare(recipe.data, tokenizer, split="train")
    eval_data = data_module.prepare(recipe.data, tokenizer, split="eval")
    student, student_tokenizer, carve = build_student(recipe, teacher, tokenizer, calibration_batches(recipe, train_data))
    if cached:
        teacher = None  # carved from it if asked; the loss reads the cache
        for prepared in (train_data, eval_data):
            if prepared is not None:
                prepared.dataset = prepared.dataset.add_column("example_id", list(range(len(prepared.dataset))))
    vocab_size = shared_vocab_size(tokenizer, student_tokenizer, teacher, student)
    refuse_transformed_logits(teacher=teacher, student=student)
    total_steps = planned_steps(recipe, len(train_data.dataset))
    print_report(recipe, tokenizer, train_data, eval_data, model=student, total_steps=total_steps)

    lineage = write_lineage(
        run_dir,
        recipe,
        teacher=absolute_ref(recipe.teacher.ref),
        student=absolute_ref(recipe.student.ref) if recipe.student.ref else None,
        base=absolute_ref(recipe.student.ref) if recipe.student.ref and recipe.method == "lora" else None,
        carved=None if carve is None else {"kept_layers": carve.kept_layers, "param_fraction": carve.param_fraction},
        method=recipe.method,
    )
    tracking = start_tracking(recipe, run_dir, job_type="distill", lineage=lineage)
    collator = collator_for(recipe.data, tokenizer, student, teacher)
    args = training_arguments(recipe, run_dir, has_eval=eval_data is not None, total_steps=total_steps, report=tracking.report_to)
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
        vocab_size=vocab_size,
        teacher_placement=recipe.distributed.teacher,
        teacher_cache=caches,
    )
    checkpoint = resume_checkpoint(run_dir) if resume else None
    result = trainer.train(resume_from_checkpoint=checkpoint)
    if stopped_by_signal(trainer, recipe):  # saved a complete checkpoint; --resume continues
        return {"summary": {"steps": trainer.state.global_step, "stopped": True}, "lineage": lineage}
    final_eval = trainer.evaluate() if eval_data is not None else {}
    # A carved student has no saved base for an adapter to point at: save it merged.
    if recipe.method == "lora" and carve is not None:
        trainer.model = trainer.model.merge_and_unload()
    save_final(trainer, tokenizer, run_dir, full=recipe.method == "full" or carve is not None)
    return {"summary": finish_run(trainer, recipe, run_dir, result, final_eval), "lineage": lineage}
