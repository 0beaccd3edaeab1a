"""Several processes: the recipe's `distributed:` section → accelerate (+ DeepSpeed) configs → a
launch, and which process this one is (`is_main_process`). Where a distillation teacher goes
once the processes run is distill/teacher.py's business.

`still run R.yaml --nproc N` (or a recipe whose strategy needs it) writes `launch/accelerate.yaml`,
`launch/deepspeed.json` (zero2/zero3) and `launch/launch.sh` into the run dir, then starts
`accelerate launch --config_file launch/accelerate.yaml -m still.cli run R.yaml ...`. The files
are plain accelerate/DeepSpeed configs, so the same job can be started by hand or from a
scheduler script. A process started by `accelerate launch` (ours or the user's) never launches
again: the launcher's settings are what that process runs under.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from still import rank_failures
from still.errors import StillError
from still.sections import DistributedSection

# Set by `still run` for the processes it launches: the run dir it opened for them.
LAUNCHED_RUN_DIR_ENV = "STILL_LAUNCHED_RUN_DIR"


@dataclass(frozen=True)
class LaunchPlan:
    strategy: str  # single | ddp | zero2 | zero3 | fsdp (never auto)
    per_machine: int
    num_machines: int

    @property
    def total_processes(self) -> int:
        return self.per_machine * self.num_machines

    @property
    def needs_launcher(self) -> bool:
        return self.total_processes > 1 or self.strategy in ("zero2", "zero3", "fsdp")


# --------------------------------------------------------------------------- quiet libraries
# Lines the training stack prints that no user can act on: DeepSpeed warns on import that it
# found no GPU (the preflight report names the device), and logs which accelerator it chose.
_DEEPSPEED_NOTICES = ("Setting accelerator to CPU", "Setting ds_accelerator to")


def _not_a_deepspeed_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(_DEEPSPEED_NOTICES)


@contextlib.contextmanager
def quiet_imports():
    """Import the training stack (transformers' Trainer, DeepSpeed) without its notices.

    transformers prints `[INFO] Running in WANDB offline mode` when its W&B integration is
    imported under WANDB_MODE=offline; still says so itself once a tracked run opens (and
    reads WANDB_MODE then), so the variable is hidden only while the import runs. DeepSpeed's
    logger keeps a filter that drops its accelerator notices for the rest of the process.
    """
    logging.getLogger("DeepSpeed").addFilter(_not_a_deepspeed_notice)
    mode = os.environ.pop("WANDB_MODE", None)
    try:
        yield
    finally:
        if mode is not None:
            os.environ["WANDB_MODE"] = mode


def is_main_process() -> bool:
    """Rank 0 of a launch (or the only process): the one that writes, logs and prints."""
    return int(os.environ.get("RANK", "0")) == 0


def inside_launch() -> bool:
    """True in a process that `accelerate launch` (or torchrun) started."""
    env = os.environ
    return (
        "LOCAL_RANK" in env
        or env.get("ACCELERATE_USE_DEEPSPEED") == "true"
        or env.get("ACCELERATE_USE_FSDP") == "true"
        or LAUNCHED_RUN_DIR_ENV in env
    )


def join_process_group(dist: DistributedSection) -> None:
    """Under a launcher: create the process group now, with `distributed.timeout_s` as the
    timeout of every collective (a rank that stalls then fails its peers in bounded time).

    Data preparation (accelerate's `local_main_process_first`) would otherwise create it first,
    with the 30-minute default; Trainer later reuses this one (`ddp_timeout` says the same).
    """
    from datetime import timedelta

    from accelerate import PartialState

    PartialState(timeout=timedelta(seconds=dist.timeout_s))


def restart_count() -> int:
    """How often torchrun's elastic agent has restarted this process group (0: first start)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def plan(dist: DistributedSection, nproc: int | None = None) -> LaunchPlan:
    """Processes and strategy for this machine: `--nproc`, else the recipe, else every GPU."""
    if nproc is not None and nproc < 1:
        raise StillError(f"--nproc {nproc}: needs at least 1 process")
    per_machine = nproc or dist.num_processes or max(1, _visible_gpus())
    total = per_machine * dist.num_machines
    strategy = dist.strategy
    if strategy == "auto":
        strategy = "ddp" if total > 1 else "single"
    if strategy == "single" and total > 1:
        raise StillError(
            f"distributed.strategy is single but {total} processes were asked for",
            hint="set distributed.strategy (ddp, zero2, zero3, fsdp) or drop --nproc",
        )
    if strategy == "fsdp" and not _visible_gpus():
        # accelerate turns FSDP on only for GPU process groups; on CPU it would silently be DDP.
        raise StillError(
            "distributed.strategy fsdp needs GPUs; this machine has none",
            hint="use zero3 to shard on CPU",
        )
    return LaunchPlan(strategy, per_machine, dist.num_machines)


# --------------------------------------------------------------------------- config files
def _offload(device: str, nvme_path: str | None) -> dict:
    if device == "nvme":
        return {"device": "nvme", "nvme_path": nvme_path, "pin_memory": True}
    return {"device": "cpu", "pin_memory": True}


def deepspeed_config(dist: DistributedSection, stage: int) -> dict:
    """A DeepSpeed JSON whose "auto" values HF Trainer fills from the recipe's train section."""
    zero: dict = {"stage": stage, "contiguous_gradients": True, "reduce_bucket_size": "auto"}
    if stage == 3:
        zero |= {
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
            # the final save writes one normal model file, not only ZeRO shards
            "stage3_gather_16bit_weights_on_model_save": True,
        }
    config = {
        "zero_optimization": zero,
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "steps_per_print": 1_000_000,  # Trainer logs; DeepSpeed's own step lines are noise
        "wall_clock_breakdown": False,
    }
    if dist.offload_optimizer != "none":
        zero["offload_optimizer"] = _offload(dist.offload_optimizer, dist.nvme_path)
        # DeepSpeed's CPU Adam steps the offloaded optimizer state far faster than torch's.
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
        }
    if dist.offload_params != "none":
        zero["offload_param"] = _offload(dist.offload_params, dist.nvme_path)
    return config


def accelerate_config(
    dist: DistributedSection,
    launch: LaunchPlan,
    *,
    mixed_precision: str,
    deepspeed_file: Path | None,
) -> dict:
    config: dict = {
        "compute_environment": "LOCAL_MACHINE",
        "num_processes": launch.total_processes,  # accelerate counts every machine's processes
        "num_machines": launch.num_machines,
        "machine_rank": dist.machine_rank,
        "main_process_port": dist.main_process_port,
        "use_cpu": False,  # Trainer picks CPU itself when there is no GPU
    }
    if launch.num_machines > 1:
        config |= {
            "main_process_ip": dist.main_process_ip,
            "same_network": True,
            "rdzv_backend": "static",
        }
    if launch.strategy in ("zero2", "zero3"):
        # With a DeepSpeed file, precision lives in the file ("auto" = the recipe's precision).
        config["distributed_type"] = "DEEPSPEED"
        config["deepspeed_config"] = {
            "deepspeed_config_file": str(deepspeed_file),
            "zero3_init_flag": launch.strategy == "zero3",
        }
        if launch.num_machines > 1:
            # One launcher per machine (torchrun's agent), as `still run` runs on each; accelerate's
            # default, pdsh, would instead ssh from machine 0 with DeepSpeed's own launcher.
            config["deepspeed_config"]["deepspeed_multinode_launcher"] = "standard"
        return config
    config["mixed_precision"] = mixed_precision
    if launch.strategy == "fsdp":
        config["distributed_type"] = "FSDP"
        config["fsdp_config"] = {
            "fsdp_version": 2,
            # one shard unit per decoder layer, found from the model's _no_split_modules
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_reshard_after_forward": True,
            "fsdp_state_dict_type": "FULL_STATE_DICT",
            "fsdp_offload_params": dist.offload_params == "cpu",
            # carving a student and adding LoRA need the real weights on every process
            "fsdp_cpu_ram_efficient_loading": False,
        }
    else:
        config["distributed_type"] = "MULTI_GPU" if launch.total_processes > 1 else "NO"
    return config


def write_configs(
    dist: DistributedSection,
    launch: LaunchPlan,
    launch_dir: Path,
    *,
    mixed_precision: str,
    command: list[str],
) -> Path:
    """Write the configs and a launch.sh that reruns this job by hand; returns accelerate.yaml."""
    launch_dir.mkdir(parents=True, exist_ok=True)
    deepspeed_file = None
    if launch.strategy in ("zero2", "zero3"):
        deepspeed_file = launch_dir / "deepspeed.json"
        deepspeed_file.write_text(
            json.dumps(deepspeed_config(dist, int(launch.strategy[-1])), indent=2) + "\n"
        )
    config_file = launch_dir / "accelerate.yaml"
    config = accelerate_config(
        dist, launch, mixed_precision=mixed_precision, deepspeed_file=deepspeed_file
    )
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    if command:
        script = launch_dir / "launch.sh"
        env = " ".join(f"{k}={v}" for k, v in launcher_env(dist).items())
        script.write_text(
            "#!/bin/sh\n# Written by `still run`: the same job with plain accelerate.\n"
            + f"{env} "
            + " ".join(shlex.quote(part) for part in command)
            + "\n"
        )
        script.chmod(0o755)
    return config_file


def launcher_env(dist: DistributedSection) -> dict[str, str]:
    """The elastic agent's grace between SIGTERM and SIGKILL when it stops the processes (after
    a rank failed, or on a signal): torch's 30 s, or less when timeout_s is shorter. With
    restarts, where its c10d rendezvous runs (torchrun's --rdzv-endpoint; accelerate has no flag
    for it on one machine): machine 0's address and main_process_port."""
    env = {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(min(30, dist.timeout_s))}
    if dist.max_restarts:
        host = dist.main_process_ip or "127.0.0.1"
        env["PET_RDZV_ENDPOINT"] = f"{host}:{dist.main_process_port}"
        # The agent's shared TCPStore outlives a restart, with the dead ranks' addresses in it
        # under the same keys; opted out, each round's rank 0 hosts a fresh store.
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    return env


def command(
    config_file: Path,
    recipe_path: str,
    overrides: list[str],
    *,
    resume: bool = False,
    max_restarts: int = 0,
) -> list[str]:
    """The `accelerate launch` command line that runs this recipe in every process."""
    child = ["-m", "still.cli", "run", str(Path(recipe_path).resolve()), *overrides]
    # torchrun's elastic agent restarts the whole group; the restarted processes resume. Its
    # static rendezvous (accelerate's default) keeps one store across restarts in torch 2.13,
    # where a restarted rank can read a dead peer's address (gloo: "Connection refused"); c10d
    # with an unshared store (launcher_env) gives each restart a fresh one. (A config file's
    # rdzv_backend loses to the flag's default, so it is a flag.)
    restarts = ["--max_restarts", str(max_restarts), "--rdzv_backend", "c10d"]
    restarts = restarts if max_restarts else []
    return [
        "accelerate",
        "launch",
        "--config_file",
        str(config_file),
        *restarts,
        *child,
        *(["--resume"] if resume else []),
    ]


class LaunchFailed(Exception):
    """The launched processes exited with `code`; a user error was printed by them, a failed
    rank is named in `reason` (rank_failures.describe) for the CLI to print as one line."""

    def __init__(self, code: int, reason: str | None = None):
        super().__init__(reason or f"launched processes exited with {code}")
        self.code = code
        self.reason = reason


def launch(
    config_file: Path,
    recipe_path: str,
    overrides: list[str],
    run_dir: Path | None,
    *,
    resume: bool,
    dist: DistributedSection,
    world_size: int,
) -> None:
    """Run `accelerate launch`; LaunchFailed(2) when a process stopped on a user error, else
    LaunchFailed(its exit code, which rank failed) when it failed.

    SIGTERM/SIGINT are passed on (the workers stop with a checkpoint). stderr is passed through
    as it comes, up to the first `still: error:` line: the same error from the other ranks and
    the launcher's report of the failed child (a traceback) are not the user's problem.
    """
    argv = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *command(
            config_file, recipe_path, overrides, resume=resume, max_restarts=dist.max_restarts
        )[2:],
    ]
    env = dict(os.environ) | launcher_env(dist)
    if run_dir is not None:  # the processes take this already opened run dir as theirs
        env[LAUNCHED_RUN_DIR_ENV] = str(Path(run_dir).resolve())
    process = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE)

    def forward(signum, _frame):
        # To the workers themselves: they stop after the current step with a checkpoint and exit
        # 0. The launcher, if signalled, would give them only 30 s before killing them.
        for pid in _children(process.pid) or [process.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        user_error, report = _pass_stderr_through(process.stderr.fileno())
        code = process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code != 0 and user_error:
        raise LaunchFailed(2)
    if code != 0:
        text = report.decode(errors="replace")
        failures, stopped = rank_failures.parse_failures(text), rank_failures.stopped_pids(text)
        reason = rank_failures.describe(failures, stopped, world_size, dist.timeout_s)
        raise LaunchFailed(code, reason)


def _children(pid: int) -> list[int]:
    try:
        return [
            int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        ]
    except (OSError, ValueError):  # not Linux, or already gone
        return []


# The elastic agent logs this line when a worker failed; if it then gives up (no restarts
# left) its traceback and failure table follow, ending the output: read by rank_failures, not
# shown. A restart instead goes on with the workers' output, and what was held is shown.
_AGENT_FAILED = re.compile(rb"^[EW]\d{4} .*elastic/multiprocessing/api\.py:\d+\] failed")
_TRACEBACK_LINE = re.compile(rb"^(Traceback |  File |    |\s*\^+\s*$)")
_LINE_END = re.compile(rb"[\r\n]")


def _pass_stderr_through(fd: int) -> tuple[bool, bytes]:
    """Copy the launcher's stderr to ours, line by line (a progress bar's \\r ends one too), up
    to a `still: error:` line or the agent's final report; returns (a user error was seen, the
    agent's lines and report)."""
    pending, user_error, report = b"", False, b""
    held: list[bytes] | None = None  # lines after the agent's "failed", until we know more
    silenced = False
    while chunk := os.read(fd, 1 << 16):
        pending += chunk
        while not silenced and (end := _LINE_END.search(pending)):
            line, pending = pending[: end.end()], pending[end.end() :]
            if held is not None:
                if b"ChildFailedError" in line:
                    silenced = True
                    continue
                if _TRACEBACK_LINE.match(line):
                    held.append(line)
                    continue
                sys.stderr.buffer.write(b"".join(held))  # a restart: show what was held
                held = None
            if b"elastic/multiprocessing/api.py" in line:
                report += line
            if b"still: error:" in line:
                sys.stderr.buffer.write(line)
                silenced = user_error = True
            elif _AGENT_FAILED.match(line):
                held = [line]
            else:
                sys.stderr.buffer.write(line)
        if silenced:
            report += pending
            pending = b""
        sys.stderr.buffer.flush()
    if not silenced:
        sys.stderr.buffer.write(b"".join(held or []) + pending)
        sys.stderr.buffer.flush()
    return user_error, report


def launched_as() -> str:
    """The strategy this process was started under, read from accelerate's environment."""
    env = os.environ
    if env.get("ACCELERATE_USE_FSDP") == "true":
        return "fsdp"
    if env.get("ACCELERATE_USE_DEEPSPEED") == "true":
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        config_file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if config_file and Path(config_file).is_file():
            stage = str(
                json.loads(Path(config_file).read_text())
                .get("zero_optimization", {})
                .get("stage", stage)
            )
        return f"zero{stage}" if stage in ("2", "3") else "deepspeed"
    return "ddp" if int(env.get("WORLD_SIZE", "1")) > 1 else "single"


def note_launcher_mismatch(dist: DistributedSection) -> None:
    actual = launched_as()
    if dist.strategy not in ("auto", actual) and is_main_process():
        print(
            f"still: note: this process was launched as {actual}; the recipe's "
            f"distributed.strategy {dist.strategy} applies only when `still run` launches"
        )
