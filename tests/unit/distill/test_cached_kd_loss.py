"""The teacher-cache side of the KD loss: top-k + rest bucket, and the cache's fidelity numbers."""

import math

import pytest
import torch

from distill.cache import kl_full_to_cached, topk_entries
from distill.losses import cached_kd_loss, fused_kd_loss
from still.errors import StillError

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd"]


def _inputs(seed=0, tokens=13, hidden=8, vocab=11):
    generator = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(tokens, hidden, generator=generator, dtype=torch.float64)
    student_head = torch.randn(vocab, hidden, generator=generator, dtype=torch.float64)
    teacher_hidden = torch.randn(tokens, hidden, generator=generator, dtype=torch.float64)
    teacher_head = torch.randn(vocab, hidden, generator=generator, dtype=torch.float64) * 2
    labels = torch.randint(0, vocab, (tokens,), generator=generator)
    labels[[2, 7]] = -100
    return student_hidden, student_head, teacher_hidden, teacher_head, labels


def _cache_rows(teacher_hidden, teacher_head, labels, temperature, k):
    keep = labels != -100
    log_probs = torch.log_softmax((teacher_hidden[keep] @ teacher_head.T) / temperature, dim=-1)
    return topk_entries(log_probs, k)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_with_every_token_cached_it_equals_online_kd(divergence):
    student_hidden, student_head, teacher_hidden, teacher_head, labels = _inputs()
    settings = dict(
        divergence=divergence, temperature=2.0, ce_weight=0.3, kd_weight=1.0, chunk_size=4
    )
    a_hidden, a_head = (
        student_hidden.clone().requires_grad_(),
        student_head.clone().requires_grad_(),
    )
    online = fused_kd_loss(a_hidden, a_head, teacher_hidden, teacher_head, labels, **settings)
    online.loss.backward()
    b_hidden, b_head = (
        student_hidden.clone().requires_grad_(),
        student_head.clone().requires_grad_(),
    )
    values, ids, rest_log = _cache_rows(teacher_hidden, teacher_head, labels, 2.0, k=11)
    cached = cached_kd_loss(
        b_hidden, b_head, values, ids, rest_log, labels, vocab_size=11, **settings
    )
    cached.loss.backward()
    assert cached.loss.item() == pytest.approx(online.loss.item(), abs=1e-9)
    assert cached.ce_sum.item() == pytest.approx(online.ce_sum.item(), abs=1e-9)
    assert torch.allclose(b_hidden.grad, a_hidden.grad, atol=1e-9)
    assert torch.allclose(b_head.grad, a_head.grad, atol=1e-9)


def test_top_k_forward_kl_is_kl_over_top_k_plus_one_rest_bucket():
    teacher = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    student_logits = torch.tensor([[0.2, -0.1, 0.4, 0.0]])
    student = torch.softmax(student_logits, -1)[0]
    values, ids, rest_log = topk_entries(teacher, 2)
    loss = cached_kd_loss(
        student_logits,
        torch.eye(4),
        values,
        ids,
        rest_log,
        torch.tensor([0]),
        ce_weight=0.0,
        kd_weight=1.0,
        vocab_size=4,
    )
    by_hand = (
        0.5 * math.log(0.5 / student[0])
        + 0.3 * math.log(0.3 / student[1])
        + 0.2 * math.log(0.2 / (student[2] + student[3]))
    )
    assert loss.kd_sum.item() == pytest.approx(by_hand, abs=1e-6)


def test_fidelity_numbers_on_a_hand_checked_distribution():
    teacher = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.25, 0.125, 0.125]]).log()
    values, ids, rest_log = topk_entries(teacher, 2)
    assert ids.tolist() == [[0, 1], [0, 1]]
    assert values.exp().sum(-1).tolist() == pytest.approx([0.8, 0.75])
    assert rest_log.exp().tolist() == pytest.approx([0.2, 0.25])
    # rest spread evenly over the 2 others: q = 0.1 each; the second tail is already even
    kl = kl_full_to_cached(teacher, ids, rest_log)
    assert kl.tolist() == pytest.approx(
        [0.15 * math.log(1.5) + 0.05 * math.log(0.5), 0.0], abs=1e-6
    )
    assert kl_full_to_cached(teacher, *topk_entries(teacher, 4)[1:]).tolist() == [0.0, 0.0]


def test_a_cache_that_does_not_match_the_batch_is_refused():
    student_hidden, student_head, teacher_hidden, teacher_head, labels = _inputs()
    values, ids, rest_log = _cache_rows(teacher_hidden, teacher_head, labels, 1.0, k=3)
    labels[2] = 5  # one more loss token than the cache has rows for
    with pytest.raises(
        StillError, match="holds 11 tokens for this batch but it has 12 loss tokens"
    ):
        cached_kd_loss(
            student_hidden,
            student_head,
            values,
            ids,
            rest_log,
            labels,
            ce_weight=0.0,
            kd_weight=1.0,
            vocab_size=11,
        )


def test_uint8_log_probs_round_trip_within_half_a_step():
    from distill.cache import dequantize_log_probs, quantize_log_probs

    log_probs = torch.log_softmax(
        torch.randn(50, 300, generator=torch.Generator().manual_seed(1)) * 3, -1
    )
    values, _, _ = topk_entries(log_probs, 64)
    stored = quantize_log_probs(values)
    assert stored["log_probs_q"].dtype == torch.uint8
    step = stored["log_probs_step"].float()[:, None]
    error = (dequantize_log_probs(stored) - values).abs()
    # half a step, plus the fp16 rounding of the stored top value and step
    assert (error <= step * 0.5 + 1e-2).all()
    assert error[:, 0].max() < 1e-2  # the top-1 value is stored directly
