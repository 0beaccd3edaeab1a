"""`kind: pipeline`, refused before any stage starts: unknown stage, cycle, an eval run used
as a teacher, data with no assistant turns; each one line, exit 2, nothing written."""

import json
import textwrap

import pytest
from tiny_models import QA

from still import cli

FT = """\
kind: finetune
name: {name}
output_dir: runs
model: {{ref: some/model}}
data:
  train: {{path: {data}, format: {fmt}}}
"""
EVAL = """\
kind: eval
name: compare
models: [some/model]
tasks: [task.yaml]
"""


def setup(tmp_path, monkeypatch, pipeline: str, data="qa.jsonl", fmt="instruction"):
    monkeypatch.chdir(tmp_path)
    rows = [{"prompt": q, "response": a} for q, a in QA]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    chat = [{"messages": [{"role": "user", "content": q}]} for q, _ in QA]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    (tmp_path / "teacher.yaml").write_text(FT.format(name="t", data=data, fmt=fmt))
    (tmp_path / "eval.yaml").write_text(EVAL)
    path = tmp_path / "pipeline.yaml"
    path.write_text("kind: pipeline\nname: p\nstages:\n" + textwrap.dedent(pipeline))
    return path


def refused(path, capsys) -> str:
    assert cli.main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (path.parent / "runs").exists()
    return err


def test_unknown_stage_is_refused_with_did_you_mean(tmp_path, monkeypatch, capsys):
    path = setup(
        tmp_path,
        monkeypatch,
        """\
        - {name: teacher, recipe: teacher.yaml}
        - name: student
          recipe: teacher.yaml
          overrides: {model.ref: "${stages.teachr.run_dir}", name: s}
        """,
    )
    err = refused(path, capsys)
    assert "pipeline.yaml:7: stage 'student' refers to unknown stage 'teachr'" in err
    assert "did you mean 'teacher'?" in err


def test_a_cycle_is_refused_naming_it(tmp_path, monkeypatch, capsys):
    path = setup(
        tmp_path,
        monkeypatch,
        """\
        - name: a
          recipe: teacher.yaml
          overrides: {model.ref: "${stages.b.run_dir}"}
        - name: b
          recipe: teacher.yaml
          overrides: {model.ref: "${stages.a.run_dir}", name: t2}
        """,
    )
    assert "in a cycle: a -> b -> a" in refused(path, capsys)


def test_an_eval_run_used_as_a_teacher_is_refused(tmp_path, monkeypatch, capsys):
    path = setup(
        tmp_path,
        monkeypatch,
        """\
        - {name: compare, recipe: eval.yaml}
        - name: student
          inline:
            kind: distill
            name: s
            teacher: {ref: "${stages.compare.run_dir}"}
            student: {init: {keep_layers: [0]}}
            data: {train: {path: qa.jsonl, format: instruction}}
        """,
    )
    err = refused(path, capsys)
    assert "pipeline.yaml:9: stage 'student' uses stage 'compare' as teacher.ref" in err
    assert "but 'compare' is an eval run: it has no model" in err


def test_data_with_no_assistant_turns_is_refused_before_any_stage(tmp_path, monkeypatch, capsys):
    path = setup(
        tmp_path,
        monkeypatch,
        """\
        - {name: teacher, recipe: teacher.yaml}
        """,
        data="chat.jsonl",
        fmt="chat",
    )
    err = refused(path, capsys)
    assert "stage 'teacher': " in err and "chat.jsonl:1: the conversation has no assistant" in err


def test_unknown_from_stage_and_flags_for_one_recipe(tmp_path, monkeypatch, capsys):
    path = setup(tmp_path, monkeypatch, "- {name: teacher, recipe: teacher.yaml}\n")
    assert cli.main(["run", str(path), "--from", "teachr"]) == 2
    assert "--from teachr: no such stage (did you mean 'teacher'?)" in capsys.readouterr().err
    assert cli.main(["run", str(tmp_path / "teacher.yaml"), "--only", "x"]) == 2
    assert "--only picks stages of a pipeline" in capsys.readouterr().err
    assert cli.main(["validate", str(path)]) == 0
    assert "kind: pipeline" in capsys.readouterr().out


@pytest.mark.parametrize("twice", ["teacher"])
def test_stage_names_are_unique(tmp_path, monkeypatch, capsys, twice):
    path = setup(
        tmp_path,
        monkeypatch,
        f"""\
        - {{name: {twice}, recipe: teacher.yaml}}
        - {{name: {twice}, recipe: teacher.yaml}}
        """,
    )
    assert f"stage name '{twice}' is used twice" in refused(path, capsys)


def test_a_run_dir_of_another_recipe_is_not_replaced(tmp_path, monkeypatch, capsys):
    path = setup(tmp_path, monkeypatch, "- {name: teacher, recipe: teacher.yaml}\n")
    other = tmp_path / "runs" / "t"
    other.mkdir(parents=True)
    (other / "recipe.resolved.yaml").write_text("# Resolved from /elsewhere/other.yaml\n")
    assert cli.main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "stage 'teacher': run dir runs/t exists and holds a run of another recipe" in err
    assert "add --force" in err and (other / "recipe.resolved.yaml").exists()


def test_a_stage_that_stops_before_saving_ends_the_pipeline(tmp_path, monkeypatch, capsys):
    from still import pipeline as pipelines
    from still import pipeline_run
    from still import recipe as recipe_module
    from still.errors import StillError

    path = setup(
        tmp_path,
        monkeypatch,
        """\
        - {name: teacher, recipe: teacher.yaml}
        - name: student
          recipe: teacher.yaml
          overrides: {model.ref: "${stages.teacher.run_dir}", name: s}
        """,
    )
    pipeline = recipe_module.load(path)
    stages = pipelines.plan(pipeline)
    ran = []

    def stopped(stage):  # as a SIGTERM'd run: a run dir with a checkpoint, no model
        ran.append(stage.recipe.name)
        (stage.path / "checkpoints").mkdir(parents=True)

    with pytest.raises(StillError, match="stage 'teacher' stopped before it saved its model"):
        pipeline_run.run(pipeline, stages, stopped)
    assert ran == ["t"] and stages[0].run.read_stage() is None


def test_a_publish_stage_replaces_its_dir_and_uploads_over_only_its_own_hub_repo(
    tmp_path, monkeypatch
):
    import publish.flow
    from still.pipeline import Stage
    from still.pipeline_sections import PublishStage

    calls = []
    monkeypatch.setattr(publish.flow, "publish", lambda run, out, **options: calls.append(options))
    out = tmp_path / "published"
    options = PublishStage(run="runs/s", out=str(out), gguf=["q8_0"], hub="me/s", eval=False)
    stage = Stage("publish", "publish", options, out, "pipeline.yaml:9")
    cli._run_stage(stage)  # the first upload: an existing hub repo is refused, not replaced
    assert calls[-1]["replace_out"] and not calls[-1]["force"]
    assert calls[-1]["gguf_types"] == ["q8_0"] and calls[-1]["evaluate"] is False
    out.mkdir()
    stage.run.write_stage({"run_id": "earlier"})  # this stage published (and uploaded) before
    cli._run_stage(stage)
    assert calls[-1]["force"]
    (out / "pipeline-stage.json").unlink()
    cli._run_stage(stage, force=True)  # still run pipeline.yaml --force
    assert calls[-1]["force"]
