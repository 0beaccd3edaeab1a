"""distill/seqkd.py: prompts from rows, local generation, the endpoint client's errors, judges."""

import json
import textwrap

import pytest
from fake_endpoint import FakeEndpoint

from distill import endpoint, seqkd
from still import cli
from still import recipe as recipe_module
from still.errors import StillError
from still.formats import BadRow
from still.sections import DataSource


def _source(**fields):
    return DataSource(path="x.jsonl", **fields)


# --------------------------------------------------------------------------- prompts
def test_instruction_row_becomes_prompt_and_reference():
    source = _source(format="instruction", prompt="q", response="a", input="ctx")
    messages, reference = seqkd.row_to_prompt(
        {"q": "Sum?", "ctx": "1 2", "a": "3"}, source, system_prompt="Be brief."
    )
    assert messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Sum?\n\n1 2"},
    ]
    assert reference == "3"
    messages, reference = seqkd.row_to_prompt({"q": "Sum?"}, source, system_prompt=None)
    assert messages == [{"role": "user", "content": "Sum?"}] and reference is None


def test_chat_row_keeps_history_and_takes_last_answer_as_reference():
    source = _source(format="chat", messages="messages")
    turns = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "2+2?"},
    ]
    messages, reference = seqkd.row_to_prompt(
        {"messages": [*turns, {"role": "assistant", "content": "4"}]}, source, system_prompt=None
    )
    assert messages == turns and reference == "4"
    messages, reference = seqkd.row_to_prompt(
        {"messages": json.dumps(turns)}, source, system_prompt=None
    )
    assert messages == turns and reference is None
    with pytest.raises(BadRow, match="'user' after 'user'"):
        seqkd.row_to_prompt({"messages": [turns[0], turns[2]]}, source, system_prompt=None)


INSTRUCTION = "{path: train.jsonl, format: instruction, prompt: q, response: a}"


def _distill_yaml(tmp_path, model_dir, generate, data=INSTRUCTION, extra=""):
    path = tmp_path / "r.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        kind: distill
        name: gen
        teacher: {{ref: "{model_dir}"}}
        student: {{ref: "{model_dir}"}}
        data:
          train: {data}
        """)
        + extra
        + "generate: "
        + generate
        + "\n"
    )
    return path


def test_bad_rows_and_completion_format(tmp_path, tiny_model_dir):
    (tmp_path / "train.jsonl").write_text('{"q": "a?", "a": "b"}\n{"q": 3}\n{"q": "c?"}\n')
    recipe = recipe_module.load(_distill_yaml(tmp_path, tiny_model_dir, "{out: o.jsonl}"))
    with pytest.raises(StillError, match=r"train.jsonl:2: field 'q' is int"):
        seqkd.load_prompts(recipe.data, seqkd.Report(out="o"))
    recipe = recipe_module.load(
        _distill_yaml(tmp_path, tiny_model_dir, "{out: o.jsonl}"), ["data.on_bad_rows=skip"]
    )
    report = seqkd.Report(out="o")
    prompts = seqkd.load_prompts(recipe.data, report)
    assert [p.reference for p in prompts] == ["b", None] and report.bad_rows == 1
    with pytest.raises(StillError, match="row's reference answer"):
        seqkd._check_references(
            prompts,
            recipe_module.load(
                _distill_yaml(tmp_path, tiny_model_dir, "{out: o.jsonl, judge: {type: exact}}")
            ).generate.judge,
        )
    recipe = recipe_module.load(
        _distill_yaml(
            tmp_path,
            tiny_model_dir,
            "{out: o.jsonl}",
            data="{path: train.jsonl, format: completion, text: q}",
        )
    )
    with pytest.raises(StillError, match="format completion"):
        seqkd.load_prompts(recipe.data, seqkd.Report(out="o"))


@pytest.mark.parametrize(
    "generate, message",
    [
        ("{out: o.jsonl, temperature: 0, samples_per_prompt: 2}", "identical copies"),
        ("{out: o.jsonl, judge: {type: regex}}", "needs a pattern"),
        ("{out: o.jsonl, judge: {type: regex, pattern: '(unclosed'}}", "not a valid regex"),
        ("{out: o.jsonl, judge: {type: model}}", "exactly one of 'ref'"),
        (
            "{out: o.jsonl, judge: {type: model, ref: x, prompt: 'no slot'}}",
            "must contain {answer}",
        ),
        ("{out: o.jsonl, judge: {type: exact, ref: x}}", "for judge type model"),
        ("{out: o.jsonl, endpoint: {url: 'localhost:8000/v1', model: m}}", "http://"),
        ("{out: o.jsonl, sample_per_prompt: 2}", "did you mean 'samples_per_prompt'"),
    ],
)
def test_generate_section_refuses_mistakes(tmp_path, tiny_model_dir, generate, message):
    with pytest.raises(StillError, match=message):
        recipe_module.load(_distill_yaml(tmp_path, tiny_model_dir, generate))


def test_out_is_relative_to_the_yaml(tmp_path, tiny_model_dir):
    (tmp_path / "train.jsonl").write_text('{"q": "a?", "a": "b"}\n')
    recipe = recipe_module.load(_distill_yaml(tmp_path, tiny_model_dir, "{out: data/o.jsonl}"))
    assert recipe.generate.out == str(tmp_path / "data" / "o.jsonl")


# --------------------------------------------------------------------------- local generation
@pytest.fixture(scope="module")
def teacher(tiny_model_dir):
    return seqkd.load_generator(str(tiny_model_dir))


CONVERSATIONS = [
    [{"role": "user", "content": text}]
    for text in ("What does len do?", "abs?", "What does os.path.join do? Join them.", "max")
]


def test_greedy_answers_do_not_depend_on_batch_size(teacher):
    model, tokenizer = teacher
    options = dict(samples=1, temperature=0.0, top_p=1.0, max_new_tokens=6, seed=0)
    one = seqkd.generate_local(model, tokenizer, CONVERSATIONS, batch_size=1, **options)
    three = seqkd.generate_local(model, tokenizer, CONVERSATIONS, batch_size=3, **options)
    assert one == three and len(one) == 4 and all(len(answers) == 1 for answers in one)
    # A random model never reaches its end-of-turn token in 6 tokens: every answer is cut.
    assert all(answers[0].truncated and answers[0].text for answers in one)


def test_sampling_is_seeded_and_gives_n_samples(teacher):
    model, tokenizer = teacher
    options = dict(samples=3, temperature=5.0, top_p=1.0, max_new_tokens=8, batch_size=2)
    first = seqkd.generate_local(model, tokenizer, CONVERSATIONS, seed=1, **options)
    again = seqkd.generate_local(model, tokenizer, CONVERSATIONS, seed=1, **options)
    other = seqkd.generate_local(model, tokenizer, CONVERSATIONS, seed=2, **options)
    assert first == again and first != other
    assert all(len(answers) == 3 for answers in first)
    assert any(len({a.text for a in answers}) > 1 for answers in first)  # samples differ


def test_an_immediate_stop_is_an_empty_answer_not_a_truncated_one(tiny_model_dir):
    model, tokenizer = seqkd.load_generator(str(tiny_model_dir))
    model.generation_config.eos_token_id = list(range(len(tokenizer)))  # every token stops
    answers = seqkd.generate_local(
        model,
        tokenizer,
        CONVERSATIONS[:2],
        samples=1,
        temperature=0.0,
        top_p=1.0,
        max_new_tokens=4,
        batch_size=2,
        seed=0,
    )
    assert [a[0] for a in answers] == [endpoint.Answer("", truncated=False)] * 2


def test_generate_writes_nothing_when_every_answer_is_dropped(tmp_path, tiny_model_dir, capsys):
    (tmp_path / "train.jsonl").write_text('{"q": "a?", "a": "b"}\n{"q": "c?", "a": "d"}\n')
    recipe = _distill_yaml(
        tmp_path, tiny_model_dir, "{out: o.jsonl, max_new_tokens: 3, temperature: 0}"
    )
    assert cli.main(["generate", str(recipe)]) == 2
    assert "no answer was kept" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()
    report = json.loads((tmp_path / "o.jsonl.report.json").read_text())
    assert report["dropped"] == {"truncated": 2} and report["prompts_without_answer"] == 2
    # keep_truncated keeps them: the file is written, atomically, with no temp file left.
    assert cli.main(["generate", str(recipe), "generate.keep_truncated=true"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [row["messages"][0]["content"] for row in rows] == ["a?", "c?"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_teacher_as_model_judge_is_loaded_once_and_unparsable_replies_drop(
    tmp_path, tiny_model_dir, monkeypatch
):
    (tmp_path / "train.jsonl").write_text('{"q": "a?", "a": "b"}\n{"q": "c?", "a": "d"}\n')
    loads = []
    real_loader = seqkd.load_generator
    monkeypatch.setattr(seqkd, "load_generator", lambda ref: loads.append(ref) or real_loader(ref))
    judge = f'{{type: model, ref: "{tiny_model_dir}", min_score: 0}}'
    recipe = _distill_yaml(
        tmp_path,
        tiny_model_dir,
        "{out: o.jsonl, max_new_tokens: 3, temperature: 0, "
        f"keep_truncated: true, judge: {judge}}}",
    )
    code = cli.main(["generate", str(recipe)])
    assert len(loads) == 1  # the teacher judged itself
    report = json.loads((tmp_path / "o.jsonl.report.json").read_text())
    assert sum(report["judge_scores"].values()) == report["samples"] == 2
    assert report["kept"] + report["dropped"].get("judge_no_score", 0) == 2
    assert report["kept"] == sum(
        n for score, n in report["judge_scores"].items() if score != "none"
    )
    assert code == (0 if report["kept"] else 2)
    for example in report["drop_examples"]:
        assert example["reason"] == "judge_no_score" and seqkd.parse_score(example["reply"]) is None


def test_generate_verb_needs_a_distill_recipe_with_a_generate_section(
    tmp_path, tiny_model_dir, capsys
):
    (tmp_path / "train.jsonl").write_text('{"q": "a?", "a": "b"}\n')
    path = _distill_yaml(tmp_path, tiny_model_dir, "null")
    assert cli.main(["generate", str(path)]) == 2
    assert "has no generate: section" in capsys.readouterr().err


# --------------------------------------------------------------------------- endpoint client
def _endpoint(url, **extra):
    from still.distill_sections import EndpointSection

    return EndpointSection(url=url, model="m", **extra)


def _one_choice(request, headers=None):
    return {
        "choices": [
            {
                "message": {"role": "assistant", "content": f" seed {request['seed']} "},
                "finish_reason": "stop",
            }
        ]
    }


def test_endpoint_asks_again_when_the_server_ignores_n(monkeypatch):
    server = FakeEndpoint(200, _one_choice)
    monkeypatch.setenv("TEST_KEY", "sekret")
    try:
        answers = endpoint.generate_endpoint(
            _endpoint(server.url, api_key_env="TEST_KEY"),
            CONVERSATIONS[:2],
            samples=2,
            temperature=0.5,
            top_p=0.9,
            max_new_tokens=7,
            batch_size=2,
            seed=10,
        )
    finally:
        server.close()
    assert answers == [
        [endpoint.Answer("seed 10", False), endpoint.Answer("seed 11", False)],
        [endpoint.Answer("seed 12", False), endpoint.Answer("seed 13", False)],
    ]
    path, headers, body = server.requests[0]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer sekret"
    assert {k: body[k] for k in ("model", "temperature", "top_p", "max_tokens")} == {
        "model": "m",
        "temperature": 0.5,
        "top_p": 0.9,
        "max_tokens": 7,
    }
    assert sorted(request[2]["n"] for request in server.requests) == [1, 1, 2, 2]


def test_endpoint_errors_are_still_errors(monkeypatch):
    server = FakeEndpoint(401, {"error": {"message": "bad key"}})
    try:
        with pytest.raises(StillError, match=r"chat/completions: HTTP 401 Unauthorized: .*bad key"):
            endpoint.EndpointClient(_endpoint(server.url)).complete(
                CONVERSATIONS[0], n=1, temperature=0, top_p=1, max_tokens=4, seed=0
            )
    finally:
        server.close()
    with pytest.raises(StillError, match=f"cannot reach {server.url}/chat/completions"):
        endpoint.EndpointClient(_endpoint(server.url)).complete(
            CONVERSATIONS[0], n=1, temperature=0, top_p=1, max_tokens=4, seed=0
        )
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(StillError, match="NO_SUCH_KEY_VAR is not set"):
        endpoint.EndpointClient(_endpoint(server.url, api_key_env="NO_SUCH_KEY_VAR"))
    server = FakeEndpoint(200, {"object": "not a completion"})
    try:
        with pytest.raises(StillError, match="not an OpenAI chat completion response"):
            endpoint.EndpointClient(_endpoint(server.url)).complete(
                CONVERSATIONS[0], n=1, temperature=0, top_p=1, max_tokens=4, seed=0
            )
    finally:
        server.close()


# --------------------------------------------------------------------------- judges
def test_exact_and_regex_verdicts():
    assert seqkd.exact_verdict("  The  Answer\n", "the answer") is None
    assert seqkd.exact_verdict("the answer.", "the answer") == "exact_mismatch"
    pattern = r"#### *(-?[0-9.,]+)"
    assert seqkd.regex_verdict(pattern, "so 3+4 = 7\n#### 7", "4+3\n#### 7") is None
    assert seqkd.regex_verdict(pattern, "#### 8", "#### 7") == "regex_mismatch"
    assert seqkd.regex_verdict(pattern, "seven", "#### 7") == "regex_no_match"
    assert (
        seqkd.regex_verdict(r"\d+", "it is 42", "42") is None
    )  # no group, reference compared whole


def test_score_parsing_and_judge_prompt_filling():
    assert seqkd.parse_score("Score: 8/10") == 8
    assert seqkd.parse_score("-1") == -1
    assert seqkd.parse_score("excellent") is None
    prompt = seqkd.Prompt("f:1", [{"role": "user", "content": "json {a: 1}?"}], "ref {x}")
    filled = seqkd.fill_judge_prompt(
        "Q={question} A={answer} R={reference} {other}", prompt, "{answer}"
    )
    assert filled == "Q=json {a: 1}? A={answer} R=ref {x} {other}"
