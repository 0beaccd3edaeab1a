"""Confidence signals in the samples: computed by hand on a fixed case, batch-size independent."""

import copy
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from eval.harness import choice_signals, evaluate
from eval.scorer import answer_length, answer_signals
from eval.tasks import load_task

QA = (
    "name: qa\ntype: generate\ndata: {path: qa.jsonl}\nprompt: '{{ question }}'\n"
    "target: '{{ answer }}'\nchat_template: true\ngeneration: {max_new_tokens: 8}\n"
    "metrics: [rouge_l]\n"
)
MC = (
    "name: mc\ntype: multiple_choice\ndata: {path: mc.jsonl}\nprompt: '{{ question }}'\n"
    "choices: choices\nlabel: label\n"
)


@pytest.fixture(scope="module")
def chaotic(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model.eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def score(model, tokenizer, tmp_path, name, text, batch_size):
    rows = [
        {
            "id": f"q{i}",
            "question": "What is it" + " really" * (i % 4) + "?",
            "answer": "A thing.",
            "choices": ["yes", "no", "maybe so"],
            "label": i % 3,
        }
        for i in range(6)
    ]
    (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / f"{name}.yaml").write_text(text)
    out = tmp_path / f"out-{batch_size}"
    evaluate(
        model,
        tokenizer,
        load_task(tmp_path / f"{name}.yaml"),
        batch_size=batch_size,
        out_dir=out,
        cache_dir=None,
        model_hash="m",
        progress=False,
    )
    return [json.loads(line) for line in (out / f"{name}.samples.jsonl").open()]


def test_answer_signals_by_hand_on_fixed_logits():
    # step 1: uniform over 4 tokens; step 2: token 2 has logit ln 3 against three zeros.
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, math.log(3.0), 0.0]])
    signals = answer_signals(logits, torch.tensor([1, 2]))
    step2 = [1 / 6, 1 / 6, 1 / 2, 1 / 6]
    assert signals["n_tokens"] == 2
    assert signals["mean_logprob"] == pytest.approx((math.log(1 / 4) + math.log(1 / 2)) / 2)
    assert signals["min_logprob"] == pytest.approx(math.log(1 / 4))
    entropy2 = -sum(p * math.log(p) for p in step2)
    assert signals["mean_entropy"] == pytest.approx((math.log(4) + entropy2) / 2)


def test_choice_margin_by_hand():
    signals = choice_signals([-3.0, -1.0, -2.0])
    assert signals["margin"] == pytest.approx(1.0)
    assert signals["top_prob"] == pytest.approx(1 / (1 + math.exp(-1) + math.exp(-2)))
    assert "margin" not in choice_signals([-1.0])  # one choice: no margin to give


def test_answer_length_stops_at_end_of_turn_or_stop_string(chaotic):
    tokenizer = chaotic[1]
    ids = tokenizer.encode("ab cd ef", add_special_tokens=False)
    assert answer_length(tokenizer, ids + [99, 7], {99}, []) == len(ids) + 1
    assert answer_length(tokenizer, ids, set(), []) == len(ids)
    cut = answer_length(tokenizer, ids, set(), ["cd"])
    assert "cd" in tokenizer.decode(ids[:cut]) and "cd" not in tokenizer.decode(ids[: cut - 1])


def test_generate_signals_match_a_forward_pass_and_any_batch_size(chaotic, tmp_path):
    model, tokenizer = chaotic
    one = score(model, tokenizer, tmp_path, "qa", QA, batch_size=1)
    four = score(model, tokenizer, tmp_path, "qa", QA, batch_size=4)
    for a, b in zip(one, four):
        for key in ("mean_logprob", "min_logprob", "mean_entropy"):
            assert a["signals"][key] == pytest.approx(b["signals"][key], abs=1e-4)
    # By hand: teacher-force prompt + generated tokens, read the same log-probs.
    sample = one[0]
    prompt_ids = tokenizer.encode(sample["prompt"])
    with torch.no_grad():
        generated = model.generate(
            torch.tensor([prompt_ids]),
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )[0, len(prompt_ids) :]
        n = sample["signals"]["n_tokens"]
        whole = torch.tensor([prompt_ids + generated[:n].tolist()])
        log_probs = torch.log_softmax(model(whole).logits[0, len(prompt_ids) - 1 : -1], -1)
    picked = log_probs.gather(-1, generated[:n, None])[:, 0]
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    assert sample["signals"]["mean_logprob"] == pytest.approx(float(picked.mean()), abs=1e-4)
    assert sample["signals"]["min_logprob"] == pytest.approx(float(picked.min()), abs=1e-4)
    assert sample["signals"]["mean_entropy"] == pytest.approx(float(entropy.mean()), abs=1e-4)


def test_multiple_choice_samples_carry_the_margin(chaotic, tmp_path):
    samples = score(*chaotic, tmp_path, "mc", MC, batch_size=2)
    for sample in samples:
        top, second = sorted(sample["logliks"], reverse=True)[:2]
        assert sample["signals"]["margin"] == pytest.approx(top - second)
