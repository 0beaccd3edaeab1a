"""bf16 mixed precision, as runs get it on a GPU, reproduced on the CPU through CPU autocast.

A bf16 model under Trainer's bf16 hands back its outputs (hidden states included) as fp32, and
the chunked losses multiply them by the bf16 output head: on an H200 that was a dtype error
in both the SFT and the KD loss. `precision_flags` refuses bf16 without a GPU, so these tests
patch it; everything else is the normal CPU run.
"""

import pytest

from still import cli
from still.rundir import RunDir


@pytest.fixture
def bf16_everywhere(monkeypatch):
    from still import train

    # training_arguments (still.train) asks precision_flags, which refuses bf16 without a GPU
    monkeypatch.setattr(train, "precision_flags", lambda train: {"bf16": True, "fp16": False})


def losses(run_dir, key="loss"):
    return [row[key] for row in RunDir(run_dir).metrics() if key in row]


def test_finetune_chunked_loss_in_bf16(bf16_everywhere, finetune_recipe, tmp_path):
    recipe = finetune_recipe()
    common = [
        "run",
        str(recipe),
        "model.dtype=bfloat16",
        "train.max_steps=4",
        "train.lr=2e-2",
        "train.eval_steps=2",
    ]
    assert cli.main([*common, "name=chunked"]) == 0
    assert cli.main([*common, "name=full-logits", "train.loss_chunk_size=null"]) == 0
    chunked, full = losses(tmp_path / "runs" / "chunked"), losses(tmp_path / "runs" / "full-logits")
    assert chunked[-1] < chunked[0]
    assert chunked == pytest.approx(full, rel=1e-2)  # bf16 matmuls; the same fp32 softmax
    assert losses(tmp_path / "runs" / "chunked", "eval_loss") == pytest.approx(
        losses(tmp_path / "runs" / "full-logits", "eval_loss"), rel=1e-2
    )


def test_distill_fused_loss_in_bf16(bf16_everywhere, distill_recipe, tmp_path):
    recipe = distill_recipe(name="kd-bf16")
    assert (
        cli.main(
            [
                "run",
                str(recipe),
                "teacher.dtype=bfloat16",
                "distill.ce_weight=0.5",
                "train.max_steps=4",
                "train.save_steps=10",
            ]
        )
        == 0
    )
    curve = losses(tmp_path / "runs" / "kd-bf16")
    assert len(curve) == 4 and curve[-1] < curve[0]
