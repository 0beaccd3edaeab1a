"""Preflight's size checks: every size-like setting against the model's own config."""

import pytest
from transformers import Gemma3Config, GPT2Config, LlamaConfig

from still import recipe as recipe_module
from still.errors import StillError
from still.preflight import position_limit, refuse_beyond_model


def test_position_limit_reads_each_family_key():
    assert position_limit(LlamaConfig(max_position_embeddings=2048)) == (
        2048,
        "max_position_embeddings",
    )
    assert position_limit(GPT2Config(n_positions=1024)) == (1024, "n_positions")
    # multimodal configs keep the language model's limit in text_config
    gemma = Gemma3Config(text_config={"max_position_embeddings": 32768})
    assert position_limit(gemma) == (32768, "max_position_embeddings")


def test_position_limit_is_none_when_the_config_says_nothing():
    class Bare:
        hidden_size = 8

    assert position_limit(Bare()) is None


def _recipe(tmp_path, body: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "kind: finetune\nname: t\nmodel: {ref: some/model}\n"
        "data:\n  train: {path: train.jsonl}\n" + body
    )
    (tmp_path / "train.jsonl").write_text('{"text": "x"}\n')
    return recipe_module.load(path)


def test_max_len_at_the_limit_passes_and_one_beyond_is_refused_at_its_line(tmp_path):
    config = LlamaConfig(max_position_embeddings=512, hidden_size=64)
    refuse_beyond_model(_recipe(tmp_path, "  max_len: 512\n"), config)
    with pytest.raises(StillError, match=r"recipe\.yaml:6: data\.max_len 513 is beyond"):
        refuse_beyond_model(_recipe(tmp_path, "  max_len: 513\n"), config)


def test_lora_rank_against_hidden_size_only_for_adapters(tmp_path):
    config = LlamaConfig(
        max_position_embeddings=512, hidden_size=8, num_attention_heads=4, num_key_value_heads=4
    )
    with pytest.raises(StillError, match=r"lora\.r 32 is above the model's hidden size 8"):
        refuse_beyond_model(_recipe(tmp_path, "lora: {r: 32}\n"), config)
    # full fine-tuning has no adapter: the default rank (16) is never compared
    refuse_beyond_model(_recipe(tmp_path, "method: full\n"), config)
    refuse_beyond_model(_recipe(tmp_path, "lora: {r: 8}\n"), config)


# --------------------------------------------------------------------------- memory at real size
def _real_size(tmp_path, body: str, **overrides):
    from still.preflight import shipped_estimate

    path = tmp_path / "r.yaml"
    path.write_text(
        "kind: finetune\nname: t\nmodel: {ref: meta-llama/Llama-3.1-8B-Instruct}\n"
        "data:\n  train: {path: train.jsonl}\n  max_len: 2048\n"
        "train: {batch_size: 2, precision: bf16}\n" + body
    )
    (tmp_path / "train.jsonl").write_text('{"text": "x"}\n')
    recipe = recipe_module.load(path, [f"{k}={v}" for k, v in overrides.items()])
    return shipped_estimate(recipe)[0]["memory"]


def test_each_memory_lever_moves_its_own_term(tmp_path):
    lora = _real_size(tmp_path, "method: lora\n")
    qlora = _real_size(tmp_path, "method: qlora\n")
    # 4-bit base: the 6.98B decoder-layer weights at ~0.52 bytes, the embedding and head at 2
    assert 0.3 < qlora["weights"] / lora["weights"] < 0.4
    checkpointed = _real_size(tmp_path, "method: lora\n", **{"train.gradient_checkpointing": 1})
    assert checkpointed["activations"] < lora["activations"] / 5
    full = _real_size(tmp_path, "method: full\n")
    zero3 = _real_size(
        tmp_path,
        "method: full\ndistributed: {strategy: zero3, num_processes: 8}\n",
    )
    assert zero3["weights"] < full["weights"] / 6  # sharded, plus one gathered layer
    offload = _real_size(
        tmp_path,
        "method: full\ndistributed: {strategy: zero3, num_processes: 8, offload_optimizer: cpu}\n",
    )
    assert offload["grads_optimizer"] < zero3["grads_optimizer"] / 2
    # chunked loss: one chunk of logits; sharded finetunes use the model's own loss, all of it
    assert zero3["logits"] == 4 * full["logits"]
