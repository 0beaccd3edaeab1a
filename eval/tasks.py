"""Eval tasks: a YAML file in, a typed `TaskSpec` out, plus the rows and prompts it describes.

A task says where its rows live, how a row becomes a prompt (Jinja2 over the row's fields), what
the reference answer is, and which metrics score it. The three task types follow
lm-evaluation-harness: `generate` (free text scored against `target`), `multiple_choice`
(log-likelihood of each choice after the prompt) and `perplexity` (loss on `target` given
`prompt`).

A mistake in a task file is reported as one line naming the file, the line, the key path and,
for an unknown key or value, the closest valid one: `qa.yaml:7: unknown key 'promt' in task (did
you mean 'prompt'?)`. Rendering a task on a row (and the messages when a row does not fit the
templates) is `eval/templates.py`; checking every row a run will score, before any model loads,
is `eval/checks.py`.

Path rule: `data.path` and `fewshot.path` are relative to the task YAML's directory, so a task
file can ship next to its data and be run from anywhere.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path
from typing import Any, Literal

import jinja2
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from eval.templates import environment, render_key, row_target
from still.errors import StillError
from still.recipe import refuse_secrets
from still.rows import strict_rows
from still.sections import RowSource
from still.yaml_errors import key_lines, one_line_error, parse_yaml, read_yaml_text, where

TaskType = Literal["generate", "multiple_choice", "perplexity"]
MetricName = Literal[
    "exact_match", "token_f1", "rouge_l", "regex_match", "acc", "acc_norm", "loss", "perplexity"
]

# Which metrics make sense for which task type, and what a task gets when it names none.
METRICS_BY_TYPE: dict[str, tuple[str, ...]] = {
    "generate": ("exact_match", "token_f1", "rouge_l", "regex_match"),
    "multiple_choice": ("acc", "acc_norm"),
    "perplexity": ("loss", "perplexity"),
}
DEFAULT_METRICS: dict[str, list[str]] = {
    "generate": ["exact_match", "token_f1"],
    "multiple_choice": ["acc", "acc_norm"],
    "perplexity": ["loss", "perplexity"],
}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TaskData(RowSource):
    """A task's rows: `path` (relative to the task YAML) or `hf` (+ `subset`, `split`)."""

    split: str = Field("test", description="Split to read for `hf` datasets.")

    @model_validator(mode="before")
    @classmethod
    def _nested_hub_form(cls, value: Any) -> Any:
        # Task files written as `hf: {name, config, split}` (the first task schema) keep working.
        if not isinstance(value, dict) or not isinstance(value.get("hf"), dict):
            return value
        flat, hub = dict(value), dict(value["hf"])
        unknown = sorted(set(hub) - {"name", "config", "split"})
        if unknown:
            raise ValueError(
                f"unknown key '{unknown[0]}' in data.hf (it takes name, config and split)"
            )
        if "name" not in hub:
            raise ValueError("data.hf needs name (the dataset id)")
        for nested, key in (("name", "hf"), ("config", "subset"), ("split", "split")):
            if nested in hub:
                if key != "hf" and key in flat:
                    raise ValueError(
                        f"data.{key} and data.hf.{nested} say the same thing: give one"
                    )
                flat[key] = hub[nested]
        return flat


class FewShot(_Section):
    n: int = Field(0, ge=0, description="How many solved examples go before each question.")
    path: str | None = Field(
        None, description="Local file to draw examples from (relative to the YAML)."
    )
    split: str | None = Field(
        None, description="Hub split to draw examples from (with data.hf), e.g. 'validation'."
    )
    seed: int = Field(1234, description="Seeds the draw; each question gets its own draw.")


class Generation(_Section):
    max_new_tokens: int = Field(64, gt=0, description="Longest answer generated.")
    stop: list[str] = Field(
        default_factory=list,
        description="Cut the answer at the first of these strings (generation also stops there).",
    )
    do_sample: bool = Field(False, description="False: greedy decoding, the reproducible default.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (do_sample only).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (do_sample only).")
    seed: int = Field(0, description="Seeds sampling (do_sample only).")


class Normalize(_Section):
    """SQuAD-style answer normalisation applied before exact match (all on by default)."""

    lowercase: bool = Field(True, description="Compare case-insensitively.")
    strip_punctuation: bool = Field(True, description="Drop ASCII punctuation.")
    strip_articles: bool = Field(True, description="Drop the words a, an, the.")
    whitespace: bool = Field(True, description="Collapse runs of whitespace, trim the ends.")


class TaskSpec(_Section):
    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Names the output files <name>.json and <name>.samples.jsonl.",
    )
    type: TaskType = Field(description="generate | multiple_choice | perplexity.")
    data: TaskData = Field(description="Where the rows come from.")
    prompt: str = Field(
        "", description="Jinja2 template over a row, e.g. '{{ question }}'. Empty: no context."
    )
    target: str | None = Field(
        None, description="Jinja2 template for the reference answer, e.g. '{{ answer }}'."
    )
    choices: str | None = Field(
        None, description="multiple_choice: Jinja2 expression giving the list, e.g. 'choices'."
    )
    label: str | None = Field(
        None, description="multiple_choice: expression giving the gold choice index, e.g. 'label'."
    )
    target_delimiter: str | None = Field(
        None,
        description="Between context and continuation; default ' ', or '' with chat_template "
        "(lm-eval's rule).",
    )
    fewshot_delimiter: str = Field("\n\n", description="Between few-shot examples.")
    chat_template: bool = Field(
        False, description="Wrap the prompt as a user message with the tokenizer's chat template."
    )
    system: str | None = Field(None, description="System message (chat_template) or preamble.")
    fewshot: FewShot = Field(default_factory=FewShot, description="Solved examples in the prompt.")
    generation: Generation = Field(default_factory=Generation, description="generate tasks only.")
    metrics: list[MetricName] = Field(
        default_factory=list, description="Metrics to report; empty: the type's defaults."
    )
    normalize: Normalize = Field(
        default_factory=Normalize, description="Exact-match normalisation."
    )
    regex: str | None = Field(
        None, description="regex_match: pattern whose group 1 (or whole match) is the answer."
    )
    limit: int | None = Field(None, gt=0, description="Score only the first N rows.")

    # The directory relative paths are resolved against (the YAML's); not part of the spec.
    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)
    # The YAML as named, and each key's (file, line): messages point at the key.
    _source: str | None = PrivateAttr(None)
    _origins: dict = PrivateAttr(default_factory=dict)

    @field_validator("prompt", "target", "system")
    @classmethod
    def _template_compiles(cls, template: str | None) -> str | None:
        if template is not None:
            try:
                environment().parse(template)
            except jinja2.TemplateSyntaxError as exc:
                raise ValueError(f"invalid Jinja2 template: {exc.message}") from None
        return template

    @field_validator("label", mode="before")
    @classmethod
    def _constant_label(cls, label: Any) -> Any:
        # `label: 0` (every row's gold is the first choice) is the expression "0".
        return str(label) if isinstance(label, int) and not isinstance(label, bool) else label

    @field_validator("choices", "label")
    @classmethod
    def _expression_compiles(cls, expression: str | None) -> str | None:
        if expression is not None:
            try:
                environment().compile_expression(expression)
            except jinja2.TemplateSyntaxError as exc:
                raise ValueError(f"invalid Jinja2 expression: {exc.message}") from None
        return expression

    @field_validator("regex")
    @classmethod
    def _regex_compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"invalid regular expression: {exc}") from None
        return pattern

    @model_validator(mode="after")
    def _type_rules(self):
        if self.type == "multiple_choice":
            if self.choices is None:
                raise ValueError(
                    "a multiple_choice task needs `choices` (an expression giving the list, "
                    "e.g. choices: choices)"
                )
            if self.label is None and self.target is None:
                raise ValueError("a multiple_choice task needs `label` (the gold index field)")
        elif self.target is None:
            raise ValueError(f"a {self.type} task needs `target`, e.g. target: '{{{{ answer }}}}'")
        if not self.metrics:
            self.metrics = list(DEFAULT_METRICS[self.type])
        wrong = [m for m in self.metrics if m not in METRICS_BY_TYPE[self.type]]
        if wrong:
            raise ValueError(
                f"metric {wrong[0]!r} does not apply to a {self.type} task "
                f"(use {', '.join(METRICS_BY_TYPE[self.type])})"
            )
        if "regex_match" in self.metrics and not self.regex:
            raise ValueError("metric regex_match needs `regex`")
        if self.fewshot.split and not self.data.hf:
            raise ValueError("fewshot.split needs data.hf; for a local file use fewshot.path")
        return self

    @property
    def delimiter(self) -> str:
        if self.target_delimiter is not None:
            return self.target_delimiter
        return "" if self.chat_template else " "

    def resolve(self, relative: str) -> Path:
        return (self._base_dir / relative).resolve()

    @property
    def source(self) -> str:
        """The task file as it was named, or `task NAME` for a task built in code."""
        return self._source or f"task {self.name}"

    def where(self, *keys: str) -> str:
        """`file:line` of a key of the task file (the file alone when the key is not in it)."""
        return where(self._origins, keys, self.source)


# --------------------------------------------------------------------------- loading YAML
def load_task(path: str | Path) -> TaskSpec:
    """Read and validate a task YAML; any mistake is one `StillError` line with file:line."""
    path = Path(path)
    text = read_yaml_text(path, "task")
    root, raw = parse_yaml(text, path)
    if not isinstance(raw, dict):
        raise StillError(f"{path}:1: a task file must be a mapping of keys")
    origins = key_lines(root, str(path))
    refuse_secrets(raw, origins, str(path), what="task file")  # tasks are printed and logged
    top = f"{path}:{root.start_mark.line + 1}"
    try:
        task = TaskSpec.model_validate(raw)
    except ValidationError as exc:
        # Whole-task rules (a multiple_choice task needs choices, ...) hinge on `type`: point there.
        raise one_line_error(
            exc, TaskSpec, origins, top, whole="task", anchor=("type",), suggest_values=True
        ) from None
    task._base_dir = path.resolve().parent
    task._source, task._origins = str(path), origins
    for keys, relative in (("data", "path"), ("fewshot", "path")):
        value = getattr(getattr(task, keys), relative)
        if value is not None and not task.resolve(value).is_file():
            raise StillError(
                f"{where(origins, (keys, relative), top)}: {keys}.{relative}: file not found: "
                f"{value} (looked at {task.resolve(value)})"
            )
    return task


# --------------------------------------------------------------------------- rows
def located_rows(task: TaskSpec) -> list[tuple[str, dict]]:
    """(origin, row) for every row of the task's data, in file order; origin is `file:line`."""
    source = task.data
    if source.path is not None:
        source = source.model_copy(update={"path": str(task.resolve(source.path))})
    return _questions(source)


def task_rows(task: TaskSpec) -> list[dict]:
    """All rows of the task's data, in file order (callers slice for `limit`)."""
    return [row for _, row in located_rows(task)]


def located_fewshot_rows(task: TaskSpec) -> list[tuple[str, dict]] | None:
    """(origin, row) of a separate shot pool (fewshot.path or .split); None: the task's rows."""
    if task.fewshot.path:
        return _questions(RowSource(path=str(task.resolve(task.fewshot.path))))
    if task.fewshot.split:
        return _questions(_fewshot_split(task))
    return None


def fewshot_rows(task: TaskSpec, rows: list[dict]) -> tuple[list[dict], bool]:
    """The pool shots are drawn from, and whether it is the evaluated rows themselves."""
    pool = located_fewshot_rows(task)
    return (rows, True) if pool is None else ([row for _, row in pool], False)


def _fewshot_split(task: TaskSpec) -> RowSource:
    # data.limit picks the questions; the split the shots come from is drawn from whole.
    return task.data.model_copy(update={"split": task.fewshot.split, "limit": None})


def _questions(source: RowSource) -> list[tuple[str, dict]]:
    rows = []
    for origin, row in strict_rows(source):
        if not isinstance(row, dict):
            raise StillError(
                f"{origin}: expected an object (one row per question), got {type(row).__name__}"
            )
        rows.append((origin, row))
    return rows


def select_shots(
    pool: list[dict], n: int, seed: int, query_index: int, query: dict, same_pool: bool
) -> list[dict]:
    """`n` examples for one question: seeded per question, never the question itself.

    Each question gets its own `random.Random(seed, index)` so a question's shots do not
    depend on `limit` or on which other questions are scored.
    """
    if n == 0:
        return []

    def is_query(j: int) -> bool:
        return j == query_index if same_pool else _same_row(pool[j], query)

    rng = random.Random(f"{seed}:{query_index}")
    picks = [j for j in rng.sample(range(len(pool)), min(len(pool), n + 1)) if not is_query(j)]
    if len(picks) < n:  # the query appeared more than once in a separate pool
        picks = [j for j in rng.sample(range(len(pool)), len(pool)) if not is_query(j)]
    if len(picks) < n:
        raise StillError(f"fewshot.n is {n} but only {len(picks)} other rows are available")
    return [pool[j] for j in picks[:n]]


def _same_row(a: dict, b: dict) -> bool:
    if "id" in a and "id" in b:
        return a["id"] == b["id"]
    return a == b


# --------------------------------------------------------------------------- prompts
def build_context(task: TaskSpec, row: dict, shots: list[dict], tokenizer) -> str:
    """The text the model sees before its answer: system, solved shots, then the question.

    With `chat_template`, shots become user/assistant turns (lm-eval's fewshot_as_multiturn)
    and the tokenizer's template adds the assistant header; otherwise shots are joined by
    `fewshot_delimiter` as lm-eval does.
    """
    if task.chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise StillError(
                f"task {task.name} sets chat_template: true but the tokenizer has no chat template",
                hint="set chat_template: false in the task, or use an instruct model",
            )
        messages = [{"role": "system", "content": task.system}] if task.system else []
        for shot in shots:
            messages.append({"role": "user", "content": render_key(task, "prompt", shot)})
            messages.append({"role": "assistant", "content": row_target(task, shot)})
        messages.append({"role": "user", "content": render_key(task, "prompt", row)})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    parts = [task.system] if task.system else []
    parts += [
        render_key(task, "prompt", shot) + task.delimiter + row_target(task, shot) for shot in shots
    ]
    parts.append(render_key(task, "prompt", row))
    return task.fewshot_delimiter.join(parts)


# --------------------------------------------------------------------------- hashing
def task_hash(task: TaskSpec) -> str:
    """sha256 over the validated spec and the content of every data file (or hub split) it reads.

    Paths enter as written, so the same task and data checked out elsewhere hash the same; the
    file contents enter too, so editing the data changes the hash.
    """
    digest = hashlib.sha256()
    digest.update(json.dumps(task.model_dump(mode="json"), sort_keys=True).encode())
    for relative in (task.data.path, task.fewshot.path):
        if relative is None:
            continue
        file = task.resolve(relative)
        if not file.is_file():
            raise StillError(f"task data file not found: {file}")
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    if task.data.hf is not None:  # no file to read: hash the rows themselves
        sources = [task.data, _fewshot_split(task)] if task.fewshot.split else [task.data]
        for source in sources:
            for _, row in _questions(source):
                digest.update(json.dumps(row, sort_keys=True, default=str).encode())
    return digest.hexdigest()
