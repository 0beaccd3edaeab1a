"""Packing with per-example attention, per family: a packed row's logits equal each example's
own, for the kit's default (packed sdpa from position_ids, still/attention.py) and for the 4-D
block mask. Gemma 3's sliding-window layers (window 4 here, shorter than the examples) must
keep their window inside each example; the block mask cannot, and is refused for it."""

import pytest
import torch
from families import FAMILIES, build_model

from still.attention import PACKED_SDPA, implementation, packed_attention, sliding_window
from still.data import PackedCollator
from still.errors import StillError
from still.formats import Encoder
from still.sections import DataSection
from still.train import collator_for

CONVERSATIONS = [
    [("What does abs do?", "Return the absolute value.")],
    [("Hi", "ok")],
    [("What does len do?", "The number of items."), ("And min?", "The smallest item.")],
]


def encoded_rows(tokenizer) -> list[dict]:
    rows = []
    for turns in CONVERSATIONS:
        messages = []
        for question, answer in turns:
            messages += [{"role": "user", "content": question}]
            messages += [{"role": "assistant", "content": answer}]
        encoded = Encoder(tokenizer).encode({"messages": messages})
        rows.append({"input_ids": encoded.input_ids, "labels": encoded.labels})
    return rows


def alone(model, rows) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(input_ids=torch.tensor([row["input_ids"]])).logits[0] for row in rows]


def packed_pieces(model, batch, rows) -> list[torch.Tensor]:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs).logits[0]
    pieces, start = [], 0
    for row in rows:
        pieces.append(logits[start : start + len(row["input_ids"])])
        start += len(row["input_ids"])
    return pieces


@pytest.fixture(scope="module")
def family_model(family_tokenizer):
    built = {}

    def get(name):
        if name not in built:
            tokenizer = family_tokenizer(name)
            built[name] = (build_model(name, tokenizer).eval(), encoded_rows(tokenizer))
        return built[name]

    return get


@pytest.mark.parametrize("name", FAMILIES)
def test_packed_sdpa_gives_each_example_its_own_logits(family_model, name):
    model, rows = family_model(name)
    expected = alone(model, rows)
    assert packed_attention(model) == "position_ids" and implementation(model) == PACKED_SDPA
    batch = PackedCollator(0, attention="position_ids")(rows)
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    for here, reference in zip(packed_pieces(model, batch, rows), expected, strict=True):
        torch.testing.assert_close(here, reference, atol=1e-5, rtol=1e-5)
    # the check has teeth: one causal row across the examples changes the later ones
    with torch.no_grad():
        leaked = model(input_ids=batch["input_ids"]).logits[0]
    start = len(rows[0]["input_ids"])
    assert (leaked[start : start + len(rows[1]["input_ids"])] - expected[1]).abs().max() > 1e-3
    model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("name", [name for name in FAMILIES if name != "gemma3"])
def test_block_mask_gives_each_example_its_own_logits(family_model, name):
    model, rows = family_model(name)
    expected = alone(model, rows)
    assert packed_attention(model, choice="block_mask") == "block_mask"
    batch = PackedCollator(0, attention="block_mask")(rows)
    assert batch["attention_mask"].dim() == 4
    for here, reference in zip(packed_pieces(model, batch, rows), expected, strict=True):
        torch.testing.assert_close(here, reference, atol=1e-5, rtol=1e-5)


def test_gemma3_window_is_shorter_than_its_examples_and_the_block_mask_is_refused(
    family_model, family_tokenizer, tmp_path
):
    model, rows = family_model("gemma3")
    window = sliding_window(model)
    assert window == 4 and all(len(row["input_ids"]) > window for row in rows)
    (tmp_path / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    data = DataSection(train={"path": str(tmp_path / "train.jsonl")}, max_len=64)
    model.set_attn_implementation("eager")  # the one attention that needs the block mask
    try:
        with pytest.raises(StillError, match=r"sliding window \(4 tokens\).*max_len 64"):
            collator_for(data, family_tokenizer("gemma3"), packed_attention(model), model)
    finally:
        model.set_attn_implementation("sdpa")
