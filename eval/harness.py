"""Score a loaded model on one task: prompts → model → per-question metrics → summary files.

`evaluate` reads top to bottom: rows and prompts, the cache lookup, scoring by task type
(generate / multiple_choice / perplexity), per-question metrics, the summary with bootstrap
error bars, and the two output files `<task>.json` and `<task>.samples.jsonl`.

Scores never depend on the batch size. Generation left-pads and lets `generate` derive
position ids from the attention mask. Log-likelihoods pack each question's context once,
followed by every choice as its own branch, with a 4-D mask so a branch sees only the context
and itself and explicit position ids so every branch starts where the context ends: the context
is encoded once per question instead of once per choice, and padding never touches a score.

Caching: results live under `cache_dir/<model_hash>/<task_hash>/<HARNESS_VERSION>/<limit>/`.
`still.models.model_content_hash` covers the weights (adapter included), `task_hash` the spec
and the data bytes, so a changed weight, adapter, prompt or data row is a miss.
"""

from __future__ import annotations

import datetime
import inspect
import json
import logging
import math
import shutil
import sys
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from eval import metrics
from eval.checks import check_count, check_task
from eval.tasks import TaskSpec, build_context, fewshot_rows, select_shots, task_hash
from eval.templates import row_choices, row_gold, row_target
from still import models
from still.data import batches_longest_first, left_padded
from still.errors import StillError
from still.fsutil import atomic_write_json, atomic_write_text, json_text

# Bump when a change here can change a score: old cache entries then stop matching.
HARNESS_VERSION = "1"
BOOTSTRAP_SAMPLES = 1000

log = logging.getLogger(__name__)

GENERATE_METRICS = {
    "exact_match": lambda prediction, target, task: metrics.exact_match(
        prediction, target, task.normalize.model_dump()
    ),
    "token_f1": lambda prediction, target, task: metrics.token_f1(prediction, target),
    "rouge_l": lambda prediction, target, task: metrics.rouge_l(prediction, target),
    "regex_match": lambda prediction, target, task: metrics.regex_match(
        prediction, target, task.regex, task.normalize.model_dump()
    ),
}
CHOICE_METRICS = {
    "acc": lambda logliks, choices, gold: metrics.acc(logliks, gold),
    "acc_norm": lambda logliks, choices, gold: metrics.acc_norm(logliks, choices, gold),
}


def evaluate(
    model,
    tokenizer,
    task: TaskSpec,
    *,
    batch_size: int = 8,
    limit: int | None = None,
    out_dir: Path,
    cache_dir: Path | None,
    model_hash: str,
    progress: bool = True,
    model_name: str | None = None,
) -> dict:
    """Score `model` on `task`, write `<task>.json` + `<task>.samples.jsonl`, return the summary.

    `limit` (else `task.limit`) scores the first N rows. `model_hash` names the model in the
    cache (use `still.models.model_content_hash`). The returned summary carries `cache_hit`.
    """
    out_dir = Path(out_dir)
    check_count(limit)
    check_count(batch_size, "batch_size")
    limit = limit if limit is not None else task.limit
    current_task_hash = task_hash(task)
    cache_entry = None
    if cache_dir is not None:
        # Sampled text also depends on how rows were batched (one seed per batch).
        variant = f"limit-{limit or 'all'}" + (
            f"-batch-{batch_size}" if task.generation.do_sample else ""
        )
        cache_entry = Path(cache_dir) / model_hash / current_task_hash / HARNESS_VERSION / variant
        cached_files = (
            cache_entry / f"{task.name}.json",
            cache_entry / f"{task.name}.samples.jsonl",
        )
        if all(file.is_file() for file in cached_files):
            return _reuse_cached(cache_entry, task.name, out_dir, model_name)

    all_rows = check_task(task, limit=limit)  # never a row that fails, never zero rows
    rows = all_rows[:limit]
    # Shots come from all rows, not just the scored ones, so `limit` never changes a prompt.
    pool, same_pool = fewshot_rows(task, all_rows) if task.fewshot.n else ([], True)
    shots = [
        select_shots(pool, task.fewshot.n, task.fewshot.seed, i, row, same_pool)
        for i, row in enumerate(rows)
    ]
    contexts = [
        build_context(task, row, row_shots, tokenizer) for row, row_shots in zip(rows, shots)
    ]
    _warn_if_not_fp32(model)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(rows), desc=task.name, disable=not progress, unit="q")
    try:
        with torch.inference_mode():
            samples = SCORERS[task.type](model, tokenizer, task, rows, contexts, batch_size, bar)
    finally:
        bar.close()
        model.train(was_training)

    summary = {
        "task": task.name,
        "task_hash": current_task_hash,
        "model_hash": model_hash,
        "harness_version": HARNESS_VERSION,
        "n": len(samples),
        "metrics": _finite(task, model_name or model_hash, samples, _summarise(task, samples)),
        "batch_size": batch_size,
        "limit": limit,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if cache_entry is not None:  # the display name belongs to this call, not to the cache
        _write_results(cache_entry, task.name, summary, samples)
    if model_name is not None:
        summary["model_name"] = model_name
    _write_results(out_dir, task.name, summary, samples)
    return {**summary, "cache_hit": False}


def _reuse_cached(cache_entry: Path, task_name: str, out_dir: Path, model_name: str | None) -> dict:
    summary = json.loads((cache_entry / f"{task_name}.json").read_text())
    if model_name is not None:
        summary["model_name"] = model_name
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(
        cache_entry / f"{task_name}.samples.jsonl", out_dir / f"{task_name}.samples.jsonl"
    )
    atomic_write_json(out_dir / f"{task_name}.json", summary)
    log.info("%s: cache hit, reusing %s", task_name, cache_entry)
    print(f"{task_name}: cache hit, reusing results from {cache_entry}", file=sys.stderr)
    return {**summary, "cache_hit": True}


def _warn_if_not_fp32(model) -> None:
    parameter = next(model.parameters(), None)
    if (
        parameter is not None
        and parameter.device.type == "cpu"
        and parameter.dtype != torch.float32
    ):
        warnings.warn(
            f"scoring a {parameter.dtype} model on CPU: scores can shift with batch size; "
            "load it in float32",
            stacklevel=3,
        )


# --------------------------------------------------------------------------- tokenisation
def _encode(tokenizer, text: str) -> list[int]:
    """lm-eval's `HFLM.tok_encode`: default special tokens unless the text already has BOS."""
    has_bos = bool(tokenizer.bos_token) and text.startswith(tokenizer.bos_token)
    return tokenizer.encode(text, add_special_tokens=not has_bos)


def _encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
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
    whole = _encode(tokenizer, context + continuation)
    context_ids = _encode(tokenizer, context)
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


def _generation_config(model, tokenizer, task: TaskSpec) -> GenerationConfig:
    # A fresh config: decoding is what the task says, not whatever generation_config.json ships.
    settings = task.generation
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


def score_generate(model, tokenizer, task, rows, contexts, batch_size, bar) -> list[dict]:
    encoded = [_encode(tokenizer, context) for context in contexts]
    config = _generation_config(model, tokenizer, task)
    device = next(model.parameters()).device
    predictions: dict[int, str] = {}
    for batch_number, batch in enumerate(
        batches_longest_first([len(ids) for ids in encoded], batch_size)
    ):
        input_ids, attention_mask = left_padded([encoded[i] for i in batch], config.pad_token_id)
        width = input_ids.shape[1]
        stop = task.generation.stop
        stopping = StoppingCriteriaList([_StopStrings(tokenizer, stop, width)] if stop else [])
        with torch.random.fork_rng():  # seed sampling without moving the caller's RNG
            torch.manual_seed(task.generation.seed + batch_number)
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=config,
                stopping_criteria=stopping,
            )
        texts = tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
        for i, text in zip(batch, texts):
            predictions[i] = _cut_at_stop(text, task.generation.stop).strip()
        bar.update(len(batch))
    samples = []
    for i, row in enumerate(rows):
        target = row_target(task, row)
        scores = {
            name: GENERATE_METRICS[name](predictions[i], target, task) for name in task.metrics
        }
        samples.append(_sample(i, row, contexts[i], target, {"prediction": predictions[i]}, scores))
    return samples


def _cut_at_stop(text: str, stop: list[str]) -> str:
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
    max_positions = (
        getattr(getattr(model, "config", None), "max_position_embeddings", None) or 10**9
    )
    results: list[list[float]] = [[] for _ in items]
    packed = [_pack(context, continuations, max_positions) for context, continuations in items]
    for batch in batches_longest_first([len(p["tokens"]) for p in packed], batch_size):
        for i, logliks in zip(batch, _score_packed(model, [packed[i] for i in batch])):
            results[i] = logliks
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


def _score_packed(model, packed: list[dict]) -> list[list[float]]:
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
        token_logprobs = log_probs.gather(-1, token_ids.to(log_probs.device)[:, None])[
            :, 0
        ].tolist()
        row_logliks, start = [], 0
        for _, continuation in p["targets"]:
            row_logliks.append(float(sum(token_logprobs[start : start + len(continuation)])))
            start += len(continuation)
        results.append(row_logliks)
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


def score_multiple_choice(model, tokenizer, task, rows, contexts, batch_size, bar) -> list[dict]:
    items, choices_per_row, golds = [], [], []
    for row, context in zip(rows, contexts):
        choices = row_choices(task, row)
        pairs = [_encode_pair(tokenizer, context, task.delimiter + choice) for choice in choices]
        items.append((pairs[0][0], [continuation for _, continuation in pairs]))
        choices_per_row.append(choices)
        golds.append(row_gold(task, row, choices))
    logliks = continuation_logliks(model, items, batch_size, bar)
    samples = []
    for i, row in enumerate(rows):
        scores = {
            m: CHOICE_METRICS[m](logliks[i], choices_per_row[i], golds[i]) for m in task.metrics
        }
        extra = {"choices": choices_per_row[i], "label": golds[i], "logliks": logliks[i]}
        samples.append(_sample(i, row, contexts[i], choices_per_row[i][golds[i]], extra, scores))
    return samples


def score_perplexity(model, tokenizer, task, rows, contexts, batch_size, bar) -> list[dict]:
    targets = [row_target(task, row) for row in rows]
    items = []
    for context, target in zip(contexts, targets):
        context_ids, target_ids = _encode_pair(tokenizer, context, target)
        items.append((context_ids, [target_ids]))
    logliks = continuation_logliks(model, items, batch_size, bar)
    samples = []
    for i, row in enumerate(rows):
        n_tokens = len(items[i][1][0])
        loss = -logliks[i][0] / max(n_tokens, 1)
        extra = {"loglik": logliks[i][0], "n_tokens": n_tokens}
        samples.append(_sample(i, row, contexts[i], targets[i], extra, {"loss": loss}))
    return samples


SCORERS = {
    "generate": score_generate,
    "multiple_choice": score_multiple_choice,
    "perplexity": score_perplexity,
}


# --------------------------------------------------------------------------- results
def _sample(idx: int, row: dict, prompt: str, target: str, extra: dict, scores: dict) -> dict:
    return {
        "idx": idx,
        "id": row.get("id"),
        "prompt": prompt,
        "target": target,
        **extra,
        "metrics": scores,
    }


def _summarise(task: TaskSpec, samples: list[dict]) -> dict:
    """Mean ± bootstrap stderr per metric; perplexity tasks weight the loss by tokens."""
    summary = {}
    if task.type == "perplexity":
        losses = [s["metrics"]["loss"] for s in samples]
        token_counts = [s["n_tokens"] for s in samples]
        mean, stderr = metrics.bootstrap_stderr(losses, BOOTSTRAP_SAMPLES, 0, weights=token_counts)
        if "loss" in task.metrics:
            summary["loss"] = {"mean": mean, "stderr": stderr}
        if "perplexity" in task.metrics:  # delta method: d exp(x) = exp(x) dx
            perplexity = math.exp(mean) if mean < 700 else math.inf  # inf: refused by _finite
            summary["perplexity"] = {"mean": perplexity, "stderr": perplexity * stderr}
        return summary
    for name in task.metrics:
        mean, stderr = metrics.bootstrap_stderr(
            [s["metrics"][name] for s in samples], BOOTSTRAP_SAMPLES, 0
        )
        summary[name] = {"mean": mean, "stderr": stderr}
    return summary


def _finite(task: TaskSpec, model: str, samples: list[dict], summary: dict) -> dict:
    """The summary, if every score is a number: a NaN or infinity has no place in the JSON."""
    bad = [s["idx"] for s in samples if not all(map(math.isfinite, _numbers(s)))]
    wrong = [
        metric for metric, score in summary.items() if not all(map(math.isfinite, score.values()))
    ]
    if bad or wrong:
        what = f"rows {', '.join(map(str, bad[:5]))}" if bad else f"its {wrong[0]}"
        raise StillError(
            f"{model} on {task.name}: {what} scored a non-finite number (NaN or infinity)",
            hint="the model's log-probabilities overflow or are NaN: check its weights, "
            "or score it in float32",
        )
    return summary


def _numbers(sample: dict) -> list[float]:
    values = list(sample["metrics"].values()) + list(sample.get("logliks", []))
    return [float(v) for v in values + [sample.get("loglik", 0.0)]]


def _write_results(directory: Path, task_name: str, summary: dict, samples: list[dict]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    lines = "".join(json_text(sample, indent=None) for sample in samples)
    # Written aside then renamed, so a crash never leaves a half file that looks like a cache hit.
    atomic_write_text(directory / f"{task_name}.samples.jsonl", lines)
    atomic_write_json(directory / f"{task_name}.json", summary)
