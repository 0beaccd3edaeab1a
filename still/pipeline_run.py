"""`kind: pipeline`: running the planned stages (`still/pipeline.py` plans and checks them).

Each finished stage leaves a record in the dir it wrote (`RunDir.write_stage`): a key over what
it runs (the resolved recipe, or a publish stage's options), the sha256 of every file it reads,
and the run ids of the stages it needs, plus its own new run id. A stage whose dir is complete
and whose key is unchanged is skipped; a stage that runs again gets a new run id, so everything
downstream of it runs again. The runner of one stage (`run_stage`) comes from still/cli.py,
which alone imports the runners.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import time
import uuid
from collections.abc import Callable

from still.errors import StillError
from still.pipeline import MODEL_KINDS, Stage
from still.pipeline_sections import PipelineRecipe
from still.rundir import input_files

# A distill recipe's sections that do not change the teacher cache it reads: a student trained
# longer, at another rate or tracked elsewhere reuses the cache its cache stage built.
NOT_IN_CACHE = ("name", "output_dir", "train", "track", "eval_tasks", "regression_tasks")


def _what_runs(stage: Stage) -> dict:
    if stage.kind == "publish":
        return {"publish": stage.recipe.model_dump(mode="json")}
    recipe = stage.recipe.model_dump(mode="json")
    if stage.kind == "cache":
        return {"cache": {k: v for k, v in recipe.items() if k not in NOT_IN_CACHE}}
    if stage.kind == "cascade":
        return {"cascade": recipe}
    return {"recipe": recipe}


def stage_key(stage: Stage, by_name: dict[str, Stage]) -> str:
    """Over what the stage runs, the files it reads and the run ids of its upstream stages."""
    upstream = {
        name: (by_name[name].run.read_stage() or {}).get("run_id") for name in stage.upstream
    }
    payload = {
        **_what_runs(stage),
        "inputs": input_files(stage.recipe),
        "upstream": upstream,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _complete(stage: Stage, key: str) -> bool:
    record = stage.run.read_stage()
    if not record or record.get("key") != key:
        return False
    return stage.kind not in MODEL_KINDS or stage.run.saved_model() is not None


def _selected(stages: list[Stage], start: str | None, only: str | None) -> list[str]:
    names = [stage.name for stage in stages]
    for flag, value in (("--from", start), ("--only", only)):
        if value is not None and value not in names:
            close = difflib.get_close_matches(value, names, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"stages: {', '.join(names)}"
            raise StillError(f"{flag} {value}: no such stage", hint)
    if start and only:
        raise StillError("give --from or --only, not both")
    return names[names.index(start) :] if start else [only] if only else names


def _refuse_before_running(stages: list[Stage], selected: list[str], force: bool) -> None:
    by_name = {stage.name: stage for stage in stages}
    for stage in stages:
        if stage.name not in selected:
            continue
        for name in stage.upstream:
            if name not in selected and by_name[name].run.read_stage() is None:
                raise StillError(
                    f"stage '{stage.name}' needs stage '{name}', which has not run",
                    hint="run the pipeline without --from/--only first",
                )
        if not force and not _ours(stage):
            what = {"cache": "teacher cache dir", "publish": "out dir"}.get(stage.kind, "run dir")
            raise StillError(
                f"stage '{stage.name}': {what} {stage.path} exists and holds something this "
                "pipeline did not write"
                if what != "run dir"
                else f"stage '{stage.name}': run dir {stage.path} exists and holds a run of "
                "another recipe",
                hint="add --force to replace it, or change the stage's name",
            )


def _ours(stage: Stage) -> bool:
    """The stage may replace its dir: empty, written by a pipeline, or a run of the same recipe
    (one that failed, or one run by hand before the pipeline existed)."""
    path = stage.path
    if not path.exists() or not any(path.iterdir()) or stage.run.read_stage() is not None:
        return True
    if stage.kind in ("cache", "publish"):
        return False
    return stage.recipe.source_path is not None and stage.run.recipe_source() == str(
        stage.recipe.source_path
    )


def run(
    pipeline: PipelineRecipe,
    stages: list[Stage],
    run_stage: Callable[[Stage], None],
    *,
    start: str | None = None,
    only: str | None = None,
    force: bool = False,
) -> list[dict]:
    """Run (or skip) the selected stages in order; one progress line each. Returns what each
    stage did: {stage, kind, run_dir, action, seconds}."""
    selected = _selected(stages, start, only)
    _refuse_before_running(stages, selected, force)
    by_name = {stage.name: stage for stage in stages}
    done = []
    for number, stage in enumerate(stages, start=1):
        if stage.name not in selected:
            continue
        key = stage_key(stage, by_name)
        line = f"still: pipeline {pipeline.name} [{number}/{len(stages)}] {stage.name}"
        forced = force or stage.name in (start, only)
        if not forced and _complete(stage, key):
            print(f"{line}: skipped (complete; recipe and inputs unchanged) {stage.path}")
            done.append(_did(stage, "skipped", 0.0))
            continue
        print(f"{line}: running {stage.kind} -> {stage.path}", flush=True)
        started = time.monotonic()
        run_stage(stage)
        seconds = round(time.monotonic() - started, 1)
        if stage.kind in MODEL_KINDS and stage.run.saved_model() is None:
            # stopped early (SIGTERM saves a checkpoint and returns): nothing downstream may
            # use it, and it is not recorded as complete
            raise StillError(
                f"stage '{stage.name}' stopped before it saved its model ({stage.path})",
                hint="run the pipeline again to redo it, or --resume its recipe alone",
            )
        record = {"pipeline": pipeline.name, "stage": stage.name, "key": key}
        stage.run.write_stage({**record, "run_id": uuid.uuid4().hex, "seconds": seconds})
        print(f"{line}: done in {seconds:.1f} s", flush=True)
        done.append(_did(stage, "ran", seconds))
    return done


def _did(stage: Stage, action: str, seconds: float) -> dict:
    return {
        "stage": stage.name,
        "kind": stage.kind,
        "run_dir": str(stage.path),
        "action": action,
        "seconds": seconds,
    }


def summary(stages: list[Stage], done: list[dict]) -> str:
    """The stages' dirs and times; then what they made: each comparison (its % of teacher
    column is the retention), each distilled student's retention table, the published dirs and
    their files, the teacher caches and the cascade reports."""
    lines = [f"still: pipeline summary ({len(done)} of {len(stages)} stages)"]
    for row in done:
        took = f"{row['seconds']:.1f} s" if row["action"] == "ran" else "skipped"
        lines.append(f"  {row['stage']:<16} {row['kind']:<9} {took:>9}  {row['run_dir']}")
    for kind in ("eval", "distill", "publish", "cache", "cascade"):
        for stage in stages:
            lines += _made(stage) if stage.kind == kind else []
    return "\n".join(lines)


def _table(title: str, path) -> list[str]:
    if not path.is_file():
        return []
    return ["", f"{title} ({path}):", path.read_text(encoding="utf-8").rstrip()]


def _made(stage: Stage) -> list[str]:
    if stage.kind == "eval":
        return _table(f"comparison, stage {stage.name}", stage.path / "compare.md")
    if stage.kind == "distill":
        return _table(
            f"retention of stage {stage.name} against its teacher",
            stage.run.retention_dir / "compare.md",
        )
    if stage.kind == "cascade":
        return _table(f"cascade, stage {stage.name}", stage.path / "cascade" / "cascade.md")
    if stage.kind not in ("cache", "publish") or not stage.path.is_dir():
        return []
    if stage.kind == "cache":
        return ["", f"teacher cache, stage {stage.name}: {stage.path}"]
    files = sorted(p.name for p in stage.path.iterdir() if p.suffix in (".safetensors", ".gguf"))
    card = stage.path / "README.md"
    return [
        "",
        f"published, stage {stage.name}: {stage.path}"
        + (f" (model card {card})" if card.is_file() else ""),
        *(f"  {stage.path / name}" for name in files),
    ]
