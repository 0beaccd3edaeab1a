"""Eval per family: multiple-choice and generate scores do not depend on the batch size, and
generation stops at the family's end-of-turn token (Gemma's <end_of_turn> while its tokenizer's
eos is <eos>, Llama 3's <|eot_id|>, Phi-3's <|end|>), through `eval.harness.evaluate`."""

import copy
import json

import pytest
import torch
from families import FAMILIES, FAMILY, build_model

from eval.harness import evaluate
from eval.scorer import encode
from eval.tasks import load_task
from still import models

MAX_NEW_TOKENS = 10
TASKS = {
    "mc": "name: mc\ntype: multiple_choice\ndata: {path: choice.jsonl}\n"
    "prompt: 'Question: {{ question }}\\nAnswer:'\nchoices: choices\nlabel: label\n",
    "qa": "name: qa\ntype: generate\ndata: {path: qa.jsonl}\nprompt: '{{ question }}'\n"
    f"target: '{{{{ answer }}}}'\nchat_template: true\n"
    f"generation: {{max_new_tokens: {MAX_NEW_TOKENS}}}\nmetrics: [token_f1]\n",
}


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    directory = tmp_path_factory.mktemp("family-eval-tasks")
    with (directory / "qa.jsonl").open("w") as qa, (directory / "choice.jsonl").open("w") as mc:
        for i, module in enumerate(["json", "os", "re", "math", "abs", "len"]):
            question = f"What does {module}.f{i} do" + " exactly" * (i % 3) + "?"  # lengths vary
            qa.write(json.dumps({"question": question, "answer": f"Return thing {i}."}) + "\n")
            choices = [f"{module}.f{i}", "os.path.join", f"{module}.long_name_{i}", "min"]
            row = {"question": question, "choices": choices, "label": i % 4}
            mc.write(json.dumps(row) + "\n")
    for name, text in TASKS.items():
        (directory / f"{name}.yaml").write_text(text)
    return {name: load_task(directory / f"{name}.yaml") for name in TASKS}


@pytest.fixture(scope="module")
def chaotic(family_tokenizer):
    """family -> (model, tokenizer): large random weights, so greedy text varies token to token."""
    built = {}

    def get(name):
        if name not in built:
            tokenizer = family_tokenizer(name)
            model = build_model(name, tokenizer).eval()
            generator = torch.Generator().manual_seed(0)
            # the embeddings keep their init: Gemma scales them by sqrt(hidden), and large tied
            # rows make a model repeat its last input token
            embeddings = {id(model.get_input_embeddings().weight)}
            embeddings.add(id(model.get_output_embeddings().weight))
            with torch.no_grad():
                for parameter in model.parameters():
                    if parameter.dim() > 1 and id(parameter) not in embeddings:
                        parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
            built[name] = model, tokenizer
        return built[name]

    return get


def samples(model, tokenizer, task, out_dir, batch_size) -> list[dict]:
    evaluate(
        model,
        tokenizer,
        task,
        batch_size=batch_size,
        out_dir=out_dir,
        cache_dir=None,
        model_hash="m",
        progress=False,
    )
    return [json.loads(line) for line in (out_dir / f"{task.name}.samples.jsonl").open()]


@pytest.mark.parametrize("name", FAMILIES)
def test_multiple_choice_is_independent_of_batch_size(chaotic, tasks, tmp_path, name):
    model, tokenizer = chaotic(name)
    one = samples(model, tokenizer, tasks["mc"], tmp_path / "b1", 1)
    four = samples(model, tokenizer, tasks["mc"], tmp_path / "b4", 4)
    for a, b in zip(one, four, strict=True):
        assert a["logliks"] == pytest.approx(b["logliks"], abs=1e-4)
        assert a["metrics"] == b["metrics"]
    assert len({round(x, 3) for s in one for x in s["logliks"]}) > len(one)  # real scores


def greedy(model, ids: list[int], stops: set[int], end_of_turn: int):
    """Greedy tokens after `ids` (until a stop token) and, per step, how far the end-of-turn
    token's logit is below the best one."""
    tokens, gaps = [], []
    with torch.no_grad():
        for _ in range(MAX_NEW_TOKENS):
            logits = model(input_ids=torch.tensor([ids + tokens])).logits[0, -1]
            best = int(logits.argmax())
            if best in stops:
                break
            tokens.append(best)
            gaps.append(float(logits[best] - logits[end_of_turn]))
    return tokens, gaps


def step_to_stop_at(model, tokenizer, generated, stops, end_of_turn):
    """(sample index, its greedy tokens, their gaps, k): a step k >= 2 of some prompt where the
    end-of-turn token is closer to the top than at every step before, after some text."""
    for index, sample in enumerate(generated):
        tokens, gaps = greedy(model, encode(tokenizer, sample["prompt"]), stops, end_of_turn)
        # the reconstruction is the harness's own greedy text
        assert tokenizer.decode(tokens, skip_special_tokens=True).strip() == sample["prediction"]
        for k in range(2, len(gaps)):
            text = tokenizer.decode(tokens[:k], skip_special_tokens=True).strip()
            if gaps[k] < min(gaps[:k]) - 1e-3 and text:
                return index, tokens, gaps, k
    pytest.fail("no prompt gives a step where the end-of-turn token can be made greedy")


@pytest.mark.parametrize("name", FAMILIES)
def test_generation_is_batch_size_independent_and_stops_at_the_end_of_turn(
    chaotic, tasks, tmp_path, name
):
    model, tokenizer = chaotic(name)
    family = FAMILY[name]
    end_of_turn = tokenizer.convert_tokens_to_ids(family.end_of_turn)
    stops = set(models.stop_token_ids(model, tokenizer))
    assert stops == set(tokenizer.convert_tokens_to_ids([*family.stops, family.end_of_turn]))
    one = samples(model, tokenizer, tasks["qa"], tmp_path / "b1", 1)
    four = samples(model, tokenizer, tasks["qa"], tmp_path / "b4", 4)
    assert [s["prediction"] for s in one] == [s["prediction"] for s in four]
    assert len({s["prediction"] for s in one}) >= len(one) // 2  # varied, not one string

    # Make the end-of-turn token the greedy choice at step k of one prompt and nowhere before:
    # a bias on its logit between the gap at step k and the smallest gap before it.
    index, tokens, gaps, k = step_to_stop_at(model, tokenizer, one, stops, end_of_turn)
    sample = one[index]
    biased = copy.deepcopy(model)
    head = biased.get_output_embeddings()
    bias = torch.zeros(head.weight.shape[0])
    bias[end_of_turn] = (gaps[k] + min(gaps[:k])) / 2
    head.bias = torch.nn.Parameter(bias)
    stopped = samples(biased, tokenizer, tasks["qa"], tmp_path / "stopped", 1)[index]
    expected = tokenizer.decode(tokens[:k], skip_special_tokens=True).strip()
    assert stopped["prediction"] == expected
    if family.end_of_turn != family.eos:  # stopping at the tokenizer's eos alone runs on
        prompt = torch.tensor([encode(tokenizer, sample["prompt"])])
        with torch.no_grad():
            on = biased.generate(
                input_ids=prompt,
                max_new_tokens=MAX_NEW_TOKENS,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )[0, prompt.shape[1] :].tolist()
        assert on[k] == end_of_turn and len(on) > k + 1
