"""Held-out splits (`data.eval: {split, seed, group_by}`): deterministic, group-disjoint, the same
rows for the eval loss, the lineage and any task that names the same split."""

import json
import textwrap

import pytest

from still import recipe as recipe_module
from still.errors import StillError
from still.rows import strict_rows
from still.rundir import _data_files
from still.sections import DataSection


def rows_file(tmp_path, count=60, modules=12):
    path = tmp_path / "train.jsonl"
    rows = [
        {"question": f"q{index}", "answer": f"a{index}", "module": f"m{index % modules}"}
        for index in range(count)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def sides(data: DataSection):
    train = [row["question"] for _, row in strict_rows(data.train)]
    held = [row["question"] for _, row in strict_rows(data.eval)]
    return train, held


def section(path, **eval_spec):
    train = {"path": str(path), "format": "instruction", "prompt": "question", "response": "answer"}
    return DataSection(train=train, eval=eval_spec)


def test_share_split_is_deterministic_disjoint_and_complete(tmp_path):
    path = rows_file(tmp_path)
    train, held = sides(section(path, split=0.1, seed=0))
    assert len(held) == 6 and len(train) == 54
    assert not set(train) & set(held) and len(set(train) | set(held)) == 60
    assert sides(section(path, split=0.1, seed=0)) == (train, held)  # same seed, same rows
    assert sides(section(path, split=0.1, seed=1))[1] != held  # the seed matters
    # eval inherits train's fields, and reads train's file
    data = section(path, split=0.1)
    assert data.eval.path == str(path) and data.eval.response == "answer"
    assert data.train.holdout.side == "rest" and data.eval.holdout.side == "held_out"


def test_count_split_and_limits_apply_after_the_split(tmp_path):
    path = rows_file(tmp_path)
    train, held = sides(section(path, split=7, seed=3))
    assert len(held) == 7 and len(train) == 53
    # a train limit does not move the held-out rows: the split is drawn over the whole file
    limited = DataSection(
        train={
            "path": str(path),
            "format": "instruction",
            "prompt": "question",
            "response": "answer",
            "limit": 10,
        },
        eval={"split": 7, "seed": 3, "limit": 4},
    )
    small_train, small_held = sides(limited)
    assert small_held == held[:4] and small_train == train[:10]


def test_group_by_keeps_every_group_on_one_side(tmp_path):
    path = rows_file(tmp_path, count=60, modules=12)
    data = section(path, split=0.25, seed=5, group_by="module")
    train_modules = {row["module"] for _, row in strict_rows(data.train)}
    held_modules = {row["module"] for _, row in strict_rows(data.eval)}
    assert held_modules and not train_modules & held_modules
    assert len(train_modules | held_modules) == 12
    assert len(held_modules) == 3  # 5 rows a module: whole groups until 15 rows are held out


def test_missing_group_field_and_too_large_a_split_are_one_line_errors(tmp_path):
    path = rows_file(tmp_path, count=10, modules=2)
    with pytest.raises(StillError, match=r"train.jsonl:1: no field 'topic' to group"):
        strict_rows(section(path, split=0.2, group_by="topic").eval)
    with pytest.raises(StillError, match="leaves nothing to train on"):
        strict_rows(section(path, split=10).eval)


RECIPE = """\
kind: finetune
name: t
model: {ref: some/model}
data:
  train: {path: train.jsonl, format: instruction, prompt: question, response: answer}
  eval: EVAL
"""


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("{split: 1.5}", r"r.yaml:6: data.eval.holdout.split: .*share must be between 0 and 1"),
        ("{split: 0.1, sed: 1}", r"r.yaml:6: unknown key 'sed' in data.eval"),
        ("{split: 0}", r"r.yaml:6: data.eval.holdout.split: .*at least 1"),
    ],
)
def test_bad_split_settings_are_refused_at_their_line(tmp_path, spec, message):
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent(RECIPE).replace("EVAL", spec))
    with pytest.raises(StillError, match=message):
        recipe_module.load(path)


def test_lineage_records_the_split_and_a_task_reads_the_same_rows(tmp_path):
    rows_file(tmp_path)
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.replace("EVAL", "{split: 0.1, seed: 2, group_by: module}"))
    recipe = recipe_module.load(path)
    files = _data_files(recipe)
    assert files[0]["holdout"]["side"] == "rest" and files[1]["holdout"]["side"] == "held_out"
    assert files[1]["holdout"]["group_by"] == "module" and files[0]["sha256"] == files[1]["sha256"]
    # the resolved recipe loads back to the same split
    (tmp_path / "again.yaml").write_text(recipe_module.to_yaml(recipe))
    again = recipe_module.load(tmp_path / "again.yaml")
    assert sides(again.data) == sides(recipe.data)

    from eval.tasks import load_task, task_rows

    task = tmp_path / "qa.yaml"
    task.write_text(
        "name: qa\ntype: generate\nprompt: '{{ question }}'\ntarget: '{{ answer }}'\n"
        "data: {path: train.jsonl, holdout: {split: 0.1, seed: 2, group_by: module}}\n"
    )
    held = [row["question"] for row in task_rows(load_task(task))]
    assert held == sides(recipe.data)[1]


def test_a_test_side_is_distinct_deterministic_and_leaves_eval_as_it_was(tmp_path):
    from eval.tasks import load_task, task_rows

    path = rows_file(tmp_path)
    train0, held0 = sides(section(path, split=0.1, seed=4))
    data = section(path, split=0.1, test=0.1, seed=4)
    train, held = sides(data)
    assert held == held0  # adding a test side does not move the eval rows
    assert data.train.holdout.test == 0.1 and len(train) == 48
    # a task reads the test side: distinct from eval and train, together the whole file
    task = tmp_path / "qa.yaml"
    task.write_text(
        "name: qa\ntype: generate\nprompt: '{{ question }}'\ntarget: '{{ answer }}'\n"
        "data: {path: train.jsonl, holdout: {split: 0.1, test: 0.1, seed: 4, side: test}}\n"
    )
    test = [row["question"] for row in task_rows(load_task(task))]
    assert len(test) == 6 and test == [row["question"] for row in task_rows(load_task(task))]
    assert not set(test) & set(held) and not set(test) & set(train)
    assert len(set(train) | set(held) | set(test)) == 60
    assert set(test) <= set(train0)  # without a test side these rows were trained on


def test_a_grouped_test_side_shares_no_group_and_is_recorded_in_lineage(tmp_path):
    rows_file(tmp_path, count=60, modules=12)
    path = tmp_path / "r.yaml"
    spec = "{split: 0.2, test: 0.2, seed: 1, group_by: module}"
    path.write_text(RECIPE.replace("EVAL", spec))
    recipe = recipe_module.load(path)
    data = recipe.data
    test_source = data.eval.model_copy(
        update={"holdout": data.eval.holdout.model_copy(update={"side": "test"})}
    )
    modules = [
        {row["module"] for _, row in strict_rows(source)}
        for source in (data.train, data.eval, test_source)
    ]
    assert all(modules) and len(set.union(*modules)) == 12
    assert not modules[0] & modules[1] and not modules[0] & modules[2]
    assert not modules[1] & modules[2]
    files = _data_files(recipe)
    assert files[0]["holdout"]["test"] == 0.2 and files[0]["holdout"]["side"] == "rest"


def test_a_test_side_needs_its_size_and_room(tmp_path):
    path = rows_file(tmp_path, count=10, modules=2)
    with pytest.raises(StillError, match="leaves nothing to train on"):
        strict_rows(section(path, split=0.2, test=0.2, group_by="module").eval)
    with pytest.raises(StillError, match="leaves nothing to train on"):
        strict_rows(section(path, split=5, test=5).eval)
    from pydantic import ValidationError

    from still.sections import Holdout

    with pytest.raises(ValidationError, match="side 'test' reads the test rows"):
        Holdout(split=0.1, side="test")
