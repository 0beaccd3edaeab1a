"""Everything an eval will need, checked before any model loads.

`check_tasks(paths)` is the one check of task files, called by `still check` and `still run`
(finetune and distill recipes' `eval_tasks`), by eval recipes and by `still eval`, before
any weights are read. Per task: the file exists, parses and validates (`load_task`); its rows
load and there is at least one; every row that will be scored (and every row few-shot examples
are drawn from) renders the prompt and target, gives a non-empty list of distinct choices and a
gold label in range; there are enough rows for `fewshot.n`. A run that starts therefore cannot
fail at the end on a task, and no metric is ever the mean of nothing (NaN).

`check_eval_recipe(recipe)` adds what an eval recipe says about its models: `reference` and
`teacher` name one of them, and no two share a display name.

This module imports no torch: `still validate` can call it and still answer at once.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from pathlib import Path

from eval.lm_eval_tasks import PREFIX as LM_EVAL_PREFIX
from eval.lm_eval_tasks import is_lm_eval_task
from eval.tasks import TaskSpec, load_task, located_fewshot_rows, located_rows
from eval.templates import render_key, row_choices, row_gold, task_error
from still.errors import StillError


def check_count(value: int | None, what: str = "--limit") -> None:
    """A count given by the user (a limit, a batch size) is a whole number >= 1, or unset."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        hint = "drop it to score every row" if "limit" in what else None
        raise StillError(f"{what} must be >= 1 (got {value})", hint=hint)


def check_recipe_tasks(recipe) -> list[TaskSpec]:
    """A finetune or distill recipe's `eval_tasks` and `regression_tasks`, checked before its
    first step."""
    tasks = []
    for key in ("eval_tasks", "regression_tasks"):
        if getattr(recipe, key, None):
            tasks += check_tasks(getattr(recipe, key), named_by=_recipe_where(recipe, key))
    return tasks


def check_tasks(
    paths: Sequence[str | Path],
    *,
    limit: int | None = None,
    base_dir: str | Path | None = None,
    named_by: str | None = None,
) -> list[TaskSpec]:
    """Load and check every task file (see the module docstring); returns the tasks.

    An lm-eval task (`lm_eval:NAME`, or an lm-eval task YAML) is built by lm-eval, its data
    loaded, and returned as an `eval.lm_eval_tasks.LmEvalTask`.

    Relative paths are taken against `base_dir`, else the current directory (recipes have
    already made their task paths absolute, relative to the recipe file). `named_by` says
    where the list comes from (`recipe.yaml:12`), for a task file that does not exist.
    """
    check_count(limit)
    tasks: list = []
    for path in paths:
        if str(path).startswith(LM_EVAL_PREFIX) or is_lm_eval_task(path):
            tasks.append(_check_lm_eval(path, tasks))
            continue
        path = Path(path)
        if base_dir is not None and not path.is_absolute():
            path = Path(base_dir) / path
        if named_by and not path.is_file():
            raise StillError(
                f"{named_by}: task file not found: {path}",
                hint="task paths in a recipe are relative to the recipe file",
            )
        task = load_task(path)
        for other in tasks:
            if other.name == task.name:
                same_file = Path(other.source).resolve() == path.resolve()
                problem = (
                    f"{path} is listed twice"
                    if same_file
                    else f"{task.where('name')}: task name '{task.name}' is also the name "
                    f"of {other.source}"
                )
                raise StillError(problem, hint="each task writes <name>.json: list each once")
        check_task(task, limit=limit)
        tasks.append(task)
    return tasks


def _check_lm_eval(ref, earlier: list):
    """An lm-eval task (name or YAML), built with its data; the names of its results are new."""
    from eval.lm_eval_tasks import check_lm_eval_task

    task = check_lm_eval_task(ref)
    taken = {getattr(t, "name", None) for t in earlier} | {
        leaf for t in earlier for leaf in getattr(t, "outputs", [])
    }
    clash = sorted(set(task.outputs) & taken)
    if clash:
        raise StillError(
            f"{ref}: task name '{clash[0]}' is listed twice",
            hint="each task writes <name>.json: list each once",
        )
    return task


def check_task(task: TaskSpec, *, limit: int | None = None) -> list[dict]:
    """Check one loaded task against its rows; returns all its rows (in file order)."""
    check_count(limit)
    located = located_rows(task)
    if not located:
        raise StillError(
            f"{task.where('data')}: data: {_data_name(task)} has no rows (nothing to score)",
            hint="add rows, or point data at another file",
        )
    limit = limit if limit is not None else task.limit
    scored = located[:limit]
    for origin, row in scored:
        check_row(task, row, origin)
    if task.fewshot.n:
        pool = located_fewshot_rows(task)
        same_pool = pool is None
        if same_pool:
            pool = located
            extra = located[len(scored) :]  # shots come from every row, not just the scored
        else:
            extra = pool
        for origin, row in extra:
            check_row(task, row, origin)
        needed = task.fewshot.n + (1 if same_pool else 0)  # a question is never its own shot
        if len(pool) < needed:
            where = "the task has" if same_pool else "the few-shot pool has"
            rows = f"{len(pool)} row" + ("" if len(pool) == 1 else "s")
            raise StillError(
                f"{task.where('fewshot', 'n')}: fewshot.n is {task.fewshot.n} but {where} only "
                f"{rows}" + (" (a question is never its own shot)" if same_pool else ""),
                hint="lower fewshot.n, or draw shots from a larger fewshot.path",
            )
    return [row for _, row in located]


def check_row(task: TaskSpec, row: dict, origin: str | None = None) -> None:
    """Everything scoring reads from one row renders or evaluates, and the gold is in range."""
    render_key(task, "prompt", row, origin)
    if task.type == "multiple_choice":
        row_gold(task, row, row_choices(task, row, origin), origin)
        return
    target = render_key(task, "target", row, origin)
    if task.type == "perplexity" and target == "":
        raise task_error(
            task,
            "target",
            f"renders empty on row {origin or row.get('id')}: a perplexity task has nothing "
            "to score there",
            hint="drop the row, or fix the target template",
        )


def _data_name(task: TaskSpec) -> str:
    if task.data.path is not None:
        return str(task.resolve(task.data.path))
    subset = f" ({task.data.subset})" if task.data.subset else ""
    return f"{task.data.hf}{subset} split {task.data.split}"


# --------------------------------------------------------------------------- eval recipes
def display_name(ref: str) -> str:
    """A short, file-safe name for a model reference (run dir name, built-in name, ...)."""
    ref = str(ref).rstrip("/")
    if ref.startswith("builtin:"):
        name = ref.removeprefix("builtin:")
    elif Path(ref).expanduser().exists():
        name = Path(ref).expanduser().resolve().name
    else:
        name = ref.replace("/", "__")
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def check_eval_recipe(recipe, *, limit: int | None = None) -> list[TaskSpec]:
    """An eval recipe's models and tasks, checked before any model loads; returns the tasks."""
    names = [display_name(ref) for ref in recipe.models]
    for index, name in enumerate(names):
        if name in names[:index]:
            first = recipe.models[names.index(name)]
            raise StillError(
                f"{_recipe_where(recipe, 'models')}: {first!r} and "
                f"{recipe.models[index]!r} share the name {name!r}",
                hint="results go to one folder per name: list each model once, by distinct paths",
            )
    for role in ("reference", "teacher"):
        wanted = getattr(recipe, role)
        if wanted is not None:
            model_among(wanted, recipe.models, role, at=_recipe_where(recipe, role))
    return check_tasks(recipe.tasks, limit=limit if limit is not None else recipe.limit)


def model_among(wanted: str, refs: Sequence[str], role: str, *, at: str) -> str:
    """The model reference among `refs` that `wanted` names (as written, by name or path)."""
    for ref in refs:
        if wanted == ref or display_name(wanted) == display_name(ref):
            return ref
        if Path(wanted).expanduser().exists() and Path(ref).expanduser().exists():
            if Path(wanted).expanduser().resolve() == Path(ref).expanduser().resolve():
                return ref
    names = [display_name(ref) for ref in refs]
    close = difflib.get_close_matches(str(wanted), [*refs, *names], n=1)
    suggestion = f" (did you mean {close[0]!r}?)" if close else ""
    raise StillError(
        f"{at}: {wanted!r} is not one of the models{suggestion}",
        hint=f"{role} names one of models: {', '.join(refs)}",
    )


def _recipe_where(recipe, key: str) -> str:
    """`recipe.yaml:LINE: key` when the recipe file itself sets the key, else
    `recipe.yaml: key` (the key came from a file it extends, or from an override)."""
    source = recipe.source_path
    if not source:
        return f"recipe {recipe.name}: {key}"
    line = recipe.own_line((key,))
    return f"{source}:{line}: {key}" if line else f"{source}: {key}"
