"""Width pruning (Minitron, Muralidharan et al., 2024): a student with the teacher's layers made
narrower, its channels ranked by how much they carry on calibration data.

Axes (`student.init.width_axes`):
    mlp      the intermediate channels of each MLP (what enters down_proj), chosen per layer
    heads    query heads, the same number kept in every key/value group so that grouped-query
             attention stays grouped (key/value heads are all kept), chosen per layer
    hidden   embedding channels: the residual stream, shared by the embeddings, every layer's
             projections and norms, the final norm and the head

Importance, from activations on calibration batches (the teacher is only read), as the root
mean square over real tokens of:
    mlp channel     its activation entering down_proj
    query head      the L2 norm of its attention output (its slice of o_proj's input)
    hidden channel  that channel of every norm's output in the layers, and of the final norm
The highest keep, in their original order.

Which layers. Llama-style blocks (Llama, Qwen2/2.5 with q/k/v biases, Qwen3 with per-head q/k
norms, Mistral, Gemma-3) and Phi-3's fused ones ([q; k; v] in qkv_proj, [gate; up] in
gate_up_proj, cut row block by row block). A model with any other layer weight, such as
Qwen3-MoE's experts and router, is refused before any scoring (`refuse_uncuttable`).

Size. One ratio r is applied to every pruned axis; `size` (a share of the teacher's parameters
or a count) picks the largest r whose student fits, by bisection on the parameter count of the
student's config built on the meta device. Widths are rounded to multiples of 8.

Norms over fewer channels. An RMS norm over the kept channels divides by their mean square,
not the full one; each norm weight is multiplied by sqrt(H / H') and `rms_norm_eps` by H / H',
which is exact when the dropped channels carry nothing (the per-head q/k norms of Gemma-3 and
Qwen3 share that eps and see it grow by H / H', a change far below their inputs' scale), and a
norm of the (1 + w) form (Gemma) is scaled as such.
Gemma also multiplies its embeddings by sqrt(hidden_size): the kept embedding columns are
scaled by sqrt(H / H') so the layers see the teacher's values, and a tied head's logits are
kept by dividing the final norm by the same factor. The student is a normal model of the
teacher's class and config (`hidden_size`, `intermediate_size`, `num_attention_heads`, an
explicit `head_dim`), saved and reloaded with `from_pretrained`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from peft import PeftModel
from torch import Tensor, nn
from transformers import PreTrainedModel

from distill.student import (
    LAYERS_PREFIX,
    CarveReport,
    _decoder_layers,
    _merged_copy,
    carve_student,
    count_parameters,
    run_calibration,
)
from still.errors import StillError

WIDTH_AXES = ("mlp", "heads", "hidden")
ROUND_TO = 8
BISECTION_STEPS = 40


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config) -> Shape:
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            config.num_hidden_layers,
            config.hidden_size,
            config.intermediate_size,
            heads,
            kv_heads,
            head_dim,
        )

    def describe(self) -> str:
        return (
            f"{self.layers} layers, hidden {self.hidden}, MLP {self.intermediate}, "
            f"{self.heads} heads / {self.kv_heads} kv heads of {self.head_dim}"
        )


def _rounded(value: float, full: int) -> int:
    return min(full, max(ROUND_TO, int(value // ROUND_TO) * ROUND_TO))


def shape_at(shape: Shape, ratio: float, axes) -> Shape:
    """The student's shape when every axis in `axes` keeps `ratio` of its width. A pruned
    hidden size is a multiple of the student's head count too (transformers' configs check
    hidden_size % num_attention_heads even with an explicit head_dim)."""
    per_group = shape.heads // shape.kv_heads
    heads = shape.kv_heads * max(1, round(per_group * ratio)) if "heads" in axes else shape.heads
    hidden = shape.hidden
    if "hidden" in axes:
        step = math.lcm(ROUND_TO, heads)
        hidden = min(shape.hidden, max(step, int(shape.hidden * ratio // step) * step))
    return Shape(
        shape.layers,
        hidden,
        _rounded(shape.intermediate * ratio, shape.intermediate)
        if "mlp" in axes
        else shape.intermediate,
        heads,
        shape.kv_heads,
        shape.head_dim,
    )


def pruned_config(config, shape: Shape):
    """The teacher's config at `shape`. An RMS norm over H' of the H channels divides by
    sqrt(mean' + eps); the teacher's sqrt(mean + eps) is sqrt(H'/H) · sqrt(mean' + eps · H/H')
    when the dropped channels are zero, so eps scales by H/H' with the norm weights."""
    eps = getattr(config, "rms_norm_eps", None)
    hidden = config.hidden_size
    config = copy.deepcopy(config)
    if eps is not None and shape.hidden != hidden:
        config.rms_norm_eps = eps * hidden / shape.hidden
    config.hidden_size = shape.hidden
    config.intermediate_size = shape.intermediate
    config.num_attention_heads = shape.heads
    config.num_key_value_heads = shape.kv_heads
    config.head_dim = shape.head_dim
    return config


def parameters_of(model_class, config) -> int:
    with torch.device("meta"):
        return count_parameters(model_class._from_config(config))


def plan_width(model: PreTrainedModel, target: int, axes) -> Shape:
    """The widest shape (one ratio on every axis) with at most `target` parameters; refused
    for a model whose layers cannot be cut (so the size chooser offers no such student)."""
    refuse_uncuttable(model)
    full = Shape.of(model.config)

    def size(ratio: float) -> int:
        return parameters_of(type(model), pruned_config(model.config, shape_at(full, ratio, axes)))

    smallest = size(0.0)
    if smallest > target:
        raise StillError(
            f"student.init.size: {target:,} parameters is below the narrowest student width "
            f"pruning of {', '.join(axes)} can make ({smallest:,})",
            hint="prune depth too (prune: both), add width_axes, or ask for a larger size",
        )
    low, high = 0.0, 1.0
    if size(high) <= target:
        return full
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        low, high = (middle, high) if size(middle) <= target else (low, middle)
    return shape_at(full, low, axes)


# --------------------------------------------------------------------------- importance
def _norms(layer: nn.Module, hidden: int) -> list[nn.Module]:
    """The layer's norms over the residual stream (not per-head q/k norms)."""
    return [
        module
        for name, module in layer.named_children()
        if "norm" in name
        and getattr(module, "weight", None) is not None
        and module.weight.shape == (hidden,)
    ]


@torch.no_grad()
def width_importance(model: nn.Module, calibration_batches) -> dict[str, Tensor]:
    """Per-channel importance: mlp [layers, intermediate], heads [layers, heads], hidden [H]."""
    refuse_uncuttable(model)
    layers = _decoder_layers(model)
    shape = Shape.of(model.config)
    device = next(model.parameters()).device
    sums = {
        "mlp": torch.zeros(shape.layers, shape.intermediate, dtype=torch.float64, device=device),
        "heads": torch.zeros(shape.layers, shape.heads, dtype=torch.float64, device=device),
        "hidden": torch.zeros(shape.hidden, dtype=torch.float64, device=device),
    }
    current = {}

    def masked_square_sum(values: Tensor) -> Tensor:
        return (values.float().pow(2) * current["mask"][..., None]).sum((0, 1)).double()

    def on_mlp(index):
        def hook(module, args):  # returns None: a pre-hook's return value would replace the input
            sums["mlp"][index].add_(masked_square_sum(args[0]))

        return hook

    def on_heads(index):
        def hook(module, args):
            per_head = args[0].unflatten(-1, (shape.heads, shape.head_dim)).float().norm(dim=-1)
            sums["heads"][index].add_(masked_square_sum(per_head))

        return hook

    def on_norm(module, args, output):
        sums["hidden"].add_(masked_square_sum(output))

    handles = []
    for index, layer in enumerate(layers):
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(on_mlp(index)))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(on_heads(index)))
        handles += [norm.register_forward_hook(on_norm) for norm in _norms(layer, shape.hidden)]
    handles.append(model.model.norm.register_forward_hook(on_norm))
    tokens = run_calibration(model, calibration_batches, handles, current)
    if tokens == 0:
        raise StillError("the calibration batches hold no tokens to score channels on")
    return {name: (total / tokens).sqrt().float().cpu() for name, total in sums.items()}


def _top(scores: Tensor, count: int) -> Tensor:
    return scores.topk(count).indices.sort().values


def kept_channels(importance: dict[str, Tensor], full: Shape, shape: Shape) -> dict:
    """Kept indices: hidden [H'], and per layer mlp [I'] and query-projection rows [heads' × d]."""
    per_group, keep_per_group = full.heads // full.kv_heads, shape.heads // shape.kv_heads
    heads = []
    for scores in importance["heads"]:
        groups = scores.view(full.kv_heads, per_group)
        chosen = [
            group * per_group + _top(groups[group], keep_per_group)
            for group in range(full.kv_heads)
        ]
        rows = torch.cat(chosen)[:, None] * full.head_dim + torch.arange(full.head_dim)
        heads.append(rows.flatten())
    return {
        "hidden": _top(importance["hidden"], shape.hidden),
        "mlp": [_top(scores, shape.intermediate) for scores in importance["mlp"]],
        "query_rows": heads,
    }


# --------------------------------------------------------------------------- the student
def _norm_offset(norm: nn.Module) -> float:
    """1.0 for a norm that scales by (1 + weight) (Gemma), 0.0 for one that scales by weight."""
    probe = copy.deepcopy(norm).float()
    with torch.no_grad():
        probe.weight.zero_()
        out = probe(torch.ones(1, probe.weight.shape[0]))
    return 1.0 if out.abs().max().item() > 0.5 else 0.0


def _layer_cuts(hidden: Tensor, mlp: Tensor, rows: Tensor, full: Shape) -> dict:
    """Each decoder-layer weight width pruning knows, and how it is cut to the kept channels.
    Phi-3 fuses [q; k; v] (qkv_proj) and [gate; up] (gate_up_proj) along their output rows."""
    kv_rows = full.heads * full.head_dim + torch.arange(2 * full.kv_heads * full.head_dim)
    fused_rows = torch.cat([rows, kv_rows])
    gate_up_rows = torch.cat([mlp, full.intermediate + mlp])
    return {
        "self_attn.q_proj.weight": lambda t: t[rows][:, hidden],
        "self_attn.q_proj.bias": lambda t: t[rows],
        "self_attn.k_proj.weight": lambda t: t[:, hidden],
        "self_attn.v_proj.weight": lambda t: t[:, hidden],
        "self_attn.k_proj.bias": lambda t: t,
        "self_attn.v_proj.bias": lambda t: t,
        "self_attn.qkv_proj.weight": lambda t: t[fused_rows][:, hidden],
        "self_attn.qkv_proj.bias": lambda t: t[fused_rows],
        "self_attn.o_proj.weight": lambda t: t[hidden][:, rows],
        "self_attn.o_proj.bias": lambda t: t[hidden],
        "self_attn.q_norm.weight": lambda t: t,  # per head, over head_dim: heads keep theirs
        "self_attn.k_norm.weight": lambda t: t,
        "mlp.gate_proj.weight": lambda t: t[mlp][:, hidden],
        "mlp.up_proj.weight": lambda t: t[mlp][:, hidden],
        "mlp.gate_proj.bias": lambda t: t[mlp],
        "mlp.up_proj.bias": lambda t: t[mlp],
        "mlp.gate_up_proj.weight": lambda t: t[gate_up_rows][:, hidden],
        "mlp.down_proj.weight": lambda t: t[hidden][:, mlp],
        "mlp.down_proj.bias": lambda t: t[hidden],
    }


def _residual_norm_names(model, hidden: int) -> list[str]:
    """The norms over the residual stream: each layer's and the final one (not the per-head
    q/k norms, even where head_dim equals hidden_size)."""
    names = ["model.norm"]
    for index, layer in enumerate(_decoder_layers(model)):
        names += [
            f"{LAYERS_PREFIX}{index}.{name}"
            for name, module in layer.named_children()
            if any(module is norm for norm in _norms(layer, hidden))
        ]
    return names


def refuse_uncuttable(model: nn.Module) -> None:
    """Before any scoring: a layer weight without a known cut (mixture-of-experts blocks, an
    architecture's own projections) would leave the student wrong, so the model is refused."""
    nothing = torch.zeros(0, dtype=torch.long)
    full = Shape.of(model.config)
    known = _layer_cuts(nothing, nothing, nothing, full)
    norms = {f"{name}.weight" for name in _residual_norm_names(model, full.hidden)}
    for key in model.state_dict():
        rest = key[len(LAYERS_PREFIX) :].split(".", 1)[-1]
        if key.startswith(LAYERS_PREFIX) and rest not in known and key not in norms:
            raise StillError(
                f"cannot width-prune {type(model).__name__}: it has a weight {key} this kit "
                "does not know how to cut",
                hint="width pruning supports Llama-style, Qwen, Mistral, Phi-3 and Gemma-3 dense "
                "layers (not mixture-of-experts); use prune: depth",
            )


def _student_state(model, kept: dict, full: Shape, shape: Shape) -> dict[str, Tensor]:
    refuse_uncuttable(model)
    hidden = kept["hidden"]
    norm_scale = math.sqrt(full.hidden / shape.hidden)
    modules = dict(model.named_modules())
    offsets = {
        name: _norm_offset(modules[name]) for name in _residual_norm_names(model, full.hidden)
    }
    embed_scaled = getattr(model.model.embed_tokens, "embed_scale", None) is not None
    embed_factor = norm_scale if embed_scaled else 1.0
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    state, layer_cuts = {}, {}
    for key, tensor in model.state_dict().items():
        module_name = key.rsplit(".", 1)[0]
        if module_name in offsets:  # a norm over the residual stream
            offset = offsets[module_name]
            factor = norm_scale / (embed_factor if module_name == "model.norm" and tied else 1.0)
            state[key] = (tensor[hidden] + offset) * factor - offset
        elif key == "model.embed_tokens.weight":
            state[key] = tensor[:, hidden] * embed_factor
        elif key == "lm_head.weight":
            state[key] = tensor[:, hidden] * (embed_factor if tied else 1.0)
        elif key.startswith(LAYERS_PREFIX):
            index, rest = key[len(LAYERS_PREFIX) :].split(".", 1)
            if index not in layer_cuts:
                mlp, rows = kept["mlp"][int(index)], kept["query_rows"][int(index)]
                layer_cuts[index] = _layer_cuts(hidden, mlp, rows, full)
            state[key] = layer_cuts[index][rest](tensor)
        else:
            state[key] = tensor
    return {key: value.contiguous() for key, value in state.items()}


def width_pruned_model(model: PreTrainedModel, importance: dict, shape: Shape) -> PreTrainedModel:
    """A model of `model`'s class with `shape`, holding the most important channels' weights."""
    full = Shape.of(model.config)
    kept = kept_channels(importance, full, shape)
    first = next(model.parameters())
    config = pruned_config(model.config, shape)
    config.validate()  # what save_pretrained checks, checked before any training
    with torch.device(first.device):
        student = type(model)._from_config(config, dtype=first.dtype)
    student.load_state_dict(_student_state(model, kept, full, shape), strict=True)
    student.generation_config = copy.deepcopy(model.generation_config)
    return student.eval()


# --------------------------------------------------------------------------- the recipe's student
def pruned_student(teacher: nn.Module, init, calibration_batches=None):
    """`student.init` as a model and its report: depth (distill/student.py), width, or depth
    then width. The teacher is left unchanged."""
    if init.prune == "depth":
        return carve_student(teacher, init, calibration_batches)
    if calibration_batches is None:
        raise StillError(
            "width pruning needs calibration batches to score channels",
            hint="the distill runner passes student.init.calibration_samples examples",
        )
    calibration_batches = list(calibration_batches)
    source = _merged_copy(teacher) if isinstance(teacher, PeftModel) else teacher
    refuse_uncuttable(source)  # before a depth carve or any scoring
    teacher_params = count_parameters(source)
    layers = len(_decoder_layers(source))
    if init.prune == "both":
        narrower, report = carve_student(source, init, calibration_batches)
    else:
        narrower = source
        report = CarveReport(list(range(layers)), layers, teacher_params, teacher_params)
    target = init.target_parameters(teacher_params)
    shape = plan_width(narrower, target, tuple(init.width_axes))
    warn_gguf_blocks(shape)
    student = width_pruned_model(narrower, width_importance(narrower, calibration_batches), shape)
    report.student_params = count_parameters(student)
    report.shape = _narrowed(Shape.of(source.config), shape)
    return student, report


# GGUF quantizes a matrix in blocks along its rows: 32 values for q8_0 / q4_0, 256 for the
# k-quants (q4_k_m ...). A row is a matrix's input width: hidden, MLP, or heads x head_dim.
GGUF_BLOCKS = {"q8_0/q4_0": 32, "q4_k_m/q5_k_m/q6_k": 256}


def warn_gguf_blocks(shape: Shape) -> None:
    """Before training: a pruned width that GGUF's quantization blocks do not divide."""
    widths = {
        "hidden": shape.hidden,
        "MLP": shape.intermediate,
        "attention (heads x head_dim)": shape.heads * shape.head_dim,
    }
    for types, block in GGUF_BLOCKS.items():
        odd = [f"{name} {width}" for name, width in widths.items() if width % block]
        if odd:
            print(
                f"still: warning: the width-pruned student's {', '.join(odd)} "
                f"{'is' if len(odd) == 1 else 'are'} not a multiple of {block}: GGUF {types} "
                f"cannot block those matrices (publish refuses q8_0/q4_0 for them; llama.cpp "
                f"writes k-quants of them in a wider fallback type); set student.init.keep_ratio "
                f"or the target size so the widths are multiples of {block}"
            )
            return


def _narrowed(full: Shape, shape: Shape) -> str:
    parts = [
        f"hidden {shape.hidden}/{full.hidden}",
        f"MLP {shape.intermediate}/{full.intermediate}",
        f"heads {shape.heads}/{full.heads} ({shape.kv_heads} kv)",
    ]
    return ", ".join(parts)
