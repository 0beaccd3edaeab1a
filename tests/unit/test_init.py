"""`still init`: format detection, max_len from the token lengths, and refusals that leave
nothing written."""

import json

import pytest
from tiny_models import QA

from still import cli, init_templates
from still.errors import StillError
from still.init import detect_format, histogram, init, pick_max_len
from still.rows import strict_rows
from still.sections import RowSource


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def detected(tmp_path, rows):
    path = write_rows(tmp_path / "d.jsonl", rows)
    return detect_format(str(path), strict_rows(RowSource(path=str(path))))


def test_detects_each_format_and_its_fields(tmp_path):
    chat = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in QA
    ]
    assert detected(tmp_path, chat).format == "chat"
    qa = detected(tmp_path, [{"id": 1, "question": q, "answer": a} for q, a in QA])
    assert (qa.format, qa.fields) == ("instruction", {"prompt": "question", "response": "answer"})
    alpaca = detected(tmp_path, [{"instruction": q, "input": "", "output": a} for q, a in QA])
    assert alpaca.fields == {"prompt": "instruction", "response": "output", "input": "input"}
    assert detected(tmp_path, [{"text": q + " " + a} for q, a in QA]).format == "completion"
    choice = detected(
        tmp_path, [{"question": q, "answer": a, "choices": [a, q], "label": 0} for q, a in QA]
    )
    assert choice.choices


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"question": "q", "answer": "a", "text": "t"}], r"ambiguous format \(instruction"),
        ([{"prompt": "q", "question": "q2", "answer": "a"}], "several prompt/response fields"),
        ([{"question": "q", "answer": "a"}, {"text": "t"}], "share no field"),
        ([{"title": "q", "body": "a"}], r"no format fits every row \(fields: body, title\)"),
    ],
)
def test_an_ambiguous_or_unknown_file_is_refused(tmp_path, rows, message):
    with pytest.raises(StillError, match=message):
        detected(tmp_path, rows)


def test_max_len_is_the_p99_rounded_up_and_the_histogram_marks_it():
    lengths = list(range(1, 101)) * 2  # p99 = 99
    assert pick_max_len(lengths) == 128
    assert pick_max_len([3, 4]) == 32
    text = histogram(lengths, 128)
    assert text.count("\n") == 7 and "<- max_len" not in text  # beyond the longest row
    assert "<- max_len" in histogram(lengths, 60)


def test_no_assistant_turns_refuse_exit_2_and_write_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rows = [{"messages": [{"role": "user", "content": q}]} for q, _ in QA]
    write_rows(tmp_path / "chat.jsonl", rows)
    assert cli.main(["init", "chat.jsonl", "--base", "unused/model"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "chat.jsonl:1: the conversation has no assistant message to train on" in err
    assert not (tmp_path / "recipes").exists()


def test_refuses_to_overwrite_without_force(tmp_path, monkeypatch, tiny_tokenizer):
    monkeypatch.chdir(tmp_path)
    write_rows(tmp_path / "qa.jsonl", [{"question": q, "answer": a} for q, a in QA])
    target = init("qa.jsonl", base="tiny", tokenizer=tiny_tokenizer)
    assert target.resolve() == tmp_path / "recipes" / "qa"
    (target / "teacher.yaml").write_text("# edited\n")
    with pytest.raises(StillError, match="recipes/qa already exists.*--force"):
        init("qa.jsonl", base="tiny", tokenizer=tiny_tokenizer)
    assert (target / "teacher.yaml").read_text() == "# edited\n"
    init("qa.jsonl", base="tiny", tokenizer=tiny_tokenizer, force=True)
    assert (target / "teacher.yaml").read_text().startswith("# Run: still run recipes/qa/")
    write_rows(tmp_path / "t.jsonl", [{"prompt": q, "response": a} for q, a in QA])
    with pytest.raises(StillError, match=r"t.jsonl: format instruction \(fields 'prompt'"):
        init("qa.jsonl", base="tiny", tokenizer=tiny_tokenizer, test="t.jsonl", name="c")
    with pytest.raises(StillError, match="no field 'module' to group"):
        init("qa.jsonl", base="tiny", tokenizer=tiny_tokenizer, group_by="module", name="b")
    assert not (tmp_path / "recipes" / "b").exists()


def test_completion_data_gets_no_generate_task_and_says_why():
    plan = init_templates.Plan(
        name="c",
        base="b",
        data="d.jsonl",
        test=None,
        format="completion",
        fields={"text": "text"},
        reason="r",
        rows=10,
        held_out=0.1,
        group_by=None,
        max_len=64,
        p50=1,
        p99=2,
        longest=3,
        choices=False,
        chat_pairs=True,
        answer_tokens=0,
    )
    written = init_templates.files(plan)
    assert sorted(written) == [
        "eval.yaml",
        "pipeline.yaml",
        "student-sft.yaml",
        "student.yaml",
        "tasks/perplexity.yaml",
        "teacher.yaml",
    ]
    assert "No generate task: completion rows have no question" in written["eval.yaml"]


def test_without_test_the_tasks_score_a_test_split_distinct_from_eval(
    tmp_path, monkeypatch, tiny_tokenizer
):
    from eval.tasks import load_task, task_rows
    from still import recipe as recipe_module

    monkeypatch.chdir(tmp_path)
    rows = [{"question": f"{q} ({n})", "answer": a} for n in range(4) for q, a in QA]
    write_rows(tmp_path / "qa.jsonl", rows)
    target = init("qa.jsonl", base="tiny", tokenizer=tiny_tokenizer)
    teacher = recipe_module.load(target / "teacher.yaml")
    assert teacher.data.eval.holdout.test == 0.1
    train = {row["question"] for _, row in strict_rows(teacher.data.train)}
    held = {row["question"] for _, row in strict_rows(teacher.data.eval)}
    test = [row["question"] for row in task_rows(load_task(target / "tasks" / "qa.yaml"))]
    assert len(held) == len(test) == 3 and len(train) == 26
    assert not set(test) & held and not set(test) & train
    with_file = init("qa.jsonl", base="tiny", tokenizer=tiny_tokenizer, test="qa.jsonl", name="f")
    assert "test:" not in (with_file / "teacher.yaml").read_text().split("eval:")[1][:40]
