"""The model-facing primitives every scorer shares: lm-eval's tokenisation of a (context,
continuation) pair, batched log-likelihoods with each context encoded once, and left-padded
generation with per-row stop strings.

`eval/harness.py` scores our task YAMLs with them; `eval/lm_eval_backend.py` answers
lm-evaluation-harness's requests with them, so a number is computed the same way whichever
harness asks. Scores never depend on the batch size: generation left-pads and lets `generate`
derive position ids from the attention mask; log-likelihoods pack each context once, followed
by every continuation as its own branch, with a 4-D mask so a branch sees only the context and
itself and explicit position ids so every branch starts where the context ends.
"""

from __future__ import annotations

import inspect

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from still import models
from still.data import batches_longest_first, left_padded


# --------------------------------------------------------------------------- tokenisation
def encode(tokenizer, text: str) -> list[int]:
    """lm-eval's `HFLM.tok_encode`: default special tokens unless the text already has BOS."""
    has_bos = bool(tokenizer.bos_token) and text.startswith(tokenizer.bos_token)
    return tokenizer.encode(text, add_special_tokens=not has_bos)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's `LM._encode_pair` (and its empty-context rule in `LM.loglikelihood`).

    Trailing spaces move from the context into the continuation; the continuation's tokens are
    the whole string's tokens after the context's, so word-boundary merges match lm-eval.
    """
    if context == "":
        continuation_ids = tokenizer.encode(continuation, add_special_tokens=False)
        prefix = (
            tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        )
        if continuation_ids and continuation_ids[0] == prefix:
            return continuation_ids[:1], continuation_ids[1:]
        return [prefix], continuation_ids
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = encode(tokenizer, context + continuation)
    context_ids = encode(tokenizer, context)
    return context_ids, whole[len(context_ids) :]


# --------------------------------------------------------------------------- generate
class _StopStrings(StoppingCriteria):
    """Marks a row done once its generated text contains a stop string (per row, not per batch)."""

    def __init__(self, tokenizer, stop: list[str], prompt_length: int):
        self.tokenizer, self.stop, self.prompt_length = tokenizer, stop, prompt_length

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(
            input_ids[:, self.prompt_length :], skip_special_tokens=True
        )
        done = [any(stop in text for stop in self.stop) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def generation_config(model, tokenizer, settings) -> GenerationConfig:
    """A fresh config from a task's `generation` settings: decoding is what the task says, not
    whatever generation_config.json ships."""
    sampling = (
        {"temperature": settings.temperature, "top_p": settings.top_p} if settings.do_sample else {}
    )
    return GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        do_sample=settings.do_sample,
        pad_token_id=models.pad_token_id(tokenizer),
        eos_token_id=models.stop_token_ids(model, tokenizer),
        **sampling,
    )


def generate_texts(model, tokenizer, encoded: list[list[int]], settings, batch_size, bar=None):
    """The text generated after each encoded prompt, cut at the first stop string (not
    stripped). `settings` is a task's `Generation` (max_new_tokens, stop, sampling, seed).
    A model that scores itself (eval/llama_cpp.py) generates with its own runtime."""
    texts, _ = generate_with_signals(
        model, tokenizer, encoded, settings, batch_size, bar, with_signals=False
    )
    return texts


def generate_with_signals(
    model,
    tokenizer,
    encoded: list[list[int]],
    settings,
    batch_size,
    bar=None,
    *,
    with_signals: bool = True,
) -> tuple[list[str], list[dict | None]]:
    """`generate_texts`, and for each answer its confidence signals (`answer_signals`), or None
    where the runtime gives no token log-probs (a model that scores itself: llama.cpp) or
    `with_signals` is off (the logits of every step cost memory: batch × steps × vocabulary)."""
    if getattr(model, "scores_itself", False):
        stop_ids = models.stop_token_ids(model, tokenizer)
        texts = model.generate_texts(encoded, settings, stop_ids, bar)
        return texts, [None] * len(texts)
    config = generation_config(model, tokenizer, settings)
    # The model's own distribution at each step, before any sampling warper, for the signals.
    config.return_dict_in_generate, config.output_logits = True, with_signals
    stop_ids = set(models.stop_token_ids(model, tokenizer) or [])
    device = next(model.parameters()).device
    texts: list[str] = [""] * len(encoded)
    signals: list[dict | None] = [None] * len(encoded)
    for batch_number, batch in enumerate(
        batches_longest_first([len(ids) for ids in encoded], batch_size)
    ):
        input_ids, attention_mask = left_padded([encoded[i] for i in batch], config.pad_token_id)
        width = input_ids.shape[1]
        stop = settings.stop
        stopping = StoppingCriteriaList([_StopStrings(tokenizer, stop, width)] if stop else [])
        with torch.random.fork_rng():  # seed sampling without moving the caller's RNG
            torch.manual_seed(settings.seed + batch_number)
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=config,
                stopping_criteria=stopping,
            )
        generated = output.sequences[:, width:]
        decoded = tokenizer.batch_decode(generated, skip_special_tokens=True)
        logits = torch.stack(output.logits, dim=1) if with_signals else None  # batch, step, vocab
        for row, (i, text) in enumerate(zip(batch, decoded)):
            texts[i] = cut_at_stop(text, stop)
            if logits is None:
                continue
            tokens = generated[row].tolist()
            n_answer = answer_length(tokenizer, tokens, stop_ids, stop)
            signals[i] = answer_signals(logits[row, :n_answer], generated[row, :n_answer])
        if bar is not None:
            bar.update(len(batch))
    return texts, signals


def answer_length(tokenizer, tokens: list[int], stop_ids: set[int], stop: list[str]) -> int:
    """How many generated tokens make the answer: up to and including the first end-of-turn id
    or the token that completes a stop string; the padding after a finished row is not read."""
    for n, token in enumerate(tokens, start=1):
        if token in stop_ids:
            return n
        if stop and any(s in tokenizer.decode(tokens[:n], skip_special_tokens=True) for s in stop):
            return n
    return len(tokens)


def answer_signals(step_logits: torch.Tensor, token_ids: torch.Tensor) -> dict:
    """Confidence signals of one generated answer from the logits that chose its tokens:
    mean and minimum token log-probability and mean entropy (nats) of the next-token
    distribution, over the answer's tokens."""
    log_probs = torch.log_softmax(step_logits.float(), dim=-1)
    token_logprobs = log_probs.gather(-1, token_ids.to(log_probs.device)[:, None])[:, 0]
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return {
        "mean_logprob": float(token_logprobs.mean()),
        "min_logprob": float(token_logprobs.min()),
        "mean_entropy": float(entropy.mean()),
        "n_tokens": len(token_ids),
    }


def cut_at_stop(text: str, stop: list[str]) -> str:
    cut = min((text.find(s) for s in stop if s in text), default=len(text))
    return text[:cut]


# --------------------------------------------------------------------------- log-likelihood
def continuation_logliks(
    model, items: list[tuple[list[int], list[list[int]]]], batch_size: int, bar=None
) -> list[list[float]]:
    """Summed log-probability of each continuation after its context, for each
    (context, [continuations]).

    One sequence per item: the context once, then each continuation's tokens but its last as a
    branch. The 4-D mask lets a branch see the context and itself only; position ids restart
    each branch at the context's end. That equals scoring context+continuation separately.
    """
    scores = continuation_scores(model, items, batch_size, bar)
    return [[loglik for loglik, _ in row] for row in scores]


def continuation_scores(
    model, items: list[tuple[list[int], list[list[int]]]], batch_size: int, bar=None
) -> list[list[tuple[float, bool]]]:
    """`continuation_logliks`, each with whether every continuation token is the argmax
    (lm-eval's `is_greedy`, which e.g. LAMBADA's accuracy reads)."""
    if getattr(model, "scores_itself", False):  # eval/llama_cpp.py: one context at a time
        return model.continuation_scores(items, bar)
    max_positions = (
        getattr(getattr(model, "config", None), "max_position_embeddings", None) or 10**9
    )
    results: list[list[tuple[float, bool]]] = [[] for _ in items]
    packed = [_pack(context, continuations, max_positions) for context, continuations in items]
    for batch in batches_longest_first([len(p["tokens"]) for p in packed], batch_size):
        for i, scores in zip(batch, _score_packed(model, [packed[i] for i in batch])):
            results[i] = scores
        if bar is not None:
            bar.update(len(batch))
    return results


def _pack(context: list[int], continuations: list[list[int]], max_positions: int) -> dict:
    longest = max(len(c) for c in continuations)
    context = context[-max(1, max_positions - longest) :]  # lm-eval also truncates on the left
    tokens, branch, positions = list(context), [0] * len(context), list(range(len(context)))
    targets = []  # per continuation: (sequence index predicting each token, token id)
    for number, continuation in enumerate(continuations, start=1):
        predictors = [len(context) - 1]
        for offset, token in enumerate(continuation[:-1]):
            predictors.append(len(tokens))
            tokens.append(token)
            branch.append(number)
            positions.append(len(context) + offset)
        targets.append((predictors[: len(continuation)], continuation))
    return {"tokens": tokens, "branch": branch, "positions": positions, "targets": targets}


def _score_packed(model, packed: list[dict]) -> list[list[tuple[float, bool]]]:
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    width = max(len(p["tokens"]) for p in packed)
    input_ids = torch.zeros((len(packed), width), dtype=torch.long)
    position_ids = torch.zeros((len(packed), width), dtype=torch.long)
    branch = torch.full((len(packed), width), -1, dtype=torch.long)  # -1: padding
    # Left padding puts every scored position in the last few columns, so the vocabulary
    # projection (a fifth of a small model's compute) runs only there (`logits_to_keep`).
    # The explicit mask and position ids make the side of the padding irrelevant to scores.
    offsets = [width - len(p["tokens"]) for p in packed]
    for row, (p, offset) in enumerate(zip(packed, offsets)):
        input_ids[row, offset:] = torch.tensor(p["tokens"])
        position_ids[row, offset:] = torch.tensor(p["positions"])
        branch[row, offset:] = torch.tensor(p["branch"])
    index = torch.arange(width)
    causal = index[None, :, None] >= index[None, None, :]
    same_branch = (branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])
    allowed = (causal & same_branch) | torch.eye(
        width, dtype=torch.bool
    )  # padding sees itself: no NaN
    attention_mask = _attention_masks(
        getattr(model, "config", None), allowed, position_ids, dtype, device
    )
    scored_starts = [
        offset + min(pred) for p, offset in zip(packed, offsets) for pred, _ in p["targets"] if pred
    ]
    first_scored = min(scored_starts, default=width - 1)
    keep = width - first_scored if _accepts_logits_to_keep(model) else width
    logits = model(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask,
        position_ids=position_ids.to(device),
        **({"logits_to_keep": keep} if keep < width else {}),
    ).logits
    results = []
    for row, (p, offset) in enumerate(zip(packed, offsets)):
        # All of a question's scored positions in one log-softmax, then summed per continuation.
        columns = [
            offset + position - (width - keep)
            for predictors, _ in p["targets"]
            for position in predictors
        ]
        token_ids = torch.tensor(
            [token for _, continuation in p["targets"] for token in continuation]
        )
        log_probs = torch.log_softmax(logits[row, columns].float(), dim=-1)
        token_ids = token_ids.to(log_probs.device)
        token_logprobs = log_probs.gather(-1, token_ids[:, None])[:, 0].tolist()
        is_argmax = (log_probs.argmax(dim=-1) == token_ids).tolist()
        row_scores, start = [], 0
        for _, continuation in p["targets"]:
            end = start + len(continuation)
            row_scores.append((float(sum(token_logprobs[start:end])), all(is_argmax[start:end])))
            start = end
        results.append(row_scores)
    return results


def _attention_masks(config, allowed: torch.Tensor, position_ids: torch.Tensor, dtype, device):
    """Additive 4-D masks from `allowed` (batch, query, key), with sliding windows where used.

    A custom 4-D mask replaces the model's own, so sliding-window layers (Gemma 3, Mistral)
    need their window applied here; models with `layer_types` take a mask per layer type.
    The window counts positions, as an unpacked sequence would.
    """

    def additive(keep: torch.Tensor) -> torch.Tensor:
        additive_mask = torch.zeros(keep.shape, dtype=dtype).masked_fill(
            ~keep, torch.finfo(dtype).min
        )
        return additive_mask[:, None].to(device)

    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or []
    if not window or (layer_types and "sliding_attention" not in layer_types):
        return additive(allowed)
    in_window = position_ids[:, None, :] > position_ids[:, :, None] - window  # key > query - window
    sliding = additive(allowed & in_window)
    if not layer_types:
        return sliding  # every layer slides
    return {"full_attention": additive(allowed), "sliding_attention": sliding}


def _accepts_logits_to_keep(model) -> bool:
    # PEFT wrappers pass extra keyword arguments through: ask the model underneath.
    return "logits_to_keep" in inspect.signature(models.base_model(model).forward).parameters
