"""The cascade analysis: measures by hand, a threshold with a known answer, disjoint splits, the
report files, and `still cascade` end to end on two tiny models."""

import json
import math
import random

import numpy as np
import pytest

from eval.cascade import (
    analyse_task,
    auroc,
    cascade_quality,
    check_disjoint,
    choose_threshold,
    deferral_curve,
    reliability,
    signals_for,
    split_questions,
)
from eval.cascade_report import write_report
from still.errors import StillError
from still.sections import CascadeSection


def test_auroc_and_ece_by_hand():
    scores = np.array([0.9, 0.8, 0.3, 0.1])
    assert auroc(scores, np.array([True, True, False, False])) == 1.0
    assert auroc(scores, np.array([False, False, True, True])) == 0.0
    assert auroc(np.array([0.5, 0.5]), np.array([True, False])) == 0.5
    # two bins: predicted 0.15 vs observed 0 (2 rows), predicted 0.85 vs observed 1 (2 rows)
    ece, bins = reliability(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0.0, 0.0, 1.0, 1.0]))
    assert ece == pytest.approx(0.15)
    assert [b[4] for b in bins] == [1, 1, 1, 1] or sum(b[4] for b in bins) == 4


def test_threshold_search_finds_the_known_answer():
    # 10 questions: the student is right exactly where it is confident (conf >= 0.6), the
    # teacher is always right. 95% of the teacher's score needs 4 deferrals (the 4 unsure).
    conf = np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99])
    student = (conf >= 0.6).astype(float)
    teacher = np.ones(10)
    chosen = choose_threshold(conf, student, teacher, target_quality=0.95)
    assert chosen["reached"] and chosen["deferral"] == pytest.approx(0.4)
    assert chosen["quality"] == pytest.approx(1.0) and chosen["threshold"] == pytest.approx(0.6)
    budget = choose_threshold(conf, student, teacher, max_deferral=0.2)
    assert budget["deferral"] == pytest.approx(0.2) and budget["quality"] == pytest.approx(0.8)
    unreachable = choose_threshold(conf, np.zeros(10), teacher, target_quality=1.5)
    assert not unreachable["reached"] and unreachable["deferral"] == 1.0
    curve = deferral_curve(conf, student, teacher)
    assert curve[0] == [0.0, 0.6] and curve[-1] == [1.0, 1.0] and curve[4] == [0.4, 1.0]
    assert cascade_quality(conf, student, teacher, 0.6) == (0.4, 1.0)


def records(n, duplicates=0):
    rows = [
        {"id": f"q{i}", "prompt": f"question {i}", "student": 0.0, "teacher": 1.0, "signals": {}}
        for i in range(n)
    ]
    for i in range(duplicates):  # the same question again under another id
        rows.append({**rows[i], "id": f"dup{i}"})
    return rows


@pytest.mark.parametrize("seed", range(5))
def test_calibration_and_test_splits_never_overlap(seed):
    calibration, test = split_questions(records(40, duplicates=10), 0.5, seed)
    assert len(calibration) + len(test) == 50
    assert not {r["prompt"] for r in calibration} & {r["prompt"] for r in test}
    assert not {r["id"] for r in calibration} & {r["id"] for r in test}
    again = split_questions(records(40, duplicates=10), 0.5, seed)
    assert [r["id"] for r in again[0]] == [r["id"] for r in calibration]  # seeded


def test_overlapping_splits_and_impossible_signals_are_refused():
    rows = records(4)
    with pytest.raises(StillError, match="calibration split overlaps the test split"):
        check_disjoint(rows[:3], rows[2:])
    with pytest.raises(StillError, match="'margin' cannot be given by qa, a generate task"):
        signals_for("generate", ["margin"], "qa")
    with pytest.raises(StillError, match="no answer to defer"):
        signals_for("perplexity", None, "ppl")
    with pytest.raises(StillError, match="fewer than 2"):
        split_questions(records(3), 0.5, 0)
    with pytest.raises(ValueError, match="exactly one of target_quality and max_deferral"):
        CascadeSection(student="a", teacher="b")


def write_results(directory, rows, with_signals=True, seconds=None, n_params=None):
    directory.mkdir(parents=True)
    samples = []
    for i, (quality, signal) in enumerate(rows):
        sample = {"idx": i, "id": f"q{i}", "prompt": f"q{i}?", "metrics": {"rouge_l": quality}}
        if with_signals:
            sample["signals"] = {
                "mean_logprob": signal,
                "min_logprob": 2 * signal,
                "mean_entropy": -signal,
                "n_tokens": 10,
            }
        samples.append(sample)
    (directory / "qa.samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    summary = {"task": "qa", "n": len(rows), "batch_size": 8, "metrics": {"rouge_l": {}}}
    summary.update({"seconds": seconds, "n_params": n_params})
    (directory / "qa.json").write_text(json.dumps(summary))


def test_report_from_two_models_samples(tmp_path):
    rng = random.Random(0)
    signal = [rng.uniform(-3, 0) for _ in range(60)]
    student = [1.0 if s > -1.5 else 0.0 for s in signal]  # confident ⇔ right
    write_results(tmp_path / "s", list(zip(student, signal)), seconds=6.0, n_params=100)
    write_results(tmp_path / "t", [(1.0, 0.0)] * 60, seconds=30.0, n_params=1000)
    settings = CascadeSection(student="s", teacher="t", target_quality=0.95)
    task = analyse_task(tmp_path / "s", tmp_path / "t", "qa", "generate", settings)
    assert task["n_calibration"] == 30 and task["n_test"] == 30
    assert task["signals"]["mean_logprob"]["auroc"] == 1.0  # ranks every error below
    chosen = task["signals"][task["winner"]]["test"]
    assert chosen["share_of_teacher"]["value"] >= 0.85
    low, high = chosen["deferral"]["ci"]
    assert low <= chosen["deferral"]["value"] <= high
    cost = task["cost"]
    assert cost["teacher_never_sees"] == pytest.approx(1 - chosen["deferral"]["value"])
    assert cost["flops_per_request"]["saved"] > 0 and cost["seconds_per_request"]["saved"] > 0
    report = write_report(tmp_path / "out", "s", "t", [task])
    on_disk = json.loads((tmp_path / "out" / "cascade.json").read_text())
    assert on_disk == report and report["serve"] is None  # no model references given
    assert (tmp_path / "out" / "cascade.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "out" / "cascade-reliability.png").stat().st_size > 0
    assert "**(chosen)**" in (tmp_path / "out" / "cascade.md").read_text()
    assert not math.isnan(report["tasks"][0]["signals"]["mean_entropy"]["ece"])


def test_samples_without_signals_are_refused(tmp_path):
    write_results(tmp_path / "s", [(1.0, 0.0)] * 10, with_signals=False)
    write_results(tmp_path / "t", [(1.0, 0.0)] * 10)
    settings = CascadeSection(student="s", teacher="t", max_deferral=0.3)
    with pytest.raises(StillError, match="carry no 'mean_logprob' signal"):
        analyse_task(tmp_path / "s", tmp_path / "t", "qa", "generate", settings)


QA = (
    "name: qa\ntype: generate\ndata: {path: qa.jsonl}\nprompt: '{{ question }}'\n"
    "target: '{{ answer }}'\nchat_template: true\ngeneration: {max_new_tokens: 4}\n"
    "metrics: [token_f1]\n"
)


def cascade_recipe(tmp_path, student, teacher, extra=""):
    rows = [{"id": f"q{i}", "question": f"What is {i}?", "answer": f"It is {i}."} for i in range(8)]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "qa.yaml").write_text(QA)
    (tmp_path / "r.yaml").write_text(
        f"kind: eval\nname: casc\noutput_dir: {tmp_path / 'runs'}\n"
        f"models: [{student}, {teacher}]\ntasks: [qa.yaml]\n"
        f"cascade: {{student: {student}, teacher: {teacher}, max_deferral: 0.5{extra}}}\n"
    )
    return tmp_path / "r.yaml"


def test_still_cascade_end_to_end_and_its_one_line_refusal(
    tmp_path, tiny_model_dir, tiny_model_dir_4layers, monkeypatch, capsys
):
    from still.cli import main

    monkeypatch.setenv("STILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    recipe = cascade_recipe(tmp_path, tiny_model_dir, tiny_model_dir_4layers)
    assert main(["cascade", str(recipe)]) == 0
    report = json.loads((tmp_path / "runs" / "casc" / "cascade" / "cascade.json").read_text())
    assert report["tasks"][0]["signals"]["mean_logprob"]["curve"][0][0] == 0.0
    serve = report["serve"]
    assert serve["student"] == str(tiny_model_dir) and serve["max_new_tokens"] == 4
    assert serve["signal"] == report["tasks"][0]["winner"]
    assert "still: cascade on qa:" in capsys.readouterr().out
    (tmp_path / "runs" / "casc" / "cascade" / "cascade.json").unlink()
    assert main(["run", str(recipe)]) == 0  # the cascade: section of an eval recipe: cached
    assert json.loads((tmp_path / "runs" / "casc" / "cascade" / "cascade.json").read_text())
    assert (tmp_path / "runs" / "casc" / "compare.md").is_file()
    assert "cache hit" in capsys.readouterr().err
    bad = cascade_recipe(tmp_path, tiny_model_dir, tiny_model_dir_4layers, ", signals: [margin]")
    assert main(["cascade", str(bad)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("still: error: cascade: signal 'margin' cannot be given")
    assert "Traceback" not in "\n".join(error)


def test_cascade_is_logged_to_wandb_like_compare(
    tmp_path, tiny_model_dir, tiny_model_dir_4layers, monkeypatch
):
    pytest.importorskip("wandb")
    from wandb_records import offline_runs

    from still.cli import main

    for key in ("WANDB_API_KEY", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_DIR", "WANDB_RUN_GROUP"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("STILL_CACHE", str(tmp_path / "cache"))
    for key in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_ARTIFACT_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(key, str(tmp_path / "wandb-home" / key.lower()))
    recipe = cascade_recipe(tmp_path, tiny_model_dir, tiny_model_dir_4layers)
    recipe.write_text(recipe.read_text() + "track: {wandb: {project: still-test}}\n")
    assert main(["cascade", str(recipe)]) == 0
    (run,) = offline_runs(tmp_path / "runs" / "casc" / "cascade")
    table = run.table("cascade/table")
    assert table["columns"][:3] == ["task", "signal", "auroc"] and len(table["data"]) == 3
    assert any(key.startswith("cascade/cascade") for row in run.history for key in row)
