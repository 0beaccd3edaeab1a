"""Distillation losses: divergences between teacher and student next-token distributions.

Pure functions on tensors. With p_T the teacher's and p_S the student's distribution over the
vocabulary (the last dim), each divergence returns one value per token:

    forward_kl      KL(p_T ‖ p_S)                                covers every teacher mode
    reverse_kl      KL(p_S ‖ p_T)                                seeks the teacher's main mode
    jsd(beta)       β·KL(p_T ‖ M) + (1-β)·KL(p_S ‖ M), M = (1-β)·p_S + β·p_T  (TRL's GKD)
    skew_kl(alpha)  KL(p_T ‖ α·p_T + (1-α)·p_S)                  DistiLLM's skew forward KL
    tvd             ½·Σ|p_T − p_S|                               bounded in [0, 1]

Temperature: both logits are divided by T before the softmax, so the two models are compared
at the same softness; the divergence functions return the divergence of those softened
distributions. The losses (`kd_loss`, `fused_kd_loss`) multiply it by T², as Hinton et al.
(2015) do: the gradient with respect to the logits shrinks like 1/T² as T grows, so without the
factor a change of T would silently rescale the KD term against the hard-label cross entropy
and the learning rate. With it, changing T changes only how soft the target is.

Numerics: log-probabilities come from log_softmax in at least fp32 (bf16/fp16 are upcast, fp64
is kept). -inf logits (masked vocab entries) are raised to the smallest finite float first, and
a mixture probability that underflows to 0 to the smallest normal one, so an entry with
probability 0 adds an exact 0 to every sum instead of 0·(-inf) = NaN, in value and gradient.
Sums over the vocabulary are batched dot products (einsum), so no elementwise product is stored.

The chunked form (`fused_kd_loss`) starts from hidden states and the two output heads and never
holds the full [tokens × vocab] logits. It walks the tokens in chunks; for each it builds the
logits, the loss and the loss's gradient with respect to those logits, folds that gradient
into the gradients of the student's hidden states and head at once (as Liger's fused linear
cross-entropy does) and drops the chunk. Backward only scales the stored gradients, so the peak
is one chunk's logits and their autograd intermediates.
"""

import difflib
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from still.errors import StillError
from still.losses import IGNORE_INDEX, chunked_head_loss

DivergenceName = Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd"]
Reduction = Literal["mean", "sum"]
# A mass outside a cached top k below this counts as this much: its log must stay finite.
MIN_REST_MASS = 1e-12


def _log_probs(logits: Tensor, temperature: float) -> Tensor:
    """log_softmax(logits / T) in at least fp32, finite even where a logit is -inf."""
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    scaled = logits.to(compute_dtype) / temperature  # a fresh copy: safe to change in place
    # The floor only moves -inf entries, whose probability is 0 either way, so it is done
    # outside autograd, which would otherwise keep a [tokens × vocab] copy for backward.
    with torch.no_grad():
        scaled.clamp_(min=torch.finfo(compute_dtype).min)
    return torch.log_softmax(scaled, dim=-1)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Σ a·b over the last dim as a batched matmul: the [tokens × vocab] product never exists."""
    return torch.einsum("...v,...v->...", a, b)


def _kl(p_log_probs: Tensor, q_log_probs: Tensor) -> Tensor:
    """KL(p ‖ q) = Σ p·(log p − log q) over the last dim."""
    return _dot(p_log_probs.exp(), p_log_probs - q_log_probs)


def _mixture_log_probs(a_probs: Tensor, b_probs: Tensor, weight_b: float) -> Tensor:
    """log((1 − w)·a + w·b), mixed in probability space from probabilities the KL terms need
    anyway: fewer [tokens × vocab] tensors than logaddexp, and as exact for p ≥ 1e-38."""
    mixture = torch.lerp(a_probs, b_probs, weight_b)
    # Where both probabilities underflow, log 0 would give 0·inf = NaN; the floor moves only
    # entries whose weight in every sum is 0, and lerp keeps nothing for backward to corrupt.
    with torch.no_grad():
        mixture.clamp_(min=torch.finfo(mixture.dtype).tiny)
    return mixture.log()


# The divergences on log-probs. The chunked loss calls these on log-probs it builds inline, so
# full-size logits are dropped before a divergence's own intermediates exist.
def _jsd(student: Tensor, teacher: Tensor, beta: float) -> Tensor:
    if beta == 0:
        return _kl(teacher, student)
    if beta == 1:
        return _kl(student, teacher)
    student_probs, teacher_probs = student.exp(), teacher.exp()
    mixture = _mixture_log_probs(student_probs, teacher_probs, weight_b=beta)
    to_teacher = _dot(teacher_probs, teacher - mixture)
    return beta * to_teacher + (1 - beta) * _dot(student_probs, student - mixture)


def _skew_kl(student: Tensor, teacher: Tensor, alpha: float) -> Tensor:
    if alpha == 0:
        return _kl(teacher, student)
    teacher_probs = teacher.exp()
    mixture = _mixture_log_probs(student.exp(), teacher_probs, weight_b=alpha)
    return _dot(teacher_probs, teacher - mixture)


def _tvd(student: Tensor, teacher: Tensor) -> Tensor:
    return 0.5 * (teacher.exp() - student.exp()).abs().sum(-1)


_ON_LOG_PROBS = {
    "forward_kl": lambda student, teacher: _kl(teacher, student),
    "reverse_kl": lambda student, teacher: _kl(student, teacher),
    "jsd": _jsd,
    "skew_kl": _skew_kl,
    "tvd": _tvd,
}


def forward_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(p_T ‖ p_S) per token."""
    return _kl(_log_probs(teacher_logits, temperature), _log_probs(student_logits, temperature))


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(p_S ‖ p_T) per token."""
    return _kl(_log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature))


def jsd(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, beta: float = 0.5
) -> Tensor:
    """Generalized Jensen-Shannon divergence per token, exactly as TRL's GKD trainer defines it.

    M = (1-β)·p_S + β·p_T and the value is β·KL(p_T ‖ M) + (1-β)·KL(p_S ‖ M). That formula
    tends to 0 at both ends; like TRL, β=0 is *defined* as forward KL and β=1 as reverse KL.
    """
    _check_unit_interval("beta", beta)
    student = _log_probs(student_logits, temperature)
    return _jsd(student, _log_probs(teacher_logits, temperature), beta)


def skew_kl(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, alpha: float = 0.1
) -> Tensor:
    """DistiLLM's skew forward KL per token: KL(p_T ‖ α·p_T + (1-α)·p_S); α=0 is forward KL.

    Mixing some teacher into the student keeps the divergence bounded where the student puts
    almost no mass, which steadies early training.
    """
    _check_unit_interval("alpha", alpha)
    student = _log_probs(student_logits, temperature)
    return _skew_kl(student, _log_probs(teacher_logits, temperature), alpha)


def tvd(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Total variation distance per token: ½·Σ|p_T − p_S|, in [0, 1]."""
    student = _log_probs(student_logits, temperature)
    return _tvd(student, _log_probs(teacher_logits, temperature))


DIVERGENCES = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "skew_kl": skew_kl,
    "tvd": tvd,
}


def _check_unit_interval(name: str, value: float) -> None:
    if not 0 <= value <= 1:
        raise StillError(f"{name}={value} is outside [0, 1]", hint=f"{name} is a mixing weight")


def _divergence_params(divergence: str, temperature: float, beta: float, alpha: float) -> dict:
    """Validate a divergence and its settings; return the keyword params that divergence takes."""
    if divergence not in DIVERGENCES:
        close = difflib.get_close_matches(divergence, DIVERGENCES, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"choose from {sorted(DIVERGENCES)}"
        raise StillError(f"unknown divergence '{divergence}'", hint=hint)
    if not temperature > 0:
        raise StillError(f"temperature={temperature} must be > 0", hint="1.0 leaves logits as is")
    _check_unit_interval("beta", beta)
    _check_unit_interval("alpha", alpha)
    return {"jsd": {"beta": beta}, "skew_kl": {"alpha": alpha}}.get(divergence, {})


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    divergence: DivergenceName = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    reduction: Reduction = "mean",
) -> Tensor:
    """T² · divergence, summed or averaged over the tokens where `mask` is True.

    `mask` has the logits' shape without the vocab dim. An all-False mask gives exactly 0 with
    zero gradients (the mean divides by max(count, 1)). Masked-out positions must still hold
    finite logits; their values are dropped with `where`, never multiplied by 0.
    """
    params = _divergence_params(divergence, temperature, beta, alpha)
    if reduction not in ("mean", "sum"):
        raise StillError(f"unknown reduction '{reduction}'", hint="use 'mean' or 'sum'")
    if mask.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} is not the logits' shape without "
            f"the vocab dim, {tuple(student_logits.shape[:-1])}"
        )
    per_token = DIVERGENCES[divergence](student_logits, teacher_logits, temperature, **params)
    mask = mask.to(torch.bool)
    total = torch.where(mask, per_token, 0.0).sum() * temperature**2
    return total if reduction == "sum" else total / mask.sum().clamp(min=1)


class FusedKDLoss(NamedTuple):
    """Sums over loss-carrying tokens, so callers can normalise by a global token count."""

    loss: Tensor  # kd_weight·kd_sum + ce_weight·ce_sum; differentiable w.r.t. the student only
    kd_sum: Tensor  # Σ T²·divergence, detached
    ce_sum: Tensor  # Σ cross entropy of the student against labels at T=1, detached
    n_tokens: Tensor  # how many labels were not IGNORE_INDEX


class _ChunkSettings(NamedTuple):
    divergence: str
    params: dict
    temperature: float
    kd_weight: float
    ce_weight: float
    chunk_size: int


class _TeacherHead(NamedTuple):
    """The teacher as hidden states + output head: its logits are built chunk by chunk."""

    rows: Tensor  # [N, H]
    weight: Tensor
    bias: Tensor | None


class _TeacherTopK(NamedTuple):
    """The teacher as cached top-k log-probs (at the temperature) plus the rest mass."""

    log_probs: Tensor  # [N, k]
    ids: Tensor  # [N, k]
    rest_log: Tensor  # [N]


def _rest_bucket(log_probs_topk: Tensor, rest_log: Tensor) -> Tensor:
    """[N, k] + [N] → [N, k + 1]: the top k and one bucket for all other tokens."""
    return torch.cat([log_probs_topk, rest_log.unsqueeze(-1)], dim=-1)


def _student_rest_log(picked: Tensor) -> Tensor:
    """log(1 − Σ p) of the student's mass outside the teacher's top k, floored like the cache's."""
    covered = torch.logsumexp(picked, dim=-1).exp()
    return torch.log((1.0 - covered).clamp(min=MIN_REST_MASS))


def _chunk_divergence(student_logits: Tensor, teacher, rows: slice, settings) -> Tensor:
    """Per token divergence of one chunk, against teacher logits or cached top-k + rest."""
    student_log_probs = _log_probs(student_logits, settings.temperature)
    divergence = _ON_LOG_PROBS[settings.divergence]
    if isinstance(teacher, _TeacherHead):
        return divergence(
            student_log_probs,
            _log_probs(
                F.linear(teacher.rows[rows].to(teacher.weight.dtype), teacher.weight, teacher.bias),
                settings.temperature,
            ),
            **settings.params,
        )
    ids = teacher.ids[rows]
    picked = student_log_probs.gather(-1, ids)
    return divergence(
        _rest_bucket(picked, _student_rest_log(picked)),
        _rest_bucket(teacher.log_probs[rows], teacher.rest_log[rows]),
        **settings.params,
    )


def _kd_chunk(teacher, labels: Tensor, settings: _ChunkSettings):
    """`chunked_head_loss`'s per-chunk loss: the weighted KD + CE sum, the KD and the CE sums,
    and the gradient of the weighted sum w.r.t. the student's logits."""

    def chunk_loss(student_logits: Tensor, rows: slice):
        student_logits.requires_grad_()
        with torch.enable_grad():
            # Cross entropy as logsumexp − label logit keeps nothing [chunk × vocab] for backward
            # but the logits themselves. It comes first so that backward, which runs in reverse,
            # frees the divergence's saved tensors before it builds the CE gradient.
            label_logits = student_logits.gather(-1, labels[rows].unsqueeze(-1)).squeeze(-1)
            ce_sum = (torch.logsumexp(student_logits, dim=-1) - label_logits).sum()
            per_token = _chunk_divergence(student_logits, teacher, rows, settings)
            kd_sum = per_token.sum() * settings.temperature**2
            weighted = settings.kd_weight * kd_sum + settings.ce_weight * ce_sum
            (grad_logits,) = torch.autograd.grad(weighted, student_logits)
        return (weighted.detach(), kd_sum.detach(), ce_sum.detach()), grad_logits

    return chunk_loss


def _fused(student_rows, student_weight, student_bias, teacher, labels, settings: _ChunkSettings):
    """(weighted loss, KD sum, CE sum) from the student's hidden rows, one chunk of logits at a
    time."""
    return chunked_head_loss(
        student_rows,
        student_weight,
        student_bias,
        _kd_chunk(teacher, labels, settings),
        n_sums=3,
        chunk_size=settings.chunk_size,
    )


def _shared_vocab(student_rows: int, teacher_rows: int, vocab_size: int | None) -> int:
    """How many head rows both models score: all of them, or the first `vocab_size`, which
    drops rows a checkpoint pads its vocab with (they never see a softmax)."""
    if vocab_size is None and student_rows != teacher_rows:
        raise StillError(
            f"student head has {student_rows} vocab rows, teacher head {teacher_rows}",
            hint="pass vocab_size= the shared tokenizer's size to drop padded rows",
        )
    if vocab_size is not None and not 0 < vocab_size <= min(student_rows, teacher_rows):
        raise StillError(
            f"vocab_size={vocab_size} does not fit heads of {student_rows} (student) "
            f"and {teacher_rows} (teacher) rows",
            hint="use at most the smaller",
        )
    return student_rows if vocab_size is None else vocab_size


def fused_kd_loss(
    student_hidden: Tensor,
    student_head_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_head_weight: Tensor,
    labels: Tensor,
    *,
    divergence: DivergenceName = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    ce_weight: float,
    kd_weight: float,
    vocab_size: int | None = None,
    chunk_size: int = 1024,
    student_head_bias: Tensor | None = None,
    teacher_head_bias: Tensor | None = None,
) -> FusedKDLoss:
    """KD + hard-label CE from hidden states, never materialising the full logits.

    Hidden states are [N, H] (or [..., H], flattened); logits at position i must already be
    aligned to predict labels[i]. Tokens labelled IGNORE_INDEX (-100) carry no loss of either
    kind and are dropped before any matmul. Gradients reach the student's hidden states, head
    weight and bias; the teacher's inputs are constants. Values and gradients equal full logits
    through `kd_loss(..., reduction="sum")` plus summed cross entropy, weighted.
    """
    params = _divergence_params(divergence, temperature, beta, alpha)
    if chunk_size < 1:
        raise StillError(f"chunk_size={chunk_size} must be >= 1", hint="1024 is a good default")
    vocab = _shared_vocab(student_head_weight.shape[0], teacher_head_weight.shape[0], vocab_size)
    labels = labels.reshape(-1)
    keep = labels != IGNORE_INDEX
    student_rows = student_hidden.reshape(-1, student_hidden.shape[-1])[keep]
    teacher_rows = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])[keep].detach()
    teacher_bias = None if teacher_head_bias is None else teacher_head_bias[:vocab].detach()
    student_bias = None if student_head_bias is None else student_head_bias[:vocab]
    settings = _ChunkSettings(divergence, params, temperature, kd_weight, ce_weight, chunk_size)
    teacher = _TeacherHead(teacher_rows, teacher_head_weight[:vocab].detach(), teacher_bias)
    loss, kd_sum, ce_sum = _fused(
        student_rows, student_head_weight[:vocab], student_bias, teacher, labels[keep], settings
    )
    return FusedKDLoss(loss=loss, kd_sum=kd_sum, ce_sum=ce_sum, n_tokens=keep.sum())


def cached_kd_loss(
    student_hidden: Tensor,
    student_head_weight: Tensor,
    teacher_log_probs: Tensor,
    teacher_ids: Tensor,
    teacher_rest_log: Tensor,
    labels: Tensor,
    *,
    divergence: DivergenceName = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    ce_weight: float,
    kd_weight: float,
    vocab_size: int,
    chunk_size: int = 1024,
    student_head_bias: Tensor | None = None,
) -> FusedKDLoss:
    """`fused_kd_loss` against a teacher cache: the teacher's top-k log-probs (at `temperature`),
    their ids and the log of the rest mass, one row per loss-carrying label in order.

    Both distributions are compared on k + 1 buckets: the teacher's top k tokens, and one
    bucket for everything else (teacher: the stored rest mass; student: 1 − its mass on those
    k tokens). With k = vocab this is the full divergence; for smaller k the student is not
    told how the teacher spreads its rest mass, only how much there is.
    """
    params = _divergence_params(divergence, temperature, beta, alpha)
    if chunk_size < 1:
        raise StillError(f"chunk_size={chunk_size} must be >= 1", hint="1024 is a good default")
    labels = labels.reshape(-1)
    keep = labels != IGNORE_INDEX
    if int(keep.sum()) != teacher_log_probs.shape[0]:
        raise StillError(
            f"the teacher cache holds {teacher_log_probs.shape[0]} tokens for this batch "
            f"but it has {int(keep.sum())} loss tokens",
            hint="rebuild it with `still cache`",
        )
    student_rows = student_hidden.reshape(-1, student_hidden.shape[-1])[keep]
    student_bias = None if student_head_bias is None else student_head_bias[:vocab_size]
    device = student_rows.device
    teacher = _TeacherTopK(
        teacher_log_probs.to(device), teacher_ids.to(device), teacher_rest_log.to(device)
    )
    settings = _ChunkSettings(divergence, params, temperature, kd_weight, ce_weight, chunk_size)
    loss, kd_sum, ce_sum = _fused(
        student_rows,
        student_head_weight[:vocab_size],
        student_bias,
        teacher,
        labels[keep],
        settings,
    )
    return FusedKDLoss(loss=loss, kd_sum=kd_sum, ce_sum=ce_sum, n_tokens=keep.sum())
