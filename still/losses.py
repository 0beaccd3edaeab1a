"""Token losses the trainers share: cross entropy straight from hidden states, chunk by chunk,
and the normalisation of a summed loss by Trainer's global token count.

A causal LM's own loss builds logits for every position ([tokens × vocab], upcast to fp32) and
keeps them, with their softmax, for backward. `linear_cross_entropy` drops the positions that
carry no label before the output head runs, builds one chunk of logits at a time and turns each
into its gradient at once, so no [tokens × vocab] tensor outlives its chunk.
`chunked_head_loss` is that mechanism for any per-chunk loss; KD (distill.losses) uses it too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


class _ChunkedHeadLoss(torch.autograd.Function):
    """A loss of `hidden @ weight.T (+ bias)`, summed over row chunks: forward builds one chunk
    of logits at a time, asks `chunk_loss(logits, rows)` for that chunk's sums and d(loss)/d
    logits, and folds those into the input gradients at once; backward only rescales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, chunk_size: int, chunk_loss, n_sums: int):
        want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
        compute_dtype = torch.promote_types(hidden.dtype, torch.float32)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        # fp32 accumulators: a bf16 running sum over many chunks would lose the small ones.
        grad_weight = torch.zeros_like(weight, dtype=compute_dtype) if want_weight else None
        grad_bias = torch.zeros_like(bias, dtype=compute_dtype) if want_bias else None
        totals = [hidden.new_zeros((), dtype=compute_dtype) for _ in range(n_sums)]
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            # The matmul runs in the weights' dtype, as the model's own head would under autocast
            # (accelerate hands back fp32 hidden states from a bf16 model); only logits are upcast.
            logits = F.linear(hidden[rows].to(weight.dtype), weight, bias).to(compute_dtype)
            sums, grad_logits = chunk_loss(logits, rows)
            for total, chunk_sum in zip(totals, sums, strict=True):
                total += chunk_sum
            if want_bias:
                grad_bias += grad_logits.sum(0)
            if want_weight:  # straight into the accumulator: no [vocab × hidden] temporary
                grad_weight.addmm_(grad_logits.T, hidden[rows].to(compute_dtype))
            if want_hidden:
                grad_hidden[rows] = grad_logits.to(weight.dtype) @ weight
            del logits, grad_logits  # before the next chunk's logits exist, not after
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.input_dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(*totals[1:])
        return tuple(totals)

    @staticmethod
    def backward(ctx, grad_loss, *_grad_other_sums):
        grads = [
            None if grad is None else (grad * grad_loss).to(dtype)
            for grad, dtype in zip(ctx.saved_tensors, ctx.input_dtypes)
        ]
        return *grads, None, None, None


def chunked_head_loss(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    chunk_loss,
    *,
    n_sums: int = 1,
    chunk_size: int = 1024,
) -> tuple[Tensor, ...]:
    """Σ over chunks of `chunk_loss`, never holding more than one chunk's [rows × vocab] logits.

    hidden is [N, H]. `chunk_loss(logits, rows)` gets one chunk's fp32 logits (its own buffer,
    free to overwrite) and its row slice, and returns `n_sums` 0-d sums and the gradient of the
    first sum w.r.t. those logits. Returns the `n_sums` totals; gradients reach hidden, weight
    and bias through the first, the others are reported as they are.
    """
    return _ChunkedHeadLoss.apply(hidden, weight, bias, chunk_size, chunk_loss, n_sums)


def _cross_entropy_chunk(labels: Tensor):
    def chunk_loss(logits: Tensor, rows: slice):
        targets = labels[rows].unsqueeze(-1)
        log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)
        total = (log_norm - logits.gather(-1, targets)).sum()
        # d(Σ CE)/d logits = softmax − one-hot, built in the logits' own buffer
        grad_logits = logits.sub_(log_norm).exp_()
        grad_logits.scatter_add_(-1, targets, grad_logits.new_full(targets.shape, -1.0))
        return (total,), grad_logits

    return chunk_loss


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    chunk_size: int = 1024,
) -> tuple[Tensor, Tensor]:
    """Σ cross entropy of `hidden @ weight.T (+ bias)` against `labels`, and the label count.

    hidden is [..., H] and labels [...], already aligned (position i predicts labels[i]);
    IGNORE_INDEX labels carry no loss and their rows never reach the head. Gradients reach
    hidden, weight and bias as the full-logits loss would give them.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    labels = labels.reshape(-1)
    keep = labels != IGNORE_INDEX
    rows = hidden.reshape(-1, hidden.shape[-1])[keep]
    (total,) = chunked_head_loss(
        rows, weight, bias, _cross_entropy_chunk(labels[keep]), chunk_size=chunk_size
    )
    return total, keep.sum()


def per_token_loss(
    loss_sum: Tensor,
    n_tokens: Tensor,
    *,
    num_items_in_batch,
    training: bool,
    accumulation_steps: int,
    num_processes: int,
    average_across_devices: bool,
) -> Tensor:
    """A summed loss → the loss Trainer backpropagates.

    With Trainer's `num_items_in_batch` (the loss tokens of the whole optimizer step, over all
    accumulation micro-batches, and over all processes when `average_tokens_across_devices`),
    every token weighs the same. Without it (eval), the mean over this batch's tokens.
    """
    if num_items_in_batch is not None:
        loss = loss_sum / num_items_in_batch
        if average_across_devices:
            # DDP averages gradients over ranks; the divisor above already counts every rank.
            loss = loss * num_processes
        return loss
    loss = loss_sum / n_tokens.clamp(min=1)
    return loss / accumulation_steps if training else loss
