"""`still init` on chat, instruction and completion files: the recipes and tasks it writes
validate, and run for a few steps on the tiny models."""

import json

import pytest
from tiny_models import QA

from still import cli
from still.rundir import RunDir

ROWS = {
    "chat": [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in QA * 3
    ],
    "instruction": [{"question": q, "answer": a} for q, a in QA * 3],
    "completion": [{"text": f"{q} {a}"} for q, a in QA * 3],
}
STEPS = ["train.max_steps=2", "train.batch_size=4", "train.save_steps=2"]


def init_and_validate(tmp_path, monkeypatch, fmt, base):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / f"{fmt}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS[fmt]))
    assert cli.main(["init", str(data), "--base", str(base), "--name", fmt]) == 0
    recipes = tmp_path / "recipes" / fmt
    for recipe in ("teacher", "student", "student-sft", "eval", "pipeline"):
        assert cli.main(["validate", str(recipes / f"{recipe}.yaml")]) == 0  # tasks included
    return recipes


@pytest.mark.parametrize("fmt", ["chat", "completion"])
def test_init_teacher_runs(tmp_path, monkeypatch, tiny_model_dir, fmt):
    recipes = init_and_validate(tmp_path, monkeypatch, fmt, tiny_model_dir)
    assert cli.main(["run", str(recipes / "teacher.yaml"), *STEPS]) == 0
    run = RunDir(tmp_path / "runs" / f"{fmt}-teacher")
    assert run.saved_model() is not None
    held = run.read_lineage()["data"][1]
    assert held["holdout"] == {
        "split": 0.1,
        "test": 0.1,
        "seed": 0,
        "group_by": None,
        "side": "held_out",
    }


def test_init_instruction_pipeline_runs_every_stage(tmp_path, monkeypatch, tiny_model_dir):
    recipes = init_and_validate(tmp_path, monkeypatch, "instruction", tiny_model_dir)
    for name, old, new in (
        ("teacher", "max_steps: 50", "max_steps: 2"),
        ("student", "max_steps: 60", "max_steps: 2"),
        ("eval", "limit: 100", "limit: 2"),
    ):
        path = recipes / f"{name}.yaml"
        path.write_text(
            path.read_text().replace(old, new).replace("batch_size: 8", "batch_size: 4")
        )
    assert cli.main(["run", str(recipes / "pipeline.yaml")]) == 0
    compare = (tmp_path / "runs" / "instruction-compare" / "compare.md").read_text()
    assert "instruction-qa" in compare and "instruction-student" in compare
