"""The distillation-only sections of a recipe: the student, the KD loss, the teacher's share of
the processes, and `generate:` (teacher-written data and its judge).

Built on the shared sections in `still/sections.py`; the recipe models in `still/recipe.py`
put them together.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from still.sections import DistributedSection, ModelSection, Section, TrainSection


# --------------------------------------------------------------------------- training
class DistillTrainSection(TrainSection):
    loss_chunk_size: int = Field(
        1024,
        ge=1,
        description="The KD loss straight from both models' hidden states, this "
        "many label tokens at a time: no [tokens × vocab] logits of either model are kept.",
    )


# --------------------------------------------------------------------------- several processes
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
_SIZE_SUFFIXES = {"K": 10**3, "M": 10**6, "B": 10**9}


class StudentInit(Section):
    from_: Literal["teacher"] = Field(
        "teacher", alias="from", description="Carve from the teacher."
    )
    prune: Literal["depth", "width", "both"] = Field(
        "depth",
        description="depth: drop whole decoder layers; width: keep every layer and drop the "
        "least important MLP channels, query heads (whole per KV group) and embedding channels "
        "(Minitron); both: depth first, then width to reach size.",
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
    size: float | str | None = Field(
        None,
        description="Width pruning's target: a share of the teacher's parameters (0.6) or a "
        "count (80M, 1.5B, 80000000).",
    )
    width_axes: list[Literal["mlp", "heads", "hidden"]] = Field(
        default_factory=lambda: ["mlp", "heads", "hidden"],
        description="What width pruning narrows: mlp channels, query heads, hidden channels.",
    )
    calibration_samples: int = Field(
        32, ge=1, description="Examples for importance scores (layers or channels)."
    )

    @field_validator("size")
    @classmethod
    def _a_size(cls, value):
        if value is None or isinstance(value, (int, float)) and not isinstance(value, bool):
            if value is not None and value <= 0:
                raise ValueError("size must be > 0: a share (0.6) or a count (80M)")
            return value
        text = str(value).strip().upper().replace("_", "").replace(",", "")
        scale = _SIZE_SUFFIXES.get(text[-1:], 1)
        try:
            count = float(text[:-1] if text[-1:] in _SIZE_SUFFIXES else text) * scale
        except ValueError:
            raise ValueError(
                f"size {value!r} is not a share or a count; write 0.6, 80M or 1.5B"
            ) from None
        if count <= 0:
            raise ValueError("size must be > 0: a share (0.6) or a count (80M)")
        return count

    @field_validator("size", mode="after")
    @classmethod
    def _share_or_count(cls, value):
        if value is not None and 1 < value < 1000:
            raise ValueError(f"size {value:g} is neither a share (at most 1) nor a count (80M)")
        return value

    def target_parameters(self, teacher_parameters: int) -> int | None:
        """`size` as a parameter count (a share ≤ 1 is of the teacher's)."""
        if self.size is None:
            return None
        return int(self.size * teacher_parameters) if self.size <= 1 else int(self.size)

    @model_validator(mode="after")
    def _what_to_prune(self):
        depth = self.keep_layers is not None or self.keep_ratio is not None
        if self.prune in ("depth", "both") and not depth:
            if self.prune == "depth" and self.size is not None:
                raise ValueError(
                    "size is width pruning's target: set prune: width (or prune: both with "
                    "keep_ratio)"
                )
            raise ValueError("give keep_layers (a list of indices) or keep_ratio (e.g. 0.5)")
        if self.prune in ("width", "both") and self.size is None:
            raise ValueError(f"prune: {self.prune} needs size: a share (0.6) or a count (80M)")
        if self.prune == "width" and depth:
            raise ValueError("prune: width keeps every layer; use prune: both with keep_ratio")
        if not self.width_axes:
            raise ValueError("width_axes is empty; give some of mlp, heads, hidden")
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
    cross_tokenizer: Literal["off", "auto", "uld", "gold"] = Field(
        "off",
        description="Teacher and student with different tokenizers. off: refused (use "
        "sequence-level KD). auto: same-tokenizer KD when the vocabularies are identical (or "
        "differ only by padding rows), else gold. uld: sorted-probability Wasserstein distance "
        "(ULD) at the positions the two tokenizations align. gold: the recipe's divergence on "
        "tokens whose strings map one-to-one between the vocabularies, renormalised over them, "
        "plus ULD on the rest. Unaligned student positions get only the hard-label CE.",
    )
    teacher_chat_template: str | None = Field(
        None,
        description="Cross-tokenizer KD: a Jinja chat template the teacher renders each "
        "conversation with (default: the teacher tokenizer's own; data.chat_template is the "
        "student's). Needed for a base teacher whose tokenizer has none.",
    )
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
