"""The run dir: the unit every later step (eval, distill, compare, publish) consumes.

`RunDir` is the only code that knows the names of a run dir's files: the resolved recipe (with
the file it was resolved from), lineage.json, metrics.jsonl, checkpoints/, the saved adapter/
or model/, eval/ and the tracker's run id. Everything else asks it.

`open_run_dir` refuses to clobber an existing run unless told to resume or force, writes the
resolved recipe first, and removes the dir again if the run dies before it saved anything, so
a mistake never leaves a half-written run behind.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import subprocess
from pathlib import Path

import yaml

from still import __version__
from still.errors import StillError
from still.fsutil import atomic_write_json, atomic_write_text, file_sha256
from still.launch import LAUNCHED_RUN_DIR_ENV, is_main_process
from still.recipe import Recipe, recipe_hash, to_yaml

RESOLVED_RECIPE = "recipe.resolved.yaml"
LINEAGE = "lineage.json"
METRICS = "metrics.jsonl"
TRACKER_RUN_ID = "wandb_run_id"
REGRESSION = "regression.json"
PIPELINE_STAGE = "pipeline-stage.json"  # written by a pipeline when its stage finished
# The first line of the resolved recipe names the YAML it was resolved from.
SOURCE_HEADER = "# Resolved from "


class RunDir:
    """One run dir on disk. Reading never creates anything; writers are main-process only."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @classmethod
    def of(cls, recipe: Recipe) -> RunDir:
        return cls(Path(recipe.output_dir) / recipe.name)

    # -------------------------------------------------------------- what is where
    @property
    def name(self) -> str:
        return self.path.name

    @property
    def recipe_file(self) -> Path:
        return self.path / RESOLVED_RECIPE

    @property
    def lineage_file(self) -> Path:
        return self.path / LINEAGE

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def eval_dir(self) -> Path:
        return self.path / "eval"

    @property
    def regression_dir(self) -> Path:
        """Base and result scored on the recipe's regression_tasks (the forgetting check)."""
        return self.path / "regression"

    @property
    def regression_file(self) -> Path:
        return self.path / REGRESSION

    @property
    def retention_dir(self) -> Path:
        """A distill run's teacher scored on its eval_tasks, and compare.md between them."""
        return self.path / "retention"

    @property
    def stage_file(self) -> Path:
        return self.path / PIPELINE_STAGE

    @property
    def launch_dir(self) -> Path:
        return self.path / "launch"

    @property
    def tracker_run_id_file(self) -> Path:
        return self.path / TRACKER_RUN_ID

    def final_dir(self, *, full: bool) -> Path:
        """Where the finished weights go: model/ for full weights, adapter/ for an adapter."""
        return self.model_dir if full else self.adapter_dir

    # -------------------------------------------------------------- questions
    def is_run_dir(self) -> bool:
        """Written by `still run` (a finished or running run, not a plain model dir)."""
        return self.path.is_dir() and self.lineage_file.is_file() and self.recipe_file.is_file()

    def saved_model(self) -> Path | None:
        """The finished adapter/ or model/ dir, if the run saved one."""
        for candidate in (self.adapter_dir, self.model_dir):
            if candidate.is_dir():
                return candidate
        return None

    def has_saved_state(self) -> bool:
        """Anything a --resume or a later step could use: final weights or a checkpoint."""
        checkpoints = self.checkpoints
        return self.saved_model() is not None or (
            checkpoints.exists() and any(checkpoints.glob("checkpoint-*"))
        )

    # -------------------------------------------------------------- reading
    def read_lineage(self) -> dict:
        """lineage.json; {} when absent. A corrupt file is a one-line error naming it."""
        if not self.lineage_file.is_file():
            return {}
        try:
            lineage = json.loads(self.lineage_file.read_text(encoding="utf-8"))
        # ValueError covers a bad encoding, invalid JSON and an int of 4300+ digits
        except (OSError, ValueError, RecursionError) as error:
            raise StillError(
                f"{self.lineage_file}: not valid JSON ({error})",
                hint="the run dir is damaged; rerun its recipe with --force",
            ) from None
        if not isinstance(lineage, dict):
            raise StillError(
                f"{self.lineage_file}: expected a JSON object",
                hint="the run dir is damaged; rerun its recipe with --force",
            )
        return lineage

    def recipe_text(self) -> str:
        if not self.recipe_file.is_file():
            return ""
        try:
            return self.recipe_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            reason = "not UTF-8 text" if isinstance(error, UnicodeDecodeError) else "unreadable"
            raise StillError(
                f"{self.recipe_file}: {reason}",
                hint="the run dir is damaged; rerun its recipe with --force",
            ) from None

    def recipe_data(self) -> dict:
        """The resolved recipe as plain data ({} when absent)."""
        text = self.recipe_text()
        try:
            data = yaml.safe_load(text) if text else {}
        except (yaml.YAMLError, RecursionError):
            raise StillError(
                f"{self.recipe_file}: not valid YAML",
                hint="the run dir is damaged; rerun its recipe with --force",
            ) from None
        return data if isinstance(data, dict) else {}

    def recipe_source(self) -> str | None:
        """The recipe YAML this run was resolved from, as recorded when it started."""
        first = self.recipe_text().partition("\n")[0]
        return (
            first.removeprefix(SOURCE_HEADER).strip() if first.startswith(SOURCE_HEADER) else None
        )

    def metrics(self) -> list[dict]:
        """Every row of metrics.jsonl; a line cut short by a kill is skipped."""
        if not self.metrics_file.is_file():
            return []
        rows = []
        try:
            text = self.metrics_file.read_text(encoding="utf-8", errors="replace")
        except OSError as error:
            raise StillError(f"{self.metrics_file}: cannot read ({error.strerror})") from None
        for line in text.splitlines():
            # ValueError: invalid JSON or an int of 4300+ digits
            with contextlib.suppress(ValueError, RecursionError):
                row = json.loads(line)
                if isinstance(row, dict):
                    rows.append(row)
        return rows

    def read_regression(self) -> dict | None:
        """The forgetting check's report, if the run made one (None: no regression_tasks)."""
        if not self.regression_file.is_file():
            return None
        try:
            report = json.loads(self.regression_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise StillError(f"{self.regression_file}: not a readable report ({error})") from None
        return report if isinstance(report, dict) else None

    def read_stage(self) -> dict | None:
        """What the pipeline that ran this dir recorded (None: no pipeline finished it)."""
        if not self.stage_file.is_file():
            return None
        try:
            record = json.loads(self.stage_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # damaged: the stage runs again
        return record if isinstance(record, dict) else None

    def write_stage(self, record: dict) -> None:
        atomic_write_json(self.stage_file, record)

    def tracker_run_id(self) -> str | None:
        path = self.tracker_run_id_file
        if not path.is_file():
            return None
        return path.read_text(encoding="utf-8", errors="replace").strip()

    # -------------------------------------------------------------- writing
    def write_recipe(self, recipe: Recipe) -> None:
        # to_yaml starts with SOURCE_HEADER + the recipe's file when it was loaded from one
        atomic_write_text(self.recipe_file, to_yaml(recipe))

    def write_regression(self, report: dict) -> None:
        atomic_write_json(self.regression_file, report)

    def write_lineage(self, recipe: Recipe, **fields) -> dict:
        """Record what this run was made from: models, data files with hashes, recipe, code."""
        lineage = {
            "kind": recipe.kind,
            "name": recipe.name,
            **fields,
            "data": _data_files(recipe),
            "recipe_sha256": recipe_hash(recipe),
            "git_commit": _git_commit(),
            "still_version": __version__,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        if is_main_process():
            atomic_write_json(self.lineage_file, lineage)
        return lineage


def input_files(recipe) -> list[dict]:
    """The files a recipe reads, with their sha256: data (and its held-out split), task YAMLs."""
    files = _data_files(recipe)
    for name in ("eval_tasks", "regression_tasks", "tasks"):
        for path in getattr(recipe, name, None) or ():
            if Path(path).is_file():
                files.append({"path": path, "sha256": file_sha256(Path(path))})
    return files


def _data_files(recipe: Recipe) -> list[dict]:
    files = []
    data = getattr(recipe, "data", None)
    for source in [*data.train_sources(), data.eval] if data else ():
        if source is not None and source.path and Path(source.path).is_file():
            files.append({"path": source.path, "sha256": file_sha256(Path(source.path))})
        elif source is not None and source.hf:
            files.append({"hf": source.hf, "subset": source.subset, "split": source.split})
        else:
            continue
        if source.holdout is not None:  # the split is drawn from the file, so this recreates it
            files[-1]["holdout"] = source.holdout.model_dump()
    return files


def _git_commit() -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None


@contextlib.contextmanager
def open_run_dir(recipe: Recipe, *, resume: bool = False, force: bool = False):
    """Yield the RunDir, created (or reopened for --resume). Cleans up if nothing was saved."""
    run = RunDir.of(recipe)
    run_dir = run.path
    if os.environ.get(LAUNCHED_RUN_DIR_ENV) == str(run_dir.resolve()):
        # `still run` opened this dir and launched us into it; it judges, and cleans up on failure.
        yield run
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
    if existed and resume and not run.recipe_file.exists():
        raise StillError(f"--resume: {run_dir} is not a still run dir (no {RESOLVED_RECIPE})")
    if is_main_process():
        if existed and force and not resume:
            shutil.rmtree(run_dir)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StillError(f"cannot write run dir {run_dir}: {exc.strerror}") from None
        run.write_recipe(recipe)
    try:
        yield run
    except BaseException:
        if is_main_process() and not (existed and resume) and not run.has_saved_state():
            shutil.rmtree(run_dir, ignore_errors=True)
            if not parent_existed:
                # the `runs/` we made for it, unless another run has appeared there meanwhile
                with contextlib.suppress(OSError):
                    run_dir.parent.rmdir()
        raise
