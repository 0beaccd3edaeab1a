"""SFT throughput: `still` finetune vs TRL SFTTrainer (its defaults) vs plain HF Trainer with padding.

    python benchmarks/sft_throughput.py                       # CPU, built-in SmolLM2, 30 steps
    python benchmarks/sft_throughput.py --device cuda --batch-size 32 --steps 50
    python benchmarks/sft_throughput.py --steps 2 --examples 16 --model /tmp/tiny   # smoke test

Every variant trains a fresh adapter on the same base model, rows (data/pydocs/train.jsonl,
mixed lengths), LoRA config, lr schedule, optimizer, seed, max length, global batch and steps,
and sees the same examples in the same order (checked: per-step token counts must match).
Variants, each in its own subprocess:
  still        what `still run` builds for `method: lora, data.packing: true` (build_trainer)
  trl          trl.SFTTrainer, conversational prompt-completion rows, TRL's defaults otherwise
  hf           plain transformers.Trainer on still's rows, padded per batch
  still-fullce, still-compile, still-liger, still-blockmask, still-loop
               `still` with one switch changed: the model's own loss, torch.compile, Liger
               (CUDA), the 4-D block mask instead of packed sdpa, packed sdpa without torch's
               varlen kernel
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
import math
import os
import platform
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_VARIANTS = "still,trl,hf,trl-matched"
DATA_FILE = ROOT / "data/pydocs/train.jsonl"
# Dense bf16 tensor-core peaks (no sparsity), TFLOPS, from the vendors' datasheets; the first
# key found as a whole word in the device name wins. None: look it up, pass --peak-tflops.
PEAK_BF16_TFLOPS = {"H200 NVL": None, "H100 NVL": None, "H200": 989.0, "H100 PCIe": 756.0,
                    "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}
# `still` with one recipe switch changed, for attribution: the model's own full-logits loss
# instead of chunked CE, torch.compile, Liger's Triton kernels (CUDA), and (not a recipe switch)
# plain sdpa with a block-diagonal mask over the packed row instead of packed sdpa, and packed
# sdpa without torch's varlen kernel.
STILL_VARIANTS = {"still": {}, "still-fullce": {"loss_chunk_size": None},
                  "still-compile": {"torch_compile": True}, "still-liger": {"liger_kernel": True},
                  "still-blockmask": {}, "still-loop": {}}
LOSS_COVERS = {
    "still": "assistant reply + <|im_end|>",
    **{name: "as still" for name in STILL_VARIANTS if name != "still"},
    "hf": "same tokens as still",
    "trl": "completion: reply + <|im_end|> + template newline",
    "trl-matched": "as trl",
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct",
                        help="model reference still resolves (builtin:NAME, local HF dir, ...)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                        help=f"comma-separated, from {DEFAULT_VARIANTS}")
    parser.add_argument("--method", default="lora", choices=["lora", "full"])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--examples", type=int, default=None,
                        help="rows to train on (default: steps × global batch, each seen once)")
    parser.add_argument("--lengths", default="mixed", choices=["mixed", "natural"])
    parser.add_argument("--max-len", type=int, default=192)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup-ratio", type=float, default=0.05)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-alpha", type=float, default=32)
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup-steps", type=int, default=1,
                        help="steps left out of tokens/s (first-step overheads)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run the whole set of variants this many times; the fastest run counts")
    parser.add_argument("--peak-tflops", type=float, default=None, help="GPU dense bf16 peak for MFU")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="torch.profiler over N steps per variant; prints top operators")
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
    texts = [tokenizer.apply_chat_template(
        [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}],
        tokenize=False) for row in rows]
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
    return (f"min {ordered[0]}, p25 {quantile(0.25)}, median {statistics.median(ordered):g}, "
            f"p75 {quantile(0.75)}, max {ordered[-1]}, mean {statistics.fmean(ordered):.1f}")


# --------------------------------------------------------------------------- measuring (child)
class Meter:
    """Counts tokens in the model's forward and times the loop's phases through callbacks."""

    def __init__(self, cuda: bool, profile_steps: tuple[int, int] | None):
        import torch

        self.torch, self.cuda = torch, cuda
        self.profile_steps, self.profiler = profile_steps, None
        self.effective = self.computed = self.loss_tokens = 0
        self._collated_loss_tokens: list[int] = []
        self.attention_pairs = 0  # Σ over examples of n(n+1)/2: causal (query, key) pairs
        self.forward_s = 0.0
        self._forward_start = 0.0
        self.steps: list[dict] = []

    def _now(self) -> float:
        if self.cuda:
            self.torch.cuda.synchronize()
        return time.perf_counter()

    # forward hooks on the trained model
    def before_forward(self, module, args, kwargs):
        input_ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        positions = kwargs.get("position_ids")
        if mask is not None and mask.dim() == 2:  # padded batch
            lengths = mask.sum(dim=1).tolist()
        elif positions is not None and positions.size(0) == 1:  # packed: a restart per example
            starts = (positions[0] == 0).nonzero().flatten().tolist() + [positions.size(1)]
            lengths = [b - a for a, b in zip(starts, starts[1:])]
        else:
            lengths = [input_ids.size(1)] * input_ids.size(0)
        self.effective += sum(lengths)
        self.computed += input_ids.numel()
        self.attention_pairs += sum(n * (n + 1) // 2 for n in lengths)
        self.loss_tokens += self._collated_loss_tokens.pop(0)
        self._forward_start = self._now()

    def counting(self, collator):
        """The collator, counting loss tokens (still's loss takes the labels out of the forward).
        Trainer collates a step's batches before the step begins; each forward takes its count."""
        def collate(features):
            batch = collator(features)
            self._collated_loss_tokens.append(int((batch["labels"][:, 1:] != -100).sum()))
            return batch
        return collate

    def after_forward(self, module, args, kwargs, output):
        self.forward_s += self._now() - self._forward_start

    def callback(self):
        from transformers import TrainerCallback

        meter = self

        class MeterCallback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                if meter.cuda:
                    meter.torch.cuda.reset_peak_memory_stats()
                meter.begin = meter.last = meter._now()

            def on_step_begin(self, args, state, control, **kwargs):
                if meter.profile_steps and state.global_step == meter.profile_steps[0]:
                    meter.start_profiler()
                meter.step_start = meter._now()
                meter.forward_at_start = meter.forward_s
                meter.at_start = (meter.effective, meter.computed, meter.loss_tokens, meter.attention_pairs)

            def on_pre_optimizer_step(self, args, state, control, **kwargs):
                meter.pre_optimizer = meter._now()

            def on_step_end(self, args, state, control, **kwargs):
                now = meter._now()
                forward = meter.forward_s - meter.forward_at_start
                counts = (meter.effective, meter.computed, meter.loss_tokens, meter.attention_pairs)
                delta = [after - before for after, before in zip(counts, meter.at_start)]
                meter.steps.append({
                    "end": now - meter.begin, "seconds": now - meter.last,
                    "data": meter.step_start - meter.last, "forward": forward,
                    "backward": meter.pre_optimizer - meter.step_start - forward,
                    "optimizer": now - meter.pre_optimizer, "effective": delta[0],
                    "computed": delta[1], "loss_tokens": delta[2], "attention_pairs": delta[3],
                })
                meter.last = now
                if meter.profiler is not None and state.global_step == meter.profile_steps[1]:
                    meter.stop_profiler()

        return MeterCallback()

    def start_profiler(self):
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self.profiler = profile(activities=activities)
        self.profiler.__enter__()

    def stop_profiler(self):
        self.profiler.__exit__(None, None, None)
        sort = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        self.profile_table = self.profiler.key_averages().table(sort_by=sort, row_limit=15)
        self.profiler = None


def matmul_params(model) -> int:
    """Base-model parameters used in matmuls per token: all but the adapter's, minus an untied
    input embedding (a lookup). `parameters()` yields a tied embedding/head weight once."""
    total = sum(p.numel() for name, p in model.named_parameters() if "lora_" not in name)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is embedding.weight
    return total if tied else total - embedding.weight.numel()


def write_recipe(args, work: Path) -> Path:
    import yaml

    recipe = {
        "kind": "finetune", "name": "bench-sft-throughput",
        "model": {"ref": str(args.model_dir)}, "method": args.method,
        "lora": {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout,
                 "target": "all-linear"},
        "data": {"train": {"path": str(work / "rows.jsonl"), "format": "instruction",
                           "prompt": "question", "response": "answer"},
                 "max_len": args.max_len, "packing": True},
        "train": {"lr": args.lr, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
                  "max_steps": args.steps, "warmup_ratio": args.warmup_ratio, "seed": args.seed,
                  "save_steps": args.steps + 1,  # no checkpoint inside the timed loop
                  **STILL_VARIANTS.get(args.variant, {})},
    }
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def shared_arguments(args, recipe) -> dict:
    """The hyperparameters every variant shares, as TrainingArguments/SFTConfig keywords."""
    from finetune.sft import precision_flags

    train = recipe.train
    return dict(
        per_device_train_batch_size=train.batch_size, gradient_accumulation_steps=train.grad_accum,
        learning_rate=train.lr, max_steps=train.max_steps,
        warmup_steps=math.ceil(train.warmup_ratio * train.max_steps),
        lr_scheduler_type=train.scheduler, optim=train.optimizer, weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm, seed=train.seed, data_seed=train.seed,
        logging_steps=1, save_strategy="no", report_to=[],
        # TRL's default bf16=True stops on a CPU-only machine unless use_cpu is set (its own advice).
        use_cpu=args.device == "cpu", **(
            {} if args.variant == "trl" else precision_flags(train)),
    )


def build_still(args, recipe, work: Path, meter: Meter):
    from transformers import Trainer, set_seed

    from finetune import sft
    from still import data as data_module
    from still import models
    from still.checkpoint import reliability_callbacks

    tokenizer = models.load_tokenizer(recipe.model.ref)
    started = time.perf_counter()
    prepared = data_module.prepare(recipe.data, tokenizer, split="train", cache_dir=work / "cache",
                                   progress=False)
    tokenize_s = time.perf_counter() - started
    set_seed(recipe.train.seed)
    model = sft.build_model(recipe)
    if args.variant == "still-blockmask":  # what packing did before packed sdpa
        sft.packed_attention = lambda *models: "block_mask"
    if args.variant == "still-loop":
        from still import attention

        attention._varlen.devices = ()
    if args.variant in STILL_VARIANTS:
        training_args = sft.training_arguments(recipe, work / "run", has_eval=False,
                                               total_steps=recipe.train.max_steps, report=[])
        trainer = sft.build_trainer(recipe, model, tokenizer, prepared, None, training_args,
                                    [meter.callback(), *reliability_callbacks(recipe.train)])
    else:  # hf: still's tokens and labels, plain padding
        from transformers import DataCollatorForSeq2Seq, TrainingArguments

        training_args = TrainingArguments(output_dir=str(work / "run"), remove_unused_columns=False,
                                          **shared_arguments(args, recipe))
        collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
        trainer = Trainer(model=model, args=training_args, data_collator=collator, processing_class=tokenizer,
                          train_dataset=prepared.dataset.select_columns(["input_ids", "labels"]),
                          callbacks=[meter.callback()])
    settings = {"gradient_checkpointing": training_args.gradient_checkpointing, "bf16": training_args.bf16}
    return trainer, tokenize_s, settings


def build_trl(args, recipe, work: Path, meter: Meter):
    import datasets
    import torch
    from trl import SFTConfig, SFTTrainer

    from finetune.sft import lora_config
    from still import models

    # What SFTTrainer does with a model path, by default fp32 weights; trl-matched: still's dtype
    # (fp32 on CPU, bf16 on CUDA). Loaded here so that the load is not timed as tokenization.
    dtype = models.pick_dtype() if args.variant == "trl-matched" else torch.float32
    try:
        from trl.trainer.utils import create_model_from_path
    except ImportError:  # older TRL: the plain load it did
        from transformers import AutoModelForCausalLM

        create_model_from_path = AutoModelForCausalLM.from_pretrained
    model = create_model_from_path(str(recipe.model.ref), dtype=dtype)
    tokenizer = models.load_tokenizer(recipe.model.ref)
    rows = [json.loads(line) for line in (work / "rows.jsonl").open()]
    dataset = datasets.Dataset.from_list([
        {"prompt": [{"role": "user", "content": row["question"]}],
         "completion": [{"role": "assistant", "content": row["answer"]}]} for row in rows])
    matched = {"gradient_checkpointing": False} if args.variant == "trl-matched" else {}
    config = SFTConfig(output_dir=str(work / "run"), max_length=recipe.data.max_len,
                       **shared_arguments(args, recipe), **matched)
    started = time.perf_counter()  # SFTTrainer tokenizes (and adds the adapter) while constructed
    peft_config = lora_config(recipe.lora, recipe.method) if recipe.method != "full" else None
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[meter.callback()])
    tokenize_s = time.perf_counter() - started
    return trainer, tokenize_s, {"gradient_checkpointing": config.gradient_checkpointing, "bf16": config.bf16}


def measure_variant(args) -> dict:
    """Child process: build one variant, train it, return its measurements."""
    import torch

    from still import recipe as recipe_module

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    work = args.work_dir
    args.model_dir = json.loads((work / "setup.json").read_text())["model_dir"]
    recipe = recipe_module.load(write_recipe(args, work / args.variant))
    profile_steps = (args.warmup_steps, args.warmup_steps + args.profile) if args.profile else None
    meter = Meter(cuda, profile_steps)
    build = build_trl if args.variant.startswith("trl") else build_still
    trainer, tokenize_s, settings = build(args, recipe, work / args.variant, meter)
    trainer.data_collator = meter.counting(trainer.data_collator)
    n_params = matmul_params(trainer.model)
    trainer.model.register_forward_pre_hook(meter.before_forward, with_kwargs=True)
    trainer.model.register_forward_hook(meter.after_forward, with_kwargs=True)
    config = trainer.model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    trainer.train()
    losses = {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}
    return {
        "variant": args.variant, "tokenize_s": tokenize_s, "steps": meter.steps,
        "losses": [losses.get(step + 1) for step in range(len(meter.steps))],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "matmul_params": n_params, "layers": config.num_hidden_layers,
        "attention_width": heads * head_dim,
        "profile": getattr(meter, "profile_table", None), **settings,
    }


# --------------------------------------------------------------------------- orchestration (parent)
def run_in_subprocess(variant: str, work: Path, device: str) -> dict:
    command = [sys.executable, __file__, *sys.argv[1:], "--variant", variant, "--work-dir", str(work)]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", WANDB_DISABLED="true", WANDB_MODE="disabled")
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
    flops = (factor * result["matmul_params"] * total("effective")
             + 12 * result["layers"] * result["attention_width"] * total("attention_pairs"))
    losses = [loss for loss in result["losses"] if loss is not None]
    tail = losses[-max(1, len(losses) // 4):]
    return {
        **result, "timed_steps": len(timed), "timed_s": seconds,
        "tokens_per_s": total("effective") / seconds,
        "effective_total": sum(step["effective"] for step in steps),
        "computed_total": sum(step["computed"] for step in steps),
        "loss_tokens_total": sum(step["loss_tokens"] for step in steps),
        "phase_s": {key: total(key) / len(timed) for key in ("data", "forward", "backward", "optimizer")},
        "mfu": flops / seconds / (peak_tflops * 1e12) if peak_tflops else None,
        "final_loss": losses[-1] if losses else float("nan"),
        "tail_loss": statistics.fmean(tail) if tail else float("nan"),
    }


def hardware(device: str) -> tuple[str, float | None, str]:
    import torch

    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    description = f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    if device != "cuda":
        return description, None, ""
    name = torch.cuda.get_device_name(0)
    peak = next((value for key, value in PEAK_BF16_TFLOPS.items()
                 if re.search(rf"\b{re.escape(key)}(?![A-Za-z0-9])", name)), None)
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
    return (f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl_version}, "
            f"peft {peft.__version__}, python {platform.python_version()}")


def print_report(args, results: list[dict], header: list[str]) -> None:
    by_name = {result["variant"]: result for result in results}
    trl_rate = by_name["trl"]["tokens_per_s"] if "trl" in by_name else None
    print("\n".join(header))
    print()
    mfu_column = args.device == "cuda"
    print("| variant | effective tokens/s | ratio vs trl | peak MB | final loss | loss, last 25% | "
          "loss covers | padding | grad ckpt | bf16 | tokenize s |" + (" MFU |" if mfu_column else ""))
    print("|---|---:|---:|---:|---:|---:|---|---:|---|---|---:|" + ("---:|" if mfu_column else ""))
    for result in results:
        ratio = f"{result['tokens_per_s'] / trl_rate:.2f}x" if trl_rate else "n/a"
        peak = result["cuda_peak_mb"] if args.device == "cuda" else result["peak_rss_mb"]
        padding = 1 - result["effective_total"] / result["computed_total"]
        mfu = "" if not mfu_column else (f" {result['mfu']:.1%} |" if result["mfu"] is not None else " n/a |")
        print(f"| {result['variant']} | {result['tokens_per_s']:.1f} | {ratio} | {peak:.0f} | "
              f"{result['final_loss']:.4f} | {result['tail_loss']:.4f} | {LOSS_COVERS[result['variant']]} | "
              f"{padding:.0%} | {'on' if result['gradient_checkpointing'] else 'off'} | "
              f"{'on' if result['bf16'] else 'off'} | {result['tokenize_s']:.1f} |{mfu}")
    print()
    print("| variant | s/step | data+log | forward | backward (+clip) | optimizer | "
          "effective tokens | computed tokens | loss tokens |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for result in results:
        phase = result["phase_s"]
        per_step = result["timed_s"] / result["timed_steps"]
        print(f"| {result['variant']} | {per_step:.2f} | {phase['data']:.2f} | "
              f"{phase['forward']:.2f} | {phase['backward']:.2f} | {phase['optimizer']:.2f} | "
              f"{result['effective_total']} | {result['computed_total']} | {result['loss_tokens_total']} |")
    print()
    reference = by_name.get("still") or results[0]
    same_batches = all([s["effective"] for s in r["steps"]] == [s["effective"] for s in reference["steps"]]
                       for r in results)
    print(f"same examples per step in every variant (per-step effective tokens equal): "
          f"{'yes' if same_batches else 'NO'}")
    for result in results:
        if result is reference:
            continue
        pairs = [(a, b) for a, b in zip(reference["losses"], result["losses"])
                 if a is not None and b is not None]
        if pairs:
            gaps = [abs(a - b) for a, b in pairs]
            print(f"loss curve {result['variant']} vs {reference['variant']}: max |diff| {max(gaps):.4f}, "
                  f"mean |diff| {statistics.fmean(gaps):.4f} over {len(pairs)} steps "
                  f"(loss tokens {result['loss_tokens_total']} vs {reference['loss_tokens_total']})")
    if "still" in by_name and trl_rate:
        ratio = by_name["still"]["tokens_per_s"] / trl_rate
        print(f"goal still ≥ 1.5x trl defaults (effective tokens/s): {ratio:.2f}x — "
              f"{'reached' if ratio >= 1.5 else 'NOT reached'}")
    if args.profile:
        print("(profiled run: torch.profiler was on for some steps; do not quote these rates)")
        for result in results:
            print(f"\n--- top operators, {result['variant']}, {args.profile} steps ---\n{result['profile']}")


def main() -> None:
    args = parse_args()
    if args.variant:
        print(json.dumps(measure_variant(args)))
        return
    import torch
    from transformers import AutoTokenizer

    from still.models import resolve_model_dir

    variants = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = set(variants) - set(LOSS_COVERS)
    if unknown:
        sys.exit(f"unknown variants: {', '.join(sorted(unknown))} (choose from {', '.join(LOSS_COVERS)})")
    if args.profile and args.warmup_steps + args.profile > args.steps:
        sys.exit(f"--profile {args.profile} needs --steps ≥ {args.warmup_steps + args.profile}")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device visible")
    if args.device == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    model_dir = resolve_model_dir(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    all_rows = [json.loads(line) for line in DATA_FILE.open() if line.strip()]
    rows, lengths = select_rows(all_rows, render_lengths(tokenizer, all_rows), args.examples, args.lengths,
                                args.seed)
    description, table_peak, gpu_name = hardware(args.device)
    peak_tflops = args.peak_tflops or table_peak
    global_batch = args.batch_size * args.grad_accum
    header = [
        f"SFT throughput, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC — {description}",
        f"{versions()}",
        f"model {args.model} ({args.method}, r {args.lora_r}, alpha {args.lora_alpha:g}, all-linear), "
        f"{args.device}, {args.steps} steps × global batch {global_batch} "
        f"({args.batch_size} × {args.grad_accum}), max_len {args.max_len}, lr {args.lr:g} cosine, "
        f"seed {args.seed}",
        f"data {DATA_FILE.relative_to(ROOT)}: {len(rows)} rows ({args.lengths} lengths), tokens per example: "
        f"{distribution(lengths)}",
        f"tokens/s over steps {args.warmup_steps + 1}..{args.steps} (loop time only)"
        + (f"; MFU against {peak_tflops:g} TFLOPS bf16 ({gpu_name})" if args.device == "cuda" and peak_tflops
           else "; MFU: pass --peak-tflops" if args.device == "cuda" else ""),
    ]
    best: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="still-sft-bench-") as work_dir:
        work = Path(work_dir)
        (work / "setup.json").write_text(json.dumps({"model_dir": str(model_dir)}))
        for repeat in range(args.repeats):
            for variant in variants:
                (work / variant).mkdir(exist_ok=True)
                (work / variant / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
                print(f"[{repeat + 1}/{args.repeats}] running {variant} ...", file=sys.stderr, flush=True)
                result = summarise(run_in_subprocess(variant, work, args.device), args, peak_tflops)
                if variant not in best or result["tokens_per_s"] > best[variant]["tokens_per_s"]:
                    best[variant] = result
                # So that a run cut short (a time limit) still leaves what it measured.
                print(f"    {variant}: {result['tokens_per_s']:.1f} effective tokens/s, "
                      f"{result['timed_s'] / result['timed_steps']:.3f} s/step", file=sys.stderr, flush=True)
                if args.json:
                    args.json.write_text(json.dumps({"header": header, "lengths": lengths, "partial": True,
                                                     "results": list(best.values())}, indent=1))
    results = [best[variant] for variant in variants]
    print_report(args, results, header)
    if args.json:
        args.json.write_text(json.dumps({"header": header, "lengths": lengths, "results": results}, indent=1))


if __name__ == "__main__":
    main()
