"""The publish table: every GGUF file of a publish next to fp32, measured in llama.cpp.

For each file (and an f32 GGUF of the same model as the fp32 row, so every row runs in the
same runtime): size on disk; tokens/s on this CPU for prompt processing and for generation;
perplexity of the run's held-out texts; and, when the publish scores tasks, each task metric
scored through llama.cpp (eval/llama_cpp.py) with its Δ vs the fp32 model's scores, paired by
question with a 95% bootstrap CI. Written into lineage.json and the model card.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from still.errors import StillError

GENERATED_TOKENS = 32


def runtime_numbers(path: Path, tokenizer, texts: list[str]) -> dict:
    """Size, llama.cpp speed (prompt and generation, tokens/s) and perplexity of `texts`."""
    from eval.llama_cpp import LlamaCppModel, log_softmax, runtime

    runner = LlamaCppModel(path, tokenizer)
    nll, scored = 0.0, 0
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        logprobs = log_softmax(runner.logits(ids)[:-1])
        nll -= float(logprobs[np.arange(len(ids) - 1), ids[1:]].sum())
        scored += len(ids) - 1
    del runner
    # Speed without logits at every position (what an app runs): a context of its own.
    llm = runtime().Llama(model_path=str(path), n_ctx=2048, verbose=False)
    prompt = [t for text in texts for t in tokenizer(text)["input_ids"]][:512]
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    prompt_seconds = time.perf_counter() - start
    llm.reset()
    start, generated = time.perf_counter(), 0
    for generated, _ in enumerate(llm.generate(prompt[:32], temp=0.0, repeat_penalty=1.0), 1):
        if generated == GENERATED_TOKENS:
            break
    generate_seconds = time.perf_counter() - start
    del llm
    return {
        "bytes": Path(path).stat().st_size,
        "perplexity": math.exp(nll / max(1, scored)),
        "perplexity_tokens": scored,
        "prompt_tokens_per_s": len(prompt) / prompt_seconds,
        "generate_tokens_per_s": generated / generate_seconds,
    }


def task_deltas(summaries: list[dict], samples_dir: Path, fp32_dir: Path) -> dict:
    """{task: {metric: {mean, delta, low, high}}}: each metric scored on the file, and its
    difference from fp32 paired by question (95% bootstrap CI)."""
    from eval.compare import values_by_question
    from eval.metrics import paired_ci_by_question

    table: dict = {}
    for summary in summaries:
        task = summary["task"]
        ours = _samples(Path(samples_dir) / f"{task}.samples.jsonl")
        reference = _samples(Path(fp32_dir) / f"{task}.samples.jsonl")
        for metric, value in summary["metrics"].items():
            cell = {"mean": value["mean"]}
            a, b = values_by_question(ours, metric), values_by_question(reference, metric)
            if a is not None and b is not None and a.keys() == b.keys():
                cell["delta"], cell["low"], cell["high"] = paired_ci_by_question(a, b)
            table.setdefault(task, {})[metric] = cell
    return table


def _samples(path: Path) -> list[dict]:
    import json

    if not path.is_file():
        raise StillError(f"no per-question results at {path}")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def markdown(rows: list[dict]) -> str:
    """rows: {type, bytes, prompt_tokens_per_s, generate_tokens_per_s, perplexity, tasks}."""
    metrics = sorted({(t, m) for row in rows for t, ms in row.get("tasks", {}).items() for m in ms})
    header = ["file", "size", "prompt tok/s", "gen tok/s", "perplexity"]
    header += [f"{task} {metric}" for task, metric in metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [
            row["type"],
            f"{row['bytes'] / 2**20:.1f} MiB",
            f"{row['prompt_tokens_per_s']:.0f}",
            f"{row['generate_tokens_per_s']:.1f}",
            f"{row['perplexity']:.3f}",
        ]
        for task, metric in metrics:
            cell = row.get("tasks", {}).get(task, {}).get(metric)
            cells.append(_cell(cell))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(cell: dict | None) -> str:
    if cell is None:
        return "—"
    if "delta" not in cell:
        return f"{cell['mean']:.3f}"
    star = "*" if cell["low"] > 0 or cell["high"] < 0 else ""
    return (
        f"{cell['mean']:.3f} ({cell['delta']:+.3f} [{cell['low']:+.3f}, {cell['high']:+.3f}]{star})"
    )


def measure_files(model, tokenizer, staging: Path, reports: list[dict], texts: list[str]) -> dict:
    """runtime_numbers for every GGUF report (into report["table"]) and for an f32 GGUF of
    `model` written to a scratch file and removed: the fp32 row, returned."""
    from publish.gguf import export_gguf

    scratch = staging / ".fp32-reference.gguf"
    try:
        export_gguf(model, tokenizer, scratch, "f32", name="fp32")
        fp32 = {"type": "fp32", **runtime_numbers(scratch, tokenizer, texts)}
    finally:
        scratch.unlink(missing_ok=True)
    for report in reports:
        numbers = runtime_numbers(staging / report["file"], tokenizer, texts)
        report["table"] = {"type": report["type"], **numbers}
    return fp32


def score_files(reports: list[dict], staging: Path, tasks, limit, fp32_summaries) -> dict:
    """Each GGUF file scored on `tasks` through llama.cpp, next to the fp32 scores in
    staging/eval (into report["table"]["tasks"]); returns the fp32 row's task cells."""
    from eval.run import evaluate_model

    for report in reports:
        out_dir = staging / "eval" / f"gguf-{report['type']}"
        path = str(staging / report["file"])
        summaries = evaluate_model(path, tasks, out_dir=out_dir, limit=limit, name=report["file"])
        report["table"]["tasks"] = task_deltas(summaries, out_dir, staging / "eval")
    return {
        s["task"]: {metric: {"mean": v["mean"]} for metric, v in s["metrics"].items()}
        for s in fp32_summaries
    }
