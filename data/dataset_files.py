"""What the dataset builders in data/ share: deterministic files and shuffled choices.
Standard library only (the builders run before the project's dependencies are installed)."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        handle.write(text)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shuffled_choices(rng: random.Random, right: str, distractors: list[str]) -> tuple[list, int]:
    """The right answer and its distractors in a seeded order, and where the right one is."""
    choices = [right, *distractors]
    rng.shuffle(choices)
    return choices, choices.index(right)
