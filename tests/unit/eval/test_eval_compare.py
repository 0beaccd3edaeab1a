"""compare: one table with paired CIs and teacher retention, a chart, and refusals."""

import json
from pathlib import Path

import numpy as np
import pytest

from eval.compare import compare
from still.errors import StillError


def write_results(
    run_dir: Path, correct: list[int], task: str = "pydocs-choice", ids=None, **summary_extra
) -> Path:
    """An eval dir as `evaluate` writes it: <task>.json + <task>.samples.jsonl."""
    eval_dir = run_dir / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    ids = ids or [f"q{i}" for i in range(len(correct))]
    with (eval_dir / f"{task}.samples.jsonl").open("w") as handle:
        for idx, (question_id, value) in enumerate(zip(ids, correct)):
            handle.write(
                json.dumps({"idx": idx, "id": question_id, "metrics": {"acc": float(value)}}) + "\n"
            )
    summary = {
        "task": task,
        "task_hash": "t",
        "model_hash": run_dir.name,
        "harness_version": "1",
        "n": len(correct),
        "metrics": {"acc": {"mean": float(np.mean(correct)), "stderr": 0.02}},
        "batch_size": 8,
        "limit": None,
        "created": "2025-01-01T00:00:00+00:00",
        **summary_extra,
    }
    (eval_dir / f"{task}.json").write_text(json.dumps(summary))
    return eval_dir


@pytest.fixture
def three_models(tmp_path):
    rng = np.random.default_rng(0)
    teacher = (rng.random(200) < 0.8).astype(int)
    student = teacher.copy()
    student[rng.choice(200, 30, replace=False)] = 0  # forgets some of what the teacher knew
    base = (rng.random(200) < 0.3).astype(int)
    return [
        write_results(tmp_path / "runs" / "teacher", list(teacher)),
        write_results(tmp_path / "runs" / "student", list(student)),
        write_results(tmp_path / "runs" / "base", list(base)),
    ]


def test_compare_writes_table_and_chart_with_paired_ci(three_models, tmp_path, capsys):
    markdown = compare(
        three_models, reference="teacher", teacher="teacher", out_dir=tmp_path / "cmp"
    )
    assert (tmp_path / "cmp" / "compare.md").read_text() == markdown
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert markdown in capsys.readouterr().out
    header = markdown.splitlines()[0]
    assert "Δ vs teacher [95% paired CI]" in header and "% of teacher" in header
    rows = {
        line.split("|")[3].strip(): line
        for line in markdown.splitlines()[2:]
        if line.startswith("| pydocs")
    }
    assert set(rows) == {"teacher", "student", "base"}
    assert "(reference)" in rows["teacher"] and "100.0%" in rows["teacher"]
    # The student lost ~30 of 200: the paired CI excludes 0, shown by the * marker.
    student_delta = rows["student"].split("|")[5]
    assert student_delta.strip().startswith("-0.1") and student_delta.strip().endswith("*")
    retention = float(rows["student"].split("|")[6].strip().rstrip("%"))
    assert retention == pytest.approx(100 * (0.8 - 0.15) / 0.8, abs=6)
    assert "paired bootstrap" in markdown


def test_names_come_from_run_dirs_or_model_name(tmp_path):
    first = write_results(tmp_path / "a", [1, 0, 1])
    second = write_results(tmp_path / "b", [1, 1, 1], model_name="smollm2-lora")
    markdown = compare([first, second], reference=None, out_dir=tmp_path / "cmp")
    assert "| a |" in markdown and "| smollm2-lora |" in markdown
    assert "reference defaulted to the first model, a" in markdown


def test_compare_refuses_different_question_sets(tmp_path):
    first = write_results(tmp_path / "a", [1, 0, 1, 1])
    second = write_results(tmp_path / "b", [1, 0, 1])  # e.g. run with a smaller --limit
    with pytest.raises(StillError) as caught:
        compare([first, second], reference="a", out_dir=tmp_path / "cmp")
    assert "did not score the same questions" in str(caught.value) and "\n" not in str(caught.value)
    third = write_results(tmp_path / "c", [1, 0, 1, 1], ids=["q0", "q1", "q2", "other"])
    with pytest.raises(StillError):
        compare([first, third], reference="a", out_dir=tmp_path / "cmp")


def test_path_without_results_is_a_one_line_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(StillError) as caught:
        compare([empty], reference=None, out_dir=tmp_path / "cmp")
    assert "empty" in str(caught.value) and "no eval results" in str(caught.value)
    with pytest.raises(StillError):
        compare([write_results(tmp_path / "a", [1])], reference="nobody", out_dir=tmp_path / "cmp")
