"""Distillation losses: each divergence against probabilities written out here, the limits that
tie them together, masking, T² scaling, and chunked (`fused_kd_loss`) == naive."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.losses import (
    DIVERGENCES,
    IGNORE_INDEX,
    forward_kl,
    fused_kd_loss,
    jsd,
    kd_loss,
    reverse_kl,
    skew_kl,
    tvd,
)
from still.errors import StillError

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: handing each op to a second OpenMP thread costs more than it
    saves, and on a busy 2-core machine made this file ~3x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


PARAMS = {"jsd": {"beta": 0.3}, "skew_kl": {"alpha": 0.2}}  # off the defaults on purpose


def reference_divergence(
    name, student_logits, teacher_logits, temperature=1.0, beta=0.5, alpha=0.1
):
    """The textbook formulas on explicit probabilities; fine for moderate logits in float64."""
    student = torch.softmax(student_logits / temperature, dim=-1)
    teacher = torch.softmax(teacher_logits / temperature, dim=-1)

    def kl(p, q):
        return (p * (p.log() - q.log())).sum(-1)

    if name == "forward_kl":
        return kl(teacher, student)
    if name == "reverse_kl":
        return kl(student, teacher)
    if name == "jsd":  # TRL GKD: M = (1-β)·p_S + β·p_T
        mixture = (1 - beta) * student + beta * teacher
        return beta * kl(teacher, mixture) + (1 - beta) * kl(student, mixture)
    if name == "skew_kl":  # DistiLLM: KL(p_T ‖ α·p_T + (1-α)·p_S)
        return kl(teacher, alpha * teacher + (1 - alpha) * student)
    return 0.5 * (teacher - student).abs().sum(-1)


def random_logits(*shape, scale=3.0, seed=0, dtype=F64):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=dtype) * scale


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_divergence_matches_reference_values_and_grads(name, temperature):
    student = random_logits(3, 5, 17, seed=1).requires_grad_()
    teacher = random_logits(3, 5, 17, seed=2).requires_grad_()
    ours = DIVERGENCES[name](student, teacher, temperature, **PARAMS.get(name, {}))
    expected = reference_divergence(name, student, teacher, temperature, **PARAMS.get(name, {}))
    assert ours.shape == (3, 5)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    weights = random_logits(3, 5, seed=3)  # a non-uniform upstream gradient
    ours_grads = torch.autograd.grad((ours * weights).sum(), [student, teacher])
    expected_grads = torch.autograd.grad((expected * weights).sum(), [student, teacher])
    for got, want in zip(ours_grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_jsd_beta_ends_are_forward_and_reverse_kl():
    student, teacher = random_logits(4, 11, seed=1), random_logits(4, 11, seed=2)
    at_zero, at_one = jsd(student, teacher, 2.0, beta=0.0), jsd(student, teacher, 2.0, beta=1.0)
    torch.testing.assert_close(at_zero, forward_kl(student, teacher, 2.0))
    torch.testing.assert_close(at_one, reverse_kl(student, teacher, 2.0))


def test_jsd_at_half_is_symmetric():
    student, teacher = random_logits(4, 11, seed=1), random_logits(4, 11, seed=2)
    torch.testing.assert_close(jsd(student, teacher, beta=0.5), jsd(teacher, student, beta=0.5))


def test_skew_kl_at_alpha_zero_is_forward_kl():
    student, teacher = random_logits(4, 11, seed=1), random_logits(4, 11, seed=2)
    at_zero = skew_kl(student, teacher, 1.5, alpha=0.0)
    torch.testing.assert_close(at_zero, forward_kl(student, teacher, 1.5))


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_identical_logits_give_zero(name):
    logits = random_logits(2, 6, 23, seed=4)
    logits[..., :3] = -math.inf  # a masked slice of the vocab must not change the answer
    values = DIVERGENCES[name](logits, logits.clone(), 1.7, **PARAMS.get(name, {}))
    torch.testing.assert_close(values, torch.zeros(2, 6, dtype=F64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_masked_vocab_entries_equal_dropping_them(name):
    """-inf logits (shared by both models) are the same as a smaller vocab, value and grads."""
    student = random_logits(3, 20, seed=5)
    teacher = random_logits(3, 20, seed=6)
    student[:, 15:], teacher[:, 15:] = -math.inf, -math.inf
    student.requires_grad_()
    masked = DIVERGENCES[name](student, teacher, **PARAMS.get(name, {}))
    (grad,) = torch.autograd.grad(masked.sum(), student)
    small = student.detach()[:, :15].clone().requires_grad_()
    dropped = DIVERGENCES[name](small, teacher[:, :15], **PARAMS.get(name, {}))
    (small_grad,) = torch.autograd.grad(dropped.sum(), small)
    torch.testing.assert_close(masked, dropped)
    torch.testing.assert_close(grad[:, :15], small_grad)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_underflowing_probabilities_stay_finite(name, dtype):
    """Huge logits underflow most probabilities to exactly 0 in fp32; nothing may turn NaN."""
    student = (random_logits(4, 64, scale=1e4, seed=7)).to(dtype).requires_grad_()
    teacher = (random_logits(4, 64, scale=1e4, seed=8)).to(dtype)
    teacher[:, :8] = -math.inf
    values = DIVERGENCES[name](student, teacher, **PARAMS.get(name, {}))
    (grad,) = torch.autograd.grad(values.sum(), student)
    assert values.dtype == torch.float32
    assert torch.isfinite(values).all() and torch.isfinite(grad).all()


def test_kd_loss_mean_and_sum_over_masked_tokens():
    student, teacher = random_logits(2, 7, 13, seed=1), random_logits(2, 7, 13, seed=2)
    mask = torch.rand(2, 7, generator=torch.Generator().manual_seed(0)) > 0.4
    per_token = jsd(student, teacher, beta=0.3)
    total = kd_loss(student, teacher, mask, divergence="jsd", beta=0.3, reduction="sum")
    mean = kd_loss(student, teacher, mask, divergence="jsd", beta=0.3)
    torch.testing.assert_close(total, per_token[mask].sum())
    torch.testing.assert_close(mean, per_token[mask].mean())
    changed = student.clone()
    changed[~mask] = 100.0  # logits at masked positions must not matter
    torch.testing.assert_close(kd_loss(changed, teacher, mask, divergence="jsd", beta=0.3), mean)


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_masked_gives_zero_not_nan_and_zero_grads(name, reduction):
    student = random_logits(2, 5, 9, seed=1).requires_grad_()
    teacher = random_logits(2, 5, 9, seed=2)
    loss = kd_loss(
        student, teacher, torch.zeros(2, 5, dtype=torch.bool), divergence=name, reduction=reduction
    )
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(student.grad, torch.zeros_like(student))


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_temperature_scales_both_logits_and_multiplies_by_t_squared(name):
    student, teacher = random_logits(3, 4, 10, seed=1), random_logits(3, 4, 10, seed=2)
    mask = torch.ones(3, 4, dtype=torch.bool)
    at_t = kd_loss(student, teacher, mask, divergence=name, temperature=3.0)
    pre_scaled = kd_loss(student / 3.0, teacher / 3.0, mask, divergence=name, temperature=1.0)
    torch.testing.assert_close(at_t, 9.0 * pre_scaled)


def test_bad_settings_raise_still_error_with_hints():
    logits, mask = random_logits(2, 5), torch.ones(2, dtype=torch.bool)
    with pytest.raises(StillError, match="unknown divergence 'forward_lk'") as raised:
        kd_loss(logits, logits, mask, divergence="forward_lk")
    assert "forward_kl" in raised.value.hint
    with pytest.raises(StillError, match="temperature"):
        kd_loss(logits, logits, mask, temperature=0.0)
    with pytest.raises(StillError, match="beta"):
        jsd(logits, logits, beta=1.5)
    with pytest.raises(StillError, match="alpha"):
        kd_loss(logits, logits, mask, divergence="skew_kl", alpha=-0.1)


# ---- chunked == naive ---------------------------------------------------------------------


def fused_inputs(
    tokens=37,
    student_hidden=12,
    teacher_hidden=9,
    vocab=29,
    dtype=F64,
    seed=0,
    student_vocab=None,
    teacher_vocab=None,
):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)

    labels = torch.randint(0, vocab, (tokens,), generator=generator)
    labels[::4] = IGNORE_INDEX
    labels[-1] = IGNORE_INDEX
    return {
        "student_hidden": randn(tokens, student_hidden).requires_grad_(),
        "student_head_weight": randn(student_vocab or vocab, student_hidden).requires_grad_(),
        "student_head_bias": randn(student_vocab or vocab).requires_grad_(),
        "teacher_hidden": randn(tokens, teacher_hidden),
        "teacher_head_weight": randn(teacher_vocab or vocab, teacher_hidden),
        "labels": labels,
    }


def naive_loss(inputs, vocab_size=None, **options):
    """Full logits → kd_loss + cross entropy, the way it reads on paper."""
    vocab = vocab_size or inputs["student_head_weight"].shape[0]
    student_logits = F.linear(
        inputs["student_hidden"],
        inputs["student_head_weight"][:vocab],
        inputs["student_head_bias"][:vocab],
    )
    teacher_logits = inputs["teacher_hidden"] @ inputs["teacher_head_weight"][:vocab].T
    mask = inputs["labels"] != IGNORE_INDEX
    kd_options = {k: v for k, v in options.items() if k not in ("ce_weight", "kd_weight")}
    kd_sum = kd_loss(student_logits, teacher_logits, mask, reduction="sum", **kd_options)
    ce_sum = F.cross_entropy(student_logits.to(kd_sum.dtype), inputs["labels"], reduction="sum")
    return options["kd_weight"] * kd_sum + options["ce_weight"] * ce_sum, kd_sum, ce_sum


def student_grads(loss, inputs):
    params = [inputs[k] for k in ("student_hidden", "student_head_weight", "student_head_bias")]
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 1024])
@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_fused_equals_naive_in_float64(name, chunk_size):
    inputs = fused_inputs(seed=chunk_size)
    options = dict(
        divergence=name, temperature=1.5, ce_weight=0.4, kd_weight=0.6, **PARAMS.get(name, {})
    )
    fused = fused_kd_loss(**inputs, chunk_size=chunk_size, **options)
    loss, kd_sum, ce_sum = naive_loss(inputs, **options)
    torch.testing.assert_close(fused.loss, loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused.kd_sum, kd_sum, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused.ce_sum, ce_sum, atol=1e-5, rtol=1e-5)
    assert fused.n_tokens.item() == (inputs["labels"] != IGNORE_INDEX).sum().item()
    # An upstream factor other than 1, as a caller normalising by a global token count has.
    fused_grads = student_grads(fused.loss / 7.0, inputs)
    for got, want in zip(fused_grads, student_grads(loss / 7.0, inputs)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["forward_kl", "jsd"])
def test_fused_equals_naive_in_float32(name):
    inputs = fused_inputs(tokens=50, dtype=torch.float32, seed=3)
    options = dict(divergence=name, temperature=2.0, ce_weight=0.5, kd_weight=0.5)
    fused = fused_kd_loss(**inputs, chunk_size=7, **options)
    loss, _, _ = naive_loss(inputs, **options)
    torch.testing.assert_close(fused.loss, loss, atol=1e-6, rtol=1e-5)
    for got, want in zip(student_grads(fused.loss, inputs), student_grads(loss, inputs)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_fused_vocab_size_drops_padded_rows():
    inputs = fused_inputs(vocab=29, student_vocab=32, teacher_vocab=40)
    options = dict(divergence="forward_kl", ce_weight=1.0, kd_weight=1.0)
    fused = fused_kd_loss(**inputs, vocab_size=29, chunk_size=8, **options)
    loss, _, _ = naive_loss(inputs, vocab_size=29, **options)
    torch.testing.assert_close(fused.loss, loss)
    grads = student_grads(fused.loss, inputs)
    for got, want in zip(grads, student_grads(loss, inputs)):
        torch.testing.assert_close(got, want)
    assert grads[1].shape == (32, 12) and not grads[1][29:].any()  # padded rows: no gradient
    with pytest.raises(StillError, match="vocab rows"):
        fused_kd_loss(**inputs, **options)
    with pytest.raises(StillError, match="vocab_size=33"):
        fused_kd_loss(**inputs, vocab_size=33, **options)


def test_fused_all_ignored_gives_zero_and_zero_grads():
    inputs = fused_inputs()
    inputs["labels"][:] = IGNORE_INDEX
    fused = fused_kd_loss(**inputs, ce_weight=1.0, kd_weight=1.0)
    fused.loss.backward()
    assert fused.loss.item() == 0.0 and fused.n_tokens.item() == 0
    assert not inputs["student_hidden"].grad.any() and not inputs["student_head_weight"].grad.any()


def test_fused_treats_teacher_as_constant_and_accepts_batch_dims():
    inputs = fused_inputs(tokens=24)
    inputs["teacher_hidden"].requires_grad_()
    batched = {
        k: v.reshape(4, 6, *v.shape[1:])
        if k in ("student_hidden", "teacher_hidden", "labels")
        else v
        for k, v in inputs.items()
    }
    fused = fused_kd_loss(**batched, divergence="reverse_kl", ce_weight=0.0, kd_weight=1.0)
    flat = fused_kd_loss(**inputs, divergence="reverse_kl", ce_weight=0.0, kd_weight=1.0)
    fused.loss.backward()
    torch.testing.assert_close(fused.loss, flat.loss)
    assert inputs["teacher_hidden"].grad is None
    assert inputs["student_hidden"].grad.shape == (24, 12)


def test_fused_frozen_head_gets_no_gradient_and_hidden_still_matches():
    """A LoRA student's head is frozen: only its hidden states need (and get) a gradient."""
    inputs = fused_inputs(seed=9)
    inputs["student_head_weight"].requires_grad_(False)
    inputs["student_head_bias"].requires_grad_(False)
    options = dict(divergence="skew_kl", ce_weight=0.2, kd_weight=1.0, alpha=0.3)
    fused = fused_kd_loss(**inputs, chunk_size=10, **options)
    loss, _, _ = naive_loss(inputs, **options)
    (got,) = torch.autograd.grad(fused.loss, inputs["student_hidden"])
    (want,) = torch.autograd.grad(loss, inputs["student_hidden"])
    torch.testing.assert_close(got, want)


def test_fused_bfloat16_is_close_to_float32():
    inputs32 = fused_inputs(tokens=40, dtype=torch.float32, seed=5)
    inputs16 = {
        k: v.detach().to(torch.bfloat16).requires_grad_(v.requires_grad)
        if v.is_floating_point()
        else v
        for k, v in inputs32.items()
    }
    options = dict(divergence="jsd", temperature=2.0, ce_weight=0.5, kd_weight=0.5, chunk_size=16)
    fused32, fused16 = fused_kd_loss(**inputs32, **options), fused_kd_loss(**inputs16, **options)
    assert fused16.loss.dtype == torch.float32  # accumulated in fp32 from bf16 matmuls
    torch.testing.assert_close(fused16.loss, fused32.loss, rtol=2e-2, atol=0)
    grads16 = student_grads(fused16.loss, inputs16)
    assert [g.dtype for g in grads16] == [torch.bfloat16] * 3
    for got, want in zip(grads16, student_grads(fused32.loss, inputs32)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.float(), want, rtol=0, atol=5e-2 * want.abs().max().item())


# ---- properties --------------------------------------------------------------------------

vocab_logits = st.integers(min_value=2, max_value=12).flatmap(
    lambda vocab: st.tuples(*[st.lists(st.floats(-30, 30), min_size=vocab, max_size=vocab)] * 2)
)


@settings(max_examples=150, deadline=None)
@given(
    pair=vocab_logits,
    temperature=st.floats(0.25, 4.0),
    beta=st.floats(0.0, 1.0),
    alpha=st.floats(0.0, 1.0),
)
def test_divergences_are_non_negative_and_tvd_at_most_one(pair, temperature, beta, alpha):
    student, teacher = (torch.tensor(values, dtype=F64) for values in pair)
    values = {
        "forward_kl": forward_kl(student, teacher, temperature),
        "reverse_kl": reverse_kl(student, teacher, temperature),
        "jsd": jsd(student, teacher, temperature, beta=beta),
        "skew_kl": skew_kl(student, teacher, temperature, alpha=alpha),
        "tvd": tvd(student, teacher, temperature),
    }
    for name, value in values.items():
        assert math.isfinite(value.item()), name
        assert value.item() >= -1e-12, (name, value.item())
    assert values["tvd"].item() <= 1.0 + 1e-12
