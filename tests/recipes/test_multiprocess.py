"""Two CPU processes (DDP, ZeRO-2, ZeRO-3) for finetune and distill, launched by `still run
--nproc 2` and by plain `accelerate launch`: the loss curve equals a single process with the
same global batch, and the saved model or adapter loads as a normal one with matching outputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from launched import losses as _losses
from launched import run as _run
from launched import still as _still
from launched import write_recipe as _recipe

from still import models
from still.rundir import RunDir

pytestmark = pytest.mark.multiproc


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_model_dir, tiny_model_dir_4layers):
    """Single-process baselines with the same global batch (1 process x 4 examples)."""
    root = tmp_path_factory.mktemp("multiproc")
    for kind in ("finetune", "distill"):
        recipe = _recipe(root, kind, tiny_model_dir, tiny_model_dir_4layers)
        _run(
            root,
            [
                sys.executable,
                "-m",
                "still.cli",
                "run",
                recipe.name,
                f"name={kind}-single",
                "train.batch_size=4",
            ],
        )
    return root


def _assert_same_run(run_dir: Path, baseline: Path, kind: str) -> None:
    # 2 ranks x 2 examples == 1 rank x 4: only reduction order differs
    assert _losses(run_dir) == pytest.approx(_losses(baseline), abs=1e-4)
    saved = run_dir / ("model" if kind == "distill" else "adapter")
    assert (
        saved / ("model.safetensors" if kind == "distill" else "adapter_model.safetensors")
    ).exists()
    assert not list(saved.glob("global_step*"))  # ZeRO-3 shards were consolidated
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    ours, _ = models.load_model(str(run_dir))
    reference, _ = models.load_model(str(baseline))
    assert torch.allclose(ours(ids).logits, reference(ids).logits, atol=1e-3)


@pytest.mark.parametrize("strategy", ["ddp", "zero2", "zero3"])
@pytest.mark.parametrize("kind", ["finetune", "distill"])
def test_nproc_2_matches_one_process(single, kind, strategy):
    name = f"{kind}-{strategy}"
    # eval_tasks run on the main process after a sharded run, on the saved model loaded whole
    _run(
        single,
        _still(
            f"{kind}.yaml",
            f"name={name}",
            f"distributed.strategy={strategy}",
            "--nproc",
            "2",
            "eval_tasks=[ppl.yaml]",
        ),
    )
    run_dir = single / "runs" / name
    _assert_same_run(run_dir, single / "runs" / f"{kind}-single", kind)
    assert json.loads((run_dir / "eval" / "ppl.json").read_text())["n"] == 8
    config = yaml.safe_load((run_dir / "launch" / "accelerate.yaml").read_text())
    assert config["num_processes"] == 2
    assert config["distributed_type"] == ("MULTI_GPU" if strategy == "ddp" else "DEEPSPEED")
    assert (run_dir / "launch" / "deepspeed.json").exists() == (strategy != "ddp")


@pytest.mark.parametrize("how", ["flags", "written config"])
def test_plain_accelerate_launch_by_hand(single, how):
    """`accelerate launch ... -m still.cli run R.yaml` works, also with the configs still wrote."""
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    if how == "flags":
        launcher = [
            accelerate,
            "launch",
            "--use_deepspeed",
            "--zero_stage",
            "3",
            "--num_processes",
            "2",
        ]
    else:
        written = single / "runs" / "written" / "launch" / "accelerate.yaml"
        if not written.exists():
            _run(
                single,
                _still(
                    "distill.yaml", "name=written", "distributed.strategy=zero3", "--nproc", "2"
                ),
            )
        launcher = [accelerate, "launch", "--config_file", str(written)]
    name = f"by-hand-{how.replace(' ', '-')}"
    _run(single, [*launcher, "-m", "still.cli", "run", "distill.yaml", f"name={name}"])
    _assert_same_run(single / "runs" / name, single / "runs" / "distill-single", "distill")
    assert not (single / "runs" / name / "launch").exists()  # launched by hand: nothing relaunched


def test_grad_accum_across_processes_is_normalised_by_tokens(single):
    """2 processes x 1 example x 2 accumulation steps == 1 process x 4 examples."""
    _run(
        single,
        _still(
            "finetune.yaml",
            "name=accum",
            "train.batch_size=1",
            "train.grad_accum=2",
            "--nproc",
            "2",
        ),
    )
    _assert_same_run(single / "runs" / "accum", single / "runs" / "finetune-single", "finetune")


def test_zero3_with_a_sharded_teacher(single):
    args = _still(
        "distill.yaml",
        "name=teacher-sharded",
        "distributed.strategy=zero3",
        "distributed.teacher=shard",
        "--nproc",
        "2",
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(args, cwd=single, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        result.stdout.count("still: teacher (") == 1
        and "sharded across 2 process(es)" in result.stdout
    )
    _assert_same_run(
        single / "runs" / "teacher-sharded", single / "runs" / "distill-single", "distill"
    )


def test_zero3_with_cpu_offload(single):
    _run(
        single,
        _still(
            "finetune.yaml",
            "name=offloaded",
            "distributed.strategy=zero3",
            "distributed.offload_optimizer=cpu",
            "distributed.offload_params=cpu",
            "--nproc",
            "2",
        ),
    )
    _assert_same_run(single / "runs" / "offloaded", single / "runs" / "finetune-single", "finetune")
    zero = json.loads((single / "runs" / "offloaded" / "launch" / "deepspeed.json").read_text())[
        "zero_optimization"
    ]
    assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"


def test_a_user_error_in_the_workers_is_one_line_and_leaves_no_run_dir(single):
    args = _still("finetune.yaml", "name=broken", "data.train.prompt=nope", "--nproc", "2")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(args, cwd=single, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("still: error:")]
    assert len(errors) == 1 and "field 'nope' is missing" in errors[0]
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr
    assert not (single / "runs" / "broken").exists()


def test_sigterm_to_one_rank_stops_both_with_a_complete_checkpoint(single):
    """A preemption signal that reaches one rank: all ranks agree, save, exit 0, resume."""
    import signal
    import time

    from still.checkpoint import checkpoint_problem

    accelerate = Path(sys.executable).with_name("accelerate")
    args = [
        str(accelerate),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "-m",
        "still.cli",
        "run",
        "finetune.yaml",
        "name=preempted",
        "train.max_steps=400",
        "train.save_steps=100",
        "train.batch_size=1",
    ]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    launcher = subprocess.Popen(
        args,
        cwd=single,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    metrics = single / "runs" / "preempted" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (
        metrics.exists() and len(metrics.read_text().splitlines()) >= 3
    ):
        time.sleep(0.1)
    workers = [
        int(pid)
        for pid in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    ]
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
    steps = [
        row["step"] for row in RunDir(single / "runs" / "preempted").metrics() if "loss" in row
    ]
    assert steps == list(range(1, 401))


def test_sigterm_to_still_run_stops_the_workers_with_a_checkpoint(single):
    """A scheduler signals the `still run --nproc 2` it started: the workers save and exit 0."""
    import signal
    import time

    from still.checkpoint import checkpoint_problem

    args = _still(
        "finetune.yaml",
        "name=preempted-parent",
        "train.max_steps=400",
        "train.save_steps=100",
        "train.batch_size=1",
        "--nproc",
        "2",
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    parent = subprocess.Popen(
        args, cwd=single, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    metrics = single / "runs" / "preempted-parent" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (
        metrics.exists() and len(metrics.read_text().splitlines()) >= 3
    ):
        time.sleep(0.1)
    parent.send_signal(signal.SIGTERM)
    output, _ = parent.communicate(timeout=300)
    assert parent.returncode == 0, output[-3000:]
    assert output.count("still: stopped by SIGTERM at step") == 1
    checkpoints = sorted(
        (single / "runs" / "preempted-parent" / "checkpoints").glob("checkpoint-*")
    )
    assert len(checkpoints) == 1 and checkpoint_problem(checkpoints[0]) is None
    assert int(checkpoints[0].name.split("-")[1]) < 400
