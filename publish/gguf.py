"""Write a transformers causal LM as a GGUF file (f16, q8_0, q4_0; f32 as the source of
llama.cpp's k-quants, publish/quantize.py) and check it loads back.

Written with the `gguf` package (GGUFWriter, the tensor-name map of the architecture,
`gguf.quants.quantize`). Each family's differences from a plain Llama are one `ArchSpec`:

  llama, mistral  q and k projections are stored with llama.cpp's rotary row order (the two
                  halves of each head interleaved); transformers' GGUF loader undoes it.
                  Mistral is llama.cpp's `llama` architecture, as its own converter writes it.
  qwen2           q/k/v projections carry biases; rotary in HF order (llama.cpp's NEOX).
  qwen3           q/k RMSNorms; head_dim apart from hidden/heads (attention.key_length).
  qwen3_moe       as qwen3, with experts: HF's fused gate_up_proj [experts, 2·ff, hidden] is
                  written as ffn_gate_exps and ffn_up_exps, and the router stays f32.
  phi3            fused qkv_proj and gate_up_proj, as llama.cpp's phi3 expects them.
  gemma3_text     Gemma's RMSNorm scales by (1 + w); llama.cpp stores the (1 + w) itself and
                  the loader subtracts one again, so every norm weight is written plus one.
                  Sliding and global layers: attention.sliding_window and its rope base.

Families not listed are refused with a one-line error. The tokenizer travels as GGUF metadata
(publish/gguf_tokenizer.py).

`verify_gguf` is the proof: it loads the file with `AutoModelForCausalLM.from_pretrained(dir,
gguf_file=...)` and compares logits with the model it came from, within `TOLERANCES`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from publish.gguf_tokenizer import write_tokenizer
from still.errors import StillError

# Drift from the fp32 model: rms(Δ logit) / std(logits) on a sample, per type. Measured on tiny
# random models of every family and SmolLM2-135M (docs/publishing.md), set with headroom; the
# 4-bit types move a random tiny model's logits by up to half their std (0.44-0.53 for q4_0).
# The k-quants (written by llama.cpp, publish/quantize.py) are loaded back for their drift only.
TOLERANCES = {
    "f16": 0.01,
    "q8_0": 0.10,
    "q6_k": 0.30,
    "q5_k_m": 0.50,
    "q4_k_m": 0.70,
    "q4_0": 0.80,
}
# The loaded GGUF against the source with the same rounding applied in torch: only float
# summation order may differ.
EXACT_TOLERANCE = 1e-4
GGUF_TYPES = ("f16", "q8_0", "q4_0")  # what this module writes itself
_BLOCK = 32  # elements per q8_0 / q4_0 block: a row must be a multiple of it


@dataclass(frozen=True)
class ArchSpec:
    gguf_arch: str  # the name in gguf.MODEL_ARCH_NAMES
    permute_qk: bool = False  # llama.cpp's rotary row order for q/k projections
    norm_offset: float = 0.0  # added to every norm weight on the way out
    biases: bool = False  # q/k/v projections with biases (Qwen2)
    key_length: bool = False  # head_dim written as attention.key_length / value_length
    sliding_window: bool = False  # sliding and global layers (Gemma-3)
    experts: bool = False  # fused expert weights and a router (Qwen3-MoE)


ARCHS = {
    "llama": ArchSpec("llama", permute_qk=True),
    "mistral": ArchSpec("llama", permute_qk=True),
    "qwen2": ArchSpec("qwen2", biases=True),
    "qwen3": ArchSpec("qwen3", key_length=True),
    "qwen3_moe": ArchSpec("qwen3moe", key_length=True, experts=True),
    "phi3": ArchSpec("phi3"),
    "gemma3_text": ArchSpec("gemma3", norm_offset=1.0, key_length=True, sliding_window=True),
}
# Matrices llama.cpp keeps in f32 whatever the file type: the MoE router.
_F32_MATRICES = (".mlp.gate.weight",)


def arch_spec(config) -> ArchSpec:
    spec = ARCHS.get(config.model_type)
    if spec is None:
        raise StillError(
            f"GGUF export supports {sorted(ARCHS)} models; this one is '{config.model_type}'",
            hint="publish without --gguf, or convert with llama.cpp's converter",
        )
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise StillError("GGUF export: projections with bias terms are not supported")
    rope = _rope_parameters(config)
    if rope.get("rope_type", "default") != "default":
        raise StillError(f"GGUF export: rope scaling '{rope['rope_type']}' is not supported")
    if not spec.sliding_window and getattr(config, "sliding_window", None) is not None:
        raise StillError(
            f"GGUF export: a {config.model_type} model with sliding-window attention "
            f"(sliding_window={config.sliding_window}) is not supported",
            hint="publish without --gguf for this model",
        )
    if getattr(config, "partial_rotary_factor", 1.0) != 1.0:
        raise StillError(
            f"GGUF export: partial rotary embeddings (partial_rotary_factor="
            f"{config.partial_rotary_factor}) are not supported",
            hint="publish without --gguf for this model",
        )
    return spec


# --------------------------------------------------------------------------- export
def export_gguf(
    model, tokenizer, path: Path, gguf_type: str, *, name: str, license: str | None = None
) -> Path:
    """Write `model` (+ tokenizer) to `path` as `gguf_type` (GGUF_TYPES, or "f32")."""
    import gguf

    if gguf_type not in (*GGUF_TYPES, "f32"):
        raise StillError(
            f"unknown GGUF type '{gguf_type}'", hint=f"choose from {', '.join(GGUF_TYPES)}"
        )
    config = model.config
    spec = arch_spec(config)
    _refuse_unblockable(model, gguf_type)
    writer = gguf.GGUFWriter(str(path), spec.gguf_arch)
    writer.add_name(name)
    if license:
        writer.add_license(license)
    file_types = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    }
    file_type = file_types[gguf_type]
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_hparams(writer, config, spec)
    vocab_rows = model.get_input_embeddings().weight.shape[0]
    write_tokenizer(writer, tokenizer, vocab_rows)
    for gguf_name, hf_name, array in _gguf_tensors(model, spec):
        data, raw_dtype = _encode(array, hf_name, gguf_type)
        writer.add_tensor(gguf_name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _refuse_unblockable(model, gguf_type: str) -> None:
    """q8_0 / q4_0 quantize each row in blocks of 32: a matrix whose rows are not whole blocks
    (a width-pruned student of odd width) cannot take the type at all."""
    if gguf_type not in ("q8_0", "q4_0"):
        return
    odd = sorted(
        {
            parameter.shape[-1]
            for name, parameter in model.named_parameters()
            if parameter.dim() >= 2
            and parameter.shape[-1] % _BLOCK
            and not name.endswith(_F32_MATRICES)
        }
    )
    if odd:
        raise StillError(
            f"GGUF {gguf_type}: this model has matrix rows of {', '.join(map(str, odd))} values, "
            f"not a multiple of {_BLOCK} (the {gguf_type} block)",
            hint="publish --gguf f16, or prune the student's width to multiples of 32",
        )


def _rope_parameters(config, layer_type: str = "full_attention") -> dict:
    rope = getattr(config, "rope_parameters", None) or {}
    if layer_type in rope:  # per-layer-type parameters (Gemma-3: full and sliding attention)
        rope = rope[layer_type]
    if "rope_theta" not in rope and getattr(config, "rope_theta", None) is not None:
        rope = {**rope, "rope_theta": config.rope_theta}
    return rope


def _write_hparams(writer, config, spec: ArchSpec) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(_rope_parameters(config)["rope_theta"]))
    writer.add_vocab_size(config.vocab_size)
    if spec.gguf_arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    if spec.key_length:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if spec.sliding_window:
        writer.add_sliding_window(config.sliding_window)
        local = _rope_parameters(config, "sliding_attention").get("rope_theta")
        if local is not None:
            writer.add_rope_freq_base_swa(float(local))
    if spec.experts:
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)


def _gguf_tensors(model, spec: ArchSpec):
    """(gguf name, HF name, fp32 array in the file's layout) for every weight the file needs."""
    import gguf
    import torch

    config = model.config
    arch = next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == spec.gguf_arch)
    name_map = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    state = model.state_dict()
    tied = getattr(config, "tie_word_embeddings", False)
    for hf_name, tensor in state.items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp ties output to token_embd when `output.weight` is absent
        array = tensor.detach().to("cpu", torch.float32).numpy()
        if spec.experts and hf_name.endswith(".mlp.experts.gate_up_proj"):
            stem = hf_name.removesuffix("gate_up_proj")
            gate, up = np.split(array, 2, axis=1)  # [experts, 2·ff, hidden]: gate rows first
            yield _gguf_name(name_map, stem + "gate_proj", spec) + ".weight", hf_name, gate
            yield _gguf_name(name_map, stem + "up_proj", spec) + ".weight", hf_name, up
            continue
        if spec.experts and hf_name.endswith(".mlp.experts.down_proj"):
            yield _gguf_name(name_map, hf_name, spec) + ".weight", hf_name, array
            continue
        base, _, suffix = hf_name.rpartition(".")
        gguf_base = _gguf_name(name_map, base, spec)
        if spec.permute_qk and gguf_base.endswith(".attn_q"):
            array = _to_rotary_row_order(array, config.num_attention_heads)
        elif spec.permute_qk and gguf_base.endswith(".attn_k"):
            array = _to_rotary_row_order(array, config.num_key_value_heads)
        if spec.norm_offset and gguf_base.endswith("norm"):
            array = array + spec.norm_offset
        yield f"{gguf_base}.{suffix}", hf_name, array


def tensor_namer(model):
    """hf module name -> the GGUF name of its weight, or None for a weight the file does not
    hold as a matrix of its own (a tied output layer, embeddings)."""
    import gguf

    config = model.config
    spec = arch_spec(config)
    arch = next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == spec.gguf_arch)
    name_map = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tied = getattr(config, "tie_word_embeddings", False)

    def name(module_name: str) -> str | None:
        if tied and module_name == "lm_head":
            return None
        base = name_map.get_name(module_name)
        return None if base is None or base == "token_embd" else f"{base}.weight"

    return name


def _gguf_name(name_map, hf_base: str, spec: ArchSpec) -> str:
    gguf_base = name_map.get_name(hf_base)
    if gguf_base is None:
        raise StillError(f"GGUF export: no GGUF name for tensor '{hf_base}' ({spec.gguf_arch})")
    return gguf_base


def _to_rotary_row_order(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """HF keeps each head's rotary pairs as two halves; llama.cpp interleaves them."""
    half = weight.shape[0] // n_heads // 2
    return weight.reshape(n_heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _encode(array: np.ndarray, hf_name: str, gguf_type: str):
    """Norms, other vectors and the MoE router stay f32 (as llama.cpp keeps them); other
    matrices become the type."""
    import gguf

    if array.ndim < 2 or hf_name.endswith(_F32_MATRICES):
        return np.ascontiguousarray(array, dtype=np.float32), None
    if gguf_type == "f32":
        return np.ascontiguousarray(array, dtype=np.float32), None
    if gguf_type in ("q8_0", "q4_0") and array.shape[-1] % _BLOCK == 0:
        block_type = getattr(gguf.GGMLQuantizationType, gguf_type.upper())
        return gguf.quants.quantize(np.ascontiguousarray(array), block_type), block_type
    # f16, or a q8_0 / q4_0 row that is not a whole number of blocks
    return np.ascontiguousarray(array, dtype=np.float16), None


# --------------------------------------------------------------------------- verify
# Config fields that change outputs; transformers rebuilds the config from GGUF metadata, and
# those it does not read (e.g. Gemma-3's query_pre_attn_scalar) come back as class defaults.
CONFIG_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "rms_norm_eps",
    "tie_word_embeddings",
    "rope_parameters",
    "hidden_act",
    "hidden_activation",
    "query_pre_attn_scalar",
    "sliding_window",
    "layer_types",
    "final_logit_softcapping",
    "attn_logit_softcapping",
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "norm_topk_prob",
)


def check_config(path: Path, config) -> None:
    """Refuse a file whose config would load back different: name the field, not a logit."""
    from transformers import AutoConfig

    path = Path(path)
    loaded = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name).to_dict()
    ours = config.to_dict()
    for key in CONFIG_KEYS:
        if key in ours and not _same(ours[key], loaded.get(key)):
            raise StillError(
                f"GGUF cannot carry {key}={ours[key]!r}: transformers' GGUF loader reads it "
                f"back as {loaded.get(key)!r}",
                hint="publish without --gguf for this model",
            )


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-6)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def rounded_copy(model, gguf_type: str):
    """A copy of `model` whose weights carry exactly the rounding the GGUF file applies."""
    import copy

    import gguf
    import torch

    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for hf_name, parameter in rounded.named_parameters():  # tied weights appear once
            array = parameter.detach().to("cpu", torch.float32).numpy()
            data, raw_dtype = _encode(array, hf_name, gguf_type)
            if raw_dtype is not None:
                data = gguf.quants.dequantize(data, raw_dtype).reshape(array.shape)
            parameter.copy_(torch.from_numpy(np.asarray(data, dtype=np.float32)))
    return rounded


def verify_gguf(
    path: Path,
    reference_model,
    tokenizer,
    gguf_type: str,
    texts: list[str],
    *,
    check_tokenizer: bool = True,
    exact: bool = True,
) -> dict:
    """Load `path` back with transformers and compare it with the model it was written from.

    Two checks (the first only with `exact`: a k-quant's rounding is llama.cpp's to know).
    Exactness: the loaded logits equal those of the source with the file's own rounding
    applied in torch (`rounded_copy`), to `EXACT_TOLERANCE`; this catches any layout,
    name or metadata mistake. Drift: how far the file is from the fp32 source, as
    rms(Δ logit) / std(logits) against `TOLERANCES[gguf_type]`, with top-1 agreement and the
    mean per-token KL(fp32 ‖ gguf) reported. Raises StillError when either fails.
    """
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    loaded = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    if check_tokenizer:
        _check_tokenizer(path, tokenizer, texts)
    reference_model.eval()
    rounded = rounded_copy(reference_model, gguf_type).eval() if exact else None
    result = {
        "type": gguf_type,
        **_compare(loaded, rounded, reference_model, tokenizer, texts),
        "tolerance": TOLERANCES[gguf_type],
    }
    result["tokens"] = result.pop("tokens")  # last, where lineage.json has always had it
    del loaded, rounded
    exact, rms = result["exact_max_abs_diff"], result["rms_relative_diff"]
    if exact is not None and not exact <= EXACT_TOLERANCE:  # written so that a NaN fails too
        raise StillError(
            f"GGUF {path.name} loads back different from the model it was written from "
            f"(max |Δlogit| {exact:.3g} > {EXACT_TOLERANCE} beyond {gguf_type} rounding)",
            hint="a bug in the GGUF export for this architecture; publish without --gguf meanwhile",
        )
    if not rms <= TOLERANCES[gguf_type]:
        raise StillError(
            f"GGUF {path.name}: {gguf_type} rounding moves the logits by {rms:.3g} of their std "
            f"(tolerance {TOLERANCES[gguf_type]})",
            hint="use --gguf f16 for this model",
        )
    return result


def _check_tokenizer(path: Path, tokenizer, texts: list[str]) -> None:
    """The file's tokenizer must split every text into the same ids as the source's."""
    from transformers import AutoTokenizer

    gguf_tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in texts:
        ours, theirs = tokenizer(text)["input_ids"], gguf_tokenizer(text)["input_ids"]
        if ours != theirs:
            raise StillError(
                f"GGUF {path.name}: its tokenizer splits {text[:40]!r} differently "
                f"({theirs[:12]} vs {ours[:12]})"
            )


def _compare(loaded, rounded, reference_model, tokenizer, texts: list[str]) -> dict:
    """Exactness against `rounded` and drift against `reference_model`, over `texts`."""
    import torch

    exact, drift_max, rms, kl, agree, total = 0.0, 0.0, 0.0, 0.0, 0, 0
    with torch.inference_mode():
        for text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            reference = reference_model(input_ids=ids).logits.float()[0]
            got = loaded(input_ids=ids).logits.float()[0]
            if rounded is not None:
                rounded_logits = rounded(input_ids=ids).logits.float()[0]
                exact = max(exact, (rounded_logits - got).abs().max().item())
            delta = reference - got
            drift_max = max(drift_max, delta.abs().max().item())
            rms = max(rms, (delta.pow(2).mean().sqrt() / reference.std()).item())
            kl += torch.nn.functional.kl_div(
                got.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="sum"
            ).item()
            agree += (reference.argmax(-1) == got.argmax(-1)).sum().item()
            total += ids.shape[1]
    return {
        "exact_max_abs_diff": exact if rounded is not None else None,
        "max_abs_diff": drift_max,
        "rms_relative_diff": rms,
        "mean_kl": kl / total,
        "top1_agreement": agree / total,
        "tokens": total,
    }
