"""Width pruning (distill/width.py): channels that carry nothing are dropped without changing a
logit (Llama-style and Gemma-3, whose norms and embeddings scale differently), GQA groups stay
whole, a parameter target is met, and the student reloads as a normal HF model."""

import pytest
import torch
from test_student import gemma3_teacher, token_batch
from tiny_models import build_tiny_llama, build_tiny_tokenizer
from transformers import AutoModelForCausalLM

from distill.student import count_parameters
from distill.width import (
    Shape,
    plan_width,
    shape_at,
    width_importance,
    width_pruned_model,
)
from still.errors import StillError


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def llama(tokenizer, heads=4, kv_heads=2):
    model = build_tiny_llama(tokenizer, hidden=64, layers=3, seed=3)
    return model.eval()


def _dead_channels(model, hidden_drop, mlp_drop):
    """Make hidden channels `hidden_drop` zero in the whole residual stream and MLP channels
    `mlp_drop` silent in every layer: then they carry nothing."""
    with torch.no_grad():
        model.model.embed_tokens.weight[:, hidden_drop] = 0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[hidden_drop] = 0
            layer.mlp.down_proj.weight[hidden_drop] = 0
            layer.mlp.up_proj.weight[mlp_drop] = 0
            post = getattr(layer, "post_attention_layernorm", None)
            if hasattr(layer, "post_feedforward_layernorm"):  # Gemma: post-norms feed the stream
                for norm in (post, layer.post_feedforward_layernorm):
                    norm.weight[hidden_drop] = -1.0  # (1 + w) = 0
    return model


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_dropping_channels_that_carry_nothing_keeps_every_logit(tokenizer, family):
    model = llama(tokenizer) if family == "llama" else gemma3_teacher(layers=2, seed=4)
    full = Shape.of(model.config)
    hidden_drop = torch.arange(0, full.hidden, 4)  # a quarter of the residual stream
    mlp_drop = torch.arange(1, full.intermediate, 2)  # half of every MLP
    _dead_channels(model, hidden_drop, mlp_drop)
    batch = token_batch(model.config.vocab_size)
    importance = width_importance(model, [batch])
    assert importance["hidden"][hidden_drop].max() == 0 and importance["hidden"].min() == 0
    assert importance["mlp"][:, mlp_drop].max() == 0
    shape = Shape(
        full.layers,
        full.hidden - len(hidden_drop),
        full.intermediate - len(mlp_drop),
        full.heads,
        full.kv_heads,
        full.head_dim,
    )
    student = width_pruned_model(model, importance, shape)
    assert student.config.hidden_size == shape.hidden
    assert student.config.intermediate_size == shape.intermediate
    with torch.no_grad():
        want = model(**batch).logits
        got = student(**batch).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()
    assert count_parameters(student) < count_parameters(model)


def test_heads_are_pruned_within_each_kv_group(tokenizer):
    model = gemma3_teacher(layers=2, seed=1)  # 4 heads in 2 groups of 2
    importance = width_importance(model, [token_batch(320)])
    # make head 1 (group 0) and head 2 (group 1) the strongest of their groups
    importance["heads"][:] = torch.tensor([0.1, 0.9, 0.8, 0.2])
    full = Shape.of(model.config)
    shape = Shape(full.layers, full.hidden, full.intermediate, 2, 2, full.head_dim)
    student = width_pruned_model(model, importance, shape)
    assert student.config.num_attention_heads == 2 and student.config.num_key_value_heads == 2
    q = model.model.layers[0].self_attn.q_proj.weight
    d = full.head_dim
    kept = torch.cat([q[1 * d : 2 * d], q[2 * d : 3 * d]])
    assert torch.equal(student.model.layers[0].self_attn.q_proj.weight, kept)
    assert torch.isfinite(student(**token_batch(320)).logits).all()


def test_a_parameter_target_is_met_and_the_student_reloads(tokenizer, tmp_path):
    model = llama(tokenizer)
    target = int(0.6 * count_parameters(model))
    shape = plan_width(model, target, ("mlp", "heads", "hidden"))
    importance = width_importance(model, [token_batch(320)])
    student = width_pruned_model(model, importance, shape)
    params = count_parameters(student)
    assert params <= target
    # the next wider step (one more rounding unit on every axis) would not fit
    wider = shape_at(Shape.of(model.config), (shape.hidden + 8) / 64, ("mlp", "hidden"))
    assert wider.hidden > shape.hidden
    student.save_pretrained(tmp_path / "student")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    batch = token_batch(320)
    with torch.no_grad():
        assert torch.equal(again(**batch).logits, student(**batch).logits)


def test_a_target_below_the_narrowest_width_is_one_line(tokenizer):
    model = llama(tokenizer)
    with pytest.raises(StillError, match="below the narrowest student width pruning"):
        plan_width(model, 1000, ("mlp",))


# --------------------------------------------------------------------------- through a recipe
def _recipe(tmp_path, teacher, init: str) -> str:
    import json

    from tiny_models import QA

    rows = [{"question": q, "answer": a} for q, a in QA]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tmp_path / "width.yaml"
    path.write_text(
        f"""kind: distill
name: narrow
output_dir: {tmp_path / "runs"}
teacher: {{ref: "{teacher}"}}
student: {{init: {init}}}
method: full
distill: {{kd_weight: 1.0, ce_weight: 0.5}}
data:
  train: {{path: train.jsonl, format: instruction, prompt: question, response: answer}}
  max_len: 64
train: {{lr: 3.0e-3, batch_size: 4, max_steps: 4, warmup_ratio: 0.0, seed: 0, logging_steps: 1}}
"""
    )
    return str(path)


@pytest.mark.parametrize(
    "init,layers",
    [
        ("{prune: width, size: 0.6, calibration_samples: 4}", 4),
        ("{prune: both, keep_ratio: 0.5, size: 0.4, calibration_samples: 4}", 2),
    ],
)
def test_a_width_pruned_student_checks_trains_and_reloads(
    tiny_model_dir_4layers, tmp_path, capsys, init, layers
):
    from still import cli

    recipe = _recipe(tmp_path, tiny_model_dir_4layers, init)
    assert cli.main(["check", recipe]) == 0
    out = capsys.readouterr().out
    assert f"({layers}/4), hidden " in out and "MLP " in out and "heads " in out
    # the size chooser: the other ways to reach the same size, with estimates for each
    assert "student candidates at" in out
    rows = [line for line in out.splitlines() if line.startswith("    ") and "tokens/s" in line]
    assert [row.split()[0] for row in rows] == ["depth", "width", "both"], out
    assert all("GiB" in row and "M " in row for row in rows)
    assert not (tmp_path / "runs").exists()
    assert cli.main(["run", recipe]) == 0
    saved = tmp_path / "runs" / "narrow" / "model"
    student = AutoModelForCausalLM.from_pretrained(saved)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_dir_4layers)
    assert student.config.num_hidden_layers == layers
    share = float(init.split("size: ")[1].split(",")[0])
    assert count_parameters(student) <= share * count_parameters(teacher)
    assert student.config.hidden_size < teacher.config.hidden_size


def test_width_settings_that_do_nothing_or_cannot_work_are_one_line(
    tiny_model_dir_4layers, tmp_path, capsys
):
    from still import cli

    for init, message in [
        ("{keep_ratio: 0.5, size: 0.6}", "student.init.size would be ignored: prune: depth"),
        ("{size: 0.6}", "size is width pruning's target: set prune: width"),
        ("{prune: width, size: 0.6, keep_ratio: 0.5}", "prune: width keeps every layer"),
        ("{prune: width, size: 5}", "size 5 is neither a share"),
        ("{prune: width, size: lots}", "size 'lots' is not a share or a count"),
    ]:
        recipe = _recipe(tmp_path, tiny_model_dir_4layers, init)
        assert cli.main(["validate", recipe]) == 2, init
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and err.count("\n") == 1, err


def test_size_is_a_share_or_a_count():
    from still.distill_sections import StudentInit

    def target(size, teacher=1_000_000):
        return StudentInit(prune="width", size=size).target_parameters(teacher)

    assert target(0.6) == 600_000
    assert target("80M") == 80_000_000 and target("1.5B") == 1_500_000_000
    assert target("250_000") == 250_000 and target(250_000) == 250_000


def test_a_pruned_hidden_size_is_a_multiple_of_the_head_count(tmp_path):
    """6 heads in 3 groups cut to 3: hidden 96 → 48, not 56 (56 % 3 != 0 would save and
    reload nowhere: transformers refuses such a config)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=320,
        hidden_size=96,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=3,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=4,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
    )
    model = Gemma3ForCausalLM(config).eval()
    shape = shape_at(Shape.of(config), 0.6, ("mlp", "heads", "hidden"))
    assert (shape.heads, shape.hidden) == (3, 48)
    student = width_pruned_model(model, width_importance(model, [token_batch(320)]), shape)
    student.save_pretrained(tmp_path / "student")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert again.config.hidden_size == 48 and again.config.num_attention_heads == 3


def test_weights_it_cannot_cut_stop_the_carve_in_one_line():
    """Qwen3-MoE's experts (fused per-expert weights, a router) have no cut here: refused,
    naming the weight, before any channel is scored. (Phi-3's fused qkv_proj and gate_up_proj
    are cut: tests/unit/families/test_family_carve.py.)"""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
    )
    model = Qwen3MoeForCausalLM(config).eval()
    with pytest.raises(StillError, match=r"cannot width-prune Qwen3MoeForCausalLM: .*experts"):
        width_importance(model, [token_batch(320)])


def test_probe_trains_each_candidate_like_the_recipe_and_keeps_nothing(
    tiny_model_dir_4layers, tmp_path, capsys
):
    import re

    from still import cli

    init = "{keep_ratio: 0.5, strategy: importance, calibration_samples: 4}"
    recipe = _recipe(tmp_path, tiny_model_dir_4layers, init)
    assert cli.main(["check", recipe, "--probe", "2"]) == 0
    out = capsys.readouterr().out
    probed = dict(
        re.findall(r"^    (depth|width|both) .* train loss ([\d.]+) after 2 steps", out, re.M)
    )
    assert set(probed) == {"depth", "width", "both"}, out
    assert not (tmp_path / "runs").exists()  # the probe runs left nothing behind
    # the depth candidate is the recipe's own student: its probe is the recipe's own run
    assert cli.main(["run", recipe, "train.max_steps=2"]) == 0
    done = re.search(r"train_loss ([\d.]+)", capsys.readouterr().out)
    assert float(probed["depth"]) == pytest.approx(float(done.group(1)), abs=2e-3)
    assert probed["width"] != probed["depth"]  # another student, another loss


def test_probe_is_for_distill_recipes_and_a_positive_count(
    tiny_model_dir_4layers, tmp_path, capsys
):
    from still import cli

    recipe = _recipe(tmp_path, tiny_model_dir_4layers, "{keep_ratio: 0.5}")
    assert cli.main(["check", recipe, "--probe", "0"]) != 0
    assert "--probe must be >= 1 (got 0)" in capsys.readouterr().err
    finetune = tmp_path / "ft.yaml"
    finetune.write_text(
        f"kind: finetune\nname: ft\nmodel: {{ref: {tiny_model_dir_4layers}}}\n"
        "data: {train: {path: train.jsonl, format: instruction, prompt: question, "
        "response: answer}}\n"
    )
    assert cli.main(["check", str(finetune), "--probe", "2"]) != 0
    assert "--probe trains a distill recipe's student candidates" in capsys.readouterr().err


def test_probe_of_a_named_student_also_carves_the_teacher(
    tiny_model_dir_4layers, tiny_model_dir, tmp_path, capsys
):
    import re

    from still import cli

    recipe = _recipe(tmp_path, tiny_model_dir_4layers, "null")
    text = (
        open(recipe)
        .read()
        .replace("student: {init: null}", f'student: {{ref: "{tiny_model_dir}"}}')
    )
    open(recipe, "w").write(text)
    assert cli.main(["check", recipe, "--probe", "2"]) == 0
    out = capsys.readouterr().out
    probed = re.findall(r"^    (\S+) .* train loss [\d.]+ after 2 steps", out, re.M)
    assert probed[0] == "depth" and probed[-1] == str(tiny_model_dir), out
    assert not (tmp_path / "runs").exists()


def test_a_width_gguf_cannot_block_is_warned_before_training(capsys):
    from distill.width import Shape, warn_gguf_blocks

    warn_gguf_blocks(Shape(4, 256, 512, 8, 4, 32))  # every width a multiple of 256: silent
    assert capsys.readouterr().out == ""
    warn_gguf_blocks(Shape(4, 400, 1024, 8, 4, 32))  # hidden 400: not even 32-blocks
    out = capsys.readouterr().out
    assert "hidden 400 is not a multiple of 32: GGUF q8_0/q4_0 cannot block" in out
    assert out.count("\n") == 1
    warn_gguf_blocks(Shape(4, 576, 1536, 9, 3, 64))  # SmolLM2's 576: 32-blocks, not 256
    out = capsys.readouterr().out
    assert "hidden 576, attention (heads x head_dim) 576 are not a multiple of 256" in out
