"""Packed (padding-free) batches must give every token the loss it has when run alone."""

import json

import pytest
import torch

from still import data as still_data
from still.data import PackedCollator, PaddedCollator
from still.losses import IGNORE_INDEX
from still.sections import DataSection

FEATURES = [
    {"input_ids": [5, 6, 7], "labels": [5, 6, 7]},
    {"input_ids": [8, 9, 10, 11, 12], "labels": [-100, -100, 10, 11, 12]},
    {"input_ids": [13, 14], "labels": [13, 14]},
]


def test_packed_collator_shapes_positions_and_boundaries():
    batch = PackedCollator(pad_token_id=0)(FEATURES)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 0, 1]]
    # The first label of every example is masked: nothing predicts across a boundary.
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, -100, 10, 11, 12, -100, 14]]
    mask = batch["attention_mask"]
    assert mask.shape == (1, 1, 10, 10) and mask.dtype == torch.float32
    allowed = mask[0, 0] == 0
    owner = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 2, 2])
    expected = (owner[:, None] == owner[None, :]) & torch.ones(10, 10, dtype=torch.bool).tril()
    assert torch.equal(allowed, expected)
    assert (mask[0, 0][~expected] == torch.finfo(torch.float32).min).all()


def test_packed_rows_are_capped_at_row_tokens_and_padded_as_the_last_example():
    batch = PackedCollator(pad_token_id=0, row_tokens=8)(FEATURES)
    # 3 + 5 tokens fill the first row; the 2-token example starts a second, padded to 8
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 0, 0, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6, 7]]
    assert batch["labels"].tolist() == [
        [-100, 6, 7, -100, -100, 10, 11, 12],
        [-100, 14] + [-100] * 6,
    ]
    mask = batch["attention_mask"]
    assert mask.shape == (2, 1, 8, 8)
    allowed = mask[:, 0] == 0
    # the padding continues the row's one example: plain causal, so no query row is all masked
    assert torch.equal(allowed[1], torch.ones(8, 8, dtype=torch.bool).tril())
    assert not allowed[0, 3, :3].any()  # the second example does not see the first
    # one row, as before, when every example fits
    assert PackedCollator(0, row_tokens=10)(FEATURES)["input_ids"].shape == (1, 10)


def test_packed_collator_position_ids_mode_and_mask_dtype():
    batch = PackedCollator(0, attention="position_ids")(FEATURES)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    half = PackedCollator(0, mask_dtype=torch.bfloat16)(FEATURES)["attention_mask"]
    assert half.dtype == torch.bfloat16 and half.min() == torch.finfo(torch.bfloat16).min


def test_padded_collator():
    batch = PaddedCollator(pad_token_id=3)(FEATURES)
    assert batch["input_ids"].shape == (3, 5)
    assert batch["input_ids"][2].tolist() == [13, 14, 3, 3, 3]
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0]
    assert batch["labels"][0].tolist() == [5, 6, 7, -100, -100]


def token_losses(model, batch) -> torch.Tensor:
    """Per-token cross entropy; position t scores the prediction of token t+1."""
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    labels = batch["labels"]
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        labels[:, 1:].flatten(),
        reduction="none",
        ignore_index=IGNORE_INDEX,
    ).view(labels.shape[0], -1)


@pytest.fixture(scope="module")
def features(tiny_model_dir, tmp_path_factory):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = []
    for index in range(4):
        messages = [
            {"role": "user", "content": "What does json.dumps do? " * (index + 1)},
            {"role": "assistant", "content": "Serialize obj. " * (4 - index)},
        ]
        if index == 2:
            messages += [
                {"role": "user", "content": "Why?"},
                {"role": "assistant", "content": "The quick brown fox."},
            ]
        rows.append(json.dumps({"messages": messages}))
    folder = tmp_path_factory.mktemp("packing")
    (folder / "train.jsonl").write_text("\n".join(rows) + "\n")
    data = DataSection(train={"path": str(folder / "train.jsonl")}, max_len=256)
    prepared = still_data.prepare(data, tokenizer, cache_dir=folder / "cache", progress=False)
    return list(prepared.dataset)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked_per_token(tiny_model_dir, features, attn_implementation):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, attn_implementation=attn_implementation, dtype=torch.float32
    ).eval()
    assert model.config._attn_implementation == attn_implementation
    alone = []
    for feature in features:
        single = {key: torch.tensor([feature[key]]) for key in ("input_ids", "labels")}
        alone.append(token_losses(model, single)[0])

    packed_batch = PackedCollator(pad_token_id=0)(features)
    packed = token_losses(model, packed_batch)[0]
    start, worst = 0, 0.0
    for feature, reference in zip(features, alone):
        length = len(feature["input_ids"])
        trained = torch.tensor(feature["labels"][1:]) != IGNORE_INDEX
        here = packed[start : start + length - 1]
        worst = max(worst, (here[trained] - reference[trained]).abs().max().item())
        start += length
    assert worst < 1e-5

    # Rows capped at a few examples' worth of tokens (padded as the row's last example): same.
    capped_batch = PackedCollator(
        pad_token_id=0, row_tokens=max(len(f["input_ids"]) for f in features) + 8
    )(features)
    assert capped_batch["input_ids"].shape[0] > 1
    capped = token_losses(model, capped_batch)
    segments = []
    for row in range(capped.shape[0]):
        starts = (capped_batch["position_ids"][row] == 0).nonzero().flatten().tolist()
        segments += [(row, start) for start in starts]
    for (row, start), feature, reference in zip(segments, features, alone, strict=True):
        length = len(feature["input_ids"])
        trained = torch.tensor(feature["labels"][1:]) != IGNORE_INDEX
        here = capped[row, start : start + length - 1]
        assert (here[trained] - reference[trained]).abs().max().item() < 1e-5

    # The check has teeth: without the block mask, later examples see earlier ones.
    no_mask = {k: v for k, v in packed_batch.items() if k != "attention_mask"}
    no_mask.pop("position_ids")
    leaked = token_losses(model, no_mask)[0]
    last = len(features[-1]["input_ids"]) - 1
    assert (leaked[-last:] - alone[-1]).abs().max() > 1e-3

    # Right padding gives the same per-token losses too.
    padded = token_losses(model, PaddedCollator(pad_token_id=0)(features))
    for row, reference in zip(padded, alone):
        valid = ~torch.isnan(reference) & (reference != 0)
        assert torch.allclose(row[: len(reference)][valid], reference[valid], atol=1e-5)
