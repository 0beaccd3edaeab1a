"""Checkpoints that are complete or ignored, resume, SIGTERM/SIGINT, non-finite steps.

Trainer writes each checkpoint (model/adapter, optimizer, scheduler, RNG states, trainer
state with the data position) non-atomically, and a process killed mid-save leaves a
half-written `checkpoint-N/`. Rather than patch Trainer's save, every checkpoint gets a
completion marker written last (`still-complete.json`: sha256 of each file, tmp + rename),
and `--resume` continues only from a checkpoint whose marker exists and whose hashes match.
Pruning is ours too (TrainingArguments.save_total_limit is None): a checkpoint is deleted
only after a newer one is complete, so a crash can never leave zero usable checkpoints.

Both runners (finetune/sft.py, distill/kd.py) get the same behaviour from
`reliability_callbacks` and `stopped_by_signal`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import threading
from pathlib import Path

import torch
from transformers import TrainerCallback

from still.errors import StillError
from still.fsutil import atomic_write_json, atomic_write_text, file_sha256, umask_modes
from still.launch import inside_launch, is_main_process
from still.rank_failures import LOST_CONTACT_EXIT
from still.rundir import RunDir

MARKER = "still-complete.json"
# In checkpoints/ from the start of training: this run writes markers, so a checkpoint without
# one is partial. Its absence means a run from before markers existed (trusted, unverified).
USES_MARKERS = ".still-markers"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# A new checkpoint is roughly the size of the last one; the margin covers optimizer state
# that grows (e.g. the first save after resume) and the filesystem's own overhead.
DISK_MARGIN = 1.5


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _any_rank(flag: bool, device) -> bool:
    """True on every rank when it is true on one, so all ranks save/stop/skip together."""
    if not _dist_ready():
        return flag
    tensor = torch.tensor([1 if flag else 0], device=device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return bool(tensor.item())


# --------------------------------------------------------------------------- markers
def _checkpoint_files(checkpoint: Path) -> list[Path]:
    return sorted(
        p
        for p in checkpoint.rglob("*")
        if p.is_file() and p.name != MARKER and not p.name.endswith(".tmp")
    )


def write_marker(checkpoint: Path) -> Path:
    """Hash every file of a finished checkpoint and write the marker last, atomically."""
    checkpoint = Path(checkpoint)
    files = {str(p.relative_to(checkpoint)): file_sha256(p) for p in _checkpoint_files(checkpoint)}
    match = _CHECKPOINT_RE.match(checkpoint.name)
    payload = {"format": 1, "step": int(match.group(1)) if match else None, "files": files}
    target = atomic_write_json(checkpoint / MARKER, payload, indent=1, fsync=True)
    # The rename itself must reach the disk before older checkpoints are pruned.
    try:
        dir_fd = os.open(checkpoint, os.O_RDONLY)
    except OSError:
        return target
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return target


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why this checkpoint must not be resumed from, or None when it is complete and intact."""
    marker = Path(checkpoint) / MARKER
    if not marker.exists():
        return "no completion marker"
    try:
        files = json.loads(marker.read_text(encoding="utf-8"))["files"]
        files = dict(files)
    except (OSError, ValueError, KeyError, TypeError):
        return "unreadable completion marker"
    if not files:
        return "completion marker lists no files"
    for name, digest in files.items():
        path = Path(checkpoint) / name
        if not path.is_file():
            return f"{name} missing"
        if file_sha256(path) != digest:
            return f"{name} corrupt (sha256 mismatch)"
    return None


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """checkpoint-N dirs, newest (highest N) first."""
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return []
    found = [p for p in checkpoints_dir.iterdir() if p.is_dir() and _CHECKPOINT_RE.match(p.name)]
    return sorted(found, key=lambda p: int(_CHECKPOINT_RE.match(p.name).group(1)), reverse=True)


# --------------------------------------------------------------------------- resume
def resume_checkpoint(run: RunDir) -> str | None:
    """The newest complete, intact checkpoint; partial or corrupt ones are named and removed.

    Ignored checkpoints are deleted (main process only) because the resumed run writes the
    same `checkpoint-N` names again and stale files must not mix into them.
    """
    checkpoints = run.checkpoints
    candidates = list_checkpoints(checkpoints)
    say = print if is_main_process() else (lambda *a, **k: None)
    legacy = not (checkpoints / USES_MARKERS).exists()
    if legacy and candidates and not any((c / MARKER).exists() for c in candidates):
        # Runs from before completion markers existed: trust Trainer's newest, say so.
        if (candidates[0] / "trainer_state.json").exists():
            say(
                f"still: resuming from {candidates[0]} "
                "(made without completion markers: unverified)"
            )
            return str(candidates[0])
    chosen, ignored = None, []
    for candidate in candidates:
        problem = checkpoint_problem(candidate)
        if problem is None:
            chosen = candidate
            break
        ignored.append((candidate, problem))
    if ignored:
        names = ", ".join(f"{c.name} ({why})" for c, why in ignored)
        say(f"still: --resume: ignored incomplete checkpoints: {names}")
        if is_main_process():
            for candidate, _ in ignored:
                shutil.rmtree(candidate, ignore_errors=True)
    if chosen is None:
        say(f"still: --resume: no complete checkpoint in {checkpoints}; starting from step 0")
        return None
    say(f"still: resuming from {chosen}")
    if is_main_process():
        _truncate_metrics(run.metrics_file, int(_CHECKPOINT_RE.match(chosen.name).group(1)))
    return str(chosen)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop logged rows past the resumed step (they are logged again) and a torn last line."""
    if not path.exists():
        return
    kept = []
    # a kill can leave any bytes at the end; an undecodable line is dropped like a torn one
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if "\ufffd" in line:
            continue
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short by the kill
        logged = row.get("step", 0) if isinstance(row, dict) else None
        if isinstance(logged, int | float) and logged <= step:
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))


def prune_checkpoints(checkpoints_dir: Path, keep: int) -> list[Path]:
    """Keep the newest `keep` complete checkpoints; drop older ones, complete or not."""
    removed = []
    complete_seen = 0
    for candidate in list_checkpoints(checkpoints_dir):
        if complete_seen >= keep:
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
        elif (candidate / MARKER).exists():
            complete_seen += 1
    return removed


# --------------------------------------------------------------------------- callbacks
class CompleteCheckpoints(TrainerCallback):
    """After Trainer's save: marker (last), then pruning; before a save: enough disk space?"""

    def __init__(self, keep: int):
        self.keep = keep

    def on_train_begin(self, args, state, control, **kwargs):
        if args.should_save:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            (Path(args.output_dir) / USES_MARKERS).touch()

    def on_save(self, args, state, control, **kwargs):
        # ZeRO/FSDP ranks write their own shards: hash only once every rank has finished.
        if _dist_ready():
            torch.distributed.barrier()
        if args.should_save:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if checkpoint.is_dir():
                umask_modes(checkpoint)  # safetensors writes owner-only files (still.fsutil)
                write_marker(checkpoint)
                prune_checkpoints(Path(args.output_dir), self.keep)
        if _dist_ready():
            torch.distributed.barrier()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if control.should_save:
            check_disk_space(Path(args.output_dir), state.global_step, model)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _estimate_checkpoint_bytes(checkpoints_dir: Path, model) -> int:
    """Size of the newest complete checkpoint; before the first, trainable weights × 3 (+Adam)."""
    for candidate in list_checkpoints(checkpoints_dir):
        if (candidate / MARKER).exists():
            return _dir_bytes(candidate)
    if model is None:
        return 0
    return 3 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def check_disk_space(checkpoints_dir: Path, step: int, model=None) -> None:
    """Refuse to start a save that would fill the disk (and so leave it half-written)."""
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    needed = int(_estimate_checkpoint_bytes(checkpoints_dir, model) * DISK_MARGIN)
    free = shutil.disk_usage(checkpoints_dir).free
    if free >= needed:
        return
    complete = [c.name for c in list_checkpoints(checkpoints_dir) if (c / MARKER).exists()]
    last = f"the last complete one is {complete[0]}" if complete else "no complete checkpoint yet"
    raise StillError(
        f"not enough disk space to save checkpoint-{step} in {checkpoints_dir}: "
        f"{free / 2**20:.0f} MiB free, about {needed / 2**20:.0f} MiB needed; {last}",
        hint="free some space, then `still run <recipe> --resume`",
    )


class SignalStop(TrainerCallback):
    """SIGTERM/SIGINT → finish the current step, save a complete checkpoint, stop cleanly.

    Handlers are installed only for the duration of train() and only in the main thread
    (Python allows signal handlers nowhere else); a second Ctrl-C interrupts at once.

    Under a launcher, a rank that has not stopped `distributed.timeout_s` after the signal exits
    by itself: it is stuck (its step stalled, or a peer died and the collective hangs); its
    step and save must fit in that time anyway, since their collectives time out after it. (The
    elastic agent, when it is the one stopping the processes, SIGKILLs them after 30 s.)
    """

    SIGNALS = ("SIGTERM", "SIGINT")

    def __init__(self):
        self.received: str | None = None
        self.stopped_at: int | None = None
        self._previous: dict = {}
        self._grace_s: float | None = None

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received is not None and name == "SIGINT":
            raise KeyboardInterrupt
        if self.received is None and self._grace_s is not None:
            timer = threading.Timer(self._grace_s, self._give_up, args=(name,))
            timer.daemon = True
            timer.start()
        self.received = self.received or name
        print(
            f"still: {name} received: saving a checkpoint after this step, then stopping",
            file=sys.stderr,
        )

    def _give_up(self, name: str) -> None:
        rank = os.environ.get("RANK", "0")
        print(
            f"still: rank {rank} had not stopped {self._grace_s:g} s after {name}; exiting",
            file=sys.stderr,
            flush=True,
        )
        os._exit(LOST_CONTACT_EXIT)

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            return
        if inside_launch():  # TrainingArguments.ddp_timeout is distributed.timeout_s
            self._grace_s = float(args.ddp_timeout)
        for name in self.SIGNALS:
            signum = getattr(signal, name)
            self._previous[signum] = signal.signal(signum, self._handle)

    def on_step_end(self, args, state, control, **kwargs):
        if _any_rank(self.received is not None, args.device):
            self.received = self.received or "SIGTERM"  # another rank got it
            if state.global_step < state.max_steps:
                self.stopped_at = state.global_step
                control.should_save = True
                control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


class NonFiniteSteps(TrainerCallback):
    """Skip optimizer updates whose gradients are NaN/inf; stop after too many in a row.

    How the skip works inside Trainer's API: `on_pre_optimizer_step` runs after clipping and
    right before `optimizer.step()`. Setting every gradient to None there makes torch's
    optimizers (AdamW, SGD, Adafactor, and bitsandbytes') pass over each parameter entirely:
    no weight change, no momentum or variance update, no weight decay, and Adam's per-parameter
    step count is not advanced. (Zeroed gradients would not do: AdamW still moves the weights
    through its momentum and decays them.) The LR scheduler still advances, as for any step.
    A NaN loss makes NaN gradients, so it is caught here too. Not effective under DeepSpeed,
    whose engine keeps gradients in its own buffers (it has its own overflow skipping).
    """

    def __init__(self, max_in_a_row: int):
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0
        self.total = 0
        self._skipped_this_step = False

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        params = [
            p for group in optimizer.param_groups for p in group["params"] if p.grad is not None
        ]
        finite = all(bool(torch.isfinite(p.grad).all()) for p in params)
        self._skipped_this_step = _any_rank(not finite, args.device)
        if self._skipped_this_step:
            for p in params:
                p.grad = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self._skipped_this_step:
            self._skipped_this_step = False
            self.in_a_row += 1
            self.total += 1
            if args.should_save:
                print(
                    f"still: step {state.global_step}: non-finite loss/gradients, update skipped "
                    f"({self.in_a_row} in a row, {self.total} in all)",
                    file=sys.stderr,
                )
            if self.in_a_row >= self.max_in_a_row:
                raise StillError(
                    f"training diverged: {self.in_a_row} steps in a row with non-finite loss or "
                    f"gradients (up to step {state.global_step}); {_last_complete(args)}",
                    hint="lower train.lr, keep train.max_grad_norm > 0, check the data; "
                    "train.max_nonfinite_steps sets the limit",
                )
        else:
            self.in_a_row = 0
        if control.should_save and model is not None and not _weights_finite(model):
            raise StillError(
                f"weights became non-finite at step {state.global_step}; not saving them; "
                f"{_last_complete(args)}",
                hint="lower train.lr, or resume from that checkpoint with --resume",
            )
        return control


def _weights_finite(model) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.is_floating_point())


def _last_complete(args) -> str:
    complete = [c for c in list_checkpoints(Path(args.output_dir)) if (c / MARKER).exists()]
    return f"the last good checkpoint is {complete[0]}" if complete else "no checkpoint was saved"


def reliability_callbacks(train) -> list[TrainerCallback]:
    """What every runner adds to its Trainer; `train` is the recipe's TrainSection."""
    # Order matters: SignalStop may request a save that the other two then check.
    return [
        SignalStop(),
        NonFiniteSteps(train.max_nonfinite_steps),
        CompleteCheckpoints(train.save_total_limit),
    ]


def stopped_by_signal(trainer, recipe) -> bool:
    """After train(): if a signal stopped it, say how to resume (the checkpoint is saved)."""
    stop = next(
        (cb for cb in trainer.callback_handler.callbacks if isinstance(cb, SignalStop)), None
    )
    if stop is None or stop.stopped_at is None:
        return False
    if trainer.is_world_process_zero():
        source = recipe.source_path or "<recipe>"
        try:
            source = os.path.relpath(source)
        except ValueError:
            pass
        print(
            f"still: stopped by {stop.received} at step {stop.stopped_at}; "
            f"resume with: still run {source} --resume"
        )
    return True
