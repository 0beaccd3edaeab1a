"""Task YAML loading: one-line errors with file:line and a suggestion, hashing, few-shot draws."""

import json
from pathlib import Path

import pytest
import yaml

from eval.tasks import (
    TaskSpec,
    build_context,
    fewshot_rows,
    load_task,
    select_shots,
    task_hash,
    task_rows,
)
from still.errors import StillError

RECIPES = Path(__file__).resolve().parents[3] / "recipes"


def write_rows(path: Path, n: int = 6) -> Path:
    rows = [
        {
            "id": f"json.f{i}",
            "module": "json",
            "question": f"What does `json.f{i}` do?",
            "answer": f"Does thing {i}.",
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_task(directory: Path, text: str, name: str = "task.yaml") -> Path:
    path = directory / name
    path.write_text(text)
    return path


QA = """\
# Run: still eval --model tiny --task task.yaml
name: qa
type: generate
data: {path: data/test.jsonl}
prompt: "Q: {{ question }}"
target: "{{ answer }}"
"""


@pytest.fixture
def task_dir(tmp_path):
    (tmp_path / "data").mkdir()
    write_rows(tmp_path / "data" / "test.jsonl")
    return tmp_path


def test_load_task_resolves_data_relative_to_the_yaml(task_dir, monkeypatch, tmp_path_factory):
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    task = load_task(write_task(task_dir, QA))
    assert task.type == "generate" and task.metrics == ["exact_match", "token_f1"]
    rows = task_rows(task)
    assert len(rows) == 6 and rows[0]["id"] == "json.f0"


def assert_one_line(error: StillError, *fragments: str) -> None:
    text = str(error)
    assert "\n" not in text
    for fragment in fragments:
        assert fragment in text, text


def test_unknown_key_names_file_line_and_suggestion(task_dir):
    path = write_task(task_dir, QA.replace('prompt: "Q:', 'promt: "Q:'))
    with pytest.raises(StillError) as caught:
        load_task(path)
    assert_one_line(caught.value, "task.yaml:5:", "unknown key 'promt'", "did you mean 'prompt'?")


def test_nested_unknown_key_points_at_its_line(task_dir):
    path = write_task(task_dir, QA + "generation:\n  max_tokens: 10\n  stop: ['\\n']\n")
    with pytest.raises(StillError) as caught:
        load_task(path)
    assert_one_line(
        caught.value, "task.yaml:8:", "'max_tokens' in generation", "did you mean 'max_new_tokens'?"
    )


def test_multiple_choice_without_choices_is_an_error(task_dir):
    text = QA.replace("type: generate", "type: multiple_choice") + "label: label\n"
    with pytest.raises(StillError) as caught:
        load_task(write_task(task_dir, text))
    assert_one_line(caught.value, "task.yaml:", "needs `choices`")


def test_bad_type_suggests_the_closest_one(task_dir):
    with pytest.raises(StillError) as caught:
        load_task(write_task(task_dir, QA.replace("type: generate", "type: multiple-choice")))
    assert_one_line(caught.value, "task.yaml:3:", "type:", "did you mean 'multiple_choice'?")


def test_metric_for_another_task_type_is_an_error(task_dir):
    with pytest.raises(StillError) as caught:
        load_task(write_task(task_dir, QA + "metrics: [acc]\n"))
    assert_one_line(caught.value, "task.yaml:", "'acc' does not apply")


def test_missing_data_file_names_the_path(task_dir):
    with pytest.raises(StillError) as caught:
        load_task(write_task(task_dir, QA.replace("data/test.jsonl", "data/nope.jsonl")))
    assert_one_line(caught.value, "task.yaml:4:", "nope.jsonl", "file not found")


def test_invalid_yaml_reports_its_line(task_dir):
    with pytest.raises(StillError) as caught:
        load_task(write_task(task_dir, QA + "limit: [1, 2\n"))
    assert_one_line(caught.value, "task.yaml:", "invalid YAML")


def test_task_hash_follows_spec_and_data(task_dir):
    path = write_task(task_dir, QA)
    first = task_hash(load_task(path))
    assert task_hash(load_task(path)) == first
    assert task_hash(load_task(write_task(task_dir, QA + "limit: 3\n"))) != first
    write_task(task_dir, QA)
    with (task_dir / "data" / "test.jsonl").open("a") as handle:
        handle.write(json.dumps({"id": "x", "question": "q", "answer": "a"}) + "\n")
    assert task_hash(load_task(path)) != first


def fewshot_task(task_dir, seed: int, n: int) -> TaskSpec:
    return load_task(write_task(task_dir, QA + f"fewshot: {{n: {n}, seed: {seed}}}\n"))


def test_fewshot_is_deterministic_by_seed(task_dir):
    task = fewshot_task(task_dir, seed=1, n=3)
    rows = task_rows(task)
    same = [select_shots(rows, 3, 1, 0, rows[0], True) for _ in range(2)]
    assert same[0] == same[1]
    orders = {
        tuple(r["id"] for r in select_shots(rows, 3, seed, 0, rows[0], True)) for seed in range(6)
    }
    assert len(orders) > 1  # different seeds draw different shots or orders
    prompt = build_context(task, rows[0], same[0], tokenizer=None)
    assert prompt == build_context(
        task, rows[0], select_shots(rows, 3, 1, 0, rows[0], True), tokenizer=None
    )
    assert prompt.endswith("Q: What does `json.f0` do?") and prompt.count("Q: ") == 4


def test_query_row_is_never_among_its_own_shots(task_dir):
    rows = task_rows(fewshot_task(task_dir, seed=5, n=5))
    for index, row in enumerate(rows):  # n = all other rows: the draw must skip exactly the query
        for seed in range(10):
            shots = select_shots(rows, 5, seed, index, row, True)
            assert row not in shots and len(shots) == 5
    separate_pool = rows + [dict(rows[2])]  # a separate file that also holds the query (twice)
    for seed in range(10):
        assert all(
            s["id"] != "json.f2" for s in select_shots(separate_pool, 5, seed, 2, rows[2], False)
        )
    with pytest.raises(StillError):
        select_shots(rows, 6, 0, 0, rows[0], True)


def test_chat_context_puts_shots_in_turns(task_dir, tiny_tokenizer):
    task = load_task(
        write_task(task_dir, QA + "chat_template: true\nsystem: Be brief.\nfewshot: {n: 1}\n")
    )
    rows = task_rows(task)
    context = build_context(task, rows[0], [rows[1]], tiny_tokenizer)
    assert context.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert "<|im_start|>assistant\nDoes thing 1.<|im_end|>" in context
    assert context.endswith(
        "<|im_start|>user\nQ: What does `json.f0` do?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert task.delimiter == ""


@pytest.mark.parametrize("path", sorted((RECIPES / "tasks").glob("*.yaml")), ids=lambda p: p.name)
def test_bundled_tasks_validate_and_say_how_to_run(path):
    text = path.read_text()
    assert text.startswith(
        f"# Run: still eval --model builtin:smollm2-135m-instruct --task recipes/tasks/{path.name}"
    )
    task = TaskSpec.model_validate(
        yaml.safe_load(text)
    )  # the schema only: data may not be built yet
    assert task.name == path.stem


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_rows_load_from_every_local_format(tmp_path, suffix):
    rows = [
        {"id": "a", "question": "q1", "answer": "x"},
        {"id": "b", "question": "q2", "answer": "y"},
    ]
    path = tmp_path / f"rows{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".csv":
        path.write_text("id,question,answer\na,q1,x\nb,q2,y\n")
    else:
        pyarrow = pytest.importorskip("pyarrow")
        import pyarrow.parquet as parquet

        parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    task = load_task(write_task(tmp_path, QA.replace("data/test.jsonl", path.name)))
    assert task_rows(task) == rows


def test_broken_template_is_caught_at_load_time(task_dir):
    with pytest.raises(StillError) as caught:
        load_task(write_task(task_dir, QA.replace("{{ answer }}", "{{ answer }")))
    assert_one_line(caught.value, "task.yaml:6:", "target:", "invalid Jinja2 template")


def hub_dir(tmp_path: Path) -> Path:
    """A local datasets dir: `datasets.load_dataset(dir, split=...)` reads it offline."""
    folder = tmp_path / "hub"
    folder.mkdir()
    write_rows(folder / "test.jsonl", n=4)
    write_rows(folder / "validation.jsonl", n=3)
    return folder


@pytest.mark.parametrize(
    "data",
    [
        "{{hf: {folder}}}",
        "{{hf: {{name: {folder}}}}}",
        "{{hf: {{name: {folder}, split: test}}}}",
    ],
)
def test_hub_data_in_the_flat_and_the_nested_form(tmp_path, data):
    folder = hub_dir(tmp_path)
    text = QA.replace("{path: data/test.jsonl}", data.format(folder=folder))
    task = load_task(write_task(tmp_path, text + "fewshot: {n: 1, split: validation}\n"))
    assert (task.data.hf, task.data.subset, task.data.split) == (str(folder), None, "test")
    assert len(task_rows(task)) == 4
    pool, same_pool = fewshot_rows(task, task_rows(task))
    assert len(pool) == 3 and not same_pool
    flat = text.replace(data.format(folder=folder), f"{{hf: {folder}, split: test}}")
    flat_task = load_task(write_task(tmp_path, flat + "fewshot: {n: 1, split: validation}\n"))
    assert task_hash(task) == task_hash(flat_task)


@pytest.mark.parametrize(
    "data, fragment",
    [
        ("{hf: {name: x, confg: y}}", "task.yaml:4: data: unknown key 'confg' in data.hf"),
        ("{hf: {config: y}}", "task.yaml:4: data: data.hf needs name"),
        ("{hf: {name: x, split: a}, split: b}", "data.split and data.hf.split say the same thing"),
        ("{path: data/test.jsonl, hf: x}", "task.yaml:4: data: give exactly one of 'path'"),
    ],
)
def test_bad_hub_data_is_one_line(task_dir, data, fragment):
    with pytest.raises(StillError) as caught:
        load_task(write_task(task_dir, QA.replace("{path: data/test.jsonl}", data)))
    assert_one_line(caught.value, fragment)


def test_a_row_that_is_not_an_object_names_its_line(task_dir):
    with (task_dir / "data" / "test.jsonl").open("a") as handle:
        handle.write("[1, 2]\n")
    task = load_task(write_task(task_dir, QA))
    with pytest.raises(StillError) as caught:
        task_rows(task)
    assert_one_line(
        caught.value, "test.jsonl:7: expected an object (one row per question), got list"
    )
