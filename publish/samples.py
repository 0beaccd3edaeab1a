"""Texts from the run's own data: what the merge and GGUF checks run on and the card shows.

A published model is checked on the kind of text it was trained for, and its card's usage
example asks the kind of question it answers, so both come from the first rows of the run's
data (its eval split first: a held-out question is the honest example; then its train split),
read through the recipe it recorded. A run whose data is gone, unreadable or on a hub that
cannot be reached falls back to neutral texts that name no domain: the checks then still
cover prose, digits, code-like punctuation and the chat template.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import ValidationError

from still.errors import StillError
from still.formats import row_to_example
from still.rows import BadRow, read_rows
from still.rundir import RunDir
from still.sections import DataSection

SAMPLE_COUNT = 2  # examples per publish: enough tokens to see a layout bug, few enough to be quick
# A whole training example can be a long document; the checks only need a few hundred tokens.
MAX_CHARS = 400
FALLBACK_PROMPTS = ("Hello! What can you help me with?",)
FALLBACK_TEXTS = (
    "The quick brown fox jumps over the lazy dog, and the dog does not mind at all.",
    "Numbers and code: total = sum([1, 2, 3])  # 12345\n    if total > 5:\n        print(total)",
)


@dataclass(frozen=True)
class Samples:
    """User turns (`prompts`) and whole examples as plain text (`texts`), never empty."""

    prompts: tuple[str, ...]
    texts: tuple[str, ...]
    from_run: bool  # False: the neutral fallback


FALLBACK = Samples(FALLBACK_PROMPTS, FALLBACK_TEXTS, from_run=False)


def run_samples(run: RunDir, count: int = SAMPLE_COUNT) -> Samples:
    """The first `count` readable examples of the run's eval data, else of its train data."""
    data = run.recipe_data().get("data")
    if not isinstance(data, dict):
        return FALLBACK
    try:
        section = DataSection.model_validate(data)
    except ValidationError:  # a recipe from an older kit: its data keys no longer validate
        return FALLBACK
    for split, source in (("eval", section.eval), ("train", section.train)):
        if source is None:
            continue
        examples = _first_examples(section, source, split, count)
        if examples:
            prompts = tuple(_prompt(example) for example in examples)
            texts = tuple(_plain_text(example) for example in examples)
            return Samples(prompts, texts, from_run=True)
    return FALLBACK


def _first_examples(section: DataSection, source, split: str, count: int) -> list[dict]:
    examples = []
    try:
        for _, row in read_rows(source):
            if isinstance(row, BadRow):
                continue  # the run itself skipped or refused it; the next row will do
            try:
                example = row_to_example(
                    row, source, split=split, system_prompt=section.system_prompt
                )
            except BadRow:
                continue
            if _prompt(example).strip():  # an empty prompt would be a zero-token check
                examples.append(example)
            if len(examples) == count:
                break
    except StillError as error:  # moved, deleted or offline: say so, and use what there is
        print(
            f"still: sample texts: {split} data unavailable ({error}); "
            f"{'using what was read' if examples else 'trying the next source'}"
        )
    return examples


def _prompt(example: dict) -> str:
    if "text" in example:  # completion data has no question: its opening stands in for one
        return _clip(example["text"])
    users = [message["content"] for message in example["messages"] if message["role"] == "user"]
    return _clip(users[0]) if users else _clip(example["messages"][0]["content"])


def _plain_text(example: dict) -> str:
    if "text" in example:
        return _clip(example["text"])
    return _clip("\n".join(message["content"] for message in example["messages"]))


def _clip(text: str) -> str:
    return text if len(text) <= MAX_CHARS else text[:MAX_CHARS]


CALIBRATION_COUNT = 64  # training examples behind a k-quant's importance matrix


def calibration_texts(run: RunDir, count: int = CALIBRATION_COUNT) -> list[str]:
    """Up to `count` of the run's training examples as plain text, for the importance matrix
    of a k-quant GGUF (never the held-out rows the GGUF check scores); the neutral texts when
    the data is gone."""
    data = run.recipe_data().get("data")
    try:
        section = DataSection.model_validate(data) if isinstance(data, dict) else None
    except ValidationError:
        section = None
    if section is None or section.train is None:
        return list(FALLBACK_TEXTS)
    examples = _first_examples(section, section.train, "train", count)
    return [_plain_text(example) for example in examples] or list(FALLBACK_TEXTS)
