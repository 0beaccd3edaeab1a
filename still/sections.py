"""The typed sections of a recipe. Every field documents itself (`still schema` prints them).

`extra="forbid"` everywhere: an unknown key is an error with a did-you-mean, never ignored.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator


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


# --------------------------------------------------------------------------- data
class RowSource(Section):
    """Where rows come from: local files or a hub dataset (`still.rows` reads them)."""

    path: str | None = Field(
        None, description="Local file or glob (.jsonl/.json/.csv/.parquet), relative to the YAML."
    )
    hf: str | None = Field(None, description="A Hugging Face datasets id (online users).")
    subset: str | None = Field(None, description="Dataset config name for `hf`.")
    split: str = Field("train", description="Split to read for `hf` datasets.")
    limit: int | None = Field(None, ge=1, description="Use only the first N rows.")

    @model_validator(mode="after")
    def _one_source(self):
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
    eval: DataSource | None = Field(None, description="Held-out data for the periodic eval loss.")
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
        description="Processes for tokenisation; default: one per 1,500 examples, up to the CPU cores.",
    )

    @model_validator(mode="after")
    def _defaults(self):
        train = self.train
        if train.format is None:
            train.format = "chat"
        for name, default in FORMAT_FIELDS[train.format].items():
            if getattr(train, name) is None:
                setattr(train, name, default)
        if self.eval is not None:
            for name in ("format", "messages", "prompt", "input", "response", "system", "text"):
                if getattr(self.eval, name) is None:
                    setattr(self.eval, name, getattr(train, name))
        return self


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
        description="Recompute activations in backward: less activation memory, one more forward per step.",
    )
    torch_compile: bool = Field(
        False,
        description="Compile the model with torch.compile (Trainer's torch_compile). The "
        "first steps pay for compilation, and each new sequence shape can cost a recompile.",
    )
    liger_kernel: bool = Field(
        False,
        description="Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU; in a finetune "
        "with loss_chunk_size: null also its fused linear cross entropy). CUDA only; pip install liger-kernel.",
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


class DistillTrainSection(TrainSection):
    loss_chunk_size: int = Field(
        1024,
        ge=1,
        description="The KD loss straight from both models' hidden states, this "
        "many label tokens at a time: no [tokens × vocab] logits of either model are kept.",
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


class DistillDistributedSection(DistributedSection):
    teacher: Literal["auto", "replicate", "shard"] = Field(
        "auto",
        description="Under zero3/fsdp: a full teacher copy per process, or sharded like "
        "the student. auto: replicate while the teacher's weights take at most a quarter of one "
        "device's memory, else shard.",
    )

    @model_validator(mode="after")
    def _shardable(self):
        if self.teacher == "shard" and self.strategy not in ("zero3", "fsdp"):
            raise ValueError("teacher: shard needs strategy zero3 or fsdp")
        return self


# --------------------------------------------------------------------------- distillation
class StudentInit(Section):
    from_: Literal["teacher"] = Field(
        "teacher", alias="from", description="Carve from the teacher."
    )
    keep_layers: list[int] | None = Field(
        None, description="Exact decoder layer indices to keep (0-based)."
    )
    keep_ratio: float | None = Field(
        None, gt=0, le=1, description="Share of layers to keep when keep_layers is not given."
    )
    strategy: Literal["uniform", "importance"] = Field(
        "uniform",
        description="uniform: every k-th layer, first and last kept; importance: drop the layers "
        "whose output is most similar to their input on a calibration sample.",
    )
    calibration_samples: int = Field(32, ge=1, description="Examples for importance scores.")

    @model_validator(mode="after")
    def _some_layers(self):
        if self.keep_layers is None and self.keep_ratio is None:
            raise ValueError("give keep_layers (a list of indices) or keep_ratio (e.g. 0.5)")
        return self


class StudentSection(ModelSection):
    ref: str | None = Field(None, description="A smaller model with the teacher's tokenizer.")
    init: StudentInit | None = Field(None, description="Carve the student out of the teacher.")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.ref is None) == (self.init is None):
            raise ValueError("give exactly one of 'ref' (a model) or 'init' (carve from teacher)")
        return self


class DistillSection(Section):
    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data):
        # one knob, one name: the chunking of the head loss is train.loss_chunk_size everywhere
        if isinstance(data, dict) and "chunk_size" in data:
            raise ValueError(
                "distill.chunk_size is now train.loss_chunk_size (the same knob "
                "in finetune and distill recipes): move it there"
            )
        return data

    loss: Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd"] = Field(
        "forward_kl", description="Divergence between teacher and student token distributions."
    )
    temperature: float = Field(1.0, gt=0, description="Both logits are divided by T; KD × T².")
    beta: float = Field(0.5, ge=0, le=1, description="jsd: 0 = forward KL, 1 = reverse KL.")
    alpha: float = Field(0.1, ge=0, le=1, description="skew_kl: teacher share in the mixture.")
    kd_weight: float = Field(1.0, ge=0, description="Weight of the KD term.")
    ce_weight: float = Field(0.0, ge=0, description="Weight of hard-label cross entropy.")
    teacher_cache: str | None = Field(
        None,
        description="A teacher cache dir (`still cache R.yaml` builds it): distill from the "
        "teacher's stored top-k log-probs instead of running the teacher.",
    )
    cache_top_k: int = Field(
        64,
        ge=1,
        description="Teacher log-probs kept per token in the cache; the rest of the "
        "mass is one bucket. k = vocabulary size is exact KD.",
    )
    cache_dtype: Literal["float16", "uint8"] = Field(
        "float16",
        description="How cached log-probs are stored: float16, or uint8 steps below "
        "each token's top value (1 byte instead of 2; about 198 bytes/token at k=64).",
    )

    on_policy_ratio: float = Field(
        0.0,
        ge=0,
        le=1,
        description="GKD: the share of batches whose responses the student "
        "samples itself (the teacher scores them); 0 = the dataset's responses only.",
    )
    on_policy_temperature: float = Field(
        1.0, gt=0, description="Sampling temperature of those responses."
    )
    on_policy_max_new_tokens: int | None = Field(
        None, ge=1, description="Cap on a sampled response; default: the dataset response's length."
    )

    @model_validator(mode="after")
    def _some_loss(self):
        if self.kd_weight == 0 and self.ce_weight == 0:
            raise ValueError("kd_weight and ce_weight are both 0: nothing to train on")
        if self.on_policy_ratio > 0 and self.teacher_cache:
            raise ValueError(
                "on_policy_ratio needs the teacher itself: it scores the student's own "
                "samples, which no cache holds"
            )
        return self


# --------------------------------------------------------------------------- teacher-written data
class EndpointSection(Section):
    """An OpenAI-compatible server (vLLM, `transformers serve`, llama.cpp, a hosted API)."""

    url: str = Field(
        description="Base URL up to /v1, e.g. http://localhost:8000/v1; "
        "requests go to <url>/chat/completions."
    )
    model: str = Field(description="The model name the server expects in each request.")
    api_key_env: str | None = Field(
        None,
        description="Name of the environment variable holding the API key (sent as a "
        "Bearer token). The key itself never goes in a recipe.",
    )
    timeout_s: float = Field(300.0, gt=0, description="Seconds to wait for one response.")

    @field_validator("url")
    @classmethod
    def _http(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("url must start with http:// or https://")
        return value.rstrip("/")


class JudgeSection(Section):
    type: Literal["exact", "regex", "model"] = Field(
        description="exact: the answer equals the dataset's reference (case and whitespace "
        "ignored); regex: `pattern` finds the same text in the answer as in the reference; "
        "model: a model scores each answer with `prompt`.",
    )
    pattern: str | None = Field(
        None,
        description="regex: a Python regex; its first group (or whole match) is compared, "
        "e.g. '#### *(-?[0-9.,]+)'. A reference the pattern does not match is compared whole.",
    )
    ref: str | None = Field(
        None,
        description="model: a model reference for the judge (runs locally; may be the teacher's).",
    )
    endpoint: EndpointSection | None = Field(None, description="model: an OpenAI-compatible judge.")
    prompt: str = Field(
        "Rate the answer to the question from 0 (wrong or useless) to 10 (correct and complete). "
        "Reply with the number only.\n\nQuestion: {question}\n\nAnswer: {answer}",
        description="model: the scoring request; {question}, {answer} and {reference} are "
        "replaced. The first integer in the reply is the score.",
    )
    min_score: int = Field(7, description="model: answers scored below this are dropped.")
    max_new_tokens: int = Field(16, ge=1, description="model: tokens the judge may reply with.")

    @model_validator(mode="after")
    def _complete(self):
        if self.type == "regex":
            import re

            if not self.pattern:
                raise ValueError("judge type regex needs a pattern")
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"pattern is not a valid regex: {exc}") from None
        if self.type == "model":
            if (self.ref is None) == (self.endpoint is None):
                raise ValueError(
                    "judge type model needs exactly one of 'ref' (a model) or 'endpoint' (a server)"
                )
            if "{answer}" not in self.prompt:
                raise ValueError("the judge prompt must contain {answer}")
        elif self.ref is not None or self.endpoint is not None:
            raise ValueError(f"ref and endpoint are for judge type model, not {self.type}")
        return self


class GenerateSection(Section):
    """`still generate R.yaml`: the teacher answers data.train's prompts; a chat JSONL comes out."""

    out: str = Field(
        description="Output chat-format JSONL, relative to the YAML; a report goes "
        "to <out>.report.json. Refused if it exists, unless --force."
    )
    samples_per_prompt: int = Field(1, ge=1, description="Answers sampled per prompt.")
    max_new_tokens: int = Field(
        256,
        ge=1,
        description="Longest answer; longer ones are cut and dropped unless keep_truncated.",
    )
    temperature: float = Field(0.7, ge=0, description="Sampling temperature; 0 = greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    seed: int = Field(0, description="Seed for sampling (local batches; sent to endpoints).")
    batch_size: int = Field(
        8,
        ge=1,
        description="Prompts per local generate call, or requests "
        "in flight at once to an endpoint.",
    )
    keep_truncated: bool = Field(False, description="Keep answers cut at max_new_tokens.")
    endpoint: EndpointSection | None = Field(
        None,
        description="Ask an OpenAI-compatible server instead of running the recipe's "
        "teacher locally.",
    )
    judge: JudgeSection | None = Field(None, description="Keep only answers the judge accepts.")

    @model_validator(mode="after")
    def _distinct_samples(self):
        if self.temperature == 0 and self.samples_per_prompt > 1:
            raise ValueError(
                "samples_per_prompt > 1 with temperature 0 gives identical copies; "
                "set a temperature above 0"
            )
        return self


# --------------------------------------------------------------------------- recipes
class RecipeBase(Section):
    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Run name: the run dir is output_dir/name.",
    )
    output_dir: str = Field("runs", description="Parent of the run dir (relative to the cwd).")
    track: TrackSection = Field(default_factory=TrackSection)
    _source: str | None = PrivateAttr(None)

    @property
    def source_path(self) -> str | None:
        """The YAML file this recipe was loaded from (None when built in code)."""
        return self._source


class FinetuneRecipe(RecipeBase):
    kind: Literal["finetune"]
    model: ModelSection
    method: Literal["lora", "dora", "qlora", "full"] = Field(
        "lora", description="lora / dora / qlora (4-bit base, GPU only) / full fine-tuning."
    )
    lora: LoraSection = Field(default_factory=LoraSection)
    data: DataSection
    train: FinetuneTrainSection = Field(default_factory=FinetuneTrainSection)
    distributed: DistributedSection = Field(default_factory=DistributedSection)
    eval_tasks: list[str] = Field(default_factory=list, description="Task YAMLs run at the end.")


class DistillRecipe(RecipeBase):
    kind: Literal["distill"]
    teacher: ModelSection
    student: StudentSection
    method: Literal["full", "lora"] = Field("full", description="Train the student fully or LoRA.")
    lora: LoraSection = Field(default_factory=LoraSection)
    distill: DistillSection = Field(default_factory=DistillSection)
    data: DataSection
    train: DistillTrainSection = Field(default_factory=DistillTrainSection)
    distributed: DistillDistributedSection = Field(default_factory=DistillDistributedSection)
    eval_tasks: list[str] = Field(default_factory=list, description="Task YAMLs run at the end.")
    generate: GenerateSection | None = Field(
        None,
        description="Sequence-level KD: `still generate R.yaml` writes the teacher's "
        "answers to data.train's prompts as a chat dataset.",
    )


class EvalRecipe(RecipeBase):
    kind: Literal["eval"]
    models: list[str] = Field(min_length=1, description="Model references or run dirs to score.")
    tasks: list[str] = Field(min_length=1, description="Task YAML files.")
    batch_size: int = Field(8, ge=1)
    limit: int | None = Field(None, ge=1, description="Score only the first N rows of each task.")
    reference: str | None = Field(None, description="Model the comparison is made against.")
    teacher: str | None = Field(None, description="Teacher, for teacher-retention %.")


Recipe = FinetuneRecipe | DistillRecipe | EvalRecipe
RECIPE_KINDS: dict[str, type[Section]] = {
    "finetune": FinetuneRecipe,
    "distill": DistillRecipe,
    "eval": EvalRecipe,
}
