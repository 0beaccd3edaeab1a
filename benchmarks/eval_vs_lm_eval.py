"""Our multiple-choice scoring next to lm-evaluation-harness: same task, model, batch, fp32 CPU.

Three runs, one process, the model loaded once: `still eval`'s harness, lm-eval with the
`still` backend (`--model still`, eval/lm_eval_backend.py), and lm-eval with its `hf` backend.

Run: python benchmarks/eval_vs_lm_eval.py --limit 200
     python benchmarks/eval_vs_lm_eval.py --model HF_DIR --data data/pydocs/choice_test.jsonl

The task YAML (default: recipes/tasks/pydocs-choice.yaml) is translated into an lm-eval task
(`dataset_path: json`, `output_type: multiple_choice`, registered through
`TaskManager(include_path=...)`), so both harnesses see the same rows, prompt, choices and
chat template. Printed: acc and acc_norm from each (they must agree within 0.5 points), how
far the per-choice log-likelihoods differ from `hf`'s, and questions/second for each plus the
ratios to `hf`, timed in this one process with the model already loaded.

Batch size means the same number in both, but not the same work: lm-eval batches
(context, choice) requests, we batch questions and encode each question's context once.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from eval.harness import evaluate  # noqa: E402
from eval.scorer import encode_pair  # noqa: E402
from eval.tasks import load_task  # noqa: E402

AGREEMENT_POINTS = 0.5
FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", help="local HF model dir (default: the built-in SmolLM2-135M-Instruct)"
    )
    parser.add_argument("--task", default=str(ROOT / "recipes/tasks/pydocs-choice.yaml"))
    parser.add_argument("--data", help="use this JSONL instead of the task's data file")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's choice)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="alternate the two harnesses this many times; best time counts",
    )
    return parser.parse_args()


def default_model_dir() -> Path:
    from still import models

    return Path(models.resolve("builtin:smollm2-135m-instruct").weights)


def lm_eval_task_yaml(task, data_file: Path, name: str) -> dict:
    """Our TaskSpec as an lm-eval task config (zero-shot multiple choice)."""

    def as_template(expression: str) -> str:
        # lm-eval reads a bare field name as doc[field]; anything else as a Jinja template.
        return expression if FIELD_NAME.match(expression) else "{{ " + expression + " }}"

    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": task.prompt,
        "doc_to_choice": as_template(task.choices),
        "doc_to_target": as_template(task.label),
        "target_delimiter": task.delimiter,
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
    }
    return config


def run_still(model, tokenizer, task, limit: int, batch_size: int):
    with tempfile.TemporaryDirectory() as out_dir:
        started = time.perf_counter()
        summary = evaluate(
            model,
            tokenizer,
            task,
            batch_size=batch_size,
            limit=limit,
            out_dir=Path(out_dir),
            cache_dir=None,
            model_hash="benchmark",
            progress=False,
        )
        seconds = time.perf_counter() - started
        with (Path(out_dir) / f"{task.name}.samples.jsonl").open() as handle:
            samples = [json.loads(line) for line in handle]
    return summary, samples, seconds


def run_lm_eval(model, tokenizer, task, data_file: Path, limit: int, batch_size: int, backend):
    """lm-eval's own run of the task with `backend` "hf" (HFLM) or "still" (StillLM)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from eval.lm_eval_backend import StillLM

    name = "still_bench_" + re.sub(r"\W", "_", task.name)
    with tempfile.TemporaryDirectory() as include_dir:
        config = lm_eval_task_yaml(task, data_file, name)
        (Path(include_dir) / f"{name}.yaml").write_text(yaml.safe_dump(config))
        if backend == "hf":
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device="cpu")
        else:
            lm = StillLM(model=model, tokenizer=tokenizer, batch_size=batch_size)
        task_manager = TaskManager(include_path=include_dir)
        started = time.perf_counter()
        output = simple_evaluate(
            model=lm,
            tasks=[name],
            task_manager=task_manager,
            limit=limit,
            apply_chat_template=task.chat_template,
            system_instruction=task.system,
            log_samples=True,
        )
        seconds = time.perf_counter() - started
    metrics = output["results"][name]
    samples = sorted(output["samples"][name], key=lambda s: s["doc_id"])
    return metrics, samples, seconds


def main() -> None:
    args = parse_args()
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        sys.exit("lm-eval is not installed: pip install -e .")
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(args.model) if args.model else default_model_dir()
    task = load_task(args.task) if not args.data else _task_with_data(args.task, Path(args.data))
    data_file = task.resolve(task.data.path)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    # Alternating runs share whatever else the machine is doing; the best of each is compared.
    seconds = {"still": math.inf, "lm-eval still": math.inf, "lm-eval hf": math.inf}
    for _ in range(args.repeats):
        ours, our_samples, elapsed = run_still(model, tokenizer, task, args.limit, args.batch_size)
        seconds["still"] = min(seconds["still"], elapsed)
        results = {}
        for backend in ("still", "hf"):
            results[backend] = run_lm_eval(
                model, tokenizer, task, data_file, args.limit, args.batch_size, backend
            )
            label = f"lm-eval {backend}"
            seconds[label] = min(seconds[label], results[backend][2])
    (backend_metrics, backend_samples, _), (theirs, their_samples, _) = (
        results["still"],
        results["hf"],
    )
    n = ours["n"]
    print(
        f"model {model_dir}  task {task.name}  questions {n}  batch size {args.batch_size}  "
        f"fp32 CPU, {torch.get_num_threads()} threads, best of {args.repeats}"
    )
    agree = print_agreement(ours, backend_metrics, theirs)
    same_prompts = all(
        o["prompt"] == t["arguments"][0][0] for o, t in zip(our_samples, their_samples)
    )
    hf_logliks = [float(r[0][0]) for t in their_samples for r in t["resps"]]
    harness_gap = max_gap([ll for o in our_samples for ll in o["logliks"]], hf_logliks)
    backend_gap = max_gap([float(r[0][0]) for t in backend_samples for r in t["resps"]], hf_logliks)
    print(
        f"same prompts: {same_prompts}   max |loglik difference| to hf over all choices: "
        f"still {harness_gap:.2e}, lm-eval still backend {backend_gap:.2e}"
    )
    hf_rate = n / seconds["lm-eval hf"]
    for label, elapsed in seconds.items():
        rate = n / elapsed
        print(
            f"throughput  {label:<14} {rate:7.2f} q/s ({elapsed:6.1f} s)  {rate / hf_rate:.2f}x hf"
        )
    our_tokens, their_tokens = tokens_through_model(tokenizer, task, our_samples)
    print(
        f"tokens through the model  still (both) {our_tokens}   lm-eval hf {their_tokens}   "
        f"(context once per question vs once per choice)"
    )
    agree &= backend_gap <= 1e-4
    print("agreement within 0.5 points and 1e-4 log-likelihood:", "yes" if agree else "NO")
    sys.exit(0 if agree else 1)


def print_agreement(ours: dict, backend: dict, theirs: dict) -> bool:
    print(
        f"{'metric':<10}{'still':>10}{'lm-eval still':>15}{'lm-eval hf':>12}{'max diff (pts)':>16}"
    )
    agree = True
    for metric in ("acc", "acc_norm"):
        values = [
            ours["metrics"][metric]["mean"],
            backend[f"{metric},none"],
            theirs[f"{metric},none"],
        ]
        difference = 100 * max(abs(value - values[2]) for value in values)
        agree &= difference <= AGREEMENT_POINTS
        print(
            f"{metric:<10}{values[0]:>10.4f}{values[1]:>15.4f}{values[2]:>12.4f}{difference:>16.2f}"
        )
    return agree


def max_gap(ours: list[float], theirs: list[float]) -> float:
    assert len(ours) == len(theirs), "the runs scored different choices"
    return max(abs(a - b) for a, b in zip(ours, theirs))


def tokens_through_model(tokenizer, task, samples: list[dict]) -> tuple[int, int]:
    """Input tokens: ours packs context + all choices; lm-eval: context + choice, per choice."""
    ours = theirs = 0
    for sample in samples:
        pairs = [
            encode_pair(tokenizer, sample["prompt"], task.delimiter + c) for c in sample["choices"]
        ]
        context_length = len(pairs[0][0])
        ours += context_length + sum(len(continuation) - 1 for _, continuation in pairs)
        theirs += sum(context_length + len(continuation) - 1 for _, continuation in pairs)
    return ours, theirs


def _task_with_data(task_path: str, data: Path):
    """The task as written, but reading `data` (e.g. a dataset built outside the repo)."""
    raw = yaml.safe_load(Path(task_path).read_text())
    raw["data"] = {"path": str(data.resolve())}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        yaml.safe_dump(raw, handle)
    try:
        return load_task(handle.name)
    finally:
        Path(handle.name).unlink()


if __name__ == "__main__":
    main()
