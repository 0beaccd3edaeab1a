"""`kind: pipeline`: stages (recipe files or inline recipes) run in the order of their references.

A stage refers to another's run dir as `${stages.NAME.run_dir}` in its `overrides` (or inline
recipe); those references are its inputs and decide the order. Everything that can be wrong is
refused before any stage starts, as one line at its key: an unknown stage, a cycle, an eval
stage used where a model is needed, a stage's data with no usable rows (a conversation with no
assistant turn), a stage that needs several processes, and a run dir the pipeline did not write.

Each finished stage leaves a record in its run dir (`RunDir.write_stage`): a key over its
resolved recipe, the sha256 of every file it reads, and the run ids of the stages it refers to,
plus its own new run id. A stage whose run dir is complete and whose key is unchanged is
skipped; a stage that runs again gets a new run id, so everything downstream of it runs again.
The runner of one stage (`run_stage`) comes from still/cli.py, which alone imports the runners.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from still import recipe as recipe_module
from still.errors import StillError
from still.pipeline_sections import PipelineRecipe
from still.rundir import RunDir, input_files
from still.yaml_errors import where

REFERENCE = re.compile(r"\$\{stages\.([^}]*)\}")
MODEL_KINDS = ("finetune", "distill")


@dataclass
class Stage:
    name: str
    recipe: Any  # a finetune, distill or eval recipe, with its references resolved
    upstream: list[str] = field(default_factory=list)

    @property
    def run(self) -> RunDir:
        return RunDir.of(self.recipe)


# --------------------------------------------------------------------------- references
def _references(value: Any, key: str) -> list[tuple[str, str, str]]:
    """(key, stage, attribute) of every ${stages.STAGE.ATTRIBUTE} inside `value`."""
    if isinstance(value, str):
        found = []
        for match in REFERENCE.finditer(value):
            stage, _, attribute = match.group(1).rpartition(".")
            found.append((key, stage or attribute, attribute if stage else ""))
        return found
    if isinstance(value, dict):
        return [r for k, v in value.items() for r in _references(v, f"{key}.{k}".strip("."))]
    if isinstance(value, list):
        return [r for item in value for r in _references(item, key)]
    return []


def _substitute(value: Any, run_dirs: dict[str, str]) -> Any:
    if isinstance(value, str):
        return REFERENCE.sub(lambda m: run_dirs[m.group(1).rpartition(".")[0]], value)
    if isinstance(value, dict):
        return {k: _substitute(v, run_dirs) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(item, run_dirs) for item in value]
    return value


def _stage_refs(pipeline: PipelineRecipe, index: int) -> list[tuple[str, str, str, str]]:
    """(where, key, stage, attribute) of each reference stage `index` makes, checked."""
    spec = pipeline.stages[index]
    names = [stage.name for stage in pipeline.stages]
    found = []
    for part, value in (("overrides", spec.overrides), ("inline", spec.inline or {})):
        for key, target, attribute in _references(value, ""):
            loc = ("stages", index, part, *(key.split(".") if part == "inline" else [key]))
            at = where(pipeline._origins, loc, pipeline._source or "the pipeline")
            if target not in names:
                close = difflib.get_close_matches(target, names, n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"stages: {', '.join(names)}"
                raise StillError(
                    f"{at}: stage '{spec.name}' refers to unknown stage '{target}'", hint
                )
            if attribute != "run_dir":
                raise StillError(
                    f"{at}: unknown stage attribute '{attribute}' in ${{stages.{target}.…}}",
                    hint=f"use ${{stages.{target}.run_dir}}",
                )
            found.append((at, key, target, attribute))
    return found


def _order(pipeline: PipelineRecipe) -> list[int]:
    """Stage indices, each after the stages it refers to (list order otherwise); a cycle is
    an error naming it."""
    index_of = {stage.name: i for i, stage in enumerate(pipeline.stages)}
    deps = {
        i: [index_of[target] for _, _, target, _ in _stage_refs(pipeline, i)]
        for i in range(len(pipeline.stages))
    }
    order: list[int] = []
    visiting: list[int] = []

    def visit(i: int) -> None:
        if i in order:
            return
        if i in visiting:
            cycle = [pipeline.stages[j].name for j in visiting[visiting.index(i) :] + [i]]
            at = where(pipeline._origins, ("stages", i), pipeline._source or "the pipeline")
            raise StillError(
                f"{at}: the stages refer to each other in a cycle: {' -> '.join(cycle)}",
                hint="a stage can use only the run dirs of stages that do not use it",
            )
        visiting.append(i)
        for j in deps[i]:
            visit(j)
        visiting.pop()
        order.append(i)

    for i in range(len(pipeline.stages)):
        visit(i)
    return order


# --------------------------------------------------------------------------- planning
def _load_stage(pipeline: PipelineRecipe, index: int, run_dirs: dict[str, str]):
    spec = pipeline.stages[index]
    overrides = [
        f"{key}={json.dumps(_substitute(value, run_dirs))}" for key, value in spec.overrides.items()
    ]
    if spec.recipe is not None:
        recipe = recipe_module.load(spec.recipe, overrides)
    else:
        prefix = ("stages", index, "inline")
        origins = {k[3:]: v for k, v in pipeline._origins.items() if k[:3] == prefix}
        recipe = recipe_module.load_inline(
            _substitute(spec.inline, run_dirs), origins, pipeline._source, overrides
        )
    if recipe.kind == "pipeline":
        at = where(pipeline._origins, ("stages", index), pipeline._source or "the pipeline")
        raise StillError(f"{at}: stage '{spec.name}' is a pipeline; list its stages here")
    return recipe


def plan(pipeline: PipelineRecipe) -> list[Stage]:
    """Every stage loaded and its references checked, in running order; nothing runs."""
    stages: dict[str, Stage] = {}
    run_dirs: dict[str, str] = {}
    for index in _order(pipeline):
        spec = pipeline.stages[index]
        upstream = []
        for at, key, target, _ in _stage_refs(pipeline, index):
            if stages[target].recipe.kind not in MODEL_KINDS:
                raise StillError(
                    f"{at}: stage '{spec.name}' uses stage '{target}' as {key}, but '{target}' "
                    f"is an {stages[target].recipe.kind} run: it has no model",
                    hint="refer to a finetune or distill stage",
                )
            upstream.append(target)
        recipe = _load_stage(pipeline, index, run_dirs)
        stages[spec.name] = Stage(spec.name, recipe, sorted(set(upstream)))
        run_dirs[spec.name] = str(stages[spec.name].run.path)
    return list(stages.values())


def preflight(stages: list[Stage]) -> None:
    """Each stage's data read and checked, and one process each, before anything runs."""
    from still import data as still_data
    from still import launch

    for stage in stages:
        if stage.recipe.kind not in MODEL_KINDS:
            continue
        if launch.plan(stage.recipe.distributed, None).needs_launcher:
            raise StillError(
                f"stage '{stage.name}' needs several processes; a pipeline runs its stages in one",
                hint=f"run it alone: still run {stage.recipe.source_path} --nproc N",
            )
        try:
            still_data.check_rows(stage.recipe.data)
        except StillError as error:
            raise StillError(f"stage '{stage.name}': {error.message}", error.hint) from None


# --------------------------------------------------------------------------- running
def stage_key(stage: Stage, by_name: dict[str, Stage]) -> str:
    """Over the resolved recipe, the files it reads and the run ids of its upstream stages."""
    upstream = {
        name: (by_name[name].run.read_stage() or {}).get("run_id") for name in stage.upstream
    }
    payload = {
        "recipe": stage.recipe.model_dump(mode="json"),
        "inputs": input_files(stage.recipe),
        "upstream": upstream,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _complete(stage: Stage, key: str) -> bool:
    record = stage.run.read_stage()
    if not record or record.get("key") != key:
        return False
    return stage.recipe.kind == "eval" or stage.run.saved_model() is not None


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
            raise StillError(
                f"stage '{stage.name}': run dir {stage.run.path} exists and holds a run of "
                "another recipe",
                hint="add --force to replace it, or change the stage's name",
            )


def _ours(stage: Stage) -> bool:
    """The stage may replace its run dir: empty, written by a pipeline, or a run of the same
    recipe (one that failed, or one run by hand before the pipeline existed)."""
    path = stage.run.path
    if not path.exists() or not any(path.iterdir()) or stage.run.read_stage() is not None:
        return True
    return stage.recipe.source_path is not None and stage.run.recipe_source() == str(
        stage.recipe.source_path
    )


def run(
    pipeline: PipelineRecipe,
    stages: list[Stage],
    run_stage: Callable[[Any], None],
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
            print(f"{line}: skipped (complete; recipe and inputs unchanged) {stage.run.path}")
            done.append(_did(stage, "skipped", 0.0))
            continue
        print(f"{line}: running {stage.recipe.kind} -> {stage.run.path}", flush=True)
        started = time.monotonic()
        run_stage(stage.recipe)
        seconds = round(time.monotonic() - started, 1)
        if stage.recipe.kind in MODEL_KINDS and stage.run.saved_model() is None:
            # stopped early (SIGTERM saves a checkpoint and returns): nothing downstream may
            # use it, and it is not recorded as complete
            raise StillError(
                f"stage '{stage.name}' stopped before it saved its model ({stage.run.path})",
                hint="run the pipeline again to redo it, or --resume its recipe alone",
            )
        record = {"pipeline": pipeline.name, "stage": stage.name, "key": key}
        stage.run.write_stage({**record, "run_id": uuid.uuid4().hex, "seconds": seconds})
        print(f"{line}: done in {seconds:.1f} s", flush=True)
        done.append(_did(stage, "ran", seconds))
    return done


def _did(stage: Stage, action: str, seconds: float) -> dict:
    kind = stage.recipe.kind
    return {
        "stage": stage.name,
        "kind": kind,
        "run_dir": str(stage.run.path),
        "action": action,
        "seconds": seconds,
    }


def summary(stages: list[Stage], done: list[dict]) -> str:
    """The stages' run dirs and times, then each eval stage's comparison (with retention)."""
    lines = [f"still: pipeline summary ({len(done)} of {len(stages)} stages)"]
    for row in done:
        took = f"{row['seconds']:.1f} s" if row["action"] == "ran" else "skipped"
        lines.append(f"  {row['stage']:<16} {row['kind']:<9} {took:>9}  {row['run_dir']}")
    for stage in stages:
        compare = Path(stage.run.path) / "compare.md"
        if stage.recipe.kind == "eval" and compare.is_file():
            lines += ["", f"{compare}:", compare.read_text(encoding="utf-8").rstrip()]
    return "\n".join(lines)
