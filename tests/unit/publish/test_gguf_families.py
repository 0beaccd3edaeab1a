"""GGUF export for every family in tests/families.py: written with the gguf package, read back by
transformers' GGUF loader and compared logit by logit (exact beyond the file's own rounding),
with the tokenizer splitting the same; and the shapes the format or the loader cannot carry
refused by name before anything is published."""

import pytest
from families import FAMILIES, build_model, build_tokenizer
from gguf import GGMLQuantizationType, GGUFReader

from publish import gguf as gguf_export
from still.errors import StillError

TEXTS = [
    "What does json.dumps do? Serialize obj to a JSON formatted str.",
    "Return a new list containing all items from the iterable in ascending order.",
]
# transformers' GGUF loader rebuilds a few config fields from class defaults instead of the
# file (llama.cpp reads them from the file); the twins take the real models' values there:
# Qwen3's head_dim 128, Qwen3-30B-A3B's 768-wide experts with normalised top-k weights, and
# Gemma-3's five sliding layers to one global with query_pre_attn_scalar 256.
REAL_VALUES = {
    "qwen3": {"head_dim": 128},
    "qwen3_moe": {"head_dim": 128, "moe_intermediate_size": 768, "norm_topk_prob": True},
    "gemma3": {
        "layers": 6,
        "layer_types": ["sliding_attention"] * 5 + ["full_attention"],
        "query_pre_attn_scalar": 256,
    },
}
# A q8_0 MoE moves its router's choices, so its drift is near the q8_0 tolerance at random init:
# the exact check (the file equals the rounded model) is the proof there, in f16. q4_0 moves a
# random tiny model's logits by about half their std (tolerance 0.8).
TYPES = [
    (f, t) for f in FAMILIES for t in ("f16", "q8_0", "q4_0") if f != "qwen3_moe" or t == "f16"
]


def twin(family, **overrides):
    tokenizer = build_tokenizer(family)
    model = build_model(family, tokenizer, **{**REAL_VALUES.get(family, {}), **overrides}).eval()
    return model, tokenizer


@pytest.mark.parametrize("family, gguf_type", TYPES)
def test_every_family_round_trips_through_transformers(tmp_path, family, gguf_type):
    model, tokenizer = twin(family)
    path = gguf_export.export_gguf(model, tokenizer, tmp_path / "m.gguf", gguf_type, name="t")
    gguf_export.check_config(path, model.config)
    report = gguf_export.verify_gguf(path, model, tokenizer, gguf_type, TEXTS)
    assert report["exact_max_abs_diff"] <= gguf_export.EXACT_TOLERANCE
    assert 0 < report["rms_relative_diff"] <= gguf_export.TOLERANCES[gguf_type]


def tensor_types(path):
    return {tensor.name: tensor.tensor_type for tensor in GGUFReader(path).tensors}


def test_family_tensors_land_under_llama_cpp_names(tmp_path):
    """Biases (Qwen2), q/k norms (Qwen3), fused projections (Phi-3), split experts with an f32
    router (Qwen3-MoE), an untied head (Llama 3) and padded vocab rows, as llama.cpp names them."""
    expected = {
        "qwen2": {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"},
        "qwen3": {"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"},
        "phi3": {"blk.0.attn_qkv.weight", "blk.0.ffn_up.weight", "output.weight"},
        "qwen3_moe": {
            "blk.0.ffn_gate_exps.weight",
            "blk.0.ffn_up_exps.weight",
            "blk.0.ffn_down_exps.weight",
            "blk.0.ffn_gate_inp.weight",
        },
        "llama3": {"output.weight"},
    }
    for family, names in expected.items():
        model, tokenizer = twin(family)
        path = gguf_export.export_gguf(
            model, tokenizer, tmp_path / f"{family}.gguf", "q8_0", name=family
        )
        types = tensor_types(path)
        assert names <= set(types), family
        if family == "qwen3_moe":
            assert types["blk.0.ffn_gate_inp.weight"] == GGMLQuantizationType.F32
            assert types["blk.0.ffn_up_exps.weight"] == GGMLQuantizationType.Q8_0
            reader = GGUFReader(path)
            assert reader.fields["qwen3moe.expert_count"].contents() == 4
            assert reader.fields["qwen3moe.expert_feed_forward_length"].contents() == 768
        if family == "phi3":  # 300 tokens, 320 embedding rows: the rest are unused padding
            tokens = GGUFReader(path).fields["tokenizer.ggml.tokens"].contents()
            assert len(tokens) == model.config.vocab_size == 320
            assert tokens[-1] == "[PAD319]"


@pytest.mark.parametrize(
    "family, overrides, message",
    [
        ("qwen3", {"head_dim": 16}, "GGUF cannot carry head_dim=16"),
        ("qwen3_moe", {"moe_intermediate_size": 16}, "GGUF cannot carry moe_intermediate_size=16"),
        ("gemma3", {"layers": 2}, "GGUF cannot carry layer_types="),
    ],
)
def test_fields_the_loader_would_read_back_wrong_are_refused_by_name(
    tmp_path, family, overrides, message
):
    model, tokenizer = twin(family, **overrides)
    path = gguf_export.export_gguf(model, tokenizer, tmp_path / "m.gguf", "f16", name="t")
    with pytest.raises(StillError, match=message):
        gguf_export.check_config(path, model.config)


@pytest.mark.parametrize(
    "family, overrides, message",
    [
        ("mistral", {"sliding_window": 4096}, "sliding-window attention"),
        ("phi3", {"sliding_window": 2047}, "sliding-window attention"),
        ("phi3", {"partial_rotary_factor": 0.75}, "partial rotary"),
        (
            "phi3",
            {
                "rope_parameters": {
                    "rope_type": "longrope",
                    "rope_theta": 1e4,
                    "short_factor": [1.0] * 4,
                    "long_factor": [1.0] * 4,
                    "original_max_position_embeddings": 256,
                }
            },
            "rope scaling 'longrope'",
        ),
    ],
)
def test_what_the_export_cannot_write_is_refused_before_writing(
    tmp_path, family, overrides, message
):
    model, tokenizer = twin(family, **overrides)
    with pytest.raises(StillError, match=message):
        gguf_export.export_gguf(model, tokenizer, tmp_path / "m.gguf", "f16", name="t")
    assert not (tmp_path / "m.gguf").exists()
