"""Carving students by depth (distill/student.py) out of every family's twin: the right layers
with their exact weights (q/k norms, fused qkv, experts and router) and per-layer attributes
(Gemma-3's sliding windows, Qwen3-MoE's dense layers), the head tied as the family ties it, the
padded vocabulary rows kept, logits equal to the teacher's running only the kept layers."""

import copy

import pytest
import torch
from families import FAMILIES, FAMILY, build_model
from torch import nn
from transformers import AutoModelForCausalLM

from distill.student import carve_student
from still.distill_sections import StudentInit

LAYERS = "model.layers."


def token_batch(tokenizer, rows: int = 2, length: int = 12, seed: int = 0) -> dict:
    """Ids of real tokens only (not the padded embedding rows past the tokenizer)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, len(tokenizer), (rows, length), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch, use_cache=False).logits  # the reference's layer_idx skip indices


def without_layers(teacher, kept: list[int]):
    """The teacher itself, running only the `kept` blocks (each keeps its own modules; the
    model reads each block's attention type from its config's list)."""
    reference = copy.deepcopy(teacher)
    reference.model.layers = nn.ModuleList(reference.model.layers[index] for index in kept)
    if getattr(reference.config, "layer_types", None) is not None:
        reference.config.layer_types = [teacher.config.layer_types[index] for index in kept]
    return reference


def is_tied(model) -> bool:
    return model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


# --------------------------------------------------------------------------- depth
@pytest.mark.parametrize("name", FAMILIES)
def test_keeping_every_layer_keeps_every_logit(name, teachers, tokenizers):
    teacher = teachers[name]
    student, report = carve_student(teacher, StudentInit(keep_layers=[0, 1, 2, 3]))
    assert type(student) is type(teacher) and report.param_fraction == 1.0
    batch = token_batch(tokenizers[name])
    assert torch.allclose(logits(student, batch), logits(teacher, batch), atol=1e-6)


@pytest.mark.parametrize("name", FAMILIES)
def test_kept_layers_carry_their_weights_attributes_and_head(name, teachers, tokenizers, tmp_path):
    teacher, kept = teachers[name], [0, 2, 3]
    student, _ = carve_student(teacher, StudentInit(keep_layers=kept))
    teacher_state = teacher.state_dict()
    for key, value in student.state_dict().items():  # q/k norms, fused qkv, experts, router...
        if key.startswith(LAYERS):
            index, rest = key[len(LAYERS) :].split(".", 1)
            key = f"{LAYERS}{kept[int(index)]}.{rest}"
        assert torch.equal(value, teacher_state[key]), key
    assert len(student.state_dict()) < len(teacher_state)
    for position, layer in enumerate(student.model.layers):
        assert layer.self_attn.layer_idx == position  # indexes the KV cache
        teacher_layer = teacher.model.layers[kept[position]]
        for attribute in ("sliding_window", "is_sliding", "scaling"):  # Gemma-3's windows
            assert getattr(layer.self_attn, attribute, None) == getattr(
                teacher_layer.self_attn, attribute, None
            ), attribute
        assert type(layer.mlp) is type(teacher_layer.mlp)
    types = getattr(teacher.config, "layer_types", None)
    if types is not None:
        assert student.config.layer_types == [types[index] for index in kept]
    tied = FAMILY[name].config.get("tie_word_embeddings", True)
    assert is_tied(student) == is_tied(teacher) == tied
    multiple = FAMILY[name].vocab_multiple
    padded_rows = -(-len(tokenizers[name]) // multiple) * multiple  # as the family pads its head
    assert student.config.vocab_size == teacher.config.vocab_size == padded_rows
    batch = token_batch(tokenizers[name])
    want = logits(without_layers(teacher, kept), batch)
    assert torch.allclose(logits(student, batch), want, atol=1e-6)
    student.save_pretrained(tmp_path / "student")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    assert type(again) is type(teacher) and is_tied(again) == tied
    assert again.config.num_hidden_layers == 3
    assert torch.equal(logits(again, batch), logits(student, batch))


def test_moe_dense_layers_stay_dense_where_they_land(tokenizers):
    """Qwen3-MoE names its dense-MLP layers by index (mlp_only_layers) or by a step: a carve
    renumbers the layers, so the student's config must name the kept dense ones anew."""
    tokenizer = tokenizers["qwen3_moe"]
    teacher = build_model("qwen3_moe", tokenizer, layers=4, seed=2, mlp_only_layers=[1])
    kept = [0, 1, 3]
    student, _ = carve_student(teacher, StudentInit(keep_layers=kept))
    assert [type(layer.mlp).__name__ for layer in student.model.layers] == [
        type(teacher.model.layers[index].mlp).__name__ for index in kept
    ]
    batch = token_batch(tokenizer)
    assert torch.allclose(
        logits(student, batch), logits(without_layers(teacher.eval(), kept), batch), atol=1e-6
    )
    stepped = build_model("qwen3_moe", tokenizer, layers=4, seed=2, decoder_sparse_step=2)
    student, _ = carve_student(stepped, StudentInit(keep_layers=[1, 2, 3]))
    assert [type(layer.mlp).__name__ for layer in student.model.layers] == [
        "Qwen3MoeSparseMoeBlock",
        "Qwen3MoeMLP",
        "Qwen3MoeSparseMoeBlock",
    ]
