"""Cross-tokenizer KD losses: a teacher and a student whose vocabularies differ.

Pure functions on tensors, like distill/losses.py (whose divergences they reuse). Positions are
already paired (distill/align.py): row i of the teacher's rows teaches row i of the student's,
where `aligned[i]`; unaligned rows carry only the hard-label cross entropy.

    uld     Universal Logit Distance (Boizard et al., 2024): sort each model's next-token
            probabilities in descending order, pad the shorter vocabulary with zeros, and take
            the L1 distance, Σ_k |sort(p_S)_k − sort(p_T)_k|, in [0, 2]. It needs no token
            correspondence at all, and is 0 only for distributions equal up to a permutation.
    gold    The hybrid (the GOLD idea): on the vocabulary entries that map one-to-one between
            the two vocabularies (VocabMap), the recipe's divergence between both models'
            distributions renormalised over those entries, weighted by the teacher's mass on
            them, m_T; plus ULD between the raw probabilities of the remaining (unmatched)
            entries of each vocabulary, whose L1 is itself at most the two remainders' mass:

                m_T · D(p_T|M ‖ p_S|M) + Σ_k |sort(p_S|U)_k − sort(p_T|U)_k|

            With one vocabulary (every entry matched) this is exactly D(p_T ‖ p_S).

Both are computed at the recipe's temperature and multiplied by T², like same-vocabulary KD.
The chunked form (`xtok_kd_loss`) builds one chunk of both models' logits at a time through
`chunked_head_loss`, so no [tokens × vocab] tensor of either model, and never a [teacher vocab
× student vocab] matrix, exists.

From a teacher cache (`xtok_cached_kd_loss`) the teacher is known only by its top k entries in
its own vocabulary, plus two buckets: the mass of the rest on matched and on unmatched entries
(distill/xtok_cache.py stores them). The divergence then compares the top-k matched entries and
one bucket for the other matched ones (the student's side: its matched mass outside those), and
ULD compares the sorted top-k unmatched entries and one bucket for the rest. With k = the
teacher's vocabulary both buckets are empty and the loss is the online one.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.align import VocabMap
from distill.losses import (
    _ON_LOG_PROBS,
    MIN_REST_MASS,
    FusedKDLoss,
    _divergence_params,
    _log_probs,
)
from still.errors import StillError
from still.losses import IGNORE_INDEX, chunked_head_loss

MODES = ("uld", "gold")
# Teacher rows sorted at once: sort keeps int64 indices, [rows × teacher vocab] of them.
TEACHER_SORT_ROWS = 64


def _sorted_teacher(teacher_probs: Tensor, keep: int) -> tuple[Tensor, Tensor]:
    """(the `keep` largest probabilities in descending order, the sum of the others), sorting
    a few rows at a time: the teacher is a constant, so nothing is kept for backward."""
    with torch.no_grad():
        heads, tails = [], []
        for start in range(0, teacher_probs.shape[0], TEACHER_SORT_ROWS):
            rows = teacher_probs[start : start + TEACHER_SORT_ROWS]
            values = rows.sort(dim=-1, descending=True).values
            heads.append(values[:, :keep])
            tails.append(values[:, keep:].sum(-1))
        if not heads:
            empty = teacher_probs.new_zeros((0, min(keep, teacher_probs.shape[-1])))
            return empty, teacher_probs.new_zeros((0,))
        return torch.cat(heads), torch.cat(tails)


def uld_distance(student_probs: Tensor, teacher_probs: Tensor) -> Tensor:
    """Σ_k |sort(p_S)_k − sort(p_T)_k| per row, the shorter vocabulary padded with zeros.

    [N, V_S] and [N, V_T] (the two may differ; either may be empty) → [N]. Gradients reach the
    student only. Inputs need not sum to 1 (the hybrid passes unmatched remainders).
    """
    student_sorted = student_probs.sort(dim=-1, descending=True).values
    shared = min(student_probs.shape[-1], teacher_probs.shape[-1])
    teacher_head, teacher_tail = _sorted_teacher(teacher_probs.detach(), shared)
    distance = (student_sorted[:, :shared] - teacher_head).abs().sum(-1)
    return distance + student_sorted[:, shared:].sum(-1) + teacher_tail


def _complement(ids: Tensor, size: int) -> Tensor:
    keep = torch.ones(size, dtype=torch.bool, device=ids.device)
    keep[ids] = False
    return keep.nonzero().flatten()


class VocabSplit:
    """A VocabMap's matched ids and the unmatched rest of each vocabulary, on one device."""

    def __init__(self, mapping: VocabMap, device):
        self.student_ids = mapping.student_ids.to(device)
        self.teacher_ids = mapping.teacher_ids.to(device)
        self.student_rest = _complement(self.student_ids, mapping.student_vocab)
        self.teacher_rest = _complement(self.teacher_ids, mapping.teacher_vocab)
        self.teacher_to_student = torch.full(
            (mapping.teacher_vocab,), -1, dtype=torch.long, device=device
        )
        self.teacher_to_student[self.teacher_ids] = self.student_ids


def xtok_divergence(
    student_log_probs: Tensor,
    teacher_log_probs: Tensor,
    *,
    mode: str,
    split: VocabSplit | None = None,
    divergence: str = "forward_kl",
    params: dict | None = None,
) -> Tensor:
    """Per row divergence between a student and a teacher distribution over different
    vocabularies (log-probabilities at the temperature, [N, V_S] and [N, V_T]) → [N]."""
    if mode == "uld":
        return uld_distance(student_log_probs.exp(), teacher_log_probs.exp())
    if mode != "gold":
        raise StillError(f"unknown cross-tokenizer loss '{mode}'", hint=f"use one of {MODES}")
    matched_student = student_log_probs.index_select(-1, split.student_ids)
    matched_teacher = teacher_log_probs.index_select(-1, split.teacher_ids)
    teacher_mass = torch.logsumexp(matched_teacher, dim=-1)
    renormalised_student = matched_student - torch.logsumexp(matched_student, dim=-1, keepdim=True)
    exact = _ON_LOG_PROBS[divergence](
        renormalised_student, matched_teacher - teacher_mass.unsqueeze(-1), **(params or {})
    )
    rest = uld_distance(
        student_log_probs.index_select(-1, split.student_rest).exp(),
        teacher_log_probs.index_select(-1, split.teacher_rest).exp(),
    )
    return teacher_mass.exp() * exact + rest


class _Settings:
    def __init__(self, mode, split, divergence, params, temperature, kd_weight, ce_weight):
        self.mode, self.split, self.divergence, self.params = mode, split, divergence, params
        self.temperature, self.kd_weight, self.ce_weight = temperature, kd_weight, ce_weight


def _xtok_chunk(divergence_of_rows, aligned, labels, settings):
    """chunked_head_loss's per-chunk loss: (weighted, KD, CE) sums and d weighted / d logits.
    `divergence_of_rows(student log-probs, rows)` is the per-row divergence to the teacher."""

    def chunk_loss(student_logits: Tensor, rows: slice):
        student_logits.requires_grad_()
        with torch.enable_grad():
            label_logits = student_logits.gather(-1, labels[rows].unsqueeze(-1)).squeeze(-1)
            ce_sum = (torch.logsumexp(student_logits, dim=-1) - label_logits).sum()
            per_row = divergence_of_rows(_log_probs(student_logits, settings.temperature), rows)
            kd_sum = torch.where(aligned[rows], per_row, 0.0).sum() * settings.temperature**2
            weighted = settings.kd_weight * kd_sum + settings.ce_weight * ce_sum
            (grad_logits,) = torch.autograd.grad(weighted, student_logits)
        return (weighted.detach(), kd_sum.detach(), ce_sum.detach()), grad_logits

    return chunk_loss


def _online_divergence(teacher_rows, teacher_weight, teacher_bias, settings):
    """Per-row divergence to the teacher's logits, one chunk of its rows at a time."""

    def divergence_of_rows(student_log_probs: Tensor, rows: slice) -> Tensor:
        with torch.no_grad():
            teacher_logits = F.linear(
                teacher_rows[rows].to(teacher_weight.dtype), teacher_weight, teacher_bias
            )
            teacher_log_probs = _log_probs(teacher_logits, settings.temperature)
            del teacher_logits
        return xtok_divergence(
            student_log_probs,
            teacher_log_probs,
            mode=settings.mode,
            split=settings.split,
            divergence=settings.divergence,
            params=settings.params,
        )

    return divergence_of_rows


def _kept_rows(student_hidden, teacher_hidden, teacher_index, labels):
    """The loss-carrying student rows, the teacher row paired with each, and which are paired."""
    labels = labels.reshape(-1)
    keep = labels != IGNORE_INDEX
    index = teacher_index.reshape(-1)[keep]
    aligned = index >= 0
    student_rows = student_hidden.reshape(-1, student_hidden.shape[-1])[keep]
    teacher_rows = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])[index.clamp(min=0)]
    return student_rows, teacher_rows.detach(), aligned, labels[keep], keep


def xtok_kd_loss(
    student_hidden: Tensor,
    student_head_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_head_weight: Tensor,
    labels: Tensor,
    teacher_index: Tensor,
    *,
    mode: str,
    mapping: VocabMap | None,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    ce_weight: float,
    kd_weight: float,
    chunk_size: int = 1024,
    student_head_bias: Tensor | None = None,
    teacher_head_bias: Tensor | None = None,
) -> FusedKDLoss:
    """Cross-tokenizer KD + hard-label CE from hidden states, one chunk of logits at a time.

    student_hidden [N, H_S] with labels [N] (position i predicts labels[i]); teacher_index [N]
    is the row of teacher_hidden [M, H_T] paired with each student row, or -1 (no KD there).
    The heads' first `mapping.student_vocab` / `mapping.teacher_vocab` rows are the real
    tokens (uld without a mapping: every row). Sums, like `fused_kd_loss`.
    """
    params = _divergence_params(divergence, temperature, beta, alpha)
    if chunk_size < 1:
        raise StillError(f"chunk_size={chunk_size} must be >= 1", hint="1024 is a good default")
    if mode == "gold" and mapping is None:
        raise ValueError("the gold loss needs a VocabMap")
    student_vocab = student_head_weight.shape[0] if mapping is None else mapping.student_vocab
    teacher_vocab = teacher_head_weight.shape[0] if mapping is None else mapping.teacher_vocab
    student_rows, teacher_rows, aligned, kept_labels, keep = _kept_rows(
        student_hidden, teacher_hidden, teacher_index, labels
    )
    split = None if mode == "uld" else VocabSplit(mapping, student_rows.device)
    settings = _Settings(mode, split, divergence, params, temperature, kd_weight, ce_weight)
    teacher_bias = None if teacher_head_bias is None else teacher_head_bias[:teacher_vocab]
    student_bias = None if student_head_bias is None else student_head_bias[:student_vocab]
    teacher = _online_divergence(
        teacher_rows,
        teacher_head_weight[:teacher_vocab].detach(),
        None if teacher_bias is None else teacher_bias.detach(),
        settings,
    )
    head = (student_head_weight[:student_vocab], student_bias)
    chunk = _xtok_chunk(teacher, aligned, kept_labels, settings)
    return _chunked_sums(student_rows, head, chunk, chunk_size, keep.sum())


def _chunked_sums(student_rows, head, chunk, chunk_size: int, n_tokens) -> FusedKDLoss:
    """The (weighted, KD, CE) sums of `chunk` over the student's rows through its head."""
    loss, kd_sum, ce_sum = chunked_head_loss(
        student_rows, head[0], head[1], chunk, n_sums=3, chunk_size=chunk_size
    )
    return FusedKDLoss(loss=loss, kd_sum=kd_sum, ce_sum=ce_sum, n_tokens=n_tokens)


def xtok_kd_loss_from_logits(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    aligned: Tensor,
    *,
    mode: str,
    mapping: VocabMap | None,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    ce_weight: float,
    kd_weight: float,
) -> FusedKDLoss:
    """The same sums from full logits, teacher rows already paired with student rows ([N, V_S],
    [N, V_T]). Costs [tokens × vocab] memory: the reference for tests, and the path under
    ZeRO-3, where only a call of the head module gathers it."""
    params = _divergence_params(divergence, temperature, beta, alpha)
    labels = labels.reshape(-1)
    keep = labels != IGNORE_INDEX
    split = None if mode == "uld" else VocabSplit(mapping, student_logits.device)
    per_row = xtok_divergence(
        _log_probs(student_logits[keep], temperature),
        _log_probs(teacher_logits[keep].detach(), temperature),
        mode=mode,
        split=split,
        divergence=divergence,
        params=params,
    )
    kd_sum = torch.where(aligned.reshape(-1)[keep], per_row, 0.0).sum() * temperature**2
    compute_dtype = torch.promote_types(student_logits.dtype, torch.float32)
    ce_sum = F.cross_entropy(student_logits[keep].to(compute_dtype), labels[keep], reduction="sum")
    loss = kd_weight * kd_sum + ce_weight * ce_sum
    return FusedKDLoss(loss, kd_sum.detach(), ce_sum.detach(), keep.sum())


# --------------------------------------------------------------------------- from a cache
# A masked entry's log-probability on both sides: its probability is 0, and so is every term
# of every divergence it takes part in (0 · (a − a) = 0, never 0 · inf).
_MASKED = -1.0e30


class CachedTeacher(NamedTuple):
    """The teacher as a cache across tokenizers stores it, one row per student loss token."""

    log_probs: Tensor  # [N, k] at the temperature, descending, in the teacher's vocabulary
    ids: Tensor  # [N, k] teacher token ids
    matched_rest_log: Tensor  # [N] log of the mass on matched entries outside the top k
    unmatched_rest_log: Tensor  # [N] log of the mass on unmatched entries outside the top k


def uld_top_k(student_probs: Tensor, teacher_top: Tensor, teacher_rest: Tensor) -> Tensor:
    """ULD against a teacher known by its k largest probabilities (descending) and the mass of
    all its other entries as one bucket: Σ_{j<k} |s_j − t_j| + |Σ_{j≥k} s_j − rest|, s sorted
    descending (zero-padded to k). With the rest 0 and k ≥ the teacher's size it is ULD."""
    k = teacher_top.shape[-1]
    student_sorted = student_probs.sort(dim=-1, descending=True).values
    if student_sorted.shape[-1] < k:
        student_sorted = F.pad(student_sorted, (0, k - student_sorted.shape[-1]))
    head = (student_sorted[:, :k] - teacher_top).abs().sum(-1)
    return head + (student_sorted[:, k:].sum(-1) - teacher_rest).abs()


def cached_xtok_divergence(
    student_log_probs: Tensor,
    teacher: CachedTeacher,
    *,
    mode: str,
    split: VocabSplit | None,
    divergence: str = "forward_kl",
    params: dict | None = None,
) -> Tensor:
    """`xtok_divergence` against cached teacher rows ([N, V_S] student log-probs) → [N]."""
    top = teacher.log_probs.exp()
    if mode == "uld":
        rest = torch.logaddexp(teacher.matched_rest_log, teacher.unmatched_rest_log).exp()
        return uld_top_k(student_log_probs.exp(), top, rest)
    if mode != "gold":
        raise StillError(f"unknown cross-tokenizer loss '{mode}'", hint=f"use one of {MODES}")
    student_of = split.teacher_to_student[teacher.ids]  # [N, k]; -1: no one-to-one token
    matched = student_of >= 0
    teacher_log = torch.cat(
        [torch.where(matched, teacher.log_probs, _MASKED), teacher.matched_rest_log[:, None]], -1
    )
    teacher_mass = torch.logsumexp(teacher_log, dim=-1)
    student_entries = torch.where(
        matched, student_log_probs.gather(-1, student_of.clamp(min=0)), _MASKED
    )
    student_mass = torch.logsumexp(student_log_probs.index_select(-1, split.student_ids), dim=-1)
    student_rest = (student_mass.exp() - student_entries.exp().sum(-1)).clamp(min=MIN_REST_MASS)
    student_log = torch.cat([student_entries, student_rest.log()[:, None]], -1)
    exact = _ON_LOG_PROBS[divergence](
        student_log - student_mass[:, None], teacher_log - teacher_mass[:, None], **(params or {})
    )
    unmatched_top = torch.where(matched, 0.0, top).sort(dim=-1, descending=True).values
    rest = uld_top_k(
        student_log_probs.index_select(-1, split.student_rest).exp(),
        unmatched_top,
        teacher.unmatched_rest_log.exp(),
    )
    return teacher_mass.exp() * exact + rest


def _cached_divergence(teacher: CachedTeacher, settings):
    def divergence_of_rows(student_log_probs: Tensor, rows: slice) -> Tensor:
        return cached_xtok_divergence(
            student_log_probs,
            CachedTeacher(*(column[rows] for column in teacher)),
            mode=settings.mode,
            split=settings.split,
            divergence=settings.divergence,
            params=settings.params,
        )

    return divergence_of_rows


def xtok_cached_kd_loss(
    student_hidden: Tensor,
    student_head_weight: Tensor,
    teacher: CachedTeacher,
    aligned: Tensor,
    labels: Tensor,
    *,
    mode: str,
    mapping: VocabMap,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    ce_weight: float,
    kd_weight: float,
    chunk_size: int = 1024,
    student_head_bias: Tensor | None = None,
) -> FusedKDLoss:
    """Cross-tokenizer KD + hard-label CE against a teacher cache, chunked like `xtok_kd_loss`.

    student_hidden [N, H_S] with labels [N]; `teacher` and `aligned` hold one row per label
    that is not IGNORE_INDEX, in order (unaligned rows carry only the cross entropy)."""
    params = _divergence_params(divergence, temperature, beta, alpha)
    if chunk_size < 1:
        raise StillError(f"chunk_size={chunk_size} must be >= 1", hint="1024 is a good default")
    labels = labels.reshape(-1)
    keep = labels != IGNORE_INDEX
    if int(keep.sum()) != teacher.log_probs.shape[0]:
        raise StillError(
            f"the teacher cache holds {teacher.log_probs.shape[0]} tokens for this batch "
            f"but it has {int(keep.sum())} loss tokens",
            hint="rebuild it with `still cache`",
        )
    student_rows = student_hidden.reshape(-1, student_hidden.shape[-1])[keep]
    device = student_rows.device
    split = None if mode == "uld" else VocabSplit(mapping, device)
    settings = _Settings(mode, split, divergence, params, temperature, kd_weight, ce_weight)
    teacher = CachedTeacher(*(column.to(device) for column in teacher))
    vocab = mapping.student_vocab
    head = (
        student_head_weight[:vocab],
        None if student_head_bias is None else student_head_bias[:vocab],
    )
    chunk = _xtok_chunk(
        _cached_divergence(teacher, settings), aligned.to(device), labels[keep], settings
    )
    return _chunked_sums(student_rows, head, chunk, chunk_size, keep.sum())
