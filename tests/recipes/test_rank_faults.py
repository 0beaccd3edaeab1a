"""A rank that dies, raises or stalls never hangs the job, and a preempted job resumes exactly.

Faults are injected from outside the library: the test signals the real rank process by pid.
SIGKILL needs nothing more; for "raises" and "stalls" the test puts tests/recipes/faults/ on
PYTHONPATH, whose sitecustomize.py turns SIGUSR1 into an exception and SIGUSR2 into a long
sleep inside the step. Each fault is injected once the first checkpoint (step 20 of 60) is
complete; the measured time from the fault to the exit of `still run` is printed (-s)."""

import os
import shlex
import signal
import time
from pathlib import Path

import pytest
from launched import (
    alive,
    finish_machines,
    free_port,
    losses,
    rank_pids,
    run,
    start,
    start_machines,
    steps,
    still,
    wait_for,
    write_recipe,
)

from still.checkpoint import MARKER, checkpoint_problem, list_checkpoints

pytestmark = pytest.mark.multiproc

TIMEOUT_S = 10
MAX_STEPS = 60
COMMON = [f"train.max_steps={MAX_STEPS}", "train.save_steps=20", "train.batch_size=1"]
FAULTS_ON_PATH = {
    "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parent / "faults"), os.environ.get("PYTHONPATH", "")]
    )
}
SIGNALS = {"kill": signal.SIGKILL, "raise": signal.SIGUSR1, "stall": signal.SIGUSR2}
# what still run says about rank 1, and the most seconds from the fault to its exit
EXPECTED = {
    "kill": ("rank 1 (pid {pid}) was killed by SIGKILL", 15),
    "raise": ("rank 1 (pid {pid}) failed with exit code 1", 15),
    # the others time out after timeout_s; rank 1 then exits min(30, timeout_s) after SIGTERM
    "stall": (f"rank(s) 1 stalled: rank(s) 0 waited {TIMEOUT_S} s", 2 * TIMEOUT_S + 15),
}


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_model_dir, tiny_model_dir_4layers):
    """The recipe and the uninterrupted 2-process run every faulty one must end like."""
    root = tmp_path_factory.mktemp("faults")
    write_recipe(root, "finetune", tiny_model_dir, tiny_model_dir_4layers)
    run(root, still("finetune.yaml", "name=uninterrupted", *COMMON, "--nproc", "2"))
    return root


def _resume_and_compare(root: Path, name: str, command: str) -> None:
    argv = shlex.split(command)
    assert argv[:3] == ["still", "run", "finetune.yaml"] and argv[-1] == "--resume"
    run(root, still(*argv[2:]))
    assert steps(root / "runs" / name) == list(range(1, MAX_STEPS + 1))
    final, reference = losses(root / "runs" / name)[-1], losses(root / "runs" / "uninterrupted")
    assert final == pytest.approx(reference[-1], abs=1e-3)


def _first_checkpoint(root: Path, name: str) -> Path:
    return root / "runs" / name / "checkpoints" / "checkpoint-20" / MARKER


@pytest.mark.parametrize(
    "fault,resume",
    [
        ("kill", True),
        ("raise", True),
        # a stall costs 2 x timeout_s before the resume: ~70 s in all on 2 shared cores
        ("stall", False),
        pytest.param("stall", True, marks=pytest.mark.slow),
    ],
)
def test_a_failed_rank_stops_the_job_in_bounded_time_and_resume_ends_the_same(root, fault, resume):
    name = f"fault-{fault}" + ("-resumed" if resume else "")
    logs = (open(root / f"{name}.out", "w"), open(root / f"{name}.err", "w"))
    timeout = f"distributed.timeout_s={TIMEOUT_S}"
    args = still("finetune.yaml", f"name={name}", *COMMON, timeout, "--nproc", "2")
    launcher = start(root, args, FAULTS_ON_PATH, logs)
    wait_for(_first_checkpoint(root, name).exists, 300, launcher)
    ranks = rank_pids(launcher.pid)
    assert sorted(ranks) == [0, 1]
    os.kill(ranks[1], SIGNALS[fault])
    faulted = time.monotonic()
    launcher.wait(timeout=120)
    detected = time.monotonic() - faulted
    for log in logs:
        log.close()
    err = (root / f"{name}.err").read_text()
    print(f"\n{fault}: still run exited {launcher.returncode} {detected:.1f} s after the fault")

    message, bound = EXPECTED[fault]
    assert launcher.returncode != 0 and detected < bound, err[-3000:]
    assert not any(alive(pid) for pid in ranks.values())  # every rank has exited
    errors = [line for line in err.splitlines() if line.startswith("still: error:")]
    assert len(errors) == 1 and message.format(pid=ranks[1]) in errors[0], err[-3000:]
    assert "ChildFailedError" not in err  # the agent's report is read, not shown
    if fault != "raise":  # only the rank that raised has a traceback to show
        assert "Traceback" not in err
    complete = [c for c in list_checkpoints(root / "runs" / name / "checkpoints")
                if (c / MARKER).exists()]  # fmt: skip
    assert complete and checkpoint_problem(complete[0]) is None
    assert f"last complete checkpoint: {complete[0].name}" in errors[0]
    if resume:
        _resume_and_compare(root, name, errors[0].split("resume with: ", 1)[1])


def test_max_restarts_restarts_the_group_from_the_last_checkpoint(root):
    """torchrun's elastic agent restarts both ranks after one is killed; they resume."""
    name = "restarted"
    logs = (open(root / f"{name}.out", "w"), open(root / f"{name}.err", "w"))
    # every rank must join the restarted group within timeout_s: on 2 busy cores the restarted
    # processes' imports alone can take 30 s. The agents' c10d rendezvous: main_process_port.
    restarts = ["distributed.max_restarts=1", "distributed.timeout_s=120"]
    restarts.append(f"distributed.main_process_port={free_port()}")
    args = still("finetune.yaml", f"name={name}", *COMMON, *restarts, "--nproc", "2")
    launcher = start(root, args, None, logs)
    wait_for(_first_checkpoint(root, name).exists, 300, launcher)
    os.kill(rank_pids(launcher.pid)[1], signal.SIGKILL)
    launcher.wait(timeout=300)
    for log in logs:
        log.close()
    out, err = ((root / f"{name}.{ext}").read_text() for ext in ("out", "err"))
    assert launcher.returncode == 0, err[-3000:]
    assert "still: resuming from" in out
    assert steps(root / "runs" / name) == list(range(1, MAX_STEPS + 1))
    final, reference = losses(root / "runs" / name)[-1], losses(root / "runs" / "uninterrupted")
    assert final == pytest.approx(reference[-1], abs=1e-3)


@pytest.mark.slow  # two two-machine launches: ~70 s on 2 shared cores
def test_sigterm_to_both_machines_saves_once_exits_0_and_resumes_exactly(root):
    """Preemption of a two-machine job (SLURM signals every node): one complete checkpoint."""
    name = "preempted-2-machines"
    machines = start_machines((root, root), "finetune.yaml", name, "rdzv", COMMON)
    metrics = root / "runs" / name / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, 300)
    for _, process, _, _ in machines:
        process.send_signal(signal.SIGTERM)
    results = finish_machines(machines, timeout=120)
    for code, _, err in results.values():
        assert code == 0, err[-3000:]
    assert results[0][1].count("still: stopped by SIGTERM at step") == 1
    checkpoints = list_checkpoints(root / "runs" / name / "checkpoints")
    assert len(checkpoints) == 1 and checkpoint_problem(checkpoints[0]) is None
    assert int(checkpoints[0].name.split("-")[1]) < MAX_STEPS

    resumed = start_machines((root, root), "finetune.yaml", name, "rdzv", [*COMMON, "--resume"])
    for code, _, err in finish_machines(resumed).values():
        assert code == 0, err[-3000:]
    assert steps(root / "runs" / name) == list(range(1, MAX_STEPS + 1))
    final, reference = losses(root / "runs" / name)[-1], losses(root / "runs" / "uninterrupted")
    assert final == pytest.approx(reference[-1], abs=1e-3)
