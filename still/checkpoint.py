"""Checkpoints: which one a `--resume` continues from.

Trainer writes checkpoints (model/adapter, optimizer, scheduler, RNG states, trainer state
with the data position); this module decides which is safe to resume.
"""

from __future__ import annotations

from pathlib import Path

from transformers.trainer_utils import get_last_checkpoint


def resume_checkpoint(run_dir: Path) -> str | None:
    """The newest checkpoint in the run dir, or None (and say so) when there is none yet."""
    checkpoints = Path(run_dir) / "checkpoints"
    last = get_last_checkpoint(str(checkpoints)) if checkpoints.exists() else None
    if last is None:
        print(f"still: --resume: no checkpoint in {checkpoints}; starting from step 0")
    else:
        print(f"still: resuming from {last}")
    return last
