"""Logit distillation: a frozen teacher's token distributions taught to a (smaller) student.

Reads top to bottom: setup (teacher, tokenizer check, student, data) → check → train → save;
the training step itself (the loss) is `distill/kd_trainer.py`. Same data pipeline and masks
as fine-tuning: KD and CE count only loss-carrying tokens.
"""

from __future__ import annotations

import torch
from transformers import set_seed

from distill import xtok
from distill.batches import with_example_ids
from distill.cache import TeacherCache
from distill.chooser import print_candidates, probe
from distill.kd_trainer import KDTrainer
from distill.retention import evaluate_with_retention
from distill.teacher import (
    load_teacher,
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
from still.launch import is_main_process
from still.preflight import print_report
from still.recipe import DistillRecipe
from still.rundir import RunDir
from still.tracking import start_tracking
from still.train import (
    add_lora,
    collator_for,
    finish_run,
    lora_config,
    planned_steps,
    save_final,
    train_token_ids,
    training_arguments,
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
    if recipe.method == "lora":  # add_lora: refuses a LoRA that would skip an MoE's experts
        tokens = train_token_ids(recipe.lora, student_tokenizer, recipe.data.chat_template)
        student = add_lora(student, lora_config(recipe.lora, "lora", tokens))
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
        teacher=teacher,
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


def _collator(recipe: DistillRecipe, tokenizer, student, teacher, cross, attention: str):
    """Packed (or padded) student batches; across tokenizers the teacher reads its own padded
    batches, so only the student is packed."""
    packed_teacher = teacher if cross is None else None
    isolation = (
        packed_attention(student, packed_teacher, choice=attention) if recipe.data.packing else None
    )
    collator = collator_for(recipe.data, tokenizer, isolation, student, packed_teacher)
    if cross is not None:
        collator = xtok.with_teacher_inputs(collator, models.pad_token_id(cross.teacher_tokenizer))
    return collator


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
    collator = _collator(recipe, tokenizer, student, teacher, cross, attention)
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
