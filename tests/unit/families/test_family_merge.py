"""`still merge` per family: the merged model's logits equal the adapter model's.

The adapters are the 3-step `all-linear` LoRA runs the finetune tests train (one per family and
session); for Qwen3-MoE that includes the experts' fused weights, which must reach the merge.
"""

import pytest
import torch
from families import FAMILIES
from transformers import AutoModelForCausalLM, AutoTokenizer

from still import cli, models

CHAT = [
    {"role": "system", "content": "Answer in one short sentence."},
    {"role": "user", "content": "What does abs do?"},
    {"role": "assistant", "content": "Return the absolute value of a number."},
    {"role": "user", "content": "And len?"},
]


def logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("name", FAMILIES)
def test_merged_logits_equal_the_adapter_models(family_runs, twin_dir, tmp_path, capsys, name):
    run_dir = family_runs(name, "lora")
    out = tmp_path / "merged"
    assert cli.main(["merge", str(run_dir), "--out", str(out)]) == 0
    assert "still: merged" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert not hasattr(merged, "peft_config")
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    adapter_model, _ = models.load_model(str(run_dir), dtype="float32")
    base = AutoModelForCausalLM.from_pretrained(twin_dir(name), dtype=torch.float32).eval()
    expected = logits(adapter_model.eval(), ids)
    torch.testing.assert_close(logits(merged, ids), expected, atol=1e-4, rtol=1e-4)
    assert (logits(base, ids) - expected).abs().max() > 1e-2  # the adapter mattered
    assert merged.config.vocab_size == base.config.vocab_size  # padded rows kept
    if name == "qwen3_moe":  # the experts' LoRA is in the merged weights
        weights, base_weights = merged.state_dict(), base.state_dict()
        experts = [key for key in base_weights if ".mlp.experts." in key]
        assert experts and all(not torch.equal(weights[k], base_weights[k]) for k in experts)
