"""The harness on the tiny Llama: batch-size independence, lm-eval semantics, caching, outputs."""

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from eval.harness import HARNESS_VERSION, evaluate
from eval.scorer import cut_at_stop as _cut_at_stop
from eval.scorer import encode_pair as _encode_pair
from eval.tasks import load_task
from still.models import model_content_hash

MODULES = ["json", "os", "re", "math"]


def write_data(directory: Path, n: int = 12) -> None:
    with (directory / "qa.jsonl").open("w") as qa, (directory / "choice.jsonl").open("w") as choice:
        for i in range(n):
            module = MODULES[i % 4]
            # Question lengths vary so batches really are padded.
            question = f"What does `{module}.f{i}` do" + " exactly" * (i % 5) + "?"
            qa.write(
                json.dumps(
                    {"id": f"{module}.f{i}", "question": question, "answer": f"Return thing {i}."}
                )
                + "\n"
            )
            choices = [
                f"{module}.f{i}",
                f"{module}.g",
                "os.path.join",
                f"{module}.quite_long_name_{i}",
            ]
            choice.write(
                json.dumps(
                    {"id": f"c{i}", "question": question, "choices": choices, "label": i % 4}
                )
                + "\n"
            )


TASKS = {
    "mc.yaml": "name: mc\ntype: multiple_choice\ndata: {path: choice.jsonl}\n"
    "prompt: 'Question: {{ question }}\\nAnswer:'\nchoices: choices\nlabel: label\n",
    "qa.yaml": "name: qa\ntype: generate\ndata: {path: qa.jsonl}\nprompt: '{{ question }}'\n"
    "target: '{{ answer }}'\nchat_template: true\ngeneration: {max_new_tokens: 10}\n"
    "metrics: [rouge_l, token_f1, exact_match]\n",
    "ppl.yaml": "name: ppl\ntype: perplexity\ndata: {path: qa.jsonl}\nprompt: '{{ question }}'\n"
    "target: '{{ answer }}'\nchat_template: true\n",
}


@pytest.fixture
def tasks(tmp_path):
    write_data(tmp_path)
    for name, text in TASKS.items():
        (tmp_path / name).write_text(text)
    return {name.removesuffix(".yaml"): load_task(tmp_path / name) for name in TASKS}


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def chaotic_model(model_and_tokenizer):
    """Large random weights: greedy text varies token to token, so any position bug shows."""
    model = copy.deepcopy(model_and_tokenizer[0])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model


def run(model, tokenizer, task, out_dir, batch_size=8, cache_dir=None, **kwargs):
    summary = evaluate(
        model,
        tokenizer,
        task,
        batch_size=batch_size,
        out_dir=out_dir,
        cache_dir=cache_dir,
        model_hash=kwargs.pop("model_hash", "m"),
        progress=False,
        **kwargs,
    )
    samples = [json.loads(line) for line in (out_dir / f"{task.name}.samples.jsonl").open()]
    return summary, samples


def test_multiple_choice_matches_lm_eval_scoring_at_any_batch_size(
    model_and_tokenizer, tasks, tmp_path
):
    model, tokenizer = model_and_tokenizer
    _, one = run(model, tokenizer, tasks["mc"], tmp_path / "b1", batch_size=1)
    _, eight = run(model, tokenizer, tasks["mc"], tmp_path / "b8", batch_size=8)
    for a, b in zip(one, eight, strict=True):
        assert a["logliks"] == pytest.approx(b["logliks"], abs=1e-4)
        assert a["metrics"] == b["metrics"]
    for sample in one[:4]:  # lm-eval's way: one unpadded forward per (context, " " + choice)
        for choice, loglik in zip(sample["choices"], sample["logliks"]):
            context_ids, continuation_ids = _encode_pair(tokenizer, sample["prompt"], " " + choice)
            with torch.no_grad():
                logits = model(torch.tensor([context_ids + continuation_ids])).logits[0]
            log_probs = torch.log_softmax(logits, -1)[len(context_ids) - 1 : -1]
            expected = log_probs.gather(-1, torch.tensor(continuation_ids)[:, None]).sum().item()
            assert loglik == pytest.approx(expected, abs=1e-4)


def test_greedy_generation_is_identical_at_any_batch_size(
    chaotic_model, model_and_tokenizer, tasks, tmp_path
):
    tokenizer = model_and_tokenizer[1]
    _, one = run(chaotic_model, tokenizer, tasks["qa"], tmp_path / "b1", batch_size=1, limit=8)
    _, eight = run(chaotic_model, tokenizer, tasks["qa"], tmp_path / "b8", batch_size=8, limit=8)
    predictions = [s["prediction"] for s in one]
    assert predictions == [s["prediction"] for s in eight]
    assert (
        len(set(predictions)) > len(predictions) // 2
    )  # real, varied text, not one repeated token


def test_stop_strings_cut_generation(chaotic_model, model_and_tokenizer, tasks, tmp_path):
    assert _cut_at_stop("abc\n\ndef. x", ["\n\n", "."]) == "abc"
    assert _cut_at_stop("abc", ["\n\n"]) == "abc"
    tokenizer = model_and_tokenizer[1]
    _, free = run(chaotic_model, tokenizer, tasks["qa"], tmp_path / "free", limit=8)
    stop = max(
        {ch for s in free for ch in s["prediction"] if ch.isalpha()},
        key=lambda ch: sum(s["prediction"].count(ch) for s in free),
    )
    tasks["qa"].generation.stop = [stop]
    _, cut = run(chaotic_model, tokenizer, tasks["qa"], tmp_path / "cut", limit=8)
    for full, short in zip(free, cut):
        assert stop not in short["prediction"]
        assert full["prediction"].startswith(short["prediction"].strip())


def test_perplexity_is_the_mean_loss_on_target_tokens(model_and_tokenizer, tasks, tmp_path):
    model, tokenizer = model_and_tokenizer
    summary, one = run(model, tokenizer, tasks["ppl"], tmp_path / "b1", batch_size=1)
    _, eight = run(model, tokenizer, tasks["ppl"], tmp_path / "b8", batch_size=8)
    for a, b in zip(one, eight):
        assert a["metrics"]["loss"] == pytest.approx(b["metrics"]["loss"], abs=1e-4)
    nll, tokens = 0.0, 0
    for sample in one:
        context_ids, target_ids = _encode_pair(tokenizer, sample["prompt"], sample["target"])
        labels = torch.tensor([[-100] * len(context_ids) + target_ids])
        with torch.no_grad():
            loss = model(torch.tensor([context_ids + target_ids]), labels=labels).loss.item()
        assert sample["metrics"]["loss"] == pytest.approx(loss, abs=1e-4)
        nll, tokens = nll + loss * len(target_ids), tokens + len(target_ids)
    assert summary["metrics"]["loss"]["mean"] == pytest.approx(nll / tokens, abs=1e-4)
    assert summary["metrics"]["perplexity"]["mean"] == pytest.approx(
        torch.tensor(nll / tokens).exp().item(), rel=1e-4
    )


def test_result_files_have_the_documented_shape(model_and_tokenizer, tasks, tmp_path):
    model, tokenizer = model_and_tokenizer
    summary, samples = run(model, tokenizer, tasks["mc"], tmp_path, limit=5, model_name="tiny")
    on_disk = json.loads((tmp_path / "mc.json").read_text())
    assert on_disk == {k: v for k, v in summary.items() if k != "cache_hit"}
    assert set(on_disk) == {
        "task",
        "task_hash",
        "model_hash",
        "harness_version",
        "n",
        "metrics",
        "batch_size",
        "limit",
        "created",
        "model_name",
        "seconds",
        "n_params",
    }
    assert (
        on_disk["n"] == 5
        and on_disk["limit"] == 5
        and on_disk["harness_version"] == HARNESS_VERSION
    )
    assert set(on_disk["metrics"]) == {"acc", "acc_norm"}
    assert set(on_disk["metrics"]["acc"]) == {"mean", "stderr"}
    assert [s["idx"] for s in samples] == list(range(5)) and samples[0]["id"] == "c0"
    assert {"prompt", "target", "logliks", "choices", "label", "metrics", "signals"} <= set(
        samples[0]
    )
    assert on_disk["n_params"] == sum(p.numel() for p in model.parameters())


def test_tokenizer_without_pad_token_is_not_modified(model_and_tokenizer, tasks, tmp_path):
    model, tokenizer = model_and_tokenizer
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.pad_token = None
    run(model, tokenizer, tasks["qa"], tmp_path, limit=3)
    assert tokenizer.pad_token is None


def test_cache_hits_on_rerun_and_misses_after_a_weight_or_data_change(
    model_and_tokenizer, tasks, tmp_path
):
    model, tokenizer = model_and_tokenizer
    model = copy.deepcopy(model)
    cache = tmp_path / "cache"
    first_hash = model_content_hash(model, tokenizer)
    first, _ = run(
        model, tokenizer, tasks["mc"], tmp_path / "a", cache_dir=cache, model_hash=first_hash
    )
    again, _ = run(
        model, tokenizer, tasks["mc"], tmp_path / "b", cache_dir=cache, model_hash=first_hash
    )
    assert not first["cache_hit"] and again["cache_hit"]
    assert (tmp_path / "a" / "mc.samples.jsonl").read_text() == (
        tmp_path / "b" / "mc.samples.jsonl"
    ).read_text()

    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    changed_hash = model_content_hash(model, tokenizer)
    assert changed_hash != first_hash
    after_weight, _ = run(
        model, tokenizer, tasks["mc"], tmp_path / "c", cache_dir=cache, model_hash=changed_hash
    )
    assert not after_weight["cache_hit"]

    data = Path(tasks["mc"].resolve("choice.jsonl"))
    data.write_text(data.read_text().replace("os.path.join", "os.path.split"))
    after_data, _ = run(
        model, tokenizer, tasks["mc"], tmp_path / "d", cache_dir=cache, model_hash=changed_hash
    )
    assert not after_data["cache_hit"] and after_data["task_hash"] != first["task_hash"]


def test_model_hash_covers_adapter_weights_and_settings(model_and_tokenizer):
    peft = pytest.importorskip("peft")
    base, _ = model_and_tokenizer
    base_hash = model_content_hash(base)
    assert model_content_hash(base) == base_hash
    config = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    adapted = peft.get_peft_model(copy.deepcopy(base), config)
    adapter_hash = model_content_hash(adapted)
    assert adapter_hash != base_hash
    with torch.no_grad():
        next(p for n, p in adapted.named_parameters() if "lora_B" in n).add_(1e-3)
    assert model_content_hash(adapted) != adapter_hash


def test_adapter_hash_is_the_same_in_every_process(tiny_model_dir):
    """PEFT keeps target_modules as a set: its order must not reach the hash (eval cache keys)."""
    import subprocess
    import sys

    script = (
        "import sys, torch, peft; from transformers import AutoModelForCausalLM; "
        "from still.models import model_content_hash\n"
        "torch.manual_seed(0); base = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "config = peft.LoraConfig(r=2, target_modules=['q_proj', 'k_proj', 'v_proj', "
        "'o_proj', 'up_proj'])\n"
        "print(model_content_hash(peft.get_peft_model(base, config)))\n"
    )
    hashes = set()
    for seed in ("1", "2", "3"):
        result = subprocess.run(
            [sys.executable, "-c", script, str(tiny_model_dir)],
            capture_output=True,
            text=True,
            env={**__import__("os").environ, "PYTHONHASHSEED": seed},
            timeout=120,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        hashes.add(result.stdout.strip().splitlines()[-1])
    assert len(hashes) == 1


def test_packed_scoring_respects_sliding_window_layers(model_and_tokenizer):
    """Gemma 3 style: a window shorter than the context cuts attention as in an unpacked pass."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from eval.scorer import continuation_logliks

    tokenizer = model_and_tokenizer[1]
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=128,
    )
    model = Gemma3ForCausalLM(config).eval()
    context = tokenizer.encode("What does json.dumps do? Serialize obj to a JSON formatted str.")
    continuations = [tokenizer.encode(" Join two pathname"), tokenizer.encode(" ok")]
    with torch.no_grad():
        packed = continuation_logliks(
            model, [(context, continuations), (context[:5], continuations)], batch_size=2
        )
        for item, (ctx, logliks) in enumerate([(context, packed[0]), (context[:5], packed[1])]):
            for continuation, loglik in zip(continuations, logliks):
                logits = model(torch.tensor([ctx + continuation])).logits[0]
                log_probs = torch.log_softmax(logits, -1)[len(ctx) - 1 : -1]
                expected = log_probs.gather(-1, torch.tensor(continuation)[:, None]).sum().item()
                assert loglik == pytest.approx(expected, abs=1e-4), item


def test_fewshot_prompts_do_not_depend_on_limit(model_and_tokenizer, tasks, tmp_path):
    model, tokenizer = model_and_tokenizer
    task = tasks["mc"].model_copy(
        update={"fewshot": tasks["mc"].fewshot.model_copy(update={"n": 2})}
    )
    _, three = run(model, tokenizer, task, tmp_path / "three", limit=3)
    _, six = run(model, tokenizer, task, tmp_path / "six", limit=6)
    assert [s["prompt"] for s in three] == [s["prompt"] for s in six[:3]]
    assert all(s["prompt"].count("Question:") == 3 for s in three)
