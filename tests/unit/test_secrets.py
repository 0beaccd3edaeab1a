"""Secrets: a key pasted into a recipe or an override is refused, shown redacted, and appears
in no file and on no console; legitimate values (hub ids, paths, digests, env names) pass."""

import hashlib
import shutil
import textwrap
import uuid
from pathlib import Path

import pytest
import yaml
from fake_endpoint import FakeEndpoint

from distill import endpoint
from still import cli, recipe
from still.errors import StillError
from still.secrets import find_secret, looks_like_secret, redact, secret_spans

# Built from pieces so that this file itself holds no key-shaped literal a scanner would flag.
OPENAI_KEY = "sk-" + "proj-" + "Q3vT9xLm2Rk7Wp4Zs8Yb1Nc6Hd0Jf5Ga" + "E2uKo7Vi3Tq9Xr4Ml"
KEYS = {
    "openai": OPENAI_KEY,
    "openai_legacy": "sk-" + "T3BlbkFJ" + "a8Kd92Lm4Pq7Rs1Vw6Xz0Yb3Nc5Hd8Jf2Ga7Ke",
    "anthropic": "sk-" + "ant-api03-" + "Zx8Cv7Bn6Mq5Wl4Ek3Rj2Th1Yg0Uf9Id8Os7Pa6Sd5Fg4Hj3Kl2",
    "huggingface": "hf_" + "QwErTyUiOpAsDfGhJkLzXcVbNmQwErTyUi",
    "github": "ghp_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8",
    "github_fine": "github_pat_" + "11AAB2CCD0" + "Qw3Er5Ty7Ui9Op1As3Df5Gh7Jk9Lz1Xc3Vb5Nm7",
    "slack": "xoxb-" + "123456789012-1234567890123-" + "AbCdEfGhIjKlMnOpQrStUvWx",
    "aws": "AKIA" + "Z7Q3X9L2M4R8T6W1",
    "google": "AIza" + "SyD8x7Kq2Lm9Pw4Rt6Vb1Nc3Hd5Jf0Ga2Ke",
    "gitlab": "glpat-" + "Xy7Kq2Lm9Pw4Rt6Vb1Nc",
    "generic": "Zk4Qm9Tx2Lp7Wv3Rb8Yc1Nd6Hf0Js5Ga" + "Ue3Io",
}
LEGIT = [
    "HuggingFaceTB/SmolLM2-135M-Instruct",
    "builtin:smollm2-135m-instruct",
    "bartowski/Llama-3.2-3B-Instruct-GGUF/Llama-3.2-3B-Instruct-Q4_K_M.gguf",
    "Qwen/Qwen2.5-Coder-32B-Instruct-GPTQ-Int4",
    "/tmp/pytest-of-root/pytest-12/test_validate_prints_the_resolved0/data/train.jsonl",
    "runs/pydocs-teacher-r16-lr2e-4-steps100-seed0",
    hashlib.sha256(b"lineage").hexdigest(),
    hashlib.sha1(b"commit").hexdigest(),
    uuid.uuid4().hex,
    str(uuid.uuid4()),
    "offline-run-20261202_165909-f133d31ba7be",
    "f133d31ba7be",
    "OPENAI_API_KEY",
    "HF_TOKEN",
    "sk-learn-classifier-model-v2",
    "pydocs-teacher-distilled-smollm2-135m-v2",
    "this_is_a_very_long_identifier_name_for_things",
    "Rate the answer from 0 to 10. Reply with the number only.",
    "#### *(-?[0-9.,]+)",
]


@pytest.mark.parametrize("name", sorted(KEYS))
def test_key_shapes_are_recognised_and_redacted(name):
    key = KEYS[name]
    assert looks_like_secret(key)
    shown = redact(f"Authorization: Bearer {key} (sent)")
    assert key not in shown and shown.endswith("…(redacted) (sent)")
    assert key[4:20] not in shown


@pytest.mark.parametrize("value", LEGIT)
def test_legitimate_values_are_not_flagged(value):
    assert not looks_like_secret(value)
    assert redact(value) == value


def test_shipped_recipes_and_env_names_pass():
    assert find_secret({"generate": {"endpoint": {"api_key_env": "OPENAI_API_KEY"}}}) is None
    assert find_secret({"a": {"api_key_env": "OPENAI-KEY"}}) == (
        ("a", "api_key_env"),
        "OPENAI-KEY",
        False,
    )


# --------------------------------------------------------------------------- planted keys
DISTILL = textwrap.dedent(
    """\
    # Run: still generate recipe.yaml
    kind: distill
    name: sec
    teacher: {{ref: some/teacher}}
    student: {{ref: some/student}}
    data:
      train: {{path: train.jsonl}}
    generate:
      out: teacher.jsonl
      endpoint:
        url: http://127.0.0.1:9/v1
        model: served
        api_key_env: {api_key_env}
      judge:
        type: model
        endpoint: {{url: "http://127.0.0.1:9/v1", model: judge, api_key_env: {judge_env}}}
    """
)


def _files_holding(root: Path, needle: str) -> list[str]:
    return [
        str(path.relative_to(root))
        for path in root.rglob("*")
        if path.is_file() and needle.encode() in path.read_bytes()
    ]


def _everything(tmp_path) -> set[str]:
    return {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")}


@pytest.mark.parametrize("verb", ["validate", "check", "generate", "run", "cache"])
@pytest.mark.parametrize("where", ["endpoint", "judge"])
def test_a_key_in_the_recipe_is_refused_and_never_echoed(
    verb, where, tmp_path, monkeypatch, capsys
):
    key = KEYS["openai"]
    envs = {"api_key_env": key, "judge_env": "JUDGE_KEY"}
    if where == "judge":
        envs = {"api_key_env": "OPENAI_API_KEY", "judge_env": key}
    (tmp_path / "recipe.yaml").write_text(DISTILL.format(**envs))
    (tmp_path / "train.jsonl").write_text('{"prompt": "q", "response": "a"}\n')
    monkeypatch.chdir(tmp_path)
    before = _everything(tmp_path)

    assert cli.main([verb, "recipe.yaml"]) == 2

    out = capsys.readouterr()
    line = 13 if where == "endpoint" else 16
    field = "generate.endpoint" if where == "endpoint" else "generate.judge.endpoint"
    assert out.err.splitlines() == [
        f"still: error: {tmp_path.resolve()}/recipe.yaml:{line}: {field}.api_key_env holds what "
        "looks like an API key or token (sk-proj-…(redacted)); a recipe must not contain "
        "secrets (put the key in an environment variable and name that variable, e.g. "
        "api_key_env: OPENAI_API_KEY)"
    ]
    assert key not in out.out + out.err
    assert _everything(tmp_path) == before  # no run dir, no output file
    assert _files_holding(tmp_path, key) == ["recipe.yaml"]  # only where the user put it


@pytest.mark.parametrize(
    "override",
    [
        "generate.endpoint.api_key_env={key}",
        "model.ref={key}",
        "track.wandb.notes=token {key} here",
        "eval_tasks=[a.yaml, {key}]",
        "{key}=1",
    ],
)
def test_a_key_in_an_override_is_refused_and_never_echoed(override, tmp_path, monkeypatch, capsys):
    key = KEYS["huggingface"]
    (tmp_path / "recipe.yaml").write_text(
        "kind: finetune\nname: sec\nmodel: {ref: some/model}\ndata: {train: {path: t.jsonl}}\n"
    )
    monkeypatch.chdir(tmp_path)
    before = _everything(tmp_path)
    for verb in ("validate", "run", "check"):
        assert cli.main([verb, "recipe.yaml", override.format(key=key)]) == 2
    out = capsys.readouterr()
    errors = out.err.splitlines()
    assert len(errors) == 3 and all("hf_…(redacted)" in e for e in errors), errors
    assert all(e.startswith("still: error: override '") for e in errors), errors
    assert key not in out.out + out.err
    assert _everything(tmp_path) == before and _files_holding(tmp_path, key) == []


def test_a_key_given_as_an_argument_is_redacted(tmp_path, monkeypatch, capsys):
    key = KEYS["github"]
    monkeypatch.chdir(tmp_path)
    assert cli.main(["validate", key]) == 2
    assert cli.main(["validate", "r.yaml", key]) == 2
    assert cli.main(["validate", "r.yaml", f"--api-key={key}"]) == 2
    out = capsys.readouterr()
    assert key not in out.out + out.err and out.err.count("ghp_…(redacted)") == 3


def test_resolved_recipe_never_holds_a_key_set_in_code(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(DISTILL.format(api_key_env="OPENAI_API_KEY", judge_env="JUDGE_KEY"))
    loaded = recipe.load(path)
    loaded.generate.endpoint.model = KEYS["anthropic"]  # what load() would have refused
    text = recipe.to_yaml(loaded)
    assert KEYS["anthropic"] not in text and "model: sk-ant-…(redacted)" in text


def test_env_name_fields_must_name_a_variable(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(DISTILL.format(api_key_env="'sk-abc'", judge_env="JUDGE_KEY"))
    with pytest.raises(StillError) as info:
        recipe.load(path)
    assert str(info.value) == (
        f"{path}:13: generate.endpoint.api_key_env must be the name of an environment variable, "
        "got 'sk-…(redacted)' (put the key in an environment variable and name that variable, "
        "e.g. api_key_env: OPENAI_API_KEY)"
    )
    path.write_text(DISTILL.format(api_key_env="MY_KEY_2", judge_env="_judge"))
    recipe.load(path)  # names pass


# --------------------------------------------------------------------------- endpoint echoes
def _echo_headers(request, headers):
    """A reply that echoes the request's headers, the key among them."""
    return {"auth": headers["Authorization"], "error": f"rejected: {headers}"}


@pytest.mark.parametrize("status", [401, 500, 200])
@pytest.mark.parametrize("key", ["plain-secret-value", KEYS["openai"]])
def test_endpoint_errors_never_show_the_key(status, key, monkeypatch):
    from still.distill_sections import EndpointSection

    monkeypatch.setenv("PLANTED_KEY", key)
    server = FakeEndpoint(status, _echo_headers)
    spec = EndpointSection(url=server.url, model="m", api_key_env="PLANTED_KEY")
    try:
        with pytest.raises(StillError) as info:
            endpoint.EndpointClient(spec).complete(
                [{"role": "user", "content": "hi"}],
                n=1,
                temperature=0,
                top_p=1,
                max_tokens=4,
                seed=0,
            )
    finally:
        server.close()
    message = str(info.value)
    assert "rejected" in message or "not an OpenAI chat completion" in message
    assert key not in message and "…(redacted)" in message


# --------------------------------------------------------------------------- the corpus's keys
CORPUS = Path(__file__).parents[1] / "bad_inputs"
SECRET_CASES = [
    case
    for case in yaml.safe_load((CORPUS / "cases_cli.yaml").read_text(encoding="utf-8"))
    if case["case"].startswith("sec_")
]


@pytest.mark.parametrize("case", SECRET_CASES, ids=[c["case"] for c in SECRET_CASES])
def test_no_planted_key_of_the_corpus_reaches_the_console_or_a_new_file(
    case, tmp_path, monkeypatch, capsys
):
    """Every key planted in a sec_* case (its files and its argv) appears neither on stdout nor
    on stderr, and no file is added or changed: the keys stay where the user put them."""
    work = tmp_path / case["case"]
    shutil.copytree(CORPUS / case["case"], work)
    texts = [p.read_text(encoding="utf-8") for p in work.rglob("*") if p.is_file()]
    planted = {
        text[start:end] for text in [*texts, *case["argv"]] for start, end, _ in secret_spans(text)
    }
    assert planted or "must be the name of an environment variable" in case["expect"]
    monkeypatch.chdir(work)
    before = {p: p.read_bytes() for p in work.rglob("*") if p.is_file()}
    assert cli.main(case["argv"]) == 2
    out = capsys.readouterr()
    for key in planted:
        assert key not in out.out + out.err
    assert {p: p.read_bytes() for p in work.rglob("*") if p.is_file()} == before
