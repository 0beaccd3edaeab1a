"""What the multi-process tests share: the tiny recipes, running `still run` as the user would,
reading the losses back, and finding a launched rank's pid (to signal it from the test)."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from still.rundir import RunDir

ENV = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def write_recipe(path: Path, kind: str, model_dir: Path, teacher_dir: Path) -> Path:
    data = path / "train.jsonl"
    rows = [
        ("What does json.dumps do?", "Serialize obj to a JSON formatted str."),
        ("What does abs do?", "Return the absolute value."),
        ("What does len do?", "Return the number of items."),
        ("What does min do?", "Return the smallest item."),
    ] * 2
    data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in rows))
    head = (
        f'kind: finetune\nname: x\nmodel: {{ref: "{model_dir}"}}\n'
        "lora: {r: 4, alpha: 8, dropout: 0.0}\n"
    )
    if kind == "distill":
        head = (
            f'kind: distill\nname: x\nteacher: {{ref: "{teacher_dir}"}}\n'
            "student: {init: {keep_layers: [0, 3]}}\n"
            "distill: {loss: forward_kl, temperature: 2.0}\n"
        )
    (path / "ppl.yaml").write_text(
        "name: ppl\ntype: perplexity\ndata: {path: train.jsonl}\nprompt: '{{ question }}'\n"
        "target: '{{ answer }}'\nmetrics: [loss]\n"
    )
    recipe = path / f"{kind}.yaml"
    recipe.write_text(
        head
        + textwrap.dedent("""\
        data:
          train: {path: train.jsonl, format: instruction, prompt: question, response: answer}
          max_len: 64
        train: {lr: 1.0e-2, batch_size: 2, max_steps: 4, warmup_ratio: 0.0, seed: 3}
        """)
    )
    return recipe


def run(cwd: Path, args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **ENV, **(env or {})}
    result = subprocess.run(
        args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def start(cwd: Path, args: list[str], env: dict | None = None, logs=None) -> subprocess.Popen:
    """Popen with stdout and stderr piped, or written to the two open files `logs`."""
    out, err = logs or (subprocess.PIPE, subprocess.PIPE)
    return subprocess.Popen(
        args, cwd=cwd, env={**os.environ, **ENV, **(env or {})}, stdout=out, stderr=err, text=True
    )


def still(*args: str) -> list[str]:
    return [sys.executable, "-m", "still.cli", "run", *args]


def losses(run_dir: Path) -> list[float]:
    return [row["loss"] for row in RunDir(run_dir).metrics() if "loss" in row]


def steps(run_dir: Path) -> list[int]:
    return [row["step"] for row in RunDir(run_dir).metrics() if "loss" in row]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(f"exited {process.returncode} first:\n{err[-3000:]}")
        assert time.time() < deadline, "timed out waiting"
        time.sleep(0.05)


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _descendants(pid: int) -> list[int]:
    found = []
    for child in _children(pid):
        found += [child, *_descendants(child)]
    return found


def rank_pids(launcher_pid: int) -> dict[int, int]:
    """Global rank → pid of the workers below a `still run` (or accelerate launch) process."""
    ranks = {}
    for pid in _descendants(launcher_pid):
        try:
            raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        env = dict(item.split(b"=", 1) for item in raw if b"=" in item)
        if b"RANK" in env and b"LOCAL_RANK" in env:
            ranks[int(env[b"RANK"])] = pid
    return ranks


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def machine_flags(how: str, rank: int, port: int) -> tuple[list[str], dict]:
    """Machine `rank`'s part of a two-machine job on 127.0.0.1, named the way `how` does."""
    if how == "hostfile":  # a hostfile names no port: the recipe's, here an override
        flags = ["--nodes-file", "hosts", "--node-rank", str(rank)]
        return [*flags, f"distributed.main_process_port={port}"], {}
    if how == "slurm":
        env = {
            "SLURM_NNODES": "2",
            "SLURM_NODEID": str(rank),
            "SLURM_JOB_NODELIST": "localhost,localhost",
            "MASTER_PORT": str(port),
        }
        return ["--slurm"], env
    return ["--nnodes", "2", "--node-rank", str(rank), "--rdzv-endpoint", f"127.0.0.1:{port}"], {}


def start_machines(dirs, recipe: str, name: str, how: str, extra=()) -> list:
    """Start machine 1, then machine 0 (dirs[rank] is its working directory), output to files
    (two pipes would fill while the test waits on the other process)."""
    port = free_port()
    started = []
    for rank in (1, 0):
        cwd = dirs[rank]
        flags, env = machine_flags(how, rank, port)
        env["STILL_CACHE"] = str(cwd / f"cache-{rank}")
        logs = (open(cwd / f"{name}-{rank}.out", "w"), open(cwd / f"{name}-{rank}.err", "w"))
        process = start(cwd, still(recipe, f"name={name}", *extra, *flags), env, logs)
        started.append((rank, process, cwd, logs))
    return started


def finish_machines(started, timeout: float = 600) -> dict[int, tuple[int, str, str]]:
    """Wait for every machine; rank → (exit code, stdout, stderr)."""
    results = {}
    for rank, process, cwd, logs in started:
        process.wait(timeout=timeout)
        for log in logs:
            log.close()
        name = Path(logs[0].name).name.rsplit(".", 1)[0]
        out, err = ((cwd / f"{name}.{ext}").read_text() for ext in ("out", "err"))
        results[rank] = (process.returncode, out, err)
    return results


def two_machines(dirs, recipe: str, name: str, how: str, extra=()) -> dict[int, tuple]:
    """A whole two-machine job that must succeed; rank → (exit code, stdout, stderr)."""
    results = finish_machines(start_machines(dirs, recipe, name, how, extra))
    for code, _, err in results.values():
        assert code == 0, err[-3000:]
    return results
