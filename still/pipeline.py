"""`kind: pipeline`: planning. Stages run in the order of their references; this module loads
them and refuses everything that can be wrong before any stage starts (`still/pipeline_run.py`
runs them).

A stage is a recipe to run (`recipe:` a file, or `inline:`), or one of three verbs: `cache:
STAGE` builds the teacher cache a distill stage reads (`still cache`; that stage then runs after
it), `publish: {run, out, gguf, ...}` publishes a run (`still publish`), and `cascade:` analyses
an eval recipe's cascade (`still cascade`). A stage refers to another's dir as
`${stages.NAME.run_dir}` (in `overrides`, an inline recipe or `publish`); those references, and a
cache stage's distill stage, are its inputs and decide the order.

Refused as one line at its key: an unknown stage, a cycle, a stage that is not a model (an eval
run, a cache, a published dir, a cascade report) used as one, a cache stage for a stage that
is not a distill stage or has no distill.teacher_cache, a cascade stage whose recipe has no
cascade, two stages writing one dir; then, naming the stage, its data with no usable rows (a
conversation with no assistant turn), a stage that needs several processes, and what the
runners' own checks find (GGUF types, task files; `check_stage` from still/cli.py).
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from still import recipe as recipe_module
from still.errors import StillError
from still.pipeline_sections import PipelineRecipe
from still.rundir import RunDir
from still.yaml_errors import where

REFERENCE = re.compile(r"\$\{stages\.([^}]*)\}")
MODEL_KINDS = ("finetune", "distill")
# Why a stage that is not a finetune or distill stage cannot be used as a model.
NOT_A_MODEL = {
    "eval": "is an eval run: it has no model",
    "cache": "is a teacher cache: it has no model",
    "cascade": "is a cascade report: it has no model",
    "publish": "is a published dir, not a run: refer to the stage it publishes",
}


@dataclass
class Stage:
    name: str
    kind: str  # finetune | distill | eval (a recipe's kind) | cache | publish | cascade
    recipe: Any  # the recipe it runs (a cache stage: its distill stage's); publish: its options
    path: Path  # where it writes (run dir, cache dir, published dir); its stage record is there
    at: str  # where the pipeline file defines it
    upstream: list[str] = field(default_factory=list)

    @property
    def run(self) -> RunDir:
        return RunDir(self.path)


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


def _at(pipeline: PipelineRecipe, *key: str | int) -> str:
    return where(pipeline._origins, key, pipeline._source or "the pipeline")


def _parts(spec) -> list[tuple[str, Any]]:
    """The parts of a stage that may hold references: overrides, an inline recipe, publish."""
    parts = [("overrides", spec.overrides)]
    parts += [(name, getattr(spec, name)) for name in ("inline", "cascade")]
    if spec.publish is not None:
        parts.append(("publish", spec.publish.model_dump(exclude_defaults=True)))
    return [(part, value) for part, value in parts if isinstance(value, dict)]


def _unknown_stage(at: str, spec, target: str, names: list[str]) -> StillError:
    close = difflib.get_close_matches(target, names, n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"stages: {', '.join(names)}"
    return StillError(f"{at}: stage '{spec.name}' refers to unknown stage '{target}'", hint)


def _stage_refs(pipeline: PipelineRecipe, index: int) -> list[tuple[str, str, str, str]]:
    """(where, key, stage, attribute) of each reference stage `index` makes, checked."""
    spec = pipeline.stages[index]
    names = [stage.name for stage in pipeline.stages]
    found = []
    for part, value in _parts(spec):
        for key, target, attribute in _references(value, ""):
            keys = [key] if part == "overrides" else key.split(".")
            at = _at(pipeline, "stages", index, part, *keys)
            if target not in names:
                raise _unknown_stage(at, spec, target, names)
            if attribute != "run_dir":
                raise StillError(
                    f"{at}: unknown stage attribute '{attribute}' in ${{stages.{target}.…}}",
                    hint=f"use ${{stages.{target}.run_dir}}",
                )
            found.append((at, f"publish.{key}" if part == "publish" else key, target, attribute))
    return found


def _cache_target(pipeline: PipelineRecipe, index: int) -> int:
    """The index of the distill stage a cache stage builds the teacher cache of."""
    spec = pipeline.stages[index]
    names = [stage.name for stage in pipeline.stages]
    at = _at(pipeline, "stages", index, "cache")
    if spec.cache not in names:
        raise _unknown_stage(at, spec, spec.cache, names)
    target = pipeline.stages[names.index(spec.cache)]
    if target.does not in ("recipe", "inline"):
        raise StillError(
            f"{at}: stage '{spec.name}' builds the teacher cache of stage '{target.name}', which "
            f"is a {target.does} stage",
            hint="name the distill stage that reads the cache",
        )
    return names.index(spec.cache)


def _dependencies(pipeline: PipelineRecipe) -> dict[int, list[int]]:
    """What each stage needs first: the stages it refers to; a cache stage, what its distill
    stage refers to; and a distill stage, the cache stage that builds its cache."""
    index_of = {stage.name: i for i, stage in enumerate(pipeline.stages)}
    refers = {
        i: [index_of[target] for _, _, target, _ in _stage_refs(pipeline, i)]
        for i in range(len(pipeline.stages))
    }
    deps = {i: list(targets) for i, targets in refers.items()}
    for i, spec in enumerate(pipeline.stages):
        if spec.cache is not None:
            served = _cache_target(pipeline, i)
            deps[i] += refers[served]
            deps[served].append(i)
    return deps


def _order(pipeline: PipelineRecipe) -> list[int]:
    """Stage indices, each after the stages it needs (list order otherwise); a cycle is an
    error naming it."""
    deps = _dependencies(pipeline)
    order: list[int] = []
    visiting: list[int] = []

    def visit(i: int) -> None:
        if i in order:
            return
        if i in visiting:
            cycle = [pipeline.stages[j].name for j in visiting[visiting.index(i) :] + [i]]
            raise StillError(
                f"{_at(pipeline, 'stages', i)}: the stages refer to each other in a cycle: "
                f"{' -> '.join(cycle)}",
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
    """The recipe of a recipe, inline or cascade stage, its overrides and references applied."""
    spec = pipeline.stages[index]
    overrides = [
        f"{key}={json.dumps(_substitute(value, run_dirs))}" for key, value in spec.overrides.items()
    ]
    written = spec.recipe if spec.recipe is not None else spec.cascade
    if isinstance(written, str):
        recipe = recipe_module.load(written, overrides)
    else:
        part = "inline" if spec.inline is not None else "cascade"
        prefix = ("stages", index, part)
        origins = {k[3:]: v for k, v in pipeline._origins.items() if k[:3] == prefix}
        recipe = recipe_module.load_inline(
            _substitute(getattr(spec, part), run_dirs), origins, pipeline._source, overrides
        )
    if recipe.kind == "pipeline":
        raise StillError(
            f"{_at(pipeline, 'stages', index)}: stage '{spec.name}' is a pipeline; list its "
            "stages here"
        )
    return recipe


def _cache_stage(pipeline: PipelineRecipe, index: int, run_dirs: dict[str, str]):
    """(the distill recipe whose teacher cache stage `index` builds, the cache dir)."""
    spec, served = pipeline.stages[index], pipeline.stages[_cache_target(pipeline, index)]
    recipe = _load_stage(pipeline, _cache_target(pipeline, index), run_dirs)
    at = _at(pipeline, "stages", index, "cache")
    if recipe.kind != "distill":
        raise StillError(
            f"{at}: stage '{spec.name}' builds the teacher cache of stage '{served.name}', but "
            f"'{served.name}' is a {recipe.kind} run: only a distill stage reads a teacher cache"
        )
    if recipe.distill.teacher_cache is None:
        raise StillError(
            f"{at}: stage '{served.name}' has no distill.teacher_cache for stage '{spec.name}' "
            "to build",
            hint=f"set it in the stage's overrides, e.g. distill.teacher_cache: runs/"
            f"{recipe.name}-teacher-cache",
        )
    return recipe, Path(recipe.distill.teacher_cache)


def _cascade_stage(pipeline: PipelineRecipe, index: int, run_dirs: dict[str, str]):
    recipe = _load_stage(pipeline, index, run_dirs)
    problem = (
        f"is kind: {recipe.kind}"
        if recipe.kind != "eval"
        else "has no cascade: section"
        if recipe.cascade is None
        else None
    )
    if problem:
        spec = pipeline.stages[index]
        raise StillError(
            f"{_at(pipeline, 'stages', index, 'cascade')}: stage '{spec.name}' analyses a cascade, "
            f"but its recipe {problem}",
            hint="give it an eval recipe with cascade: {student, teacher, ...}, as still cascade",
        )
    return recipe


def _build(pipeline: PipelineRecipe, index: int, run_dirs: dict[str, str]) -> Stage:
    """Stage `index`, loaded: what it runs and where it writes."""
    spec = pipeline.stages[index]
    at = _at(pipeline, "stages", index)
    if spec.cache is not None:
        recipe, path = _cache_stage(pipeline, index, run_dirs)
        return Stage(spec.name, "cache", recipe, path, at)
    if spec.publish is not None:
        options = type(spec.publish).model_validate(
            _substitute(spec.publish.model_dump(), run_dirs)
        )
        return Stage(spec.name, "publish", options, Path(options.out), at)
    if spec.cascade is not None:
        recipe = _cascade_stage(pipeline, index, run_dirs)
        return Stage(spec.name, "cascade", recipe, RunDir.of(recipe).path, at)
    recipe = _load_stage(pipeline, index, run_dirs)
    return Stage(spec.name, recipe.kind, recipe, RunDir.of(recipe).path, at)


def _refuse_non_model(stage_name: str, at: str, key: str, target: Stage) -> None:
    if target.kind in MODEL_KINDS:
        return
    uses = f"uses stage '{target.name}' as {key}, but"
    if key == "publish.run":
        uses = f"publishes stage '{target.name}', but"
    raise StillError(
        f"{at}: stage '{stage_name}' {uses} '{target.name}' {NOT_A_MODEL[target.kind]}",
        hint=None if target.kind == "publish" else "refer to a finetune or distill stage",
    )


def plan(pipeline: PipelineRecipe) -> list[Stage]:
    """Every stage loaded and its references checked, in running order; nothing runs."""
    stages: dict[str, Stage] = {}
    run_dirs: dict[str, str] = {}
    for index in _order(pipeline):
        spec = pipeline.stages[index]
        refs = _stage_refs(pipeline, index)
        for at, key, target, _ in refs:
            _refuse_non_model(spec.name, at, key, stages[target])
        stage = _build(pipeline, index, run_dirs)
        upstream = {target for _, _, target, _ in refs}
        if spec.cache is not None:  # needs what its distill stage needs
            served = _cache_target(pipeline, index)
            upstream |= {target for _, _, target, _ in _stage_refs(pipeline, served)}
        upstream |= {other.name for other in pipeline.stages if other.cache == spec.name}
        stage.upstream = sorted(upstream)
        stages[spec.name] = stage
        run_dirs[spec.name] = str(stage.path)
    _refuse_shared_dirs(list(stages.values()))
    return list(stages.values())


def _refuse_shared_dirs(stages: list[Stage]) -> None:
    """Each stage writes its own dir, and none inside another's (which it would replace)."""
    for index, stage in enumerate(stages):
        mine = stage.path.resolve()
        for other in stages[:index]:
            theirs = other.path.resolve()
            if mine == theirs or theirs in mine.parents or mine in theirs.parents:
                raise StillError(
                    f"{stage.at}: stages '{other.name}' and '{stage.name}' both write to "
                    f"{other.path if theirs in [mine, *mine.parents] else stage.path}",
                    hint="give each stage its own run name, cache dir or out dir",
                )


def check_stages(stages: list[Stage], check_stage: Callable[[Stage], None]) -> None:
    """What each stage's verb would refuse (`check_stage` from still/cli.py: GGUF types, task
    files, a cascade's signals), as one line at the stage."""
    for stage in stages:
        try:
            check_stage(stage)
        except StillError as error:
            raise StillError(
                f"{stage.at}: stage '{stage.name}': {error.message}", error.hint
            ) from None


def preflight(stages: list[Stage], check_stage: Callable[[Stage], None] | None = None) -> None:
    """The verbs' checks, then each training stage's data read and checked and one process
    each, before anything runs."""
    from still import data as still_data
    from still import launch

    if check_stage is not None:
        check_stages(stages, check_stage)
    for stage in stages:
        if stage.kind not in MODEL_KINDS:
            continue
        try:
            if launch.plan(stage.recipe.distributed, None).needs_launcher:
                raise StillError(
                    "needs several processes; a pipeline runs its stages in one",
                    hint=f"run it alone: still run {stage.recipe.source_path} --nproc N",
                )
            still_data.check_rows(stage.recipe.data)
        except StillError as error:
            raise StillError(f"stage '{stage.name}': {error.message}", error.hint) from None
