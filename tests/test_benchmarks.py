"""The SFT benchmark compares like with like: run end to end on a tiny model (nothing timed).

`benchmarks/sft_throughput.py` is only worth its ratios if every variant trains on the same
examples in the same order and computes the same loss; this checks that on `still` (packed
sdpa), the block mask it replaced, `still` with gradient checkpointing, and plain HF padding,
through the script's own JSON.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_sft_throughput_variants_see_the_same_examples_and_loss(tiny_model_dir, tmp_path):
    out = tmp_path / "sft.json"
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="", STILL_CACHE=str(tmp_path / "cache")
    )
    finished = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks/sft_throughput.py"),
            "--model",
            str(tiny_model_dir),
            "--variants",
            "still,still-blockmask,still-gc,hf",
            "--steps",
            "3",
            "--batch-size",
            "4",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert (
        "same examples per step in every variant (per-step effective tokens equal): yes"
        in finished.stdout
    )
    results = {result["variant"]: result for result in json.loads(out.read_text())["results"]}
    assert list(results) == ["still", "still-blockmask", "still-gc", "hf"]
    assert [result["gradient_checkpointing"] for result in results.values()] == [
        False,
        False,
        True,
        False,
    ]
    per_step = {
        name: [step["effective"] for step in result["steps"]] for name, result in results.items()
    }
    assert len(per_step["still"]) == 3 and len(set(map(tuple, per_step.values()))) == 1, per_step
    # Packing computes no padding; HF's per-batch padding does, on the mixed lengths chosen.
    assert results["still"]["computed_total"] == results["still"]["effective_total"]
    assert results["hf"]["computed_total"] > results["hf"]["effective_total"]
    losses = {name: result["losses"] for name, result in results.items()}
    assert None not in losses["still"]
    for name in ("still-blockmask", "still-gc", "hf"):
        assert losses[name] == pytest.approx(losses["still"], rel=1e-4), name
        assert results[name]["loss_tokens_total"] == results["still"]["loss_tokens_total"]
    assert all(result["tokens_per_s"] > 0 for result in results.values())
