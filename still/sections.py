"""The typed sections of a recipe. Every field documents itself (`still schema` prints them).

`extra="forbid"` everywhere: an unknown key is an error with a did-you-mean, never ignored.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_default=True)


# --------------------------------------------------------------------------- model
class ModelSection(Section):
    ref: str = Field(
        description="Model reference: hub id, local HF dir, .gguf file, run dir, or builtin:NAME "
        "(see `still models`)."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; auto = bf16 on a GPU that supports it, else fp32."
    )
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped with the model. Off unless you trust it."
    )
    allow_pickle: bool = Field(
        False, description="Allow pickled (.bin/.pt) weights; safetensors only by default."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] | None = Field(
        None, description="Attention kernel; default lets transformers choose (sdpa)."
    )


class LoraSection(Section):
    r: int = Field(16, ge=1, le=1024, description="LoRA rank: higher = more capacity and memory.")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target: Literal["all-linear"] | list[str] = Field(
        "all-linear", description="'all-linear' or module names, e.g. [q_proj, v_proj]."
    )
    rslora: bool = Field(False, description="Rank-stabilised scaling alpha/sqrt(r) (rsLoRA).")
    dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    modules_to_save: list[str] = Field(
        default_factory=list, description="Modules trained fully and saved with the adapter."
    )
    train_tokens: Literal["template"] | list[str] = Field(
        default_factory=list,
        description="Embedding rows trained with the adapter (PEFT trainable tokens): token "
        "strings, or 'template' for the special tokens the chat template writes, such as a "
        "turn format's <start_of_turn>/<end_of_turn> that a base model never learned.",
    )


# --------------------------------------------------------------------------- data
class Holdout(Section):
    """A held-out split of a source's rows (`still/holdout.py` draws it)."""

    split: int | float = Field(
        description="The held-out side's size: a share of the rows (0.1) or a count (200)."
    )
    test: int | float | None = Field(
        None,
        description="A test side for tasks, beside the eval side: a share (0.1) or a count; "
        "drawn after it from the same seeded order, so training reads neither.",
    )
    seed: int = Field(0, description="Seeds which rows (or groups) are held out.")
    group_by: str | None = Field(
        None,
        description="A row field (e.g. module): whole groups go to one side, so no group lands "
        "on both.",
    )
    side: Literal["held_out", "test", "rest"] = Field(
        "held_out",
        description="Which side this source reads: the held-out (eval) rows, the test rows, or "
        "the rest (training).",
    )

    @field_validator("split", "test")
    @classmethod
    def _share_or_count(cls, value):
        if value is None:
            return value
        if isinstance(value, bool) or (isinstance(value, float) and not 0 < value < 1):
            raise ValueError("a share must be between 0 and 1 (or give a count, e.g. 200)")
        if isinstance(value, int) and value < 1:
            raise ValueError("a count of held-out rows must be at least 1")
        return value

    @model_validator(mode="after")
    def _test_side_needs_a_size(self):
        if self.side == "test" and self.test is None:
            raise ValueError("side 'test' reads the test rows: give their size, e.g. test: 0.1")
        return self


# The short form of a held-out eval split: `data.eval: {split: 0.1, seed: 0, group_by: module}`
# (with `test: 0.1`, a test side for tasks too).
HOLDOUT_KEYS = ("split", "test", "seed", "group_by")


class RowSource(Section):
    """Where rows come from: local files or a hub dataset (`still.rows` reads them)."""

    path: str | None = Field(
        None, description="Local file or glob (.jsonl/.json/.csv/.parquet), relative to the YAML."
    )
    hf: str | None = Field(None, description="A Hugging Face datasets id (online users).")
    subset: str | None = Field(None, description="Dataset config name for `hf`.")
    split: str = Field("train", description="Split to read for `hf` datasets.")
    limit: int | None = Field(None, ge=1, description="Use only the first N rows.")
    holdout: Holdout | None = Field(
        None,
        description="Read one side of a seeded held-out split of these rows (drawn over all of "
        "them, before limit). data.eval: {split: 0.1} writes it for the eval and train sources.",
    )

    @model_validator(mode="after")
    def _one_source(self):
        if self.path is None and self.hf is None and self.holdout is not None:
            return self  # data.eval's held-out split: DataSection fills in train's file
        if (self.path is None) == (self.hf is None):
            raise ValueError("give exactly one of 'path' (local files) or 'hf' (a dataset id)")
        return self


class DataSource(RowSource):
    format: Literal["chat", "instruction", "completion"] | None = Field(
        None,
        description="chat (messages), instruction (prompt/response), completion (raw text). "
        "Eval sources default to the train source's format and fields.",
    )
    messages: str | None = Field(None, description="chat: field with the message list.")
    prompt: str | None = Field(None, description="instruction: field with the prompt.")
    input: str | None = Field(None, description="instruction: optional alpaca-style input field.")
    response: str | None = Field(None, description="instruction: field with the response.")
    system: str | None = Field(None, description="instruction: optional per-row system field.")
    text: str | None = Field(None, description="completion: field with the text.")


FORMAT_FIELDS = {
    "chat": {"messages": "messages"},
    "instruction": {"prompt": "prompt", "response": "response"},
    "completion": {"text": "text"},
}


class DataSection(Section):
    train: DataSource = Field(description="Training data.")
    mix: list[DataSource] = Field(
        default_factory=list,
        description="More training sources, appended to train: each with its own format, fields "
        "and limit (e.g. the teacher's written answers next to the dataset's). A source without "
        "a format takes train's format and fields.",
    )
    eval: DataSource | None = Field(
        None,
        description="Held-out data for the periodic eval loss: a source, or a split of the "
        "training file, {split: 0.1 | 200, seed: 0, group_by: FIELD, limit: N}; test: 0.1 also "
        "holds out test rows for tasks (holdout: {..., side: test}), which training skips too.",
    )
    max_len: int = Field(512, ge=8, description="Max tokens per example.")
    truncation: Literal["truncate", "drop"] = Field(
        "truncate", description="What to do with examples longer than max_len."
    )
    packing: bool = Field(
        True,
        description="Padding-free batches: a step's examples are flattened into one row, so no pad "
        "tokens are computed; attention runs per example (sdpa), or by position ids "
        "(flash_attention_2), or under a block-diagonal causal mask (eager), so no example "
        "attends to another. Off: plain right padding.",
    )
    pack_row_tokens: int | None = Field(
        None,
        ge=8,
        description="With packing: fill rows of at most this many tokens instead of "
        "one row per batch (rows are padded to the longest); only pays where a block mask is used "
        "(eager attention), whose cost is each row's length squared. None: one row.",
    )
    train_on: Literal["assistant", "last_assistant", "all"] = Field(
        "assistant",
        description="Which tokens carry loss: every assistant turn, only the last one, or all.",
    )
    chat_template: str | None = Field(
        None, description="A Jinja chat template to use instead of the tokenizer's."
    )
    system_prompt: str | None = Field(None, description="System message added to every example.")
    on_bad_rows: Literal["error", "skip"] = Field(
        "error", description="error: stop at the first bad row; skip: drop bad rows and report."
    )
    num_proc: int | None = Field(
        None,
        ge=1,
        description="Processes for tokenisation; default: one per 1,500 examples, up to the "
        "CPU cores.",
    )

    @model_validator(mode="before")
    @classmethod
    def _eval_split(cls, value):
        # `eval: {split: 0.1, ...}` (a number, no file): the short form of a held-out split
        if not isinstance(value, dict) or not isinstance(value.get("eval"), dict):
            return value
        spec = value["eval"]
        share = spec.get("split")
        if "path" in spec or "hf" in spec or not isinstance(share, int | float):
            return value
        holdout = {key: spec[key] for key in HOLDOUT_KEYS if key in spec}
        rest = {key: item for key, item in spec.items() if key not in HOLDOUT_KEYS}
        return {**value, "eval": {**rest, "holdout": holdout}}

    @model_validator(mode="after")
    def _defaults(self):
        _split_off_train(self)
        train = self.train
        if train.format is None:
            train.format = "chat"
        for name, default in FORMAT_FIELDS[train.format].items():
            if getattr(train, name) is None:
                setattr(train, name, default)
        for source in self.mix:
            if source.format is None:
                _inherit_fields(source, train)
            for name, default in FORMAT_FIELDS[source.format].items():
                if getattr(source, name) is None:
                    setattr(source, name, default)
        if self.eval is not None:
            _inherit_fields(self.eval, train)
        return self

    def train_sources(self) -> list[DataSource]:
        """train, then each mix source: the rows of the train split, in this order."""
        return [self.train, *self.mix]


def _split_off_train(data: DataSection) -> None:
    """A held-out eval source without a file takes train's file; train reads the rest."""
    held = data.eval
    if held is None or held.holdout is None or (held.path or held.hf):
        return
    if data.train.holdout is not None:
        raise ValueError("data.train already reads a held-out split: give data.eval a file")
    for name in ("path", "hf", "subset", "split"):
        setattr(held, name, getattr(data.train, name))
    held.holdout.side = "held_out"
    data.train.holdout = held.holdout.model_copy(update={"side": "rest"})


def _inherit_fields(source: DataSource, train: DataSource) -> None:
    for name in ("format", "messages", "prompt", "input", "response", "system", "text"):
        if getattr(source, name) is None:
            setattr(source, name, getattr(train, name))


# --------------------------------------------------------------------------- training
class TrainSection(Section):
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    batch_size: int = Field(8, ge=1, description="Examples per device per micro-step.")
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps.")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs.")
    epochs: float = Field(1.0, gt=0, description="Passes over the data when max_steps is unset.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of steps for LR warmup.")
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adamw_8bit"] = (
        "adamw_torch"
    )
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping; 0 disables it.")
    seed: int = Field(0, description="Seed for init, data order and dropout.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on a GPU that supports it, fp32 on CPU."
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute activations in backward: less activation memory, one more "
        "forward per step.",
    )
    torch_compile: bool = Field(
        False,
        description="Compile the model with torch.compile (Trainer's torch_compile). The "
        "first steps pay for compilation, and each new sequence shape can cost a recompile.",
    )
    liger_kernel: bool = Field(
        False,
        description="Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU; in a finetune "
        "with loss_chunk_size: null also its fused linear cross entropy). CUDA only; "
        "pip install liger-kernel.",
    )
    eval_steps: int | None = Field(None, ge=1, description="Eval loss every N steps (and at end).")
    save_steps: int | None = Field(None, ge=1, description="Checkpoint every N steps.")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept on disk.")
    logging_steps: int = Field(1, ge=1)
    max_nonfinite_steps: int = Field(
        3, ge=1, description="Stop after this many non-finite losses in a row."
    )


class FinetuneTrainSection(TrainSection):
    loss_chunk_size: int | None = Field(
        1024,
        ge=1,
        description="Cross entropy straight from hidden states, this many label "
        "tokens at a time: prompt positions never reach the output head and no [tokens × vocab] "
        "logits are kept for backward. null: the model's own loss over full logits.",
    )


class WandbSection(Section):
    project: str = Field("still", description="W&B project.")
    entity: str | None = Field(None, description="W&B team or user; default: your default entity.")
    group: str | None = Field(
        None,
        description="Run group; default: the recipe's directory (one pipeline, e.g. quickstart).",
    )
    tags: list[str] = Field(
        default_factory=list, description="Extra run tags (the kind is always one)."
    )
    mode: Literal["auto", "online", "offline", "disabled"] = Field(
        "auto",
        description="auto: online if an API key is set and W&B is reachable, else offline "
        "(sync later with `wandb sync`). The WANDB_MODE environment variable wins.",
    )
    log_model: Literal["end", "checkpoint", "false"] = Field(
        "end",
        description="end: the final adapter/model as a `model` artifact with its lineage; "
        "checkpoint: also every Trainer checkpoint (Trainer's WANDB_LOG_MODEL=checkpoint); "
        "false: no model files in W&B.",
    )

    @field_validator("log_model", mode="before")
    @classmethod
    def _yaml_booleans(cls, value):
        # `log_model: false` in YAML is a boolean, as in Trainer's WANDB_LOG_MODEL=false
        return {False: "false", True: "end"}.get(value, value) if isinstance(value, bool) else value


class TrackSection(Section):
    wandb: WandbSection | None = Field(None, description="Weights & Biases tracking.")
    tensorboard: bool = Field(
        False, description="Also write TensorBoard event files to <run dir>/tensorboard."
    )
    report_to: list[str] = Field(
        default_factory=list,
        description="Other trackers Trainer supports, by its report_to names (e.g. mlflow, "
        "trackio); configured through their own environment variables.",
    )

    @model_validator(mode="after")
    def _no_duplicates(self):
        for name in ("wandb", "tensorboard"):
            if name in self.report_to:
                raise ValueError(f"report_to: set '{name}' with track.{name}, not in report_to")
        return self


# --------------------------------------------------------------------------- several processes
class DistributedSection(Section):
    """How `still run` launches: one process, or several through `accelerate launch`."""

    strategy: Literal["auto", "single", "ddp", "zero2", "zero3", "fsdp"] = Field(
        "auto",
        description="auto: one process, or DDP when there are several. ddp: a model copy per "
        "process. zero2: DeepSpeed shards optimizer state and gradients. zero3 / fsdp: also shard "
        "the parameters (DeepSpeed ZeRO-3 / PyTorch FSDP2).",
    )
    num_processes: int | None = Field(
        None,
        ge=1,
        description="Processes per machine (one per GPU); `--nproc` overrides. "
        "Default: every visible GPU, or 1 on a CPU-only machine.",
    )
    num_machines: int = Field(1, ge=1, description="Machines (nodes) in the job.")
    machine_rank: int = Field(0, ge=0, description="This machine's index, 0 .. num_machines-1.")
    main_process_ip: str | None = Field(
        None, description="Address of machine 0 (several machines)."
    )
    main_process_port: int = Field(
        29500, ge=1, le=65535, description="Rendezvous port on machine 0."
    )
    offload_optimizer: Literal["none", "cpu", "nvme"] = Field(
        "none", description="zero2/zero3: keep optimizer state in CPU memory or on NVMe."
    )
    offload_params: Literal["none", "cpu", "nvme"] = Field(
        "none",
        description="zero3: parameters in CPU memory or on NVMe; fsdp: cpu offloads "
        "parameters, gradients and optimizer state together.",
    )
    nvme_path: str | None = Field(None, description="A fast local dir for NVMe offload.")
    timeout_s: int = Field(
        1800,
        ge=1,
        description="Longest wait for the other ranks in one collective (the process group's "
        "timeout) before a rank gives up, and for a signalled rank to stop; the launcher gives "
        "its processes at most min(timeout_s, 30) s. Must exceed a checkpoint's write time.",
    )
    max_restarts: int = Field(
        0,
        ge=0,
        description="Restart the processes this many times after a rank fails (torchrun's "
        "elastic agent); each restart resumes from the last complete checkpoint.",
    )

    @model_validator(mode="after")
    def _consistent(self):
        if self.offload_optimizer != "none" and self.strategy not in ("zero2", "zero3"):
            hint = " (FSDP offloads it with offload_params: cpu)" if self.strategy == "fsdp" else ""
            raise ValueError(f"offload_optimizer needs strategy zero2 or zero3{hint}")
        if self.offload_params != "none" and self.strategy not in ("zero3", "fsdp"):
            raise ValueError("offload_params needs strategy zero3 or fsdp (they shard parameters)")
        if self.strategy == "fsdp" and self.offload_params == "nvme":
            raise ValueError("FSDP offloads to CPU only; use strategy zero3 for NVMe")
        if "nvme" in (self.offload_params, self.offload_optimizer) and not self.nvme_path:
            raise ValueError("NVMe offload needs nvme_path (a fast local dir)")
        if self.num_machines > 1 and not self.main_process_ip:
            raise ValueError("several machines need main_process_ip (the address of machine 0)")
        if self.machine_rank >= self.num_machines:
            raise ValueError(
                f"machine_rank {self.machine_rank} is not below num_machines {self.num_machines}"
            )
        return self


# --------------------------------------------------------------------------- cascade
class CascadeSection(Section):
    """Small model first, teacher when unsure: the cascade an eval recipe measures
    (`still cascade R.yaml`), and that `still serve CASCADE.json` then serves."""

    student: str = Field(description="The model that answers first; one of the recipe's models.")
    teacher: str = Field(description="The model deferred to; one of the recipe's models.")
    metric: str | None = Field(
        None, description="Per-question quality the cascade keeps; default: the task's first."
    )
    signals: list[str] | None = Field(
        None,
        description="Confidence signals to measure (mean_logprob, min_logprob, mean_entropy for "
        "generate; margin, top_prob for multiple_choice); default: all the task type gives.",
    )
    correct_at: float = Field(
        0.5, description="A student answer counts as correct at metric >= this (AUROC, ECE)."
    )
    calibration: float = Field(
        0.5, gt=0, lt=1, description="Share of the questions in the calibration split."
    )
    seed: int = Field(0, description="Seed of the calibration/test split and the bootstrap.")
    target_quality: float | None = Field(
        None, gt=0, description="Reach this share of the teacher's score (e.g. 0.95)."
    )
    max_deferral: float | None = Field(
        None, ge=0, le=1, description="Defer at most this share of the questions (e.g. 0.3)."
    )

    @model_validator(mode="after")
    def _one_target(self):
        if (self.target_quality is None) == (self.max_deferral is None):
            raise ValueError("set exactly one of target_quality and max_deferral")
        return self
