"""One variant of benchmarks/sft_throughput.py, measured in its own process.

sft_throughput.py starts this (through its hidden `--variant`) once per variant: it builds the
trainer the variant names (`still`'s own build_trainer, TRL's SFTTrainer, or a plain HF Trainer
with padding), counts tokens in the model's forward, times the loop's phases through trainer
callbacks, trains, and returns the measurements as one JSON line.
"""

from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path

# `still` with one recipe switch changed, for attribution: the model's own full-logits loss
# instead of chunked CE, torch.compile, Liger's Triton kernels (CUDA), gradient checkpointing,
# and (not a recipe switch) plain sdpa with a block-diagonal mask over the packed row instead
# of packed sdpa, and packed sdpa without torch's varlen kernel.
STILL_VARIANTS = {
    "still": {},
    "still-fullce": {"loss_chunk_size": None},
    "still-compile": {"torch_compile": True},
    "still-liger": {"liger_kernel": True},
    "still-gc": {"gradient_checkpointing": True},
    "still-blockmask": {},
    "still-loop": {},
}


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
                meter.at_start = (
                    meter.effective,
                    meter.computed,
                    meter.loss_tokens,
                    meter.attention_pairs,
                )

            def on_pre_optimizer_step(self, args, state, control, **kwargs):
                meter.pre_optimizer = meter._now()

            def on_step_end(self, args, state, control, **kwargs):
                now = meter._now()
                forward = meter.forward_s - meter.forward_at_start
                counts = (meter.effective, meter.computed, meter.loss_tokens, meter.attention_pairs)
                delta = [after - before for after, before in zip(counts, meter.at_start)]
                meter.steps.append(
                    {
                        "end": now - meter.begin,
                        "seconds": now - meter.last,
                        "data": meter.step_start - meter.last,
                        "forward": forward,
                        "backward": meter.pre_optimizer - meter.step_start - forward,
                        "optimizer": now - meter.pre_optimizer,
                        "effective": delta[0],
                        "computed": delta[1],
                        "loss_tokens": delta[2],
                        "attention_pairs": delta[3],
                    }
                )
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
        "kind": "finetune",
        "name": "bench-sft-throughput",
        "model": {"ref": str(args.model_dir)},
        "method": args.method,
        "lora": {
            "r": args.lora_r,
            "alpha": args.lora_alpha,
            "dropout": args.lora_dropout,
            "target": "all-linear",
        },
        "data": {
            "train": {
                "path": str(work / "rows.jsonl"),
                "format": "instruction",
                "prompt": "question",
                "response": "answer",
            },
            "max_len": args.max_len,
            "packing": True,
        },
        "train": {
            "lr": args.lr,
            "batch_size": args.batch_size,
            "grad_accum": args.grad_accum,
            "max_steps": args.steps,
            "warmup_ratio": args.warmup_ratio,
            "seed": args.seed,
            "save_steps": args.steps + 1,  # no checkpoint inside the timed loop
            **STILL_VARIANTS.get(args.variant, {}),
        },
    }
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def shared_arguments(args, recipe) -> dict:
    """The hyperparameters every variant shares, as TrainingArguments/SFTConfig keywords."""
    from still.train import precision_flags

    train = recipe.train
    return dict(
        per_device_train_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        learning_rate=train.lr,
        max_steps=train.max_steps,
        warmup_steps=math.ceil(train.warmup_ratio * train.max_steps),
        lr_scheduler_type=train.scheduler,
        optim=train.optimizer,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        seed=train.seed,
        data_seed=train.seed,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        # TRL's default bf16=True stops on a CPU-only machine without use_cpu (its own advice).
        use_cpu=args.device == "cpu",
        **({} if args.variant == "trl" else precision_flags(train)),
    )


def build_still(args, recipe, work: Path, meter: Meter):
    from transformers import Trainer, set_seed

    from finetune import sft
    from still import data as data_module
    from still import models
    from still.checkpoint import reliability_callbacks
    from still.rundir import RunDir
    from still.train import training_arguments

    tokenizer = models.load_tokenizer(recipe.model.ref)
    started = time.perf_counter()
    prepared = data_module.prepare(
        recipe.data, tokenizer, split="train", cache_dir=work / "cache", progress=False
    )
    tokenize_s = time.perf_counter() - started
    set_seed(recipe.train.seed)
    model = sft.build_model(recipe)
    # still-blockmask: what packing did before packed sdpa; still-loop: packed sdpa without the
    # varlen kernel
    attention = {"still-blockmask": "block_mask", "still-loop": "loop"}.get(args.variant, "auto")
    if args.variant in STILL_VARIANTS:
        training_args = training_arguments(
            recipe,
            RunDir(work / "run"),
            has_eval=False,
            total_steps=recipe.train.max_steps,
            report=[],
        )
        trainer = sft.build_trainer(
            recipe,
            model,
            tokenizer,
            prepared,
            None,
            training_args,
            [meter.callback(), *reliability_callbacks(recipe.train)],
            attention=attention,
        )
    else:  # hf: still's tokens and labels, plain padding
        from transformers import DataCollatorForSeq2Seq, TrainingArguments

        training_args = TrainingArguments(
            output_dir=str(work / "run"),
            remove_unused_columns=False,
            **shared_arguments(args, recipe),
        )
        collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
        trainer = Trainer(
            model=model,
            args=training_args,
            data_collator=collator,
            processing_class=tokenizer,
            train_dataset=prepared.dataset.select_columns(["input_ids", "labels"]),
            callbacks=[meter.callback()],
        )
    return trainer, tokenize_s, {"bf16": training_args.bf16}


def build_trl(args, recipe, work: Path, meter: Meter):
    import datasets
    import torch
    from trl import SFTConfig, SFTTrainer

    from still import models
    from still.train import lora_config

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
    dataset = datasets.Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": row["question"]}],
                "completion": [{"role": "assistant", "content": row["answer"]}],
            }
            for row in rows
        ]
    )
    matched = {"gradient_checkpointing": False} if args.variant == "trl-matched" else {}
    config = SFTConfig(
        output_dir=str(work / "run"),
        max_length=recipe.data.max_len,
        **shared_arguments(args, recipe),
        **matched,
    )
    started = time.perf_counter()  # SFTTrainer tokenizes (and adds the adapter) while constructed
    peft_config = lora_config(recipe.lora, recipe.method) if recipe.method != "full" else None
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[meter.callback()],
    )
    tokenize_s = time.perf_counter() - started
    return trainer, tokenize_s, {"bf16": config.bf16}


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
    # What the model did (Trainer turns checkpointing on in the layers), not the argument passed.
    settings["gradient_checkpointing"] = bool(
        getattr(trainer.model, "is_activation_checkpointing", None)
        or trainer.model.is_gradient_checkpointing
    )
    losses = {
        entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry
    }
    return {
        "variant": args.variant,
        "tokenize_s": tokenize_s,
        "steps": meter.steps,
        "losses": [losses.get(step + 1) for step in range(len(meter.steps))],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "matmul_params": n_params,
        "layers": config.num_hidden_layers,
        "attention_width": heads * head_dim,
        "profile": getattr(meter, "profile_table", None),
        **settings,
    }
