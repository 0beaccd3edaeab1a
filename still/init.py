"""`still init DATA`: a data file in, a commented pipeline of plain recipes out.

It reads every row (through `still/rows.py`), detects the format (chat, instruction or
completion) from the fields every row carries and refuses a file that fits none or more than
one; checks each row as training would (`still/formats.py`), so a conversation without an
assistant turn is refused here, at its line; measures the rows' token lengths under the base
model's tokenizer and picks `max_len` from their p99 (the histogram is printed); and writes
`recipes/<name>/` whole or not at all (`still/fsutil.py`): teacher, student and eval recipes,
the pipeline that runs them in order, and the task YAMLs, from the commented templates in
`still/init_templates.py`.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from still import formats, init_templates
from still.errors import StillError
from still.fsutil import atomic_write_text, staged_dir
from still.holdout import side_indices
from still.rows import strict_rows
from still.sections import DataSource, Holdout, RowSource

PROMPT_FIELDS = ("prompt", "instruction", "question", "query")
RESPONSE_FIELDS = ("response", "output", "answer", "completion")
TEXT_FIELDS = ("text",)
DEFAULT_BASE = "builtin:smollm2-135m-instruct"
# More rows than this: hold out a count rather than a share (an eval loss and task of 200 rows
# is as informative as one of 10% of 10,000, and much cheaper).
SHARE_ROWS = 2000
HELD_OUT_SHARE, HELD_OUT_COUNT = 0.1, 200


@dataclass
class Detected:
    """What `still init` found in a data file."""

    format: str
    fields: dict[str, str]  # DataSource field -> the file's field
    reason: str
    choices: bool = False  # rows carry `choices` (a list) and `label` (an index)
    rows: list = field(default_factory=list)


# --------------------------------------------------------------------------- format detection
def _is_messages(value) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)
    )


def _shared_fields(path: str, rows: list[tuple[str, object]]) -> set[str]:
    shared: set[str] | None = None
    for origin, row in rows:
        if not isinstance(row, dict):
            raise StillError(
                f"{origin}: expected an object (one example per row), got {type(row).__name__}"
            )
        shared = set(row) if shared is None else shared & set(row)
    if not shared:
        raise StillError(f"{path}: the rows share no field", hint="give every row the same fields")
    return shared


def _candidates(shared: set[str], rows) -> dict[str, tuple[dict[str, str], str]]:
    """Every format whose fields every row carries: {format: (fields, why)}."""
    found = {}
    chat = sorted(name for name in shared if all(_is_messages(row[name]) for _, row in rows))
    if len(chat) == 1:
        found["chat"] = ({"messages": chat[0]}, f"field '{chat[0]}' holds role/content messages")
    elif len(chat) > 1:
        found["chat"] = ({}, f"fields {', '.join(chat)} all hold messages")
    strings = {name for name in shared if all(isinstance(row[name], str) for _, row in rows)}
    prompts = [name for name in PROMPT_FIELDS if name in strings]
    responses = [name for name in RESPONSE_FIELDS if name in strings]
    if prompts and responses:
        fields = {"prompt": prompts[0], "response": responses[0]}
        if "input" in strings:  # alpaca: instruction + input + output
            fields["input"] = "input"
        if "system" in strings:
            fields["system"] = "system"
        why = f"fields '{prompts[0]}' -> '{responses[0]}'"
        if len(prompts) > 1 or len(responses) > 1:
            fields, why = {}, f"several prompt/response fields ({', '.join(prompts + responses)})"
        found["instruction"] = (fields, why)
    texts = [name for name in TEXT_FIELDS if name in strings]
    if texts:
        found["completion"] = ({"text": texts[0]}, f"field '{texts[0]}' holds plain text")
    return found


def detect_format(path: str, rows: list[tuple[str, object]]) -> Detected:
    """The one format every row fits; an error naming the fields when none or several fit."""
    shared = _shared_fields(path, rows)
    found = _candidates(shared, rows)
    ambiguous = [name for name, (fields, _) in found.items() if not fields]
    if len(found) > 1 or ambiguous:
        reasons = "; ".join(f"{name}: {why}" for name, (_, why) in found.items())
        raise StillError(
            f"{path}: ambiguous format ({reasons})",
            hint="keep one kind of field per file (messages, prompt/response or text), "
            "or write the recipe's data.train by hand",
        )
    if not found:
        raise StillError(
            f"{path}: no format fits every row (fields: {', '.join(sorted(shared))})",
            hint="chat rows need a messages list, instruction rows a prompt/question and a "
            "response/answer field, completion rows a text field",
        )
    ((name, (fields, why)),) = found.items()
    choices = {"choices", "label"} <= shared and all(
        isinstance(row["choices"], list) and isinstance(row["label"], int) for _, row in rows
    )
    return Detected(name, fields, why, choices)


def check_rows(path: str, detected: Detected, rows) -> list[dict]:
    """Every row as training renders it; the first that training would refuse is an error."""
    source = DataSource(path=path, format=detected.format, **detected.fields)
    examples = []
    for origin, row in rows:
        try:
            examples.append(formats.row_to_example(row, source, split="train", system_prompt=None))
        except formats.BadRow as bad:
            raise StillError(f"{origin}: {bad.reason}", bad.hint or "fix the row") from None
    return examples


# --------------------------------------------------------------------------- lengths
def token_lengths(examples: list[dict], tokenizer) -> list[int]:
    encoder = formats.Encoder(tokenizer, "assistant", None)
    try:
        return [len(encoder.encode(example).input_ids) for example in examples]
    except formats.BadRow as bad:
        raise StillError(f"the base model's tokenizer cannot render a row: {bad.reason}") from None


def answer_tokens(examples: list[dict], tokenizer) -> int:
    """p99 of the final answers' token lengths, rounded up to 16: the generate task's budget."""
    answers = [e["messages"][-1]["content"] for e in examples if "messages" in e]
    if not answers:
        return 0
    lengths = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in answers]
    return max(16, 16 * math.ceil(percentile(lengths, 0.99) / 16))


def percentile(lengths: list[int], share: float) -> int:
    ordered = sorted(lengths)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def pick_max_len(lengths: list[int]) -> int:
    """The p99 of the token lengths, rounded up to a multiple of 32 (at least 32)."""
    return max(32, 32 * math.ceil(percentile(lengths, 0.99) / 32))


def histogram(lengths: list[int], max_len: int, bins: int = 8, width: int = 40) -> str:
    """Token lengths as text bars, from the shortest row to the longest; the bin holding
    max_len is marked."""
    low_end, top = min(lengths), max(lengths)
    step = max(1, math.ceil((top - low_end + 1) / bins))
    counts = [0] * bins
    for length in lengths:
        counts[min((length - low_end) // step, bins - 1)] += 1
    most = max(counts)
    lines = []
    for index, count in enumerate(counts):
        low, high = low_end + index * step, low_end + (index + 1) * step - 1
        bar = "#" * max(1 if count else 0, round(width * count / most))
        mark = "  <- max_len" if low <= max_len <= high else ""
        lines.append(f"  {low:>6}-{high:<6} {count:>7} {bar}{mark}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the pipeline
def default_name(data: Path) -> str:
    stem = data.stem if data.stem not in ("train", "data", "all", "rows") else data.parent.name
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.") or "domain"
    return name if name[0].isalnum() else f"d{name}"


def held_out_size(rows: int) -> float | int:
    return HELD_OUT_SHARE if rows <= SHARE_ROWS else HELD_OUT_COUNT


def init(
    data: str,
    *,
    test: str | None = None,
    base: str = DEFAULT_BASE,
    name: str | None = None,
    group_by: str | None = None,
    out_root: str = "recipes",
    force: bool = False,
    tokenizer=None,
) -> Path:
    """Write recipes/<name>/ for `data`; returns the dir. Nothing is written on an error."""
    data_path = Path(data)
    name = name or default_name(data_path)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise StillError(f"--name '{name}': use letters, digits, '.', '_' and '-'")
    target = Path(out_root) / name
    if target.exists() and not force:
        raise StillError(f"{target} already exists", hint="add --force to replace it")
    rows = strict_rows(RowSource(path=str(data_path)))
    detected = detect_format(str(data_path), rows)
    examples = check_rows(str(data_path), detected, rows)
    _check_group_field(str(data_path), rows, group_by)
    _check_split(rows, group_by, test)
    if test is not None:
        _check_test_file(test, detected)
    if tokenizer is None:
        from still.models import load_tokenizer

        tokenizer = load_tokenizer(base)
    lengths = token_lengths(examples, tokenizer)
    max_len = pick_max_len(lengths)
    print(f"still: {data_path}: {len(rows)} rows, format {detected.format} ({detected.reason})")
    print(
        f"still: token lengths under {base} (p50 {percentile(lengths, 0.5)}, "
        f"p99 {percentile(lengths, 0.99)}, max {max(lengths)}):"
    )
    print(histogram(lengths, max_len))
    plan = init_templates.Plan(
        name=name,
        base=base,
        data=os.path.relpath(data_path.resolve(), target.resolve()),
        test=os.path.relpath(Path(test).resolve(), target.resolve()) if test else None,
        format=detected.format,
        fields=detected.fields,
        reason=detected.reason,
        rows=len(rows),
        held_out=held_out_size(len(rows)),
        group_by=group_by,
        max_len=max_len,
        p50=percentile(lengths, 0.5),
        p99=percentile(lengths, 0.99),
        longest=max(lengths),
        choices=detected.choices,
        answer_tokens=answer_tokens(examples, tokenizer),
        chat_pairs=detected.format != "chat" or all(_ends_in_answer(e) for e in examples),
    )
    with staged_dir(target, replace=force) as staging:
        for relative, text in init_templates.files(plan).items():
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(staging / relative, text)
    for relative in init_templates.files(plan):
        print(f"still: wrote {target / relative}")
    print(f"still: next: still run {target / 'pipeline.yaml'}")
    return target


def _ends_in_answer(example: dict) -> bool:
    messages = example["messages"]
    return len(messages) >= 2 and [m["role"] for m in messages[-2:]] == ["user", "assistant"]


def _check_test_file(test: str, detected: Detected) -> None:
    """The tasks render test rows with the training file's fields: they must be the same."""
    found = detect_format(test, strict_rows(RowSource(path=test)))
    if (found.format, found.fields) != (detected.format, detected.fields):
        raise StillError(
            f"{test}: format {found.format} ({found.reason}), but the training data is "
            f"{detected.format} ({detected.reason})",
            hint="give a test file with the training file's fields",
        )


def _check_split(rows, group_by: str | None, test: str | None) -> None:
    """The eval (and, without --test, test) rows can be held out of this file, grouped or not:
    drawn once here so a file too small for them is refused before anything is written."""
    size = held_out_size(len(rows))
    split = Holdout(split=size, test=None if test else size, group_by=group_by)
    side_indices(rows, split)


def _check_group_field(path: str, rows, group_by: str | None) -> None:
    for origin, row in rows if group_by else ():
        if group_by not in row:
            raise StillError(
                f"{origin}: no field '{group_by}' to group the held-out split by",
                hint="give every row that field, or drop --group-by",
            )
