"""SFT throughput: `still` finetune vs TRL SFTTrainer (its defaults) vs plain HF Trainer, padded.

    python benchmarks/sft_throughput.py                       # CPU, built-in SmolLM2, 30 steps
    python benchmarks/sft_throughput.py --device cuda --batch-size 32 --steps 50
    python benchmarks/sft_throughput.py --steps 2 --examples 16 --model /tmp/tiny   # smoke test

Every variant trains a fresh adapter on the same base model, rows (data/pydocs/train.jsonl,
mixed lengths), LoRA config, lr schedule, optimizer, seed, max length, global batch and steps,
and sees the same examples in the same order (checked: per-step token counts must match).
Variants, each in its own subprocess (built and measured by benchmarks/sft_variants.py):
  still        what `still run` builds for `method: lora, data.packing: true` (build_trainer)
  trl          trl.SFTTrainer, conversational prompt-completion rows, TRL's defaults otherwise
  hf           plain transformers.Trainer on still's rows, padded per batch
  still-fullce, still-compile, still-liger, still-gc, still-blockmask, still-loop
               `still` with one switch changed: the model's own loss, torch.compile, Liger
               (CUDA), gradient checkpointing, the 4-D block mask instead of packed sdpa,
               packed sdpa without torch's varlen kernel
  trl-matched  TRL without gradient checkpointing, with still's weights dtype and precision
Reported: effective (non-padding) tokens/s over the training loop after `--warmup-steps`, the
per-step split (data+log, forward, backward, optimizer), peak memory (CPU ru_maxrss, CUDA
max_memory_allocated), loss curves compared step by step, and on CUDA MFU: (4N for LoRA, 6N
for full) per effective token plus 12·layers·heads·head_dim per causal (query, key) pair within
an example, over the GPU's dense bf16 peak. The setup, every deviation from the tools'
defaults, and how each number is taken: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sft_variants import STILL_VARIANTS, measure_variant  # noqa: E402  (the child side, next to this file)

DEFAULT_VARIANTS = "still,trl,hf,trl-matched"
DATA_FILE = ROOT / "data/pydocs/train.jsonl"
# Dense bf16 tensor-core peaks (no sparsity), TFLOPS, from the vendors' datasheets; the first
# key found as a whole word in the device name wins. None: look it up, pass --peak-tflops.
PEAK_BF16_TFLOPS = {
    "H200 NVL": None,
    "H100 NVL": None,
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
}
LOSS_COVERS = {
    "still": "assistant reply + <|im_end|>",
    **{name: "as still" for name in STILL_VARIANTS if name != "still"},
    "hf": "same tokens as still",
    "trl": "completion: reply + <|im_end|> + template newline",
    "trl-matched": "as trl",
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default="builtin:smollm2-135m-instruct",
        help="model reference still resolves (builtin:NAME, local HF dir, ...)",
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--variants", default=DEFAULT_VARIANTS, help=f"comma-separated, from {DEFAULT_VARIANTS}"
    )
    parser.add_argument("--method", default="lora", choices=["lora", "full"])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument(
        "--examples",
        type=int,
        default=None,
        help="rows to train on (default: steps × global batch, each seen once)",
    )
    parser.add_argument("--lengths", default="mixed", choices=["mixed", "natural"])
    parser.add_argument("--max-len", type=int, default=192)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup-ratio", type=float, default=0.05)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-alpha", type=float, default=32)
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--warmup-steps",
        type=int,
        default=1,
        help="steps left out of tokens/s (first-step overheads)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run the whole set of variants this many times; the fastest run counts",
    )
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="GPU dense bf16 peak for MFU"
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="torch.profiler over N steps per variant; prints top operators",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write all results here")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.examples is None:
        args.examples = args.steps * args.batch_size * args.grad_accum
    return args


# --------------------------------------------------------------------------- data selection
def render_lengths(tokenizer, rows: list[dict]) -> list[int]:
    """Tokens of each row as a [user, assistant] chat, the way every variant renders it."""
    texts = [
        tokenizer.apply_chat_template(
            [
                {"role": "user", "content": row["question"]},
                {"role": "assistant", "content": row["answer"]},
            ],
            tokenize=False,
        )
        for row in rows
    ]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def select_rows(rows: list[dict], lengths: list[int], count: int, how: str, seed: int):
    """`count` (row, length) pairs: evenly spread over the length range, or a random sample."""
    if count > len(rows):
        sys.exit(f"--examples {count} is more than the {len(rows)} rows in {DATA_FILE}")
    rng = random.Random(seed)
    order = list(range(len(rows)))
    rng.shuffle(order)  # ties between equal lengths break at random, reproducibly
    if how == "natural":
        chosen = order[:count]
    else:
        by_length = sorted(order, key=lambda index: lengths[index])
        low, high = lengths[by_length[0]], lengths[by_length[-1]]
        used, chosen = set(), []
        for step in range(count):
            target = low + (high - low) * step / max(count - 1, 1)
            candidates = sorted(by_length, key=lambda index: abs(lengths[index] - target))
            pick = next(index for index in candidates if index not in used)
            used.add(pick)
            chosen.append(pick)
        rng.shuffle(chosen)
    return [rows[index] for index in chosen], [lengths[index] for index in chosen]


def distribution(lengths: list[int]) -> str:
    ordered = sorted(lengths)
    quantile = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return (
        f"min {ordered[0]}, p25 {quantile(0.25)}, median {statistics.median(ordered):g}, "
        f"p75 {quantile(0.75)}, max {ordered[-1]}, mean {statistics.fmean(ordered):.1f}"
    )


# --------------------------------------------------------------------------- orchestration (parent)
def run_in_subprocess(variant: str, work: Path, device: str) -> dict:
    command = [
        sys.executable,
        __file__,
        *sys.argv[1:],
        "--variant",
        variant,
        "--work-dir",
        str(work),
    ]
    env = dict(
        os.environ, TOKENIZERS_PARALLELISM="false", WANDB_DISABLED="true", WANDB_MODE="disabled"
    )
    # CPU: hide GPUs (still picks CUDA whenever it sees one). CUDA: one GPU, or Trainer would wrap
    # the model in DataParallel across all of them.
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    env["CUDA_VISIBLE_DEVICES"] = "" if device == "cpu" else visible
    finished = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if finished.returncode != 0:
        sys.exit(f"variant {variant} failed:\n{finished.stderr[-6000:]}")
    return json.loads(finished.stdout.strip().splitlines()[-1])


def summarise(result: dict, args, peak_tflops: float | None) -> dict:
    steps = result["steps"]
    skip = args.warmup_steps if len(steps) > args.warmup_steps else 0
    timed = steps[skip:]
    seconds = steps[-1]["end"] - (steps[skip - 1]["end"] if skip else 0.0)
    total = lambda key: sum(step[key] for step in timed)  # noqa: E731
    factor = 4 if args.method == "lora" else 6
    flops = factor * result["matmul_params"] * total("effective") + 12 * result["layers"] * result[
        "attention_width"
    ] * total("attention_pairs")
    losses = [loss for loss in result["losses"] if loss is not None]
    tail = losses[-max(1, len(losses) // 4) :]
    return {
        **result,
        "timed_steps": len(timed),
        "timed_s": seconds,
        "tokens_per_s": total("effective") / seconds,
        "effective_total": sum(step["effective"] for step in steps),
        "computed_total": sum(step["computed"] for step in steps),
        "loss_tokens_total": sum(step["loss_tokens"] for step in steps),
        "phase_s": {
            key: total(key) / len(timed) for key in ("data", "forward", "backward", "optimizer")
        },
        "mfu": flops / seconds / (peak_tflops * 1e12) if peak_tflops else None,
        "final_loss": losses[-1] if losses else float("nan"),
        "tail_loss": statistics.fmean(tail) if tail else float("nan"),
    }


def hardware(device: str) -> tuple[str, float | None, str]:
    import torch

    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(
                line.split(":", 1)[1].strip() for line in info if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    description = f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    if device != "cuda":
        return description, None, ""
    name = torch.cuda.get_device_name(0)
    peak = next(
        (
            value
            for key, value in PEAK_BF16_TFLOPS.items()
            if re.search(rf"\b{re.escape(key)}(?![A-Za-z0-9])", name)
        ),
        None,
    )
    return f"{name}; host {description}", peak, name


def versions() -> str:
    import peft
    import torch
    import transformers

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = "not installed"
    return (
        f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl_version}, "
        f"peft {peft.__version__}, python {platform.python_version()}"
    )


def print_report(args, results: list[dict], header: list[str]) -> None:
    by_name = {result["variant"]: result for result in results}
    trl_rate = by_name["trl"]["tokens_per_s"] if "trl" in by_name else None
    print("\n".join(header))
    print()
    mfu_column = args.device == "cuda"
    print(
        "| variant | effective tokens/s | ratio vs trl | peak MB | final loss | loss, last 25% | "
        "loss covers | padding | grad ckpt | bf16 | tokenize s |" + (" MFU |" if mfu_column else "")
    )
    print("|---|---:|---:|---:|---:|---:|---|---:|---|---|---:|" + ("---:|" if mfu_column else ""))
    for result in results:
        ratio = f"{result['tokens_per_s'] / trl_rate:.2f}x" if trl_rate else "n/a"
        peak = result["cuda_peak_mb"] if args.device == "cuda" else result["peak_rss_mb"]
        padding = 1 - result["effective_total"] / result["computed_total"]
        mfu = (
            ""
            if not mfu_column
            else (f" {result['mfu']:.1%} |" if result["mfu"] is not None else " n/a |")
        )
        print(
            f"| {result['variant']} | {result['tokens_per_s']:.1f} | {ratio} | {peak:.0f} | "
            f"{result['final_loss']:.4f} | {result['tail_loss']:.4f} | "
            f"{LOSS_COVERS[result['variant']]} | "
            f"{padding:.0%} | {'on' if result['gradient_checkpointing'] else 'off'} | "
            f"{'on' if result['bf16'] else 'off'} | {result['tokenize_s']:.1f} |{mfu}"
        )
    print()
    print(
        "| variant | s/step | data+log | forward | backward (+clip) | optimizer | "
        "effective tokens | computed tokens | loss tokens |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for result in results:
        phase = result["phase_s"]
        per_step = result["timed_s"] / result["timed_steps"]
        print(
            f"| {result['variant']} | {per_step:.2f} | {phase['data']:.2f} | "
            f"{phase['forward']:.2f} | {phase['backward']:.2f} | {phase['optimizer']:.2f} | "
            f"{result['effective_total']} | {result['computed_total']} | "
            f"{result['loss_tokens_total']} |"
        )
    print()
    reference = by_name.get("still") or results[0]
    same_batches = all(
        [s["effective"] for s in r["steps"]] == [s["effective"] for s in reference["steps"]]
        for r in results
    )
    print(
        f"same examples per step in every variant (per-step effective tokens equal): "
        f"{'yes' if same_batches else 'NO'}"
    )
    for result in results:
        if result is reference:
            continue
        pairs = [
            (a, b)
            for a, b in zip(reference["losses"], result["losses"])
            if a is not None and b is not None
        ]
        if pairs:
            gaps = [abs(a - b) for a, b in pairs]
            print(
                f"loss curve {result['variant']} vs {reference['variant']}: "
                f"max |diff| {max(gaps):.4f}, "
                f"mean |diff| {statistics.fmean(gaps):.4f} over {len(pairs)} steps "
                f"(loss tokens {result['loss_tokens_total']} vs {reference['loss_tokens_total']})"
            )
    if "still" in by_name and trl_rate:
        ratio = by_name["still"]["tokens_per_s"] / trl_rate
        print(
            f"goal still ≥ 1.5x trl defaults (effective tokens/s): {ratio:.2f}x — "
            f"{'reached' if ratio >= 1.5 else 'NOT reached'}"
        )
    if args.profile:
        print("(profiled run: torch.profiler was on for some steps; do not quote these rates)")
        for result in results:
            print(
                f"\n--- top operators, {result['variant']}, {args.profile} steps ---\n"
                f"{result['profile']}"
            )


def main() -> None:
    args = parse_args()
    if args.variant:
        print(json.dumps(measure_variant(args)))
        return
    import torch
    from transformers import AutoTokenizer

    from still import models

    variants = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = set(variants) - set(LOSS_COVERS)
    if unknown:
        sys.exit(
            f"unknown variants: {', '.join(sorted(unknown))} (choose from {', '.join(LOSS_COVERS)})"
        )
    if args.profile and args.warmup_steps + args.profile > args.steps:
        sys.exit(f"--profile {args.profile} needs --steps ≥ {args.warmup_steps + args.profile}")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device visible")
    if args.device == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    # a local dir: the built-in's conversion, or the user's model dir
    model_dir = Path(models.resolve(args.model).weights)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    all_rows = [json.loads(line) for line in DATA_FILE.open() if line.strip()]
    rows, lengths = select_rows(
        all_rows, render_lengths(tokenizer, all_rows), args.examples, args.lengths, args.seed
    )
    description, table_peak, gpu_name = hardware(args.device)
    peak_tflops = args.peak_tflops or table_peak
    global_batch = args.batch_size * args.grad_accum
    header = [
        f"SFT throughput, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC — {description}",
        f"{versions()}",
        f"model {args.model} ({args.method}, r {args.lora_r}, alpha {args.lora_alpha:g}, "
        "all-linear), "
        f"{args.device}, {args.steps} steps × global batch {global_batch} "
        f"({args.batch_size} × {args.grad_accum}), max_len {args.max_len}, lr {args.lr:g} cosine, "
        f"seed {args.seed}",
        f"data {DATA_FILE.relative_to(ROOT)}: {len(rows)} rows ({args.lengths} lengths), "
        "tokens per example: "
        f"{distribution(lengths)}",
        f"tokens/s over steps {args.warmup_steps + 1}..{args.steps} (loop time only)"
        + (
            f"; MFU against {peak_tflops:g} TFLOPS bf16 ({gpu_name})"
            if args.device == "cuda" and peak_tflops
            else "; MFU: pass --peak-tflops"
            if args.device == "cuda"
            else ""
        ),
    ]
    best: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="still-sft-bench-") as work_dir:
        work = Path(work_dir)
        (work / "setup.json").write_text(json.dumps({"model_dir": str(model_dir)}))
        for repeat in range(args.repeats):
            for variant in variants:
                (work / variant).mkdir(exist_ok=True)
                (work / variant / "rows.jsonl").write_text(
                    "".join(json.dumps(row) + "\n" for row in rows)
                )
                print(
                    f"[{repeat + 1}/{args.repeats}] running {variant} ...",
                    file=sys.stderr,
                    flush=True,
                )
                result = summarise(run_in_subprocess(variant, work, args.device), args, peak_tflops)
                if variant not in best or result["tokens_per_s"] > best[variant]["tokens_per_s"]:
                    best[variant] = result
                # So that a run cut short (a time limit) still leaves what it measured.
                print(
                    f"    {variant}: {result['tokens_per_s']:.1f} effective tokens/s, "
                    f"{result['timed_s'] / result['timed_steps']:.3f} s/step",
                    file=sys.stderr,
                    flush=True,
                )
                if args.json:
                    args.json.write_text(
                        json.dumps(
                            {
                                "header": header,
                                "lengths": lengths,
                                "partial": True,
                                "results": list(best.values()),
                            },
                            indent=1,
                        )
                    )
    results = [best[variant] for variant in variants]
    print_report(args, results, header)
    if args.json:
        args.json.write_text(
            json.dumps({"header": header, "lengths": lengths, "results": results}, indent=1)
        )


if __name__ == "__main__":
    main()
