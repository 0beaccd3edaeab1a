"""Eval tasks are checked against every row before any model loads (eval.checks), messages
name the task file:line, the row, the field and the row's fields (eval.templates), nothing
scores zero rows or writes NaN (eval.harness), and compare / eval recipes refuse settings
that would otherwise be ignored (eval.compare, eval.run)."""

import json
import math
import textwrap
from pathlib import Path

import pytest
import torch

from eval import run as eval_run
from eval.checks import check_count, check_eval_recipe, check_task, check_tasks, model_among
from eval.compare import compare
from eval.tasks import load_task
from eval.templates import referenced_fields, row_choices, row_gold
from still import recipe as recipe_module
from still.errors import StillError

ROWS = [
    {
        "id": "a",
        "question": "Which returns the absolute value?",
        "choices": ["abs", "len"],
        "label": 0,
    },
    {"id": "b", "question": "Which counts items?", "choices": ["abs", "len"], "label": 1},
    {"id": "c", "question": "Which is largest?", "choices": ["max", "min"], "label": 0},
]
MC = """\
name: mc
type: multiple_choice
data: {path: mc.jsonl}
prompt: "Q: {{ question }}"
choices: choices
label: label
"""


def write(directory: Path, task: str = MC, rows=ROWS, name="task.yaml", data="mc.jsonl") -> Path:
    (directory / data).write_text("".join(json.dumps(row) + "\n" for row in rows))
    path = directory / name
    path.write_text(task)
    return path


def error_of(call, *args, **kwargs) -> str:
    with pytest.raises(StillError) as caught:
        call(*args, **kwargs)
    text = str(caught.value)
    assert "\n" not in text
    return text


# --------------------------------------------------------------------------- check_tasks
def test_a_good_task_passes_and_comes_back_loaded(tmp_path):
    tasks = check_tasks([write(tmp_path)])
    assert [task.name for task in tasks] == ["mc"]
    assert check_task(tasks[0]) == ROWS


def test_relative_task_paths_are_taken_against_base_dir(tmp_path, monkeypatch):
    write(tmp_path)
    monkeypatch.chdir(tmp_path.parent)
    assert check_tasks(["task.yaml"], base_dir=tmp_path)[0].name == "mc"
    assert "task file not found" in error_of(check_tasks, ["task.yaml"])


def test_a_missing_task_names_the_recipe_key_that_lists_it(tmp_path):
    message = error_of(check_tasks, [tmp_path / "gone.yaml"], named_by="r.yaml:9: eval_tasks")
    assert message.startswith("r.yaml:9: eval_tasks: task file not found: ")
    assert "gone.yaml" in message


@pytest.mark.parametrize(
    "old, new, key, line, field, suggestion",
    [
        ("{{ question }}", "{{ quesiton }}", "prompt", 4, "quesiton", "question"),
        ("choices: choices", "choices: choice", "choices", 5, "choice", "choices"),
        ("label: label", "label: labels", "label", 6, "labels", "label"),
    ],
)
def test_an_unknown_field_names_file_line_row_field_suggestion_and_fields(
    tmp_path, old, new, key, line, field, suggestion
):
    path = write(tmp_path, MC.replace(old, new))
    message = error_of(check_tasks, [path])
    assert message.startswith(f"{path}:{line}: {key}: row {tmp_path / 'mc.jsonl'}:1 ")
    assert f"has no field '{field}' (did you mean '{suggestion}'?)" in message
    assert "fields in the row: choices, id, label, question" in message


def test_a_field_missing_from_a_later_row_names_that_row(tmp_path):
    rows = [ROWS[0], ROWS[1], {k: v for k, v in ROWS[2].items() if k != "label"}]
    message = error_of(check_tasks, [write(tmp_path, rows=rows)])
    assert "mc.jsonl:3 has no field 'label'" in message
    assert "fields in the row: choices, id, question" in message


def test_templates_that_guard_a_field_or_use_globals_are_not_refused(tmp_path):
    task = MC.replace(
        "{{ question }}",
        "{{ question }}{% if hint is defined %} ({{ hint }}){% endif %}"
        "{% for i in range(2) %}.{% endfor %}",
    )
    assert check_tasks([write(tmp_path, task)])[0].name == "mc"
    assert referenced_fields("{% for i in range(2) %}{{ hint }}{% endfor %}") == ("hint",)


@pytest.mark.parametrize(
    "label, fragment",
    [
        (2, "gives the label 2 but has 2 choices (valid: 0 to 1)"),
        (-1, "gives the label -1 but has 2 choices"),
        (None, "gives null for 'label', not a choice index"),
        (True, "gives a bool (True) for 'label', not a choice index"),
        ("cos", "gives the label 'cos', which is neither a choice index nor one of its choices"),
        (1.5, "gives a float (1.5) for 'label', not a choice index"),
    ],
)
def test_a_bad_gold_label_names_task_line_row_and_value(tmp_path, label, fragment):
    rows = [ROWS[0], {**ROWS[1], "label": label}]
    path = write(tmp_path, rows=rows)
    message = error_of(check_tasks, [path])
    assert message.startswith(f"{path}:6: label: row {tmp_path / 'mc.jsonl'}:2 ")
    assert fragment in message


@pytest.mark.parametrize("label, gold", [("1", 1), (1.0, 1), ("len", 1), (0, 0)])
def test_labels_given_as_text_float_or_choice_resolve(tmp_path, label, gold):
    task = check_tasks([write(tmp_path, rows=[{**ROWS[1], "label": label}])])[0]
    row = {**ROWS[1], "label": label}
    assert row_gold(task, row, row_choices(task, row)) == gold


def test_a_constant_label_and_a_target_matched_against_choices(tmp_path):
    constant = check_tasks([write(tmp_path, MC.replace("label: label", "label: 0"))])[0]
    assert row_gold(constant, ROWS[1], ["abs", "len"]) == 0
    by_target = MC.replace("label: label", 'target: "{{ answer }}"')
    rows = [{**row, "answer": row["choices"][row["label"]]} for row in ROWS]
    assert check_tasks([write(tmp_path, by_target, rows=rows)])
    rows[1]["answer"] = "sum"
    message = error_of(check_tasks, [write(tmp_path, by_target, rows=rows)])
    assert "target: row" in message and "renders 'sum', which is not one of its choices" in message


@pytest.mark.parametrize(
    "choices, fragment",
    [
        ("abs", "gives a str ('abs'), not a list of choices"),
        ([], "gives an empty list of choices"),
        (["abs", "len", "abs"], "lists 'abs' twice (choices 0 and 2)"),
        (["abs", " "], "has an empty choice 1"),
        (7, "gives a int (7), not a list of choices"),
    ],
)
def test_bad_choices_name_the_row(tmp_path, choices, fragment):
    rows = [{**ROWS[0], "choices": choices}]
    path = write(tmp_path, rows=rows)
    message = error_of(check_tasks, [path])
    assert message.startswith(f"{path}:5: choices: row ")
    assert fragment in message


def test_choices_rendered_as_json_text_are_a_list(tmp_path):
    task = check_tasks([write(tmp_path, MC.replace("choices: choices", "choices: choices|tojson"))])
    assert row_choices(task[0], ROWS[0]) == ["abs", "len"]


def test_a_template_that_fails_on_a_row_is_a_user_error(tmp_path):
    path = write(tmp_path, MC.replace("{{ question }}", "{{ question + 1 }}"))
    message = error_of(check_tasks, [path])
    assert "prompt: row" in message and "cannot be rendered: TypeError" in message


# --------------------------------------------------------------------------- degenerate inputs
@pytest.mark.parametrize(
    "data, text",
    [("mc.jsonl", ""), ("mc.jsonl", "\n \n"), ("mc.csv", "question,label\n"), ("mc.json", "[]")],
)
def test_a_task_with_no_rows_names_its_file(tmp_path, data, text):
    path = write(tmp_path, MC.replace("mc.jsonl", data))
    (tmp_path / data).write_text(text)
    message = error_of(check_tasks, [path])
    assert message.startswith(f"{path}:3: data: {tmp_path / data} has no rows (nothing to score)")


@pytest.mark.parametrize("limit", [0, -1, True, 2.5])
def test_a_limit_below_one_is_refused(tmp_path, limit):
    message = error_of(check_tasks, [write(tmp_path)], limit=limit)
    assert message == f"--limit must be >= 1 (got {limit}) (drop it to score every row)"


def test_only_scored_rows_are_checked_unless_shots_come_from_the_rest(tmp_path):
    rows = [ROWS[0], ROWS[1], {**ROWS[2], "label": 5}]
    path = write(tmp_path, rows=rows)
    assert len(check_tasks([path], limit=2)) == 1  # row 3 is never scored
    error_of(check_tasks, [path])
    shots = MC + "fewshot: {n: 1}\n"
    assert "mc.jsonl:3" in error_of(check_tasks, [write(tmp_path, shots, rows=rows)], limit=2)


def test_too_few_rows_for_fewshot_is_refused(tmp_path):
    message = error_of(check_tasks, [write(tmp_path, MC + "fewshot: {n: 3}\n")])
    assert message.startswith(f"{tmp_path / 'task.yaml'}:7: fewshot.n is 3 but the task has only")
    assert check_tasks([write(tmp_path, MC + "fewshot: {n: 2}\n")])


def test_an_empty_perplexity_target_is_refused(tmp_path):
    task = (
        "name: ppl\ntype: perplexity\ndata: {path: qa.jsonl}\nprompt: '{{ q }}'\n"
        "target: '{{ a }}'\n"
    )
    path = write(tmp_path, task, rows=[{"q": "x", "a": "y"}, {"q": "z", "a": ""}], data="qa.jsonl")
    assert "renders empty on row" in error_of(check_tasks, [path])


def test_two_tasks_with_one_name_or_one_file_twice_are_refused(tmp_path):
    first = write(tmp_path)
    second = write(tmp_path, name="other.yaml")
    assert "task name 'mc' is also the name of" in error_of(check_tasks, [first, second])
    assert "is listed twice" in error_of(check_tasks, [first, first])


def test_an_invalid_regex_is_refused_at_load(tmp_path):
    task = (
        "name: qa\ntype: generate\ndata: {path: qa.jsonl}\nprompt: '{{ q }}'\n"
        "target: '{{ a }}'\nmetrics: [regex_match]\nregex: '('\n"
    )
    path = write(tmp_path, task, rows=[{"q": "x", "a": "y"}], data="qa.jsonl")
    assert error_of(load_task, path).startswith(f"{path}:7: regex: invalid regular expression")


def test_check_count():
    check_count(None)
    check_count(3, "--batch-size")
    assert error_of(check_count, 0, "--batch-size") == "--batch-size must be >= 1 (got 0)"


# --------------------------------------------------------------------------- the harness
@pytest.fixture
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def score(model, tokenizer, task, out_dir, **kwargs):
    from eval.harness import evaluate

    return evaluate(
        model,
        tokenizer,
        task,
        out_dir=out_dir,
        cache_dir=None,
        model_hash="m",
        progress=False,
        **kwargs,
    )


def test_the_harness_refuses_zero_rows_and_a_zero_limit_before_writing(tiny, tmp_path):
    model, tokenizer = tiny
    task = load_task(write(tmp_path))
    out = tmp_path / "out"
    assert "--limit must be >= 1" in error_of(score, model, tokenizer, task, out, limit=0)
    (tmp_path / "mc.jsonl").write_text("")
    assert "has no rows" in error_of(score, model, tokenizer, task, out)
    assert not out.exists()


def test_non_finite_scores_are_refused_not_written_as_nan(tiny, tmp_path):
    model, tokenizer = tiny
    task = load_task(write(tmp_path))
    out = tmp_path / "out"
    summary = score(model, tokenizer, task, out)
    assert all(math.isfinite(v) for s in summary["metrics"].values() for v in s.values())
    json.loads((out / "mc.json").read_text(), parse_constant=pytest.fail)  # strict JSON
    broken = tmp_path / "broken"
    with torch.no_grad():
        model.get_output_embeddings().weight.fill_(float("nan"))
    message = error_of(score, model, tokenizer, task, broken)
    assert message.startswith("m on mc: rows 0, 1, 2 scored a non-finite number")
    assert not broken.exists()


# --------------------------------------------------------------------------- eval recipes
def eval_recipe(tmp_path: Path, models, **extra) -> Path:
    write(tmp_path)
    lines = [f"{key}: {json.dumps(value)}" for key, value in extra.items()]
    path = tmp_path / "eval.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        # Run: still run eval.yaml
        kind: eval
        name: cmp
        models: {json.dumps([str(m) for m in models])}
        tasks: [task.yaml]
        """)
        + "".join(line + "\n" for line in lines)
    )
    return path


@pytest.fixture
def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the checks")

    monkeypatch.setattr(eval_run.models, "load_model", refuse)


def test_reference_and_teacher_must_name_a_model(tmp_path, no_model_loads):
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    base.mkdir(), tuned.mkdir()
    recipe = recipe_module.load(eval_recipe(tmp_path, [base, tuned], reference="tunned"))
    message = error_of(eval_run.run_eval_recipe, recipe)
    assert message.startswith(f"{tmp_path / 'eval.yaml'}:6: reference: 'tunned' is not one of")
    assert "(did you mean 'tuned'?)" in message
    for wanted in ("tuned", str(tuned), f"{tuned}/"):
        assert model_among(wanted, [str(base), str(tuned)], "reference", at="x") == str(tuned)
    recipe = recipe_module.load(eval_recipe(tmp_path, [base, tuned], teacher="teach"))
    assert "teacher: 'teach' is not one of the models" in error_of(check_eval_recipe, recipe)


def test_an_eval_recipe_with_a_bad_task_or_limit_fails_before_any_model(tmp_path, no_model_loads):
    recipe = recipe_module.load(eval_recipe(tmp_path, ["builtin:x"]))
    (tmp_path / "mc.jsonl").write_text("")
    assert "has no rows" in error_of(eval_run.run_eval_recipe, recipe)
    assert "--limit must be >= 1 (got 0)" in error_of(eval_run.run_eval_recipe, recipe, limit=0)
    assert "--limit must be >= 1" in error_of(eval_run.eval_models, ["m"], ["t.yaml"], limit=0)
    message = error_of(eval_run.eval_models, ["m"], [tmp_path / "task.yaml"], batch_size=0)
    assert message == "--batch-size must be >= 1 (got 0)"


def test_finetune_check_and_run_refuse_a_bad_eval_task_before_the_tokenizer(tmp_path, monkeypatch):
    from finetune import sft

    def refuse(*args, **kwargs):
        raise AssertionError("the tokenizer was loaded before the task checks")

    monkeypatch.setattr(sft.models, "load_tokenizer", refuse)
    write(tmp_path, MC.replace("label: label", "label: gold"))
    path = tmp_path / "ft.yaml"
    path.write_text(
        textwrap.dedent("""\
        # Run: still check ft.yaml
        kind: finetune
        name: ft
        model: {ref: builtin:x}
        data: {train: {path: mc.jsonl, format: completion, text: question}}
        eval_tasks: [task.yaml]
        """)
    )
    recipe = recipe_module.load(path)
    for call in (lambda: sft.check(recipe), lambda: sft.run(recipe, None)):
        message = error_of(call)
        assert "task.yaml:6: label: row" in message and "has no field 'gold'" in message
    recipe = recipe_module.load(path, ["eval_tasks=[gone.yaml]"])
    message = error_of(sft.check, recipe)
    assert message.startswith(f"{path}: eval_tasks: task file not found: ")


# --------------------------------------------------------------------------- compare
def results(directory: Path, correct, **summary_extra) -> Path:
    directory.mkdir(parents=True)
    samples = [
        {"idx": i, "id": f"q{i}", "metrics": {"acc": float(c)}} for i, c in enumerate(correct)
    ]
    (directory / "mc.samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    mean = sum(correct) / len(correct)
    summary = {
        "task": "mc",
        "task_hash": "t",
        "harness_version": "1",
        "n": len(correct),
        "metrics": {"acc": {"mean": mean, "stderr": 0.1}},
        "limit": None,
        **summary_extra,
    }
    (directory / "mc.json").write_text(json.dumps(summary))
    return directory


def test_compare_writes_to_the_current_directory_by_default(tmp_path, monkeypatch):
    first = results(tmp_path / "runs" / "a", [1, 0, 1])
    second = results(tmp_path / "runs" / "b", [1, 1, 1])
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    compare([first, second], reference=None)
    assert sorted(p.name for p in here.iterdir()) == ["compare.json", "compare.md", "compare.png"]
    assert not list((tmp_path / "runs").glob("compare.*"))
    json.loads((here / "compare.json").read_text(), parse_constant=pytest.fail)


def test_compare_refuses_one_input_and_writes_nothing(tmp_path):
    only = results(tmp_path / "a", [1, 0])
    message = error_of(compare, [only], reference=None, out_dir=tmp_path / "out")
    assert message.startswith("compare needs the eval results of at least two models")
    assert not (tmp_path / "out").exists()


def test_compare_names_bad_inputs(tmp_path):
    first = results(tmp_path / "a", [1, 0])
    second = results(tmp_path / "b", [1, 1])
    out = tmp_path / "out"
    assert "nope: no such directory" in error_of(
        compare, [first, tmp_path / "nope"], reference=None, out_dir=out
    )
    message = error_of(compare, [first, second], reference="bb", out_dir=out)
    assert message == (
        "--reference 'bb' is not among the compared models (did you mean 'b'?) "
        "(the models are: a, b)"
    )
    assert "--teacher 'x' is not among" in error_of(
        compare, [first, second], reference=None, teacher="x", out_dir=out
    )
    assert "is listed twice" in error_of(compare, [first, first], reference=None, out_dir=out)
    (second / "mc.json").write_text('{"task": "mc", "metrics": {"acc": {"mean": NaN}}}')
    assert "NaN is not a JSON number" in error_of(compare, [first, second], reference=None)
    (second / "mc.json").write_text('{"task": "mc", "metrics": {"acc": {"mean": null}}}')
    assert "metric 'acc' has no numeric mean and stderr" in error_of(
        compare, [first, second], reference=None
    )
    (second / "mc.json").write_text('{"task": "mc",\n "metrics": ')
    assert error_of(compare, [first, second], reference=None).startswith(f"{second}/mc.json:2: ")
    assert not out.exists()
