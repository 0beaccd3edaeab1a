"""Held-out splits carved out of one data file: seeded, deterministic, optionally grouped.

`data.eval: {split: 0.1, seed: 0, group_by: module}` in a recipe becomes a `holdout` on both
sides of one file (`still.sections.DataSection`): the eval source takes the held-out rows, the
train source the rest. A task YAML that names the same file with the same `holdout` scores the
very rows the run held out. The assignment depends only on the file's rows (all of them, before
any `limit`), the share or count, the seed and the group field, so it is the same on every run,
every rank and in every reader.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterator

from still.errors import StillError


def _group_key(origin: str, index: int, row, group_by: str | None) -> str:
    if group_by is None:
        return f"#{index}"
    if not isinstance(row, dict):  # a bad row (or a non-object): its own group; reported later
        return f"#{index}"
    if group_by not in row:
        raise StillError(
            f"{origin}: no field '{group_by}' to group the held-out split by",
            hint="give every row that field, or drop group_by",
        )
    return "=" + json.dumps(row[group_by], sort_keys=True, default=str)


def target_size(split: float | int, rows: int) -> int:
    """How many rows the held-out side should hold: a share of them, or a count."""
    return split if isinstance(split, int) else max(1, round(split * rows))


def held_out_indices(items: list[tuple[str, object]], holdout) -> set[int]:
    """Indices of the rows on the held-out side. Whole groups are taken, in a seeded order,
    until the side reaches its size, so no group lands on both sides."""
    keys = [
        _group_key(origin, index, row, holdout.group_by)
        for index, (origin, row) in enumerate(items)
    ]
    sizes = Counter(keys)
    order = list(sizes)  # first-appearance order, then shuffled by the seed
    random.Random(holdout.seed).shuffle(order)
    target = target_size(holdout.split, len(items))
    if target >= len(items) or len(order) < 2:
        what = f"{len(order)} group(s) of '{holdout.group_by}'" if holdout.group_by else "rows"
        raise StillError(
            f"held-out split {holdout.split} of {len(items)} rows leaves nothing to train on "
            f"({what})",
            hint="use a smaller share or count, or more data",
        )
    chosen: set[str] = set()
    taken = 0
    for key in order:
        if taken >= target:
            break
        chosen.add(key)
        taken += sizes[key]
    if len(chosen) == len(order):
        chosen.discard(order[-1])  # always leave a group to train on
    return {index for index, key in enumerate(keys) if key in chosen}


def split_rows(items: Iterator[tuple[str, object]], holdout) -> list[tuple[str, object]]:
    """The rows of `holdout.side` ('held_out' or 'rest'), in file order."""
    items = list(items)
    held = held_out_indices(items, holdout)
    keep_held = holdout.side == "held_out"
    return [item for index, item in enumerate(items) if (index in held) == keep_held]
