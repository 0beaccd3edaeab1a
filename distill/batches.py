"""Batches for the KD runner: the prompts an on-policy batch answers, and dataset indices
for the teacher cache."""

from __future__ import annotations

import torch

from still.losses import IGNORE_INDEX


def prompts_and_budgets(inputs: dict, labels: torch.Tensor) -> tuple[list[list[int]], list[int]]:
    """Each example's prompt (its tokens before the first trained one) and how many tokens its
    dataset answer had, from a padded [B, L] batch or a packed [1, N] one (position_ids)."""
    input_ids = inputs["input_ids"]
    if "position_ids" in inputs:  # packed rows: examples restart at position 0
        rows = []
        for row in range(input_ids.shape[0]):
            starts = (inputs["position_ids"][row] == 0).nonzero().flatten().tolist() + [
                input_ids.shape[1]
            ]
            rows += [(input_ids[row, a:b], labels[row, a:b]) for a, b in zip(starts, starts[1:])]
    else:
        lengths = inputs["attention_mask"].sum(-1).tolist() if "attention_mask" in inputs else None
        rows = [
            (
                input_ids[i, : lengths[i] if lengths else None],
                labels[i, : lengths[i] if lengths else None],
            )
            for i in range(input_ids.shape[0])
        ]
    prompts, budgets = [], []
    for ids, example_labels in rows:
        trained = (example_labels[1:] != IGNORE_INDEX).nonzero().flatten() + 1
        first = int(trained[0]) if len(trained) else len(ids)
        end = (
            int(trained[-1]) + 1 if len(trained) else len(ids)
        )  # a row's padding is not the answer
        prompts.append(ids[:first].tolist())
        budgets.append(max(1, end - first))
    return prompts, budgets


def with_example_ids(collator):
    """A collator that also hands the batch's dataset indices on (to find cached teacher rows)."""

    def collate(features: list[dict]) -> dict:
        batch = collator([{k: v for k, v in f.items() if k != "example_id"} for f in features])
        batch["example_ids"] = torch.tensor([f["example_id"] for f in features])
        return batch

    return collate
