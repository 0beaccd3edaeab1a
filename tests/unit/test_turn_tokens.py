"""A base model fine-tuned on a turn format: the template's special tokens can be trained
(`lora.train_tokens`), the template is saved with the model, and generation stops at the
template's end-of-turn token even when no config names it."""

import json

import pytest
import torch
from safetensors.torch import load_file
from xtok_models import GEMMA_STYLE_TEMPLATE, build_metaspace_tokenizer, save_teacher

from still import models
from still.errors import StillError
from still.sections import LoraSection
from still.train import lora_config, template_tokens, train_token_ids


@pytest.fixture(scope="module")
def tokenizer():
    return build_metaspace_tokenizer()


def test_the_template_tokens_are_the_turn_markers(tokenizer):
    ids = template_tokens(tokenizer)
    assert tokenizer.convert_ids_to_tokens(ids) == ["<start_of_turn>", "<end_of_turn>"]
    lora = LoraSection(train_tokens="template")
    assert train_token_ids(lora, tokenizer) == ids
    assert train_token_ids(LoraSection(train_tokens=["<end_of_turn>"]), tokenizer) == ids[1:]
    assert train_token_ids(LoraSection(), None) == []  # none asked: no tokenizer needed


def test_an_unknown_token_is_one_line_with_did_you_mean(tokenizer):
    with pytest.raises(StillError) as raised:
        train_token_ids(LoraSection(train_tokens=["<end_of_turm>"]), tokenizer)
    assert "'<end_of_turm>' is not a token of the tokenizer" in str(raised.value)
    assert "did you mean '<end_of_turn>'" in str(raised.value)
    tokenizer_without = build_metaspace_tokenizer()
    tokenizer_without.chat_template = None
    with pytest.raises(StillError, match="the tokenizer has no chat template"):
        template_tokens(tokenizer_without)


def test_only_those_embedding_rows_become_trainable(tokenizer):
    from peft import get_peft_model
    from tiny_models import build_tiny_llama

    model = build_tiny_llama(tokenizer, hidden=48, layers=2, seed=5)
    ids = template_tokens(tokenizer)
    peft_model = get_peft_model(model, lora_config(LoraSection(), "lora", ids))
    trainable = [(name, p.shape) for name, p in peft_model.named_parameters() if p.requires_grad]
    not_lora = [(name, shape) for name, shape in trainable if "lora_" not in name]
    assert len(not_lora) == 1 and "trainable_tokens_delta" in not_lora[0][0]
    assert not_lora[0][1][0] == len(ids)


def test_the_end_of_turn_token_stops_generation(tokenizer):
    end = models.end_of_turn_token(tokenizer)
    assert tokenizer.convert_ids_to_tokens(end) == "<end_of_turn>"
    assert end in models.stop_token_ids(None, tokenizer)
    assert tokenizer.eos_token_id in models.stop_token_ids(None, tokenizer)
    chatml = "{% for m in messages %}<|x|>{{ m.content }}{% endfor %}"
    assert models.end_of_turn_token(tokenizer, chatml) is None  # no special token after it
    plain = build_metaspace_tokenizer()
    plain.chat_template = None
    assert models.stop_token_ids(None, plain) == [plain.eos_token_id]


def test_a_fine_tune_trains_the_turn_rows_and_saves_its_template(tmp_path):
    from still import cli

    base = save_teacher(tmp_path / "base")
    # the tokenizer's own template is replaced by the recipe's: that one must be saved
    (tmp_path / "base" / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((tmp_path / "base" / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (tmp_path / "base" / "tokenizer_config.json").write_text(json.dumps(config))
    rows = [{"question": f"What is {n}?", "answer": f"It is {n}."} for n in range(8)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "ft.yaml"
    recipe.write_text(
        f"""kind: finetune
name: turns
output_dir: {tmp_path / "runs"}
model: {{ref: "{base}"}}
method: lora
lora: {{r: 4, alpha: 8, train_tokens: template}}
data:
  train: {{path: train.jsonl, format: instruction, prompt: question, response: answer}}
  max_len: 48
  chat_template: {json.dumps(GEMMA_STYLE_TEMPLATE)}
train: {{lr: 1.0e-2, batch_size: 4, max_steps: 3, warmup_ratio: 0.0, seed: 0}}
"""
    )
    assert cli.main(["run", str(recipe)]) == 0
    adapter = tmp_path / "runs" / "turns" / "adapter"
    saved = models.load_tokenizer(str(adapter))
    assert saved.chat_template == GEMMA_STYLE_TEMPLATE
    weights = load_file(adapter / "adapter_model.safetensors")
    deltas = [name for name in weights if "trainable_tokens" in name]
    assert deltas, sorted(weights)
    delta = weights[deltas[0]]
    assert delta.shape[0] == 2 and torch.count_nonzero(delta) > 0
