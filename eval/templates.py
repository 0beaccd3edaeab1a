"""A task's templates and expressions on one row: the prompt, the target, the choices, the gold.

A failure names the task file and the line of its key (`task.yaml:4: prompt: ...`), the row it
failed on (`qa.jsonl:3`, or the row's id), the field, the closest field as "did you mean", and
the fields the row has. Rendering is strict (StrictUndefined): a typo in a field name fails
instead of rendering an empty prompt.

`task` here is an `eval.tasks.TaskSpec` (duck-typed, so this module sits below `eval.tasks`):
it has `prompt`, `target`, `choices`, `label` and `where(key)`, the `file:line` of a key.
"""

from __future__ import annotations

import difflib
import json
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import meta

from still.errors import StillError

# What evaluating a user's template can raise: the template's or the row's fault, never ours.
_TEMPLATE_ERRORS = (
    jinja2.TemplateError,
    TypeError,
    ValueError,
    LookupError,
    AttributeError,
    ArithmeticError,
)


@lru_cache(maxsize=None)
def environment() -> jinja2.Environment:
    # StrictUndefined: a typo in a field name must fail, not render as an empty prompt.
    return jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


@lru_cache(maxsize=64)
def _compiled(template: str) -> jinja2.Template:
    return environment().from_string(template)


@lru_cache(maxsize=64)
def _compiled_expression(expression: str):
    return environment().compile_expression(expression, undefined_to_none=False)


@lru_cache(maxsize=64)
def referenced_fields(source: str, expression: bool = False) -> tuple[str, ...]:
    """The row fields a template (or expression) reads, in the order they first appear."""
    text = "{{ (" + source + ") }}" if expression else source
    names = meta.find_undeclared_variables(environment().parse(text))
    names -= set(environment().globals)  # range, dict, namespace, ...: not row fields
    return tuple(sorted(names, key=lambda name: (text.find(name), name)))


# --------------------------------------------------------------------------- messages
def row_label(row: dict, origin: str | None) -> str:
    """How a message names a row: its file:line, else its id, else its fields."""
    if origin:
        return origin
    if "id" in row:
        return f"with id {row['id']!r}"
    return "{" + ", ".join(sorted(map(str, row))) + "}"


def _fields_hint(row: dict) -> str:
    return "fields in the row: " + (", ".join(sorted(map(str, row))) or "none")


def task_error(task, key: str, problem: str, hint: str | None = None) -> StillError:
    """`task.yaml:LINE: key: problem (hint)` for a key of the task file."""
    return StillError(f"{task.where(key)}: {key}: {problem}", hint=hint)


def _row_error(task, key: str, row: dict, origin: str | None, problem: str, hint=None):
    return task_error(
        task, key, f"row {row_label(row, origin)} {problem}", hint or _fields_hint(row)
    )


def _missing_field(task, key: str, source: str, row: dict, origin, expression: bool):
    """The error for the first field `source` reads that the row lacks, else None."""
    missing = [name for name in referenced_fields(source, expression) if name not in row]
    if not missing:
        return None
    close = difflib.get_close_matches(missing[0], [str(field) for field in row], n=1)
    suggestion = f" (did you mean '{close[0]}'?)" if close else ""
    return _row_error(task, key, row, origin, f"has no field '{missing[0]}'{suggestion}")


def _reason(error: Exception) -> str:
    if isinstance(error, jinja2.TemplateError):
        return error.message or type(error).__name__
    return f"{type(error).__name__}: {error}"


def _undefined_reason(value: jinja2.Undefined) -> str:
    try:
        str(value)
    except jinja2.UndefinedError as error:
        return error.message or "undefined"
    return "undefined"


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return f"a {type(value).__name__} ({value!r:.60})"


# --------------------------------------------------------------------------- rendering
def render_key(task, key: str, row: dict, origin: str | None = None) -> str:
    """The task's template `key` (prompt, target) rendered on `row`."""
    template = getattr(task, key)
    try:
        return _compiled(template).render(**row)
    except _TEMPLATE_ERRORS as error:
        missing = _missing_field(task, key, template, row, origin, expression=False)
        raise missing or _row_error(
            task, key, row, origin, f"cannot be rendered: {_reason(error)}"
        ) from None


def evaluate_key(task, key: str, row: dict, origin: str | None = None) -> Any:
    """The task's expression `key` (choices, label) evaluated on `row`; never Undefined."""
    expression = getattr(task, key)
    try:
        value = _compiled_expression(expression)(**row)
    except _TEMPLATE_ERRORS as error:
        missing = _missing_field(task, key, expression, row, origin, expression=True)
        raise missing or _row_error(
            task, key, row, origin, f"cannot evaluate {expression!r}: {_reason(error)}"
        ) from None
    if isinstance(value, jinja2.Undefined):
        missing = _missing_field(task, key, expression, row, origin, expression=True)
        raise missing or _row_error(
            task, key, row, origin, f"gives nothing for {expression!r}: {_undefined_reason(value)}"
        )
    return value


def row_choices(task, row: dict, origin: str | None = None) -> list[str]:
    """The row's choices as text: a non-empty list of distinct, non-empty strings."""
    choices = evaluate_key(task, "choices", row, origin)
    if isinstance(choices, str):  # a template like "{{ choices }}" renders a list as text
        try:
            choices = json.loads(choices)
        except json.JSONDecodeError:
            pass
    if isinstance(choices, tuple):
        choices = list(choices)
    if not isinstance(choices, list):
        raise _row_error(
            task,
            "choices",
            row,
            origin,
            f"gives {_kind(choices)}, not a list of choices",
            hint=f"choices is an expression giving the row's list, e.g. choices: choices; "
            f"{_fields_hint(row)}",
        )
    if not choices:
        raise _row_error(task, "choices", row, origin, "gives an empty list of choices")
    texts, first_seen = [], {}
    for index, choice in enumerate(choices):
        if isinstance(choice, jinja2.Undefined):
            problem = f"gives nothing for choice {index}: {_undefined_reason(choice)}"
            missing = _missing_field(task, "choices", task.choices, row, origin, expression=True)
            raise missing or _row_error(task, "choices", row, origin, problem)
        text = str(choice)
        if not text.strip():
            raise _row_error(
                task,
                "choices",
                row,
                origin,
                f"has an empty choice {index}",
                hint="fill it in or remove it",
            )
        if text in first_seen:
            raise _row_error(
                task,
                "choices",
                row,
                origin,
                f"lists {text!r} twice (choices {first_seen[text]} and {index})",
                hint="a repeated choice makes the score ambiguous: make the choices distinct",
            )
        first_seen[text] = index
        texts.append(text)
    return texts


def row_gold(task, row: dict, choices: list[str], origin: str | None = None) -> int:
    """The gold choice index: from `label` (an index, or a choice's text), else `target`."""
    if task.label is None:
        gold = render_key(task, "target", row, origin)
        if gold in choices:
            return choices.index(gold)
        problem = f"renders {gold!r}, which is not one of its choices ({_listed(choices)})"
        raise _row_error(
            task, "target", row, origin, problem, hint="set label: to the gold index field"
        )
    gold = evaluate_key(task, "label", row, origin)
    if isinstance(gold, str) and gold.strip().lstrip("-").isdigit():
        gold = int(gold)
    elif isinstance(gold, float) and gold.is_integer():
        gold = int(gold)
    if isinstance(gold, str):
        if gold in choices:
            return choices.index(gold)
        problem = (
            f"gives the label {gold!r}, which is neither a choice index nor one of its "
            f"choices ({_listed(choices)})"
        )
        raise _row_error(task, "label", row, origin, problem)
    if isinstance(gold, bool) or not isinstance(gold, int):
        problem = f"gives {_kind(gold)} for {task.label!r}, not a choice index"
        raise _row_error(task, "label", row, origin, problem)
    if not 0 <= gold < len(choices):
        raise _row_error(
            task,
            "label",
            row,
            origin,
            f"gives the label {gold} but has {len(choices)} choices "
            f"(valid: 0 to {len(choices) - 1})",
            hint="label is the 0-based index of the gold choice",
        )
    return gold


def row_target(task, row: dict, origin: str | None = None) -> str:
    """The reference answer: the gold choice's text, or the rendered `target`."""
    if task.type == "multiple_choice":
        choices = row_choices(task, row, origin)
        return choices[row_gold(task, row, choices, origin)]
    return render_key(task, "target", row, origin)


def _listed(choices: list[str], most: int = 4) -> str:
    shown = ", ".join(repr(choice)[:40] for choice in choices[:most])
    return shown + (f", ... {len(choices) - most} more" if len(choices) > most else "")
