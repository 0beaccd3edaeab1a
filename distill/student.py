"""Carve a compact student out of a teacher by keeping a subset of its decoder layers.

The student is the teacher's own architecture with fewer blocks: embeddings, final norm,
lm_head and config are copied, and teacher layer `kept[i]` becomes student layer `i`. Starting
from the teacher's weights instead of random ones is what makes a short KD run enough.

Which layers survive:
    keep_layers   exactly these (validated against the teacher's layer count)
    uniform       k layers spread evenly over the stack, first and last always kept
    importance    the k layers that change their input most on calibration batches, first and
                  last always kept. The score is ShortGPT's Block Influence (Men et al., 2024):
                  1 − mean cosine(hidden state entering the block, hidden state leaving it),
                  over real tokens. A block that scores ~0 passes its input through unchanged,
                  so dropping it costs the least.

The teacher is never modified. A PEFT teacher (an unmerged LoRA adapter) is carved from a
merged deep copy, so the student starts from the weights the teacher actually computes with.

The student is built from its own config rather than by deleting modules from a copy: per-layer
state such as `self_attn.layer_idx` (which indexes the KV cache) then runs 0..k-1, and
per-layer config lists (Gemma-3's `layer_types`) are sliced to the kept layers.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import Tensor, nn
from transformers import PreTrainedModel

from still.distill_sections import StudentInit
from still.errors import StillError

# Where Llama-style and Gemma-3 text models keep their decoder blocks, in the module tree and
# in the state dict.
LAYERS_PREFIX = "model.layers."

# Config fields that hold one entry per decoder layer and so must be sliced to the kept layers.
# Fields holding layer *indices* need renumbering instead: Qwen-MoE's dense layers
# (`_renumber_dense_layers`); others (e.g. LFM2's `full_attn_idxs`) no architecture we carve has.
PER_LAYER_CONFIG_FIELDS = ("layer_types", "mlp_layer_types", "no_rope_layers", "sliding_window")

# Past this many kept layers the summary line abbreviates the list.
SUMMARY_MAX_LISTED_LAYERS = 8


@dataclass
class CarveReport:
    """What `carve_student` kept, and what it cost."""

    kept_layers: list[int]
    teacher_layers: int
    teacher_params: int
    student_params: int
    importance: list[float] | None = None  # per teacher layer, when strategy == "importance"
    shape: str | None = None  # the student's widths, when width pruning narrowed them

    @property
    def param_fraction(self) -> float:
        return self.student_params / self.teacher_params

    def summary(self) -> str:
        kept = self.kept_layers
        if len(kept) > SUMMARY_MAX_LISTED_LAYERS:
            listed = ", ".join(str(index) for index in kept[:3]) + f", ..., {kept[-1]}"
        else:
            listed = ", ".join(str(index) for index in kept)
        shape = f", {self.shape}" if self.shape else ""
        return (
            f"student keeps layers [{listed}] ({len(kept)}/{self.teacher_layers}){shape}: "
            f"{_human_count(self.student_params)} of {_human_count(self.teacher_params)} "
            f"parameters ({self.param_fraction:.1%})"
        )


def _human_count(count: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.1f}{suffix}"
    return str(count)


# --------------------------------------------------------------------------- which layers
def _round_half_up(value: float) -> int:
    # Python's round() rounds halves to even (round(2.5) == 2), which makes keep_ratio=0.5 of
    # a 5-layer teacher keep 2 layers but of a 7-layer one keep 4; half-up is what users expect.
    # The first rounding undoes float noise in a decimal product: 0.7 * 45 = 31.499999999999996.
    return math.floor(round(value, 9) + 0.5)


def _validated_keep_layers(keep_layers: list[int], num_layers: int) -> list[int]:
    if not keep_layers:
        raise StillError(
            "student.init.keep_layers is empty", hint=f"the teacher has {num_layers} layers"
        )
    for position, index in enumerate(keep_layers):
        if not 0 <= index < num_layers:
            raise StillError(
                f"student.init.keep_layers has index {index}, but the teacher has {num_layers} "
                f"layers (0..{num_layers - 1})"
            )
        if position > 0 and index <= keep_layers[position - 1]:
            problem = "repeated" if index == keep_layers[position - 1] else "out of order"
            raise StillError(
                f"student.init.keep_layers has index {index} {problem} (the teacher has "
                f"{num_layers} layers)",
                hint="list each index once, in ascending order",
            )
    return list(keep_layers)


def _uniform_layers(num_layers: int, count: int) -> list[int]:
    if count == 1:
        return [0]
    # linspace(0, num_layers - 1, count) rounded half up, in integers: float positions that
    # land exactly on .5 would round either way depending on how they were computed.
    span, gaps = num_layers - 1, count - 1
    return sorted({(2 * position * span + gaps) // (2 * gaps) for position in range(count)})


def _most_important_layers(importance: list[float], count: int) -> list[int]:
    last = len(importance) - 1
    if count == 1:
        return [0]
    middle = sorted(range(1, last), key=lambda index: (-importance[index], index))
    return sorted([0, last, *middle[: count - 2]])


def choose_layers(
    num_layers: int,
    *,
    keep_layers: list[int] | None = None,
    keep_ratio: float | None = None,
    strategy: str = "uniform",
    importance: list[float] | None = None,
) -> list[int]:
    """The sorted teacher layer indices the student keeps.

    Explicit `keep_layers` win and are only validated. Otherwise k = max(2, keep_ratio ·
    num_layers rounded half up), capped at num_layers, picked by `strategy`; "importance"
    needs one score per layer (`layer_importance`).
    """
    if keep_layers is not None:
        return _validated_keep_layers(keep_layers, num_layers)
    if keep_ratio is None:
        raise StillError("student.init needs keep_layers or keep_ratio")
    if not 0 < keep_ratio <= 1:
        raise StillError(f"student.init.keep_ratio must be in (0, 1], got {keep_ratio}")
    count = min(num_layers, max(2, _round_half_up(keep_ratio * num_layers)))
    if strategy == "uniform":
        return _uniform_layers(num_layers, count)
    if strategy == "importance":
        if importance is None or len(importance) != num_layers:
            raise ValueError(f"strategy 'importance' needs {num_layers} scores, got {importance}")
        return _most_important_layers(importance, count)
    raise ValueError(f"unknown layer strategy {strategy!r}")


# --------------------------------------------------------------------------- importance
def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise StillError(
            f"cannot carve a student from {type(model).__name__}: its decoder layers are not at "
            "model.model.layers",
            hint="carving supports Llama-style and Gemma-3 text causal LMs; give student.ref",
        )
    return layers


def _calibration_inputs(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    # Labels are not needed, and passing them would make the model compute a loss.
    names = ("input_ids", "attention_mask", "position_ids")
    return {name: batch[name].to(device) for name in names if batch.get(name) is not None}


def _real_token_mask(inputs: dict[str, Tensor]) -> Tensor:
    """[batch, seq] 1.0 where a token is real. A 4-D mask comes from packing, which pads nothing."""
    attention_mask = inputs.get("attention_mask")
    if attention_mask is None or attention_mask.dim() != 2:
        return torch.ones(inputs["input_ids"].shape, device=inputs["input_ids"].device)
    return attention_mask.float()


@torch.no_grad()
def layer_importance(
    model: nn.Module, calibration_batches: Iterable[dict[str, Tensor]]
) -> list[float]:
    """Block Influence per decoder layer: 1 − mean cosine(input, output) over real tokens.

    The hidden states are read by forward hooks on the blocks rather than from
    `output_hidden_states`: transformers returns the *final-normed* state as the last entry
    there, which would misscore the last block, and hooks reduce each block's states to one
    number at once instead of holding all num_layers + 1 of them.
    """
    layers = _decoder_layers(model)
    device = next(model.parameters()).device
    # Summed on the model's device: a host copy per block would sync the GPU num_layers times.
    similarity_sums = torch.zeros(len(layers), dtype=torch.float64, device=device)
    current = {}  # the batch's real-token mask, read by the hooks

    def record_similarity(index: int):
        def hook(module, args, kwargs, output):
            entering = args[0] if args else kwargs["hidden_states"]
            leaving = output[0] if isinstance(output, tuple) else output
            cosine = F.cosine_similarity(entering.float(), leaving.float(), dim=-1)
            similarity_sums[index] += (cosine * current["mask"]).sum().double()

        return hook

    handles = [
        layer.register_forward_hook(record_similarity(index), with_kwargs=True)
        for index, layer in enumerate(layers)
    ]
    token_count = run_calibration(model, calibration_batches, handles, current)
    if token_count == 0:
        raise StillError("the calibration batches hold no tokens to score layer importance on")
    return (1.0 - similarity_sums / token_count).cpu().tolist()


@torch.no_grad()
def run_calibration(model: nn.Module, calibration_batches, handles: list, current: dict) -> float:
    """Run the decoder alone (no vocab-sized logits) over the batches in eval mode, with
    `current["mask"]` set to each batch's real tokens for the hooks to read; then remove the
    hooks and restore the mode. Returns the number of real tokens seen."""
    was_training, device = model.training, next(model.parameters()).device
    token_count = 0.0
    model.eval()  # dropout off: scores must not depend on chance
    try:
        for batch in calibration_batches:
            inputs = _calibration_inputs(batch, device)
            current["mask"] = _real_token_mask(inputs)
            token_count += current["mask"].sum().item()
            model.model(**inputs, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return token_count


# --------------------------------------------------------------------------- the student
def count_parameters(model: nn.Module) -> int:
    """Distinct parameters: tied embeddings count once (`parameters()` deduplicates)."""
    return sum(parameter.numel() for parameter in model.parameters())


def _merged_copy(teacher: PeftModel) -> PreTrainedModel:
    # Merging on a copy leaves the caller's teacher, adapter and all, exactly as it was;
    # merge-then-unmerge in place would not (the subtraction rounds).
    return copy.deepcopy(teacher).merge_and_unload()


def _student_config(teacher_config, kept: list[int]):
    config = copy.deepcopy(teacher_config)
    for name in PER_LAYER_CONFIG_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)) and len(value) == teacher_config.num_hidden_layers:
            setattr(config, name, [value[index] for index in kept])
    config.num_hidden_layers = len(kept)
    if isinstance(getattr(config, "mlp_only_layers", None), list):
        _renumber_dense_layers(config, teacher_config, kept)
    return config


def _renumber_dense_layers(config, teacher_config, kept: list[int]) -> None:
    """Qwen-MoE builds layer i with a dense MLP when i is in `mlp_only_layers` or (i + 1) is
    not a multiple of `decoder_sparse_step`: by index, so a carve must say which of the new
    indices are dense, or the kept experts land in dense slots (and the reverse)."""
    step = getattr(teacher_config, "decoder_sparse_step", 1) or 1
    dense = set(teacher_config.mlp_only_layers)
    if getattr(teacher_config, "num_experts", 1) == 0:
        dense = set(range(teacher_config.num_hidden_layers))
    dense |= {index for index in range(teacher_config.num_hidden_layers) if (index + 1) % step}
    config.mlp_only_layers = [new for new, index in enumerate(kept) if index in dense]
    config.decoder_sparse_step = 1


def _student_state_dict(teacher_state: dict[str, Tensor], kept: list[int]) -> dict[str, Tensor]:
    """Teacher layer kept[i] → student layer i; everything outside the layers 1:1."""
    student_index = {teacher_index: index for index, teacher_index in enumerate(kept)}
    state = {}
    for key, tensor in teacher_state.items():
        if not key.startswith(LAYERS_PREFIX):
            state[key] = tensor
            continue
        teacher_index, rest = key[len(LAYERS_PREFIX) :].split(".", 1)
        if int(teacher_index) in student_index:
            state[f"{LAYERS_PREFIX}{student_index[int(teacher_index)]}.{rest}"] = tensor
    return state


def carved_model(teacher: PreTrainedModel, kept: list[int]) -> PreTrainedModel:
    """A fresh model of the teacher's class with only the `kept` layers, holding their weights."""
    _decoder_layers(teacher)
    first_parameter = next(teacher.parameters())
    config = _student_config(teacher.config, kept)
    # Built from config, not by deleting modules from a copy, so that layer_idx runs 0..k-1.
    # Random init is wasted work, but the student is smaller than the teacher and skipping it
    # would mean patching torch's init functions globally.
    with torch.device(first_parameter.device):
        student = type(teacher)._from_config(config, dtype=first_parameter.dtype)
    # Strict: a key the mapping missed is a bug, not something to leave at random init.
    student.load_state_dict(_student_state_dict(teacher.state_dict(), kept), strict=True)
    student.generation_config = copy.deepcopy(teacher.generation_config)
    return student.eval()


def carve_student(
    teacher: nn.Module,
    init: StudentInit,
    calibration_batches: Iterable[dict[str, Tensor]] | None = None,
) -> tuple[PreTrainedModel, CarveReport]:
    """Build the student `init` describes from `teacher`, which is left unchanged.

    `calibration_batches` (model inputs: input_ids, attention_mask, optional position_ids) are
    needed only for strategy "importance" without explicit keep_layers; every batch given is
    scored, so the caller decides how many examples (`init.calibration_samples`) to pass.
    """
    source = _merged_copy(teacher) if isinstance(teacher, PeftModel) else teacher
    num_layers = len(_decoder_layers(source))
    importance = None
    if init.strategy == "importance" and init.keep_layers is None:
        if calibration_batches is None:
            raise StillError(
                "student.init.strategy 'importance' needs calibration batches to score layers",
                hint="use strategy: uniform, or list keep_layers",
            )
        importance = layer_importance(source, calibration_batches)
    kept = choose_layers(
        num_layers,
        keep_layers=init.keep_layers,
        keep_ratio=init.keep_ratio,
        strategy=init.strategy,
        importance=importance,
    )
    student = carved_model(source, kept)
    report = CarveReport(
        kept_layers=kept,
        teacher_layers=num_layers,
        teacher_params=count_parameters(source),
        student_params=count_parameters(student),
        importance=importance,
    )
    return student, report
