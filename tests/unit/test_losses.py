"""still.losses: chunked cross entropy from hidden states equals the full-logits loss."""

import pytest
import torch
import torch.nn.functional as F

from still.losses import IGNORE_INDEX, linear_cross_entropy, per_token_loss


def full_logits_loss(hidden, weight, labels, bias=None):
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def leaves(seed=0, tokens=(3, 7), hidden=16, vocab=40, bias=True):
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(*tokens, hidden, generator=generator, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=generator, requires_grad=True)
    b = torch.randn(vocab, generator=generator, requires_grad=True) if bias else None
    labels = torch.randint(0, vocab, tokens, generator=generator)
    labels[0, :3] = IGNORE_INDEX  # a prompt
    labels[2, -1] = IGNORE_INDEX
    return h, w, b, labels


def grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
@pytest.mark.parametrize("bias", [True, False])
def test_value_and_gradients_equal_the_full_logits_loss(chunk_size, bias):
    h, w, b, labels = leaves(bias=bias)
    expected = full_logits_loss(h, w, labels, b)
    expected_grads = grads(expected, (h, w, b))
    total, n_tokens = linear_cross_entropy(h, w, labels, bias=b, chunk_size=chunk_size)
    assert int(n_tokens) == int((labels != IGNORE_INDEX).sum())
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    for got, want in zip(grads(total * 0.5, (h, w, b)), expected_grads):
        torch.testing.assert_close(got, want * 0.5, rtol=1e-5, atol=1e-6)


def test_masked_positions_get_no_gradient_and_all_masked_gives_zero():
    h, w, b, labels = leaves()
    total, _ = linear_cross_entropy(h, w, labels, bias=b)
    (grad_h,) = grads(total, (h,))
    assert torch.all(grad_h[0, :3] == 0) and torch.all(grad_h[2, -1] == 0)
    assert grad_h[1].abs().sum() > 0
    total, n_tokens = linear_cross_entropy(h, w, torch.full_like(labels, IGNORE_INDEX), bias=b)
    assert total.item() == 0.0 and int(n_tokens) == 0
    assert all(torch.all(g == 0) for g in grads(total, (h, w, b)))


def test_frozen_head_gets_no_gradient_buffer():
    h, w, _, labels = leaves(bias=False)
    w = w.detach()  # a LoRA run's tied embedding/head
    total, _ = linear_cross_entropy(h, w, labels)
    (grad_h,) = grads(total, (h,))
    assert w.grad is None and grad_h.shape == h.shape


def test_bf16_head_matches_fp32_within_bf16_rounding():
    h, w, b, labels = leaves(bias=False, hidden=32, vocab=64)
    want = full_logits_loss(h, w, labels)
    hb, wb = h.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
    total, _ = linear_cross_entropy(hb, wb, labels, chunk_size=5)
    assert total.dtype == torch.float32
    assert total.item() == pytest.approx(want.item(), rel=2e-2)
    grad_h, grad_w = grads(total, (hb, wb))
    assert grad_h.dtype == grad_w.dtype == torch.bfloat16
    want_h, want_w = grads(want, (h, w))
    assert F.cosine_similarity(grad_w.float().flatten(), want_w.flatten(), dim=0) > 0.999
    assert F.cosine_similarity(grad_h.float().flatten(), want_h.flatten(), dim=0) > 0.999


def test_per_token_loss_weighs_every_token_of_the_step_the_same():
    loss_sum, n_tokens = torch.tensor(12.0), torch.tensor(4)
    common = dict(training=True, accumulation_steps=3, num_processes=2)
    # Trainer counted 24 tokens over the step (all micro-batches, both ranks)
    assert per_token_loss(
        loss_sum,
        n_tokens,
        num_items_in_batch=torch.tensor(24),
        average_across_devices=True,
        **common,
    ).item() == pytest.approx(1.0)  # DDP then halves it again
    assert per_token_loss(
        loss_sum,
        n_tokens,
        num_items_in_batch=torch.tensor(24),
        average_across_devices=False,
        **common,
    ).item() == pytest.approx(0.5)
    # no count (eval, or a model-made batch): this batch's mean, split over accumulation in training
    assert per_token_loss(
        loss_sum, n_tokens, num_items_in_batch=None, average_across_devices=True, **common
    ).item() == pytest.approx(1.0)
    assert per_token_loss(
        loss_sum,
        n_tokens,
        num_items_in_batch=None,
        average_across_devices=True,
        training=False,
        accumulation_steps=3,
        num_processes=2,
    ).item() == pytest.approx(3.0)
    assert (
        per_token_loss(
            torch.tensor(0.0),
            torch.tensor(0),
            num_items_in_batch=None,
            average_across_devices=False,
            training=False,
            accumulation_steps=1,
            num_processes=1,
        ).item()
        == 0.0
    )


def test_chunk_size_must_be_positive():
    h, w, b, labels = leaves()
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(h, w, labels, chunk_size=0)


def test_logits_are_head_output_tells_plain_heads_from_soft_capped_ones(tiny_tokenizer):
    from peft import LoraConfig, get_peft_model
    from tiny_models import build_tiny_llama, build_tiny_softcapped

    from still.models import logits_are_head_output

    llama = build_tiny_llama(tiny_tokenizer)
    assert logits_are_head_output(llama)
    lora = get_peft_model(
        build_tiny_llama(tiny_tokenizer), LoraConfig(r=2, target_modules="all-linear")
    )
    lora.train()
    assert logits_are_head_output(lora) and lora.training  # the probe leaves the mode as it was
    assert not logits_are_head_output(build_tiny_softcapped(tiny_tokenizer))
