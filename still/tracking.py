"""Tracking: `metrics.jsonl` in every run dir, plus W&B / TensorBoard through Trainer's own
callbacks. With no W&B key or network, W&B runs offline and says how to sync later; tracking
problems never stop training.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

from transformers import TrainerCallback

from still.sections import TrackSection

SECRET_ENV_VARS = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


class MetricsJsonl(TrainerCallback):
    """Appends every Trainer log (loss, lr, grad norm, eval loss) with throughput to a file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._last_time: float | None = None
        self._last_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_time = time.perf_counter()
        self._last_tokens = state.num_input_tokens_seen

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, "epoch": state.epoch, **logs}
        now = time.perf_counter()
        tokens = state.num_input_tokens_seen
        if self._last_time is not None and tokens > self._last_tokens and "loss" in logs:
            row["tokens_per_s"] = (tokens - self._last_tokens) / max(now - self._last_time, 1e-9)
            self._last_time, self._last_tokens = now, tokens
        row["num_input_tokens_seen"] = tokens
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")


def read_metrics(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def stable_run_id(run_dir: Path) -> str | None:
    """The run dir's tracker id, made once by the main process and reused on --resume."""
    path = Path(run_dir) / "wandb_run_id"
    if not path.exists() and int(os.environ.get("RANK", "0")) == 0:
        path.write_text(uuid.uuid4().hex[:12])
    return path.read_text().strip() if path.exists() else None


def report_to(track: TrackSection, *, run_dir: Path, group: str, job_type: str) -> list[str]:
    """Trainer `report_to` list; configures W&B through its env vars (offline when no key)."""
    targets = []
    if track.tensorboard:
        targets.append("tensorboard")
    wandb_cfg = track.wandb
    if wandb_cfg is not None and wandb_cfg.mode != "disabled":
        mode = wandb_cfg.mode
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        os.environ.setdefault("WANDB_MODE", mode)
        os.environ["WANDB_PROJECT"] = wandb_cfg.project
        if wandb_cfg.entity:
            os.environ["WANDB_ENTITY"] = wandb_cfg.entity
        os.environ["WANDB_RUN_GROUP"] = wandb_cfg.group or group
        os.environ["WANDB_JOB_TYPE"] = job_type
        if wandb_cfg.tags:
            os.environ["WANDB_TAGS"] = ",".join(wandb_cfg.tags)
        os.environ.setdefault("WANDB_DIR", str(run_dir))
        # One W&B run per run dir: --resume continues it instead of starting a new one.
        run_id = stable_run_id(run_dir)
        if run_id:
            os.environ["WANDB_RUN_ID"] = run_id
            os.environ["WANDB_RESUME"] = "allow"
        if os.environ["WANDB_MODE"] == "offline":
            print(f"still: W&B is offline; sync later with `wandb sync {run_dir}/wandb/offline-run-*`")
        targets.append("wandb")
    return targets
