"""Runs that are killed, stopped or corrupted continue where they were; secrets stay out.

The subprocess tests run `python -m still.cli run` as a user would and kill it for real.
(A 2-process SIGTERM test needs multi-process launching, tracked in its own issue.)
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from still import checkpoint as ckpt
from still import cli
from still.rundir import RunDir

ROWS = [
    {"question": "What does json.dumps do?", "answer": "Serialize obj to a JSON formatted str."},
    {"question": "What does abs do?", "answer": "Return the absolute value of the argument."},
    {"question": "What does len do?", "answer": "Return the number of items in a container."},
    {"question": "What does min do?", "answer": "Return the smallest item of an iterable."},
] * 2

STEPS = 60  # ~4 s of training on the tiny model: long enough to kill mid-run


def losses(run_dir):
    # after a kill + resume, a re-logged step overwrites the earlier row
    return {row["step"]: row["loss"] for row in RunDir(run_dir).metrics() if "loss" in row}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_model_dir, tiny_model_dir_4layers):
    root = tmp_path_factory.mktemp("reliability")
    (root / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    common = f"""\
        output_dir: {root / "runs"}
        data:
          train: {{path: train.jsonl, format: instruction, prompt: question, response: answer}}
          max_len: 64
        train: {{lr: 5.0e-3, batch_size: 4, max_steps: {STEPS}, save_steps: 2, save_total_limit: 3,
                 warmup_ratio: 0.0, seed: 3}}
        """
    (root / "ft.yaml").write_text(
        textwrap.dedent(f"""\
        # Run: still run ft.yaml
        kind: finetune
        name: ft
        model: {{ref: "{tiny_model_dir}"}}
        lora: {{r: 4, alpha: 8, dropout: 0.0}}
        """)
        + textwrap.dedent(common)
    )
    (root / "kd.yaml").write_text(
        textwrap.dedent(f"""\
        # Run: still run kd.yaml
        kind: distill
        name: kd
        teacher: {{ref: "{tiny_model_dir_4layers}"}}
        student: {{init: {{keep_layers: [0, 3]}}}}
        distill: {{loss: forward_kl, temperature: 2.0}}
        """)
        + textwrap.dedent(common).replace(f"max_steps: {STEPS}", "max_steps: 40")
    )
    return root


@pytest.fixture(scope="module")
def straight(workdir):
    """Uninterrupted reference runs, made once."""
    runs = {}
    for kind in ("ft", "kd"):
        assert cli.main(["run", str(workdir / f"{kind}.yaml"), f"name={kind}-straight"]) == 0
        runs[kind] = workdir / "runs" / f"{kind}-straight"
    return runs


def start(workdir, recipe, *overrides):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "still.cli", "run", recipe, *overrides],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_marker(process, checkpoints: Path, min_step: int, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [c for c in ckpt.list_checkpoints(checkpoints) if (c / ckpt.MARKER).exists()]
        if done and int(done[0].name.split("-")[1]) >= min_step:
            return
        if process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(
                f"run ended (rc {process.returncode}) before a checkpoint was complete:\n"
                f"{err[-3000:]}"
            )
        time.sleep(0.02)
    process.kill()
    pytest.fail("no complete checkpoint appeared in time")


@pytest.mark.parametrize("kind", ["ft", "kd"])
def test_sigkill_then_resume_matches_an_uninterrupted_run(workdir, straight, kind, capsys):
    name = f"{kind}-killed"
    run_dir = workdir / "runs" / name
    process = start(workdir, f"{kind}.yaml", f"name={name}")
    wait_for_marker(process, run_dir / "checkpoints", min_step=10)
    assert process.poll() is None, "the run finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    assert not (run_dir / "adapter").exists() and not (run_dir / "model").exists()

    assert cli.main(["run", str(workdir / f"{kind}.yaml"), f"name={name}", "--resume"]) == 0
    assert "still: resuming from" in capsys.readouterr().out
    expected, resumed = losses(straight[kind]), losses(run_dir)
    assert sorted(resumed) == sorted(expected) and max(resumed) == (STEPS if kind == "ft" else 40)
    last = max(expected)
    assert resumed[last] == pytest.approx(expected[last], abs=1e-3)
    assert all(resumed[s] == pytest.approx(expected[s], abs=1e-3) for s in expected)


def test_sigterm_saves_a_complete_checkpoint_exits_0_and_resumes(workdir, straight, capsys):
    run_dir = workdir / "runs" / "ft-term"
    process = start(workdir, "ft.yaml", "name=ft-term")
    wait_for_marker(process, run_dir / "checkpoints", min_step=4)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-3000:]
    assert "Traceback" not in err
    stop_lines = [line for line in out.splitlines() if line.startswith("still: stopped by")]
    assert len(stop_lines) == 1, out[-2000:]
    step = int(stop_lines[0].split(" at step ")[1].split(";")[0])
    assert (
        stop_lines[0]
        == f"still: stopped by SIGTERM at step {step}; resume with: still run ft.yaml --resume"
    )
    assert 4 <= step < STEPS
    assert ckpt.checkpoint_problem(run_dir / "checkpoints" / f"checkpoint-{step}") is None
    assert not (run_dir / "adapter").exists()  # stopped, not finished

    assert cli.main(["run", str(workdir / "ft.yaml"), "name=ft-term", "--resume"]) == 0
    assert (
        f"resuming from {run_dir / 'checkpoints' / f'checkpoint-{step}'}" in capsys.readouterr().out
    )
    expected, resumed = losses(straight["ft"]), losses(run_dir)
    assert sorted(resumed) == sorted(expected)
    assert resumed[STEPS] == pytest.approx(expected[STEPS], abs=1e-3)
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()


def test_partial_and_corrupt_checkpoints_are_ignored_on_resume(workdir, straight, capsys):
    run_dir = workdir / "runs" / "ft-partial"
    shutil.copytree(straight["ft"], run_dir)
    shutil.rmtree(run_dir / "adapter")
    checkpoints = run_dir / "checkpoints"
    newest, middle, oldest = ckpt.list_checkpoints(checkpoints)
    (newest / ckpt.MARKER).unlink()  # killed before the marker
    with (middle / "adapter_model.safetensors").open("r+b") as handle:
        handle.seek(100)
        handle.write(b"\xff" * 8)  # bit rot

    assert cli.main(["run", str(workdir / "ft.yaml"), "name=ft-partial", "--resume"]) == 0
    out = capsys.readouterr().out
    assert (
        f"still: --resume: ignored incomplete checkpoints: {newest.name} (no completion marker), "
        f"{middle.name} (adapter_model.safetensors corrupt (sha256 mismatch))"
    ) in out
    assert f"still: resuming from {oldest}" in out
    expected, resumed = losses(straight["ft"]), losses(run_dir)
    assert resumed[STEPS] == pytest.approx(expected[STEPS], abs=1e-3)
    # the re-made checkpoints are complete again, and pruning kept 3
    assert [ckpt.checkpoint_problem(c) for c in ckpt.list_checkpoints(checkpoints)] == [None] * 3


def test_secrets_never_reach_the_run_dir(workdir, monkeypatch):
    fake = {
        "WANDB_API_KEY": "fakewandbkey0123456789abcdef",
        "HF_TOKEN": "hf_FAKEtoken0123456789SECRET",
        "HUGGING_FACE_HUB_TOKEN": "hf_FAKEtoken9876543210OTHER",
    }
    for key, value in fake.items():
        monkeypatch.setenv(key, value)
    assert cli.main(["run", str(workdir / "ft.yaml"), "name=ft-secrets", "train.max_steps=2"]) == 0
    run_dir = workdir / "runs" / "ft-secrets"
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.name == "recipe.resolved.yaml" for p in files) and len(files) > 10
    for path in files:
        data = path.read_bytes()
        for value in fake.values():
            assert value.encode() not in data, f"{value} leaked into {path}"
