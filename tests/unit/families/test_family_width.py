"""Width pruning (distill/width.py) of every family's twin: channels that carry nothing are
dropped without changing a logit (Llama-3, Qwen2.5 biases, Qwen3 q/k norms, Gemma-3 scaled
embeddings and (1 + w) norms, Mistral, Phi-3's fused projections), the pruned model reloads in
its class, and Qwen3-MoE, whose experts have no cut, is refused in one line."""

import pytest
import torch
from families import DENSE, build_model
from test_family_carve import is_tied, logits, token_batch
from transformers import AutoModelForCausalLM

from distill.student import count_parameters
from distill.width import Shape, pruned_student, width_importance, width_pruned_model
from still.distill_sections import StudentInit
from still.errors import StillError

WIDTH_PRUNABLE = DENSE  # every dense family; qwen3_moe is refused


def _dead_channels(model, hidden_drop, mlp_drop, heads_drop, full: Shape):
    """Hidden channels `hidden_drop` zero in the residual stream, MLP channels `mlp_drop` and
    query heads `heads_drop` silent in every layer: then dropping them changes nothing."""
    head_columns = (heads_drop[:, None] * full.head_dim + torch.arange(full.head_dim)).flatten()
    with torch.no_grad():
        model.model.embed_tokens.weight[:, hidden_drop] = 0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[hidden_drop] = 0
            layer.self_attn.o_proj.weight[:, head_columns] = 0
            layer.mlp.down_proj.weight[hidden_drop] = 0
            if hasattr(layer.mlp, "gate_up_proj"):  # Phi-3: [gate; up] in one projection
                layer.mlp.gate_up_proj.weight[full.intermediate + mlp_drop] = 0
            else:
                layer.mlp.up_proj.weight[mlp_drop] = 0
            if hasattr(layer, "post_feedforward_layernorm"):  # Gemma: post-norms feed the stream
                for norm in (layer.post_attention_layernorm, layer.post_feedforward_layernorm):
                    norm.weight[hidden_drop] = -1.0  # (1 + w) = 0
    return model


@pytest.mark.parametrize(
    ("name", "hidden"), [*((name, 64) for name in WIDTH_PRUNABLE), ("qwen3", 16)]
)
def test_width_pruning_drops_dead_channels_without_changing_a_logit(
    name, hidden, tokenizers, tmp_path
):
    """qwen3 at hidden 16 has q/k norms as wide as the residual stream (head_dim 16): they
    are per head and must stay whole."""
    tokenizer = tokenizers[name]
    model = build_model(name, tokenizer, layers=2, hidden=hidden, seed=3).eval()
    full = Shape.of(model.config)
    hidden_drop = torch.arange(0, full.hidden, 4)  # a quarter of the residual stream
    mlp_drop = torch.arange(1, full.intermediate, 2)  # half of every MLP
    heads_drop = torch.tensor([1, 3])  # one query head in each of the two kv groups
    _dead_channels(model, hidden_drop, mlp_drop, heads_drop, full)
    batch = token_batch(tokenizer)
    importance = width_importance(model, [batch])
    assert importance["mlp"][:, mlp_drop].max() == 0
    importance["heads"][:, heads_drop] = -1.0  # their output reaches nothing: weakest
    shape = Shape(
        full.layers,
        full.hidden - len(hidden_drop),
        full.intermediate - len(mlp_drop),
        full.heads - len(heads_drop),
        full.kv_heads,
        full.head_dim,
    )
    student = width_pruned_model(model, importance, shape)
    assert (student.config.hidden_size, student.config.intermediate_size) == (
        shape.hidden,
        shape.intermediate,
    )
    assert student.config.num_attention_heads == 2 and student.config.head_dim == full.head_dim
    assert is_tied(student) == is_tied(model)
    got, want = logits(student, batch), logits(model, batch)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()
    assert count_parameters(student) < count_parameters(model)
    student.save_pretrained(tmp_path / "narrow")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "narrow").eval()
    assert type(again) is type(model) and again.config.hidden_size == shape.hidden
    assert torch.equal(logits(again, batch), got)


@pytest.mark.parametrize("name", ["qwen3", "gemma3", "phi3"])
def test_a_planned_width_student_has_consistent_shapes(name, teachers, tokenizers):
    """Importance from real (random) activations, a parameter target, every axis."""
    init = StudentInit(prune="width", size=0.6, calibration_samples=2)
    batch = token_batch(tokenizers[name])
    student, report = pruned_student(teachers[name], init, [batch])
    assert count_parameters(student) <= 0.6 * count_parameters(teachers[name])
    assert report.shape and torch.isfinite(logits(student, batch)).all()
    assert student.model.embed_tokens.weight.shape[1] == student.config.hidden_size


def test_width_refusal_is_one_line(teachers, tokenizers):
    """Qwen3-MoE: every expert would need its own channel choice; refused before any scoring."""
    init = StudentInit(prune="width", size=0.6)
    batch = token_batch(tokenizers["qwen3_moe"])
    with pytest.raises(StillError) as raised:
        pruned_student(teachers["qwen3_moe"], init, [batch])
    message = str(raised.value)
    assert "cannot width-prune Qwen3MoeForCausalLM" in message and "\n" not in message
    assert "prune: depth" in raised.value.hint
