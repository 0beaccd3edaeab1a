"""A non-Llama family under ZeRO-3: `still run --nproc 2` distils a Qwen3 twin (tied head, q/k
norms, padded vocabulary rows) into a carved student through accelerate + DeepSpeed on CPU. The
loss curve equals one process with the same global batch, and the consolidated student reloads
in its class with the same logits."""

import json
import os
import subprocess
import sys

import pytest
import torch
from families import save_twin
from tiny_models import QA

from still import models
from still.rundir import RunDir

pytestmark = pytest.mark.multiproc

RECIPE = """\
kind: distill
name: x
teacher: {{ref: "{teacher}"}}
student: {{init: {{keep_layers: [0, 3]}}}}
distill: {{loss: forward_kl, temperature: 2.0}}
data:
  train: {{path: train.jsonl, format: instruction, prompt: question, response: answer}}
  max_len: 64
train: {{lr: 1.0e-2, batch_size: 2, max_steps: 3, warmup_ratio: 0.0, seed: 3}}
"""


def _still_run(cwd, *args: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["TOKENIZERS_PARALLELISM"] = "false"
    command = [sys.executable, "-m", "still.cli", "run", "distill.yaml", *args]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def _losses(run_dir) -> list[float]:
    return [row["loss"] for row in RunDir(run_dir).metrics() if "loss" in row]


def test_qwen3_distills_under_zero3_on_two_processes(tmp_path):
    save_twin("qwen3", tmp_path / "teacher", layers=4, hidden=32, seed=1)
    rows = [json.dumps({"question": q, "answer": a}) + "\n" for q, a in QA[:4]] * 2
    (tmp_path / "train.jsonl").write_text("".join(rows))
    (tmp_path / "distill.yaml").write_text(RECIPE.format(teacher=tmp_path / "teacher"))
    _still_run(tmp_path, "name=single", "train.batch_size=4")
    _still_run(tmp_path, "name=zero3", "distributed.strategy=zero3", "--nproc", "2")
    single, sharded = tmp_path / "runs" / "single", tmp_path / "runs" / "zero3"
    # 2 ranks x 2 examples == 1 rank x 4: only the reduction order differs
    assert len(_losses(sharded)) == 3
    assert _losses(sharded) == pytest.approx(_losses(single), abs=1e-4)
    assert (sharded / "launch" / "deepspeed.json").exists()
    assert not list((sharded / "model").glob("global_step*"))  # ZeRO-3 shards consolidated
    ours, tokenizer = models.load_model(str(sharded))
    reference, _ = models.load_model(str(single))
    assert type(ours).__name__ == "Qwen3ForCausalLM" and ours.config.num_hidden_layers == 2
    assert ours.config.vocab_size == 320 and ours.config.tie_word_embeddings
    assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([tokenizer.encode("What does abs do?")])
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, reference(ids).logits, atol=1e-3)
