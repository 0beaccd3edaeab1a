"""The forgetting check: regression_tasks scored on the base and the result at the end of a run,
the change with paired CIs in regression.json, the summary and the card; --strict exits 3."""

import json

import pytest
from tiny_models import QA

from eval.regression import format_report, regression_report
from still import cli
from still.rundir import RunDir

OUR_TASK = """name: tiny-general
type: multiple_choice
data: {path: general.jsonl}
prompt: "Question: {{ question }}\\nAnswer:"
choices: choices
label: label
"""
LM_EVAL_TASK = """task: tiny_general_lm_eval
dataset_path: json
dataset_kwargs: {data_files: {test: general.jsonl}}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: label
metric_list: [{metric: acc}]
"""


@pytest.fixture
def regression_files(tmp_path):
    answers = [answer for _, answer in QA]
    with (tmp_path / "general.jsonl").open("w") as handle:
        for i, (question, answer) in enumerate(QA):
            choices = [answer, answers[(i + 1) % len(answers)], answers[(i + 3) % len(answers)]]
            handle.write(
                json.dumps(
                    {"id": f"g{i}", "question": question, "choices": choices, "label": i % 3}
                )
                + "\n"
            )
    (tmp_path / "general.yaml").write_text(OUR_TASK)
    (tmp_path / "general_lm_eval.yaml").write_text(LM_EVAL_TASK)
    return tmp_path


def test_a_finetune_run_ends_with_the_forgetting_check(
    finetune_recipe, regression_files, tmp_path, capsys
):
    recipe = finetune_recipe(
        extra="regression_tasks: [general.yaml, general_lm_eval.yaml]\nregression_tolerance: 0.5\n"
    )
    assert cli.main(["run", str(recipe), "--strict", "train.lr=2e-2"]) == 0
    out = capsys.readouterr().out
    assert "forgetting check" in out
    run = RunDir(tmp_path / "runs" / "tiny-ft")
    report = run.read_regression()
    assert {(row["task"], row["metric"]) for row in report["rows"]} == {
        ("tiny-general", "acc"),
        ("tiny-general", "acc_norm"),
        ("tiny_general_lm_eval", "acc"),
    }
    for row in report["rows"]:
        base = json.loads((run.regression_dir / "base" / f"{row['task']}.json").read_text())
        after = json.loads((run.regression_dir / "tiny-ft" / f"{row['task']}.json").read_text())
        assert row["base"] == base["metrics"][row["metric"]]["mean"]
        assert row["result"] == after["metrics"][row["metric"]]["mean"]
        assert row["change"] == pytest.approx(row["result"] - row["base"])
        low, high = row["ci95"]
        assert low <= row["change"] <= high
        assert row["flagged"] == (row["change"] < -0.5)
    # the same base again: served from the eval cache, not scored twice
    assert cli.main(["run", str(recipe), "--force", "train.lr=2e-2"]) == 0
    assert "base on tiny-general (cached)" in capsys.readouterr().out


def test_a_distill_run_checks_the_carved_student_against_its_teacher(
    distill_recipe, regression_files, tmp_path, tiny_model_dir_4layers, capsys
):
    recipe = distill_recipe(extra="regression_tasks: [general.yaml]\n")
    assert cli.main(["run", str(recipe)]) == 0
    assert "forgetting check" in capsys.readouterr().out
    run = RunDir(tmp_path / "runs" / "tiny-kd")
    report = run.read_regression()
    assert report["base"] == str(tiny_model_dir_4layers)  # a carved student: its teacher
    assert report["tolerance"] == 0.02  # the default
    assert {(row["task"], row["metric"]) for row in report["rows"]} == {
        ("tiny-general", "acc"),
        ("tiny-general", "acc_norm"),
    }
    teacher = json.loads((run.regression_dir / "base" / "tiny-general.json").read_text())
    for row in report["rows"]:
        assert row["base"] == teacher["metrics"][row["metric"]]["mean"]
        assert row["flagged"] == (row["change"] < -0.02)


def write_results(directory, task, metric, values, lower_is_better=False):
    directory.mkdir(parents=True, exist_ok=True)
    samples = [{"idx": i, "id": f"q{i}", "metrics": {metric: v}} for i, v in enumerate(values)]
    (directory / f"{task}.samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    mean = sum(values) / len(values)
    return {"task": task, "metrics": {metric: {"mean": mean, "stderr": 0.0}}}


def test_a_drop_beyond_the_tolerance_is_flagged_in_the_metrics_direction(tmp_path):
    base = [
        write_results(tmp_path / "base", "mc", "acc", [1, 1, 1, 1, 0, 1, 1, 1]),
        write_results(tmp_path / "base", "ppl", "loss", [2.0, 2.1, 1.9, 2.0]),
    ]
    result = [
        write_results(tmp_path / "after", "mc", "acc", [1, 0, 0, 1, 0, 0, 1, 1]),
        write_results(tmp_path / "after", "ppl", "loss", [1.5, 1.6, 1.4, 1.5]),  # better
    ]
    report = regression_report(base, result, tmp_path / "base", tmp_path / "after", 0.1)
    rows = {row["task"]: row for row in report["rows"]}
    assert rows["mc"]["change"] == pytest.approx(-3 / 8) and rows["mc"]["flagged"]
    assert rows["mc"]["ci95"][1] < 0  # paired over the same questions: a clear drop
    assert rows["ppl"]["change"] == pytest.approx(-0.5) and not rows["ppl"]["flagged"]
    assert report["flagged"] == ["mc acc -0.3750 (tolerance 0.1)"]
    assert "DROP beyond tolerance" in format_report(report, "tuned")
    loose = regression_report(base, result, tmp_path / "base", tmp_path / "after", 0.5)
    assert loose["flagged"] == []
    # a drop of exactly the tolerance is not beyond it, whatever floating point makes of it
    base = [write_results(tmp_path / "b2", "mc", "acc", [0.53])]
    result = [write_results(tmp_path / "a2", "mc", "acc", [0.48])]
    exact = regression_report(base, result, tmp_path / "b2", tmp_path / "a2", 0.05)
    assert exact["flagged"] == [] and exact["rows"][0]["change"] < -0.05


def test_strict_exits_3_on_a_flagged_drop_and_0_without(tmp_path, capsys):
    run = RunDir(tmp_path)
    run.write_regression({"tolerance": 0.02, "rows": [], "flagged": ["mc acc -0.1000"]})
    assert cli._strict_exit(run) == 3
    assert "forgetting check: mc acc -0.1000" in capsys.readouterr().err
    run.write_regression({"tolerance": 0.02, "rows": [], "flagged": []})
    assert cli._strict_exit(run) == 0
