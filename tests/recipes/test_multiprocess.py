"""Two CPU processes through `accelerate launch` (DDP, ZeRO-2, ZeRO-3) for finetune and distill:
the loss curve equals a single process with the same global batch, and the saved model or
adapter loads as a normal one with matching outputs."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from still import models
from still.tracking import read_metrics

pytestmark = pytest.mark.multiproc

LAUNCH = {
    "ddp": ["--multi_gpu"],
    "zero2": ["--use_deepspeed", "--zero_stage", "2"],
    "zero3": ["--use_deepspeed", "--zero_stage", "3"],
}


def _recipe(path: Path, kind: str, model_dir: Path, teacher_dir: Path) -> Path:
    data = path / "train.jsonl"
    rows = [("What does json.dumps do?", "Serialize obj to a JSON formatted str."),
            ("What does abs do?", "Return the absolute value."),
            ("What does len do?", "Return the number of items."),
            ("What does min do?", "Return the smallest item.")] * 2
    data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in rows))
    head = f"kind: finetune\nname: x\nmodel: {{ref: \"{model_dir}\"}}\nlora: {{r: 4, alpha: 8, dropout: 0.0}}\n"
    if kind == "distill":
        head = (f"kind: distill\nname: x\nteacher: {{ref: \"{teacher_dir}\"}}\n"
                "student: {init: {keep_layers: [0, 3]}}\ndistill: {loss: forward_kl, temperature: 2.0, chunk_size: 16}\n")
    recipe = path / f"{kind}.yaml"
    recipe.write_text(head + textwrap.dedent("""\
        data:
          train: {path: train.jsonl, format: instruction, prompt: question, response: answer}
          max_len: 64
        train: {lr: 1.0e-2, batch_size: 2, max_steps: 4, warmup_ratio: 0.0, seed: 3}
        """))
    return recipe


def _run(cwd: Path, args: list[str]) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def _losses(run_dir: Path) -> list[float]:
    return [row["loss"] for row in read_metrics(run_dir / "metrics.jsonl") if "loss" in row]


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_model_dir, tiny_model_dir_4layers):
    """Single-process baselines with the same global batch (1 process x 4 examples)."""
    root = tmp_path_factory.mktemp("multiproc")
    for kind in ("finetune", "distill"):
        recipe = _recipe(root, kind, tiny_model_dir, tiny_model_dir_4layers)
        _run(root, [sys.executable, "-m", "still.cli", "run", recipe.name, f"name={kind}-single", "train.batch_size=4"])
    return root


@pytest.mark.parametrize("strategy", ["ddp", "zero2", "zero3"])
@pytest.mark.parametrize("kind", ["finetune", "distill"])
def test_two_processes_match_one(single, kind, strategy):
    accelerate = Path(sys.executable).with_name("accelerate")
    name = f"{kind}-{strategy}"
    _run(single, [str(accelerate), "launch", *LAUNCH[strategy], "--num_processes", "2",
                  "-m", "still.cli", "run", f"{kind}.yaml", f"name={name}"])
    run_dir, baseline = single / "runs" / name, single / "runs" / f"{kind}-single"
    # 2 ranks x 2 examples == 1 rank x 4: only reduction order differs
    assert _losses(run_dir) == pytest.approx(_losses(baseline), abs=1e-4)
    saved = run_dir / ("model" if kind == "distill" else "adapter")
    assert (saved / ("model.safetensors" if kind == "distill" else "adapter_model.safetensors")).exists()
    assert not list(saved.glob("global_step*"))  # ZeRO-3 shards were consolidated
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    ours, _ = models.load_model(str(run_dir))
    reference, _ = models.load_model(str(baseline))
    assert torch.allclose(ours(ids).logits, reference(ids).logits, atol=1e-3)


def test_sigterm_to_one_rank_stops_both_with_a_complete_checkpoint(single):
    """A preemption signal that reaches one rank: all ranks agree, save, exit 0, resume."""
    import signal
    import time

    from still.checkpoint import checkpoint_problem

    accelerate = Path(sys.executable).with_name("accelerate")
    args = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "-m", "still.cli", "run",
            "finetune.yaml", "name=preempted", "train.max_steps=400", "train.save_steps=100", "train.batch_size=1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    launcher = subprocess.Popen(args, cwd=single, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    metrics = single / "runs" / "preempted" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.1)
    workers = [int(pid) for pid in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()]
    assert len(workers) == 2
    os.kill(workers[-1], signal.SIGTERM)  # only the second rank hears it
    output, _ = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, output[-3000:]
    assert output.count("still: stopped by SIGTERM at step") == 1  # printed by the main process
    checkpoints = sorted((single / "runs" / "preempted" / "checkpoints").glob("checkpoint-*"))
    assert len(checkpoints) == 1 and checkpoint_problem(checkpoints[0]) is None
    stopped_at = int(checkpoints[0].name.split("-")[1])
    assert stopped_at < 400

    _run(single, args + ["--resume"])
    steps = [row["step"] for row in read_metrics(single / "runs" / "preempted" / "metrics.jsonl") if "loss" in row]
    assert steps == list(range(1, 401))
