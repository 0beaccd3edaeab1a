"""LoRA (all-linear), DoRA and full fine-tuning of every family through `still run`.

Each run trains 3 steps on multi-turn chat rows (`chat_rows` in tests/families.py). What
`all-linear` wraps is read back from the saved run: every attention and MLP projection of every
layer (Phi-3's fused qkv_proj and gate_up_proj included), never the embeddings or the head. A
Qwen3-MoE's experts are fused 3-D parameters in transformers 5, which PEFT reaches through
`target_parameters`; where it cannot (DoRA, dropout, a model type PEFT does not map, such as
GPT-OSS) the kit refuses with one line rather than train an adapter that skips the experts.
"""

import json
import math

import pytest
import torch
from families import DENSE, FAMILIES, FAMILY, model_config, write_finetune_recipe
from safetensors.torch import load_file

from still import cli, models
from still.errors import StillError
from still.rundir import RunDir

ATTENTION = {"q_proj", "k_proj", "v_proj", "o_proj"}
MLP = {"gate_proj", "up_proj", "down_proj"}
WRAPPED = {name: ATTENTION | MLP for name in FAMILIES}
WRAPPED["phi3"] = {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
WRAPPED["qwen3_moe"] = ATTENTION
# The MoE's parameters the adapter reaches as target_parameters, per layer.
MOE_PARAMETERS = {"mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"}


def losses(run_dir) -> list[float]:
    return [row["loss"] for row in RunDir(run_dir).metrics() if "loss" in row]


def assert_trained(run_dir):
    curve = losses(run_dir)
    assert len(curve) == 3 and all(math.isfinite(loss) for loss in curve), curve
    assert curve[-1] < curve[0], curve


def adapted(model) -> dict[str, set[str]]:
    """layer index -> the names (relative to the layer) of what LoRA wraps there."""
    per_layer = {}
    for name, module in models.base_model(model).named_modules():
        if not hasattr(module, "lora_A") or ".layers." not in name:
            continue
        path = [part for part in name.split(".") if part != "base_layer"]
        layer = path.index("layers") + 1
        parameter = getattr(module, "parameter_name", None)
        inside = ".".join(path[layer + 1 :] + ([parameter] if parameter else []))
        per_layer.setdefault(int(path[layer]), set()).add(inside)
    return per_layer


@pytest.mark.parametrize("name", FAMILIES)
def test_lora_all_linear_wraps_every_projection_and_trains(family_runs, name):
    run_dir = family_runs(name, "lora")
    assert_trained(run_dir)
    model, _ = models.load_model(str(run_dir), dtype="float32")
    layers = adapted(model)
    assert sorted(layers) == [0, 1]  # both layers
    expected = {
        f"{'self_attn' if short in ATTENTION | {'qkv_proj'} else 'mlp'}.{short}"
        for short in WRAPPED[name]
    }
    if name == "qwen3_moe":
        expected |= MOE_PARAMETERS
    assert all(found == expected for found in layers.values()), layers
    wrapped = {n for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert not any("embed" in n or "lm_head" in n for n in wrapped)
    saved = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert not any("embed" in key or "lm_head" in key for key in saved)
    # trained: every LoRA B left its zero init (the experts' too)
    assert all(tensor.abs().max() > 0 for key, tensor in saved.items() if "lora_B" in key)


@pytest.mark.parametrize("name", DENSE)
def test_dora_trains(family_runs, name):
    run_dir = family_runs(name, "dora")
    assert_trained(run_dir)
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    saved = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert any("lora_magnitude_vector" in key for key in saved)


@pytest.mark.parametrize("name", FAMILIES)
def test_full_fine_tuning_trains_every_weight(family_runs, twin_dir, name):
    run_dir = family_runs(name, "full")
    assert_trained(run_dir)
    trained = load_file(run_dir / "model" / "model.safetensors")
    base = load_file(twin_dir(name) / "model.safetensors")
    assert trained.keys() == base.keys()
    moved = [key for key in base if not torch.equal(trained[key], base[key])]
    assert any("experts" in key for key in moved) == (name == "qwen3_moe")
    assert {key for key in base if "layers.0." in key and "norm" not in key} <= set(moved)


def refusal(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("still: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(
    "method, extra, message",
    [
        ("dora", "", "method: dora cannot adapt Qwen3MoeForCausalLM's fused expert weights"),
        ("lora", "lora: {dropout: 0.05}\n", "lora.dropout: 0.05 cannot apply to Qwen3MoeFor"),
    ],
)
def test_moe_experts_refuse_dora_and_dropout_in_one_line(
    family_runs, twin_dir, capsys, method, extra, message
):
    recipe = write_finetune_recipe(
        family_runs.directory, "moe-refused", method, twin_dir("qwen3_moe")
    )
    if extra:  # the default dropout, as a user's recipe would leave it
        text = open(recipe).read().replace("lora: {r: 4, alpha: 8, dropout: 0.0}\n", extra)
        open(recipe, "w").write(text)
    for verb in ("check", "run"):
        assert cli.main([verb, recipe]) == 2
        line = refusal(capsys)
        assert message in line and "model.layers.*.mlp.experts.gate_up_proj" in line, line
    assert not (family_runs.directory / "runs" / f"moe-refused-{method}" / "adapter").exists()


def tiny_gpt_oss(tokenizer):
    """GPT-OSS: fused experts that PEFT 0.21 does not map to target_parameters."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "gpt_oss",
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
    )
    return AutoModelForCausalLM.from_config(config)


def test_all_linear_that_misses_the_experts_is_refused(family_tokenizer):
    from still.sections import LoraSection
    from still.train import add_lora, lora_config

    model = tiny_gpt_oss(family_tokenizer("qwen3_moe"))
    with pytest.raises(StillError) as refused:
        add_lora(model, lora_config(LoraSection(dropout=0.0), "lora"))
    assert "lora.target: all-linear leaves GptOssForCausalLM's fused expert weights" in str(
        refused.value
    )
    assert "does not map this model's experts" in str(refused.value)
    # naming the modules is a choice the kit accepts: attention only
    chosen = add_lora(
        tiny_gpt_oss(family_tokenizer("qwen3_moe")),
        lora_config(LoraSection(target=["q_proj", "k_proj", "v_proj", "o_proj"]), "lora"),
    )
    assert set(adapted(chosen)[0]) == {f"self_attn.{p}" for p in ATTENTION}


def test_every_family_twin_is_its_real_class_with_padded_rows(family_tokenizer):
    """The ground the tests above stand on: padded vocab rows where the family pads them."""
    for name in FAMILIES:
        tokenizer = family_tokenizer(name)
        rows = model_config(name, tokenizer).vocab_size
        assert rows % FAMILY[name].vocab_multiple == 0 and rows >= len(tokenizer)
