"""The distill recipe kind on tiny models: a carved student learns from a frozen teacher."""

import json

import pytest
import torch

from still import cli, models
from still.rundir import RunDir


def logged(run_dir, key):
    return [row[key] for row in RunDir(run_dir).metrics() if key in row]


def test_carved_student_learns_from_teacher(distill_recipe, tmp_path, tiny_model_dir_4layers):
    assert cli.main(["run", str(distill_recipe())]) == 0
    run_dir = tmp_path / "runs" / "tiny-kd"
    kd = logged(run_dir, "kd_loss")
    assert len(kd) == 10 and all(v == v for v in kd)
    assert sum(kd[-3:]) / 3 < 0.7 * sum(kd[:3]) / 3
    evals = logged(run_dir, "eval_loss")
    assert evals[-1] < evals[0]
    lineage = json.loads((run_dir / "lineage.json").read_text())
    assert lineage["carved"]["kept_layers"] == [0, 3] and lineage["teacher"] == str(
        tiny_model_dir_4layers
    )
    student, _ = models.load_model(str(run_dir))
    assert student.config.num_hidden_layers == 2


def test_hard_label_only_baseline_and_lora_student(distill_recipe, tmp_path):
    recipe = distill_recipe()
    assert (
        cli.main(
            [
                "run",
                str(recipe),
                "name=ce-only",
                "distill.kd_weight=0",
                "distill.ce_weight=1",
                "train.max_steps=3",
            ]
        )
        == 0
    )
    ce = logged(tmp_path / "runs" / "ce-only", "ce_loss")
    assert len(ce) == 3 and ce[-1] < ce[0]
    assert cli.main(["run", str(recipe), "name=lora-kd", "method=lora", "train.max_steps=2"]) == 0
    # a carved student has no saved base for an adapter: it is saved merged
    assert (tmp_path / "runs" / "lora-kd" / "model" / "config.json").exists()


def test_student_reference_with_other_tokenizer_is_refused(
    distill_recipe, tmp_path, tiny_model_dir, capsys
):
    from transformers import AutoTokenizer

    other = tmp_path / "other_student"
    import shutil

    shutil.copytree(tiny_model_dir, other)
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["<extra_token>"])
    tokenizer.save_pretrained(other)
    recipe = distill_recipe(student=f'ref: "{other}"')
    assert cli.main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "teacher and student tokenizers differ" in err and "sequence-level KD" in err
    assert not (tmp_path / "runs" / "tiny-kd").exists()


def test_teacher_weights_unchanged_and_only_student_trains(tiny_model_dir_4layers, tmp_path):
    import datasets
    from transformers import TrainingArguments

    from distill.kd_trainer import KDTrainer
    from distill.student import carve_student
    from still.data import PackedCollator
    from still.distill_sections import DistillSection, StudentInit

    teacher, tokenizer = models.load_model(str(tiny_model_dir_4layers))
    teacher.requires_grad_(False)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student, _ = carve_student(teacher, StudentInit(keep_layers=[0, 3]))
    rows = [{"input_ids": list(range(5, 25)), "labels": [-100] * 5 + list(range(10, 25))}] * 8
    args = TrainingArguments(
        output_dir=str(tmp_path / "o"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
    )
    trainer = KDTrainer(
        model=student,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        data_collator=PackedCollator(tokenizer.pad_token_id),
        teacher=teacher,
        distill=DistillSection(),
        vocab_size=len(tokenizer),
        loss_chunk_size=16,
    )
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer.train()
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, before[name]), name
    changed = [k for k, v in student.state_dict().items() if not torch.equal(v, student_before[k])]
    assert changed


def test_student_with_padded_vocab_rows_is_reconciled(
    distill_recipe, tmp_path, tiny_model_dir, capsys
):
    """Same tokenizer, but the student's embedding has 8 extra (padding) rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    padded = tmp_path / "padded_student"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model.resize_token_embeddings(len(tokenizer) + 8)
    model.save_pretrained(padded)
    tokenizer.save_pretrained(padded)
    recipe = distill_recipe(name="padded", student=f'ref: "{padded}"')
    assert cli.main(["run", str(recipe), "train.max_steps=2"]) == 0
    out = capsys.readouterr().out
    assert (
        f"vocab padding differs (teacher {len(tokenizer)}, student {len(tokenizer) + 8} rows)"
        in out
    )
    assert len(logged(tmp_path / "runs" / "padded", "kd_loss")) == 2


def test_soft_capped_teacher_is_refused(distill_recipe, tmp_path, tiny_tokenizer_dir, capsys):
    from tiny_models import build_tiny_softcapped
    from transformers import AutoTokenizer

    teacher = tmp_path / "capped-teacher"
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    build_tiny_softcapped(tokenizer).save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    recipe = distill_recipe(student="init: {keep_layers: [0]}")
    assert cli.main(["run", str(recipe), f"teacher.ref={teacher}"]) == 2
    err = capsys.readouterr().err
    assert "the teacher's logits are not its output head alone" in err and "Traceback" not in err
    assert not (tmp_path / "runs" / "tiny-kd").exists()


def test_gradient_checkpointing_trains_the_same_student(distill_recipe, tmp_path, mlp_forwards):
    """The student, here a LoRA adapter over frozen embeddings, recomputes and learns the same."""
    common = ["run", str(distill_recipe()), "method=lora", "train.max_steps=3"]
    assert cli.main([*common, "name=plain"]) == 0
    plain_calls = len(mlp_forwards)
    mlp_forwards.clear()
    assert cli.main([*common, "name=checkpointed", "train.gradient_checkpointing=true"]) == 0
    # The frozen teacher is not rerun; the student's 2 layers are, once in each of the 3 steps.
    assert len(mlp_forwards) == plain_calls + 2 * 3
    plain, checkpointed = (
        logged(tmp_path / "runs" / "plain", "kd_loss"),
        logged(tmp_path / "runs" / "checkpointed", "kd_loss"),
    )
    assert len(plain) == 3 and plain[-1] < plain[0]
    assert checkpointed == pytest.approx(plain, rel=1e-5)
