"""Packed sdpa: per-example attention must equal each example run alone, values and gradients."""

import json

import pytest
import torch
from tiny_models import build_tiny_llama, build_tiny_tokenizer

from still.attention import (
    PACKED_SDPA,
    PACKED_SDPA_LOOP,
    implementation,
    packed_attention,
    sliding_window,
    use_packed_sdpa,
)
from still.data import PackedCollator
from still.errors import StillError
from still.losses import IGNORE_INDEX
from still.sections import DataSection

LENGTHS = (7, 12, 3, 9)


def features(vocab: int, lengths=LENGTHS, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for length in lengths:
        ids = torch.randint(4, vocab, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": ids})
    return rows


def build_tiny_gemma3(tokenizer, window: int):
    """A tiny Gemma-3 text model: one sliding-window layer, one full layer."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=512,
        sliding_window=window,
        layer_types=["sliding_attention", "full_attention"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.2,
        attn_implementation="sdpa",
    )
    return Gemma3ForCausalLM(config)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def logits_alone(model, rows) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(input_ids=torch.tensor([row["input_ids"]])).logits[0] for row in rows]


def split_packed(logits: torch.Tensor, batch, rows) -> list[torch.Tensor]:
    """Each example's logits out of a packed [rows, L, V] output, in order."""
    pieces = []
    for row in range(logits.shape[0]):
        starts = (batch["position_ids"][row] == 0).nonzero().flatten().tolist()
        pieces += [(row, start) for start in starts]
    return [
        logits[row, start : start + len(example["input_ids"])]
        for (row, start), example in zip(pieces, rows, strict=True)
    ]


@pytest.mark.parametrize("row_tokens", [None, 16])
def test_packed_sdpa_equals_each_example_alone(tokenizer, row_tokens):
    model = build_tiny_llama(tokenizer).eval()  # 4 query heads over 2 key/value heads (GQA)
    rows = features(len(tokenizer))
    alone = logits_alone(model, rows)
    assert use_packed_sdpa(model) and implementation(model) == PACKED_SDPA
    batch = PackedCollator(0, attention="position_ids", row_tokens=row_tokens)(rows)
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == (
        1 if row_tokens is None else 3
    )
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    for here, reference in zip(split_packed(packed, batch, rows), alone):
        torch.testing.assert_close(here, reference, atol=1e-5, rtol=1e-5)
    # The check has teeth: the same call without position_ids is one causal row across examples.
    with torch.no_grad():
        leaked = model(input_ids=batch["input_ids"]).logits
    assert (split_packed(leaked, batch, rows)[2] - alone[2]).abs().max() > 1e-3


def test_packed_sdpa_gradients_equal_the_block_mask_under_checkpointing(tokenizer):
    rows = features(len(tokenizer))
    grads = {}
    for mode in ("block_mask", "position_ids"):
        model = build_tiny_llama(tokenizer).train()
        model.gradient_checkpointing_enable()  # recomputes each layer's forward in backward
        if mode == "position_ids":
            assert use_packed_sdpa(model)
        batch = PackedCollator(0, attention=mode)(rows)
        model(**batch).loss.backward()
        grads[mode] = {name: p.grad for name, p in model.named_parameters()}
    for name, grad in grads["block_mask"].items():
        torch.testing.assert_close(
            grads["position_ids"][name], grad, atol=1e-5, rtol=1e-4, msg=name
        )


def test_packed_sdpa_keeps_the_sliding_window_inside_each_example(tokenizer):
    window = 4
    model = build_tiny_gemma3(tokenizer, window).eval()
    assert sliding_window(model) == window
    rows = features(len(tokenizer), lengths=(9, 3, 11))  # two examples longer than the window
    alone = logits_alone(model, rows)  # transformers' own sdpa with its sliding-window mask
    assert use_packed_sdpa(model)
    batch = PackedCollator(0, attention="position_ids")(rows)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    for here, reference in zip(split_packed(packed, batch, rows), alone):
        torch.testing.assert_close(here, reference, atol=1e-5, rtol=1e-5)
    # The window matters for these lengths: without it the long examples' logits change.
    wide = build_tiny_gemma3(tokenizer, window=64).eval()
    assert (logits_alone(wide, rows)[0] - alone[0]).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_switched_model_generates_like_sdpa(tokenizer, family):
    build = (
        (lambda: build_tiny_llama(tokenizer))
        if family == "llama"
        else (lambda: build_tiny_gemma3(tokenizer, 4))
    )
    prompts = [row["input_ids"] for row in features(len(tokenizer), lengths=(5, 9))]
    width = max(map(len, prompts))
    input_ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # left padding
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    outputs = []
    for switch in (False, True):
        model = build().eval()
        if switch:
            assert use_packed_sdpa(model)
        outputs.append(
            model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=8,
                do_sample=False,
                pad_token_id=0,
            )
        )
        outputs.append(
            model.generate(
                input_ids=input_ids[1:], max_new_tokens=8, do_sample=False, pad_token_id=0
            )
        )
    assert torch.equal(outputs[0], outputs[2]) and torch.equal(outputs[1], outputs[3])


def test_switch_is_not_saved(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = build_tiny_llama(tokenizer)
    assert use_packed_sdpa(model)
    model.save_pretrained(tmp_path)
    assert PACKED_SDPA not in (tmp_path / "config.json").read_text()
    assert implementation(AutoModelForCausalLM.from_pretrained(tmp_path)) == "sdpa"


def test_packed_attention_needs_every_model_to_isolate_examples(tokenizer):
    from peft import LoraConfig, get_peft_model

    student = get_peft_model(
        build_tiny_llama(tokenizer), LoraConfig(r=4, target_modules="all-linear")
    )
    teacher = build_tiny_llama(tokenizer, hidden=64, seed=1)
    teacher.set_attn_implementation("eager")
    # eager cannot: the batch carries the block mask, which the switched student honours too
    assert packed_attention(student, teacher) == "block_mask"
    assert implementation(teacher) == "eager" and implementation(student) == PACKED_SDPA
    assert packed_attention(student, None) == "position_ids"
    rows = features(len(tokenizer))
    batch = PackedCollator(0)(rows)  # block mask
    with torch.no_grad():
        masked = student(**batch).logits
        unmasked = student(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    torch.testing.assert_close(masked, unmasked, atol=1e-5, rtol=1e-5)


def test_block_mask_refuses_a_sliding_window_shorter_than_max_len(tokenizer, tmp_path):
    from still.train import collator_for

    (tmp_path / "train.jsonl").write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    model = build_tiny_gemma3(tokenizer, window=64)
    model.set_attn_implementation("eager")
    data = DataSection(train={"path": str(tmp_path / "train.jsonl")}, max_len=128)
    isolation = packed_attention(model)
    assert isolation == "block_mask"
    with pytest.raises(StillError, match=r"sliding window \(64 tokens\).*max_len 128"):
        collator_for(data, tokenizer, isolation, model)
    shorter = data.model_copy(update={"max_len": 64})
    assert collator_for(shorter, tokenizer, isolation, model).attention == "block_mask"
    sdpa = build_tiny_gemma3(tokenizer, window=64)
    isolation = packed_attention(sdpa)
    assert isolation == "position_ids" and implementation(sdpa) == PACKED_SDPA
    assert collator_for(data, tokenizer, isolation, sdpa).attention == "position_ids"


def test_the_collator_only_reads_the_models(tokenizer, tmp_path):
    """Choosing the attention switches the model; building a collator changes nothing."""
    from still.train import collator_for

    (tmp_path / "train.jsonl").write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    data = DataSection(train={"path": str(tmp_path / "train.jsonl")}, max_len=64)
    model = build_tiny_gemma3(tokenizer, window=64)
    collator_for(data, tokenizer, "position_ids", model)
    assert implementation(model) == "sdpa"
    assert packed_attention(model, choice="block_mask") == "block_mask"
    assert implementation(model) == "sdpa"
    assert packed_attention(model, choice="loop") == "position_ids"
    assert implementation(model) == PACKED_SDPA_LOOP


def test_packed_loss_is_unchanged_by_the_switch(tokenizer):
    """The labels' loss of a packed batch: block mask (plain sdpa) == packed sdpa."""
    rows = features(len(tokenizer))
    losses = []
    for mode in ("block_mask", "position_ids"):
        model = build_tiny_llama(tokenizer).eval()
        if mode == "position_ids":
            use_packed_sdpa(model)
        batch = PackedCollator(0, attention=mode)(rows)
        assert (batch["labels"] != IGNORE_INDEX).sum() == sum(LENGTHS) - len(LENGTHS)
        with torch.no_grad():
            losses.append(model(**batch).loss)
    torch.testing.assert_close(losses[0], losses[1])


# --------------------------------------------------------------------------- varlen kernel
def reference_varlen(
    query,
    key,
    value,
    cu_seq_q,
    cu_seq_k,
    max_q,
    max_k,
    *,
    window_size=(-1, -1),
    scale=None,
    enable_gqa=False,
    return_aux=None,
):
    """What torch.nn.attention.varlen.varlen_attn computes (its CUDA kernel, written out for the
    CPU): [tokens, heads, dim] with examples at cu_seq offsets; window_size (left, right)."""
    assert max_q == max_k == int((cu_seq_q[1:] - cu_seq_q[:-1]).max())
    out = []
    for start, end in zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist()):
        q, k, v = (x[start:end].transpose(0, 1)[None] for x in (query, key, value))
        i, j = torch.arange(end - start)[:, None], torch.arange(end - start)[None, :]
        left, right = window_size
        allowed = ((j <= i + right) if right >= 0 else torch.ones_like(i == j)) & (
            (j >= i - left) if left >= 0 else True
        )
        out.append(
            torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=allowed, scale=scale, enable_gqa=enable_gqa
            )[0].transpose(0, 1)
        )
    return torch.cat(out)


def older_varlen(
    query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None
):
    """torch 2.10's signature: causality as a flag, no scale, window or GQA keywords."""
    assert (
        key.shape[1] == value.shape[1] == query.shape[1]
    )  # no GQA keyword: heads repeated by the caller
    return reference_varlen(
        query,
        key,
        value,
        cu_seq_q,
        cu_seq_k,
        max_q,
        max_k,
        window_size=(-1, 0 if is_causal else -1),
    )


@pytest.fixture
def varlen_on_cpu(monkeypatch):
    """Let packed sdpa take the varlen path on the CPU, with `kernel` standing in for torch's."""
    import inspect

    from still import attention

    calls = []

    def install(kernel):
        def counted(*args, **kwargs):
            calls.append(kwargs)
            return kernel(*args, **kwargs)

        counted.__signature__ = inspect.signature(kernel)
        monkeypatch.setattr(attention._varlen, "fn", counted)
        monkeypatch.setattr(
            attention._varlen, "params", frozenset(inspect.signature(kernel).parameters)
        )
        monkeypatch.setattr(attention._varlen, "devices", ("cpu",))
        monkeypatch.setattr(attention._varlen, "dtypes", (torch.float32,))
        monkeypatch.setattr(attention._varlen, "checked", {})
        return calls

    return install


@pytest.mark.parametrize("kernel", [reference_varlen, older_varlen])
def test_varlen_kernel_gives_each_example_alone(tokenizer, varlen_on_cpu, kernel):
    calls = varlen_on_cpu(kernel)
    model = build_tiny_llama(tokenizer).eval()
    rows = features(len(tokenizer))
    alone = logits_alone(model, rows)
    assert use_packed_sdpa(model)
    batch = PackedCollator(0, attention="position_ids", row_tokens=16)(rows)
    with torch.no_grad():
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
        assert len(calls) == 3  # the check on first use, then one call per layer
        calls.clear()
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    assert len(calls) == 2
    assert ("enable_gqa" in calls[0]) == (kernel is reference_varlen)
    for here, reference in zip(split_packed(packed, batch, rows), alone):
        torch.testing.assert_close(here, reference, atol=1e-5, rtol=1e-5)


def test_varlen_kernel_gradients_and_sliding_window(tokenizer, varlen_on_cpu):
    from still import attention

    calls = varlen_on_cpu(reference_varlen)
    rows = features(len(tokenizer), lengths=(9, 3, 11))
    grads = []
    for varlen in (False, True):
        model = build_tiny_gemma3(tokenizer, window=4).train()
        assert use_packed_sdpa(model)
        batch = PackedCollator(0, attention="position_ids")(rows)
        calls.clear()
        attention._varlen.devices = ("cpu",) if varlen else ()  # monkeypatched: restored after
        model(**batch).loss.backward()
        assert bool(calls) == varlen
        grads.append({name: p.grad for name, p in model.named_parameters()})
    assert any(call["window_size"] == (3, 0) for call in calls)  # the sliding layer
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_older_varlen_cannot_hold_a_sliding_window(tokenizer, varlen_on_cpu):
    calls = varlen_on_cpu(older_varlen)
    model = build_tiny_gemma3(tokenizer, window=4).eval()
    assert use_packed_sdpa(model)
    batch = PackedCollator(0, attention="position_ids")(features(len(tokenizer)))
    with torch.no_grad():
        model(**batch)
    # the full-attention layer (Gemma's own scaling, which 2.10's kernel cannot take) and the
    # sliding one both stay on the per-example loop
    assert not calls


@pytest.mark.parametrize("broken", ["wrong", "raises"])
def test_a_varlen_kernel_that_fails_its_check_is_not_used(tokenizer, varlen_on_cpu, capsys, broken):
    def wrong(*args, **kwargs):
        return reference_varlen(*args, **{**kwargs, "window_size": (-1, -1)})  # not causal

    def raises(*args, **kwargs):
        raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.")

    wrong.__signature__ = raises.__signature__ = __import__("inspect").signature(reference_varlen)
    calls = varlen_on_cpu(wrong if broken == "wrong" else raises)
    model = build_tiny_llama(tokenizer).eval()
    rows = features(len(tokenizer))
    alone = logits_alone(model, rows)
    assert use_packed_sdpa(model)
    batch = PackedCollator(0, attention="position_ids")(rows)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
    assert len(calls) <= 1  # the check's own call, if it got that far; never again
    for here, reference in zip(split_packed(packed, batch, rows), alone):
        torch.testing.assert_close(here, reference, atol=1e-5, rtol=1e-5)
    out = capsys.readouterr().out
    assert out.count("still: torch's varlen attention failed its check on cpu torch.float32") == 1
    assert ("differed" in out) == (broken == "wrong") and ("Ampere" in out) == (broken == "raises")
