"""CUDA-only paths, on the tiny model: bf16 by default, chunked CE in bf16, Liger, torch.compile.

Run on a machine with a GPU: `pytest -m gpu`. The default suite skips them (`-m 'not gpu'`).
"""

import importlib.util

import pytest
import torch

from still import cli
from still.tracking import read_metrics

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def curve(run_dir, key="loss"):
    return [row[key] for row in read_metrics(run_dir / "metrics.jsonl") if key in row]


def run(recipe, name, *overrides):
    """Train 6 steps; a non-zero exit shows the captured `still: error:` line in the report."""
    assert cli.main(["run", str(recipe), f"name={name}", "train.max_steps=6", "train.lr=2e-2",
                     "train.eval_steps=3", *overrides]) == 0


def test_precision_auto_trains_in_bf16_on_cuda(finetune_recipe, tmp_path):
    run(finetune_recipe(), "bf16")
    run_dir = tmp_path / "runs" / "bf16"
    checkpoints = sorted((run_dir / "checkpoints").glob("checkpoint-*"))
    assert checkpoints, list(run_dir.iterdir())
    args = torch.load(checkpoints[-1] / "training_args.bin", weights_only=False)
    assert (args.bf16, args.use_cpu) == (True, False)
    losses = curve(run_dir)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses


def test_chunked_loss_matches_the_models_loss_in_bf16(finetune_recipe, tmp_path):
    recipe = finetune_recipe()
    run(recipe, "chunked", "train.loss_chunk_size=5")
    run(recipe, "full-logits", "train.loss_chunk_size=null")
    for key in ("loss", "eval_loss"):
        chunked, full = curve(tmp_path / "runs" / "chunked", key), curve(tmp_path / "runs" / "full-logits", key)
        assert len(chunked) == len(full) >= 3
        assert chunked == pytest.approx(full, rel=2e-2), key  # bf16 matmuls, same fp32 softmax


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel not installed")
def test_liger_kernel_trains_like_the_plain_model(finetune_recipe, tmp_path):
    recipe = finetune_recipe()
    run(recipe, "plain")
    run(recipe, "liger", "train.liger_kernel=true")
    plain, liger = curve(tmp_path / "runs" / "plain"), curve(tmp_path / "runs" / "liger")
    assert liger[-1] < liger[0]
    assert liger == pytest.approx(plain, rel=3e-2)


def test_torch_compile_trains_like_eager(finetune_recipe, tmp_path):
    recipe = finetune_recipe()
    run(recipe, "eager")
    run(recipe, "compiled", "train.torch_compile=true")
    eager, compiled = curve(tmp_path / "runs" / "eager"), curve(tmp_path / "runs" / "compiled")
    assert compiled == pytest.approx(eager, rel=3e-2)
    torch._dynamo.reset()
