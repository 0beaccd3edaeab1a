"""On-policy distillation (GKD): with probability λ per batch the student answers the prompts
itself and the teacher scores those answers. λ = 0 is exactly off-policy KD."""

import json
import textwrap

import pytest
import torch

from distill.batches import prompts_and_budgets
from still import cli
from still.data import PackedCollator, PaddedCollator
from still.rundir import RunDir


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_model_dir_4layers):
    root = tmp_path_factory.mktemp("on_policy")
    rows = [
        ("What does json.dumps do?", "Serialize obj to a JSON formatted str."),
        ("What does abs do?", "Return the absolute value."),
        ("What does len do?", "Return the number of items."),
        ("What does min do?", "Return the smallest item."),
    ]
    (root / "train.jsonl").write_text(
        "".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in rows)
    )
    (root / "distill.yaml").write_text(
        textwrap.dedent(f"""\
        kind: distill
        name: x
        teacher: {{ref: "{tiny_model_dir_4layers}"}}
        student: {{init: {{keep_layers: [0, 3]}}}}
        distill: {{loss: jsd, beta: 0.5}}
        data:
          train: {{path: train.jsonl, format: instruction, prompt: question, response: answer}}
          max_len: 64
        train: {{lr: 1.0e-2, batch_size: 2, max_steps: 4, warmup_ratio: 0.0, seed: 3,
          loss_chunk_size: 16}}
        """)
    )
    return root


def _run(work, monkeypatch, name, *overrides):
    monkeypatch.chdir(work)
    assert cli.main(["run", "distill.yaml", f"name={name}", *overrides]) == 0
    return [row for row in RunDir(work / "runs" / name).metrics() if "loss" in row]


def test_ratio_zero_is_off_policy(work, monkeypatch):
    off = _run(work, monkeypatch, "off")
    zero = _run(work, monkeypatch, "zero", "distill.on_policy_ratio=0.0")
    assert [r["loss"] for r in zero] == [r["loss"] for r in off]


def test_ratio_one_trains_on_the_students_own_answers(work, monkeypatch):
    off = _run(work, monkeypatch, "off-2")
    on = _run(
        work, monkeypatch, "on", "distill.on_policy_ratio=1.0", "distill.on_policy_max_new_tokens=8"
    )
    assert all(row["on_policy_fraction"] == 1.0 for row in on)
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in on)
    # other sequences than the dataset's: other losses from the first step on
    assert on[0]["loss"] != pytest.approx(off[0]["loss"], rel=1e-3)
    again = _run(
        work,
        monkeypatch,
        "on-again",
        "distill.on_policy_ratio=1.0",
        "distill.on_policy_max_new_tokens=8",
    )
    assert [r["loss"] for r in again] == [r["loss"] for r in on]  # sampling is seeded


def test_half_the_batches_on_policy(work, monkeypatch):
    half = _run(work, monkeypatch, "half", "distill.on_policy_ratio=0.5", "train.max_steps=8")
    fractions = [row["on_policy_fraction"] for row in half]
    assert 0 < sum(fractions) < len(fractions)


def test_on_policy_and_a_teacher_cache_are_refused_together(work, monkeypatch, capsys):
    monkeypatch.chdir(work)
    code = cli.main(
        ["validate", "distill.yaml", "distill.on_policy_ratio=0.5", "distill.teacher_cache=c"]
    )
    assert code == 2
    assert "on_policy_ratio needs the teacher itself" in capsys.readouterr().err


@pytest.mark.parametrize(
    "collator", [PaddedCollator(3), PackedCollator(3), PackedCollator(3, row_tokens=6)]
)
def test_prompts_and_budgets_from_padded_and_packed_batches(collator):
    features = [
        {"input_ids": [10, 11, 12, 20, 21, 2], "labels": [-100, -100, -100, 20, 21, 2]},
        {"input_ids": [13, 14, 22, 2], "labels": [-100, -100, 22, 2]},
    ]
    batch = collator(features)
    labels = batch.pop("labels")
    prompts, budgets = prompts_and_budgets(batch, labels)
    assert prompts == [[10, 11, 12], [13, 14]]
    assert budgets == [3, 2]
