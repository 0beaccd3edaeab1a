"""Score a loaded model on one task: prompts → model → per-question metrics → summary files.

`evaluate` reads top to bottom: rows and prompts, the cache lookup, scoring by task type
(generate / multiple_choice / perplexity), per-question metrics, the summary with bootstrap
error bars, and the two output files `<task>.json` and `<task>.samples.jsonl`.

Scores never depend on the batch size; the log-likelihood and generation primitives that make
that so (context encoded once per question, left-padded generation) are `eval/scorer.py`,
shared with the lm-evaluation-harness backend.

Caching: results live under `cache_dir/<model_hash>/<task_hash>/<HARNESS_VERSION>/<limit>/`.
`still.models.model_content_hash` covers the weights (adapter included), `task_hash` the spec
and the data bytes, so a changed weight, adapter, prompt or data row is a miss.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from eval import metrics
from eval.checks import check_count, check_task
from eval.scorer import (
    continuation_logliks,
    encode,
    encode_pair,
    generate_with_signals,
)
from eval.tasks import TaskSpec, build_context, fewshot_rows, select_shots, task_hash
from eval.templates import row_choices, row_gold, row_target
from still.errors import StillError
from still.fsutil import atomic_write_json, atomic_write_text, json_text

# Bump when a change here can change a score or the samples' format: old cache entries then
# stop matching. 2: per-answer confidence `signals` in the samples (eval/cascade.py reads them).
HARNESS_VERSION = "2"
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
    # Sampled text also depends on how rows were batched (one seed per batch).
    variant = f"limit-{limit or 'all'}" + (
        f"-batch-{batch_size}" if task.generation.do_sample else ""
    )
    cache_entry = cache_entry_for(cache_dir, model_hash, current_task_hash, variant)
    if is_cached(cache_entry, [task.name]):
        return reuse_cached(cache_entry, task.name, out_dir, model_name)

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
    started = time.monotonic()
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
        # What a cascade's cost estimate reads: scoring wall time and the model's size.
        "seconds": round(time.monotonic() - started, 3),
        "n_params": sum(p.numel() for p in model.parameters()) or None,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return store_results(cache_entry, out_dir, task.name, summary, samples, model_name)


def cache_entry_for(
    cache_dir: Path | None, model_hash: str, task_hash: str, variant: str
) -> Path | None:
    """Where one model's results on one task version live in the eval cache (None: no cache)."""
    if cache_dir is None:
        return None
    return Path(cache_dir) / model_hash / task_hash / HARNESS_VERSION / variant


def is_cached(cache_entry: Path | None, task_names: list[str]) -> bool:
    """Both result files of every named task are in the cache entry."""
    return cache_entry is not None and all(
        (cache_entry / f"{name}{suffix}").is_file()
        for name in task_names
        for suffix in (".json", ".samples.jsonl")
    )


def store_results(
    cache_entry: Path | None, out_dir: Path, task_name: str, summary, samples, model_name
) -> dict:
    """Write fresh results into the cache entry and `out_dir`; the display name belongs to this
    call, so only `out_dir`'s copy carries it. Returns the summary with `cache_hit` False."""
    if cache_entry is not None:
        write_results(cache_entry, task_name, summary, samples)
    if model_name is not None:
        summary["model_name"] = model_name
    write_results(out_dir, task_name, summary, samples)
    return {**summary, "cache_hit": False}


def reuse_cached(cache_entry: Path, task_name: str, out_dir: Path, model_name: str | None) -> dict:
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


def score_generate(model, tokenizer, task, rows, contexts, batch_size, bar) -> list[dict]:
    encoded = [encode(tokenizer, context) for context in contexts]
    texts, signals = generate_with_signals(
        model, tokenizer, encoded, task.generation, batch_size, bar
    )
    predictions = [text.strip() for text in texts]
    samples = []
    for i, row in enumerate(rows):
        target = row_target(task, row)
        scores = {
            name: GENERATE_METRICS[name](predictions[i], target, task) for name in task.metrics
        }
        extra = {"prediction": predictions[i]}
        if signals[i] is not None:  # None: the runtime gives no token log-probs (llama.cpp)
            extra["signals"] = signals[i]
        samples.append(_sample(i, row, contexts[i], target, extra, scores))
    return samples


def score_multiple_choice(model, tokenizer, task, rows, contexts, batch_size, bar) -> list[dict]:
    items, choices_per_row, golds = [], [], []
    for row, context in zip(rows, contexts):
        choices = row_choices(task, row)
        pairs = [encode_pair(tokenizer, context, task.delimiter + choice) for choice in choices]
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
        extra["signals"] = choice_signals(logliks[i])
        samples.append(_sample(i, row, contexts[i], choices_per_row[i][golds[i]], extra, scores))
    return samples


def score_perplexity(model, tokenizer, task, rows, contexts, batch_size, bar) -> list[dict]:
    targets = [row_target(task, row) for row in rows]
    items = []
    for context, target in zip(contexts, targets):
        context_ids, target_ids = encode_pair(tokenizer, context, target)
        items.append((context_ids, [target_ids]))
    logliks = continuation_logliks(model, items, batch_size, bar)
    samples = []
    for i, row in enumerate(rows):
        n_tokens = len(items[i][1][0])
        loss = -logliks[i][0] / max(n_tokens, 1)
        extra = {"loglik": logliks[i][0], "n_tokens": n_tokens}
        samples.append(_sample(i, row, contexts[i], targets[i], extra, {"loss": loss}))
    return samples


def choice_signals(logliks: list[float]) -> dict:
    """Confidence of a multiple-choice answer: the log-likelihood margin between the top two
    choices, and the top choice's probability with the choices renormalised (softmax)."""
    ranked = sorted(logliks, reverse=True)
    top = ranked[0]
    normaliser = sum(math.exp(value - top) for value in ranked)
    signals = {"top_prob": 1.0 / normaliser}
    if len(ranked) > 1:
        signals["margin"] = ranked[0] - ranked[1]
    return signals


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


def write_results(directory: Path, task_name: str, summary: dict, samples: list[dict]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    lines = "".join(json_text(sample, indent=None) for sample in samples)
    # Written aside then renamed, so a crash never leaves a half file that looks like a cache hit.
    atomic_write_text(directory / f"{task_name}.samples.jsonl", lines)
    atomic_write_json(directory / f"{task_name}.json", summary)
