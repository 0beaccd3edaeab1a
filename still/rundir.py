"""The run dir: the unit every later step (eval, distill, compare, publish) consumes.

`open_run_dir` refuses to clobber an existing run unless told to resume or force, writes the
resolved recipe first, and removes the dir again if the run dies before it saved anything, so
a mistake never leaves a half-written run behind.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

from still import __version__
from still.errors import StillError
from still.recipe import Recipe, recipe_hash, to_yaml

RESOLVED_RECIPE = "recipe.resolved.yaml"
# Set by `still run` for the processes it launches (still.launch): the run dir it opened for them.
LAUNCHED_RUN_DIR_ENV = "STILL_LAUNCHED_RUN_DIR"
LINEAGE = "lineage.json"


def run_dir_for(recipe: Recipe) -> Path:
    return Path(recipe.output_dir) / recipe.name


def is_main_process() -> bool:
    """Rank 0 of a launch (or the only process): the one that writes, logs and prints."""
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def open_run_dir(recipe: Recipe, *, resume: bool = False, force: bool = False):
    """Yield the run dir, created (or reopened for --resume). Cleans up if nothing was saved."""
    run_dir = run_dir_for(recipe)
    if os.environ.get(LAUNCHED_RUN_DIR_ENV) == str(run_dir.resolve()):
        # `still run` opened this dir and launched us into it; it judges, and cleans up on failure.
        yield run_dir
        return
    parent_existed = run_dir.parent.exists()
    # Only the main process judges and creates the dir: under a multi-process launch the other
    # ranks would otherwise find the dir rank 0 just made and refuse it as "already exists".
    existed = is_main_process() and run_dir.exists() and any(run_dir.iterdir())
    if existed and not resume and not force:
        raise StillError(
            f"run dir {run_dir} already exists",
            hint="add --resume to continue it, --force to start over, or change `name`",
        )
    if existed and resume and not (run_dir / RESOLVED_RECIPE).exists():
        raise StillError(f"--resume: {run_dir} is not a still run dir (no {RESOLVED_RECIPE})")
    if is_main_process():
        if existed and force and not resume:
            shutil.rmtree(run_dir)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / RESOLVED_RECIPE).write_text(to_yaml(recipe))
        except OSError as exc:
            raise StillError(f"cannot write run dir {run_dir}: {exc.strerror}") from None
    try:
        yield run_dir
    except BaseException:
        if is_main_process() and not (existed and resume) and not _has_saved_state(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
            if not parent_existed:
                # the `runs/` we made for it, unless another run has appeared there meanwhile
                with contextlib.suppress(OSError):
                    run_dir.parent.rmdir()
        raise


def _has_saved_state(run_dir: Path) -> bool:
    checkpoints = run_dir / "checkpoints"
    return any((run_dir / name).exists() for name in ("adapter", "model")) or (
        checkpoints.exists() and any(checkpoints.glob("checkpoint-*"))
    )


def absolute_ref(ref: str) -> str:
    """A model reference that still resolves when read from another directory."""
    path = Path(ref).expanduser()
    return str(path.resolve()) if path.exists() else ref


def run_group(recipe: Recipe) -> str:
    """Runs of one pipeline (e.g. recipes/quickstart/*) share a tracking group."""
    source = getattr(recipe, "_source", None)
    return Path(source).parent.name if source else recipe.name


def format_summary(summary: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items())


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _git_commit() -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None


def write_lineage(run_dir: Path, recipe: Recipe, **fields) -> dict:
    """Record what this run was made from: models, data files with hashes, recipe, code."""
    data_files = []
    data = getattr(recipe, "data", None)
    for source in (data.train, data.eval) if data else ():
        if source is not None and source.path and Path(source.path).is_file():
            data_files.append({"path": source.path, "sha256": file_sha256(Path(source.path))})
        elif source is not None and source.hf:
            data_files.append({"hf": source.hf, "subset": source.subset, "split": source.split})
    lineage = {
        "kind": recipe.kind,
        "name": recipe.name,
        **fields,
        "data": data_files,
        "recipe_sha256": recipe_hash(recipe),
        "git_commit": _git_commit(),
        "still_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if is_main_process():
        (run_dir / LINEAGE).write_text(json.dumps(lineage, indent=2))
    return lineage
