"""Held-out splits carved out of one data file: seeded, deterministic, optionally grouped.

`data.eval: {split: 0.1, seed: 0, group_by: module}` in a recipe becomes a `holdout` on both
sides of one file (`still.sections.DataSection`): the eval source takes the held-out rows, the
train source the rest. A task YAML that names the same file with the same `holdout` scores the
very rows the run held out. The assignment depends only on the file's rows (all of them, before
any `limit`), the share or count, the seed and the group field, so it is the same on every run,
every rank and in every reader.

`test: 0.1` (beside `split`) carves a third side, the test rows a task scores, distinct from the
eval rows: the same seeded group order is walked once, the eval side first (so adding a test
side leaves the eval rows as they were), then the test side; training reads neither.
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


def _fill(order: list[str], sizes: Counter, start: int, target: int) -> tuple[set[str], int]:
    """Whole groups from order[start:] until they hold `target` rows; (groups, next start)."""
    chosen: set[str] = set()
    taken, index = 0, start
    while index < len(order) and taken < target:
        chosen.add(order[index])
        taken += sizes[order[index]]
        index += 1
    return chosen, index


def side_indices(items: list[tuple[str, object]], holdout) -> tuple[set[int], set[int]]:
    """(eval indices, test indices). Whole groups are taken, in a seeded order, until each side
    reaches its size, so no group lands on two sides; a group is always left to train on."""
    keys = [
        _group_key(origin, index, row, holdout.group_by)
        for index, (origin, row) in enumerate(items)
    ]
    sizes = Counter(keys)
    order = list(sizes)  # first-appearance order, then shuffled by the seed
    random.Random(holdout.seed).shuffle(order)
    target = target_size(holdout.split, len(items))
    test_target = target_size(holdout.test, len(items)) if holdout.test is not None else 0
    sides = 3 if holdout.test is not None else 2
    if target + test_target >= len(items) or len(order) < sides:
        what = f"{len(order)} group(s) of '{holdout.group_by}'" if holdout.group_by else "rows"
        test = f" and test split {holdout.test}" if holdout.test is not None else ""
        raise StillError(
            f"held-out split {holdout.split}{test} of {len(items)} rows leaves nothing to train "
            f"on ({what})",
            hint="use a smaller share or count, or more data",
        )
    held, end = _fill(order, sizes, 0, target)
    test, end = _fill(order, sizes, end, test_target)
    if end == len(order):  # always leave a group to train on
        (test or held).discard(order[-1])
    if holdout.test is not None and not test:
        raise StillError(
            f"held-out split {holdout.split} takes every group of '{holdout.group_by}' but one: "
            "none is left for the test split",
            hint="use a smaller share or count, or more groups",
        )
    return (
        {index for index, key in enumerate(keys) if key in held},
        {index for index, key in enumerate(keys) if key in test},
    )


def split_rows(items: Iterator[tuple[str, object]], holdout) -> list[tuple[str, object]]:
    """The rows of `holdout.side` ('held_out', 'test' or 'rest'), in file order."""
    items = list(items)
    held, test = side_indices(items, holdout)
    if holdout.side == "rest":
        return [item for index, item in enumerate(items) if index not in held | test]
    side = held if holdout.side == "held_out" else test
    return [item for index, item in enumerate(items) if index in side]
