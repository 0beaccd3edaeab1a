"""`kind: pipeline` on the tiny models: stages run in order with run dirs passed by name, a
complete unchanged stage is skipped, a changed stage re-runs everything downstream of it, and
--from / --only pick stages."""

import re
import textwrap

from still import cli

PIPELINE = """\
# Run: still run pipeline.yaml
kind: pipeline
name: tiny
stages:
  - {name: teacher, recipe: tiny-ft.yaml}
  - name: student
    recipe: tiny-kd.yaml
    overrides: {teacher.ref: "${stages.teacher.run_dir}", train.max_steps: 2}
  - name: compare
    inline:
      kind: eval
      name: tiny-compare
      output_dir: runs
      models: ["${stages.teacher.run_dir}", "${stages.student.run_dir}"]
      tasks: [ppl.yaml]
      teacher: "${stages.teacher.run_dir}"
      limit: 2
"""
TASK = """\
name: ppl
type: perplexity
data: {path: val.jsonl}
prompt: "{{ question }}"
target: "{{ answer }}"
chat_template: true
"""


def actions(out: str) -> dict[str, str]:
    """{stage: 'skipped' | 'running'} from the progress lines."""
    return dict(re.findall(r"\] (\S+): (skipped|running)", out))


def test_pipeline_skips_reruns_downstream_and_picks_stages(
    tmp_path, monkeypatch, capsys, finetune_recipe, distill_recipe, tiny_model_dir
):
    monkeypatch.chdir(tmp_path)
    finetune_recipe(name="tiny-ft")  # the 2-layer tiny model; tiny-kd carves a 1-layer student
    distill_recipe(name="tiny-kd", student="init: {keep_layers: [0]}")
    text = (tmp_path / "tiny-ft.yaml").read_text().replace("max_steps: 6", "max_steps: 2")
    (tmp_path / "tiny-ft.yaml").write_text(text)
    (tmp_path / "ppl.yaml").write_text(TASK)
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(textwrap.dedent(PIPELINE))

    assert cli.main(["run", str(pipeline)]) == 0
    out = capsys.readouterr().out
    assert actions(out) == {"teacher": "running", "student": "running", "compare": "running"}
    assert re.search(r"\[1/3\] teacher: done in \d+\.\d s", out)
    assert "pipeline summary (3 of 3 stages)" in out and "compare.md):" in out
    # the student distilled from the teacher stage's run dir
    assert (
        (tmp_path / "runs" / "tiny-kd" / "recipe.resolved.yaml")
        .read_text()
        .count(str(tmp_path / "runs" / "tiny-ft"))
    )

    assert cli.main(["run", str(pipeline)]) == 0
    assert set(actions(capsys.readouterr().out).values()) == {"skipped"}

    assert cli.main(["run", str(pipeline), "--only", "student"]) == 0
    assert actions(capsys.readouterr().out) == {"student": "running"}
    assert cli.main(["run", str(pipeline)]) == 0  # the student is new: its consumer re-runs
    assert actions(capsys.readouterr().out) == {
        "teacher": "skipped",
        "student": "skipped",
        "compare": "running",
    }

    # changing the teacher re-runs everything downstream of it
    text = (tmp_path / "tiny-ft.yaml").read_text().replace("lr: 5.0e-3", "lr: 4.0e-3")
    (tmp_path / "tiny-ft.yaml").write_text(text)
    assert cli.main(["run", str(pipeline)]) == 0
    assert set(actions(capsys.readouterr().out).values()) == {"running"}

    assert cli.main(["run", str(pipeline), "--from", "student"]) == 0
    assert actions(capsys.readouterr().out) == {"student": "running", "compare": "running"}


EVERY_KIND = """\
# Run: still run every.yaml
kind: pipeline
name: every
stages:
  - {name: teacher, recipe: tiny-ft.yaml}
  - {name: cache, cache: student}
  - name: student
    recipe: tiny-kd.yaml
    overrides:
      teacher.ref: "${stages.teacher.run_dir}"
      distill.teacher_cache: runs/student-cache
      distill.cache_top_k: 8
      train.max_steps: 2
      eval_tasks: [ppl.yaml]
  - name: compare
    inline:
      kind: eval
      name: every-compare
      output_dir: runs
      models: ["${stages.teacher.run_dir}", "${stages.student.run_dir}"]
      tasks: [ppl.yaml]
      teacher: "${stages.teacher.run_dir}"
      limit: 2
  - name: publish
    publish: {run: "${stages.student.run_dir}", out: published/student, gguf: [q8_0], eval: false}
  - name: cascade
    cascade:
      kind: eval
      name: every-cascade
      output_dir: runs
      models: ["${stages.student.run_dir}", "${stages.teacher.run_dir}"]
      tasks: [qa.yaml]
      cascade:
        student: "${stages.student.run_dir}"
        teacher: "${stages.teacher.run_dir}"
        max_deferral: 0.5
"""
QA_TASK = """\
name: qa
type: generate
data: {path: train.jsonl}
prompt: "{{ question }}"
target: "{{ answer }}"
chat_template: true
generation: {max_new_tokens: 4}
metrics: [token_f1]
"""


def test_cache_publish_and_cascade_stages_run_skip_and_rerun_downstream(
    tmp_path, monkeypatch, capsys, finetune_recipe, distill_recipe
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("STILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    finetune_recipe(name="tiny-ft")
    distill_recipe(name="tiny-kd", student="init: {keep_layers: [0]}")
    text = (tmp_path / "tiny-ft.yaml").read_text().replace("max_steps: 6", "max_steps: 2")
    (tmp_path / "tiny-ft.yaml").write_text(text)
    (tmp_path / "ppl.yaml").write_text(TASK)
    (tmp_path / "qa.yaml").write_text(QA_TASK)
    pipeline = tmp_path / "every.yaml"
    pipeline.write_text(EVERY_KIND)

    assert cli.main(["run", str(pipeline)]) == 0
    out = capsys.readouterr().out
    names = ["teacher", "cache", "student", "compare", "publish", "cascade"]
    assert list(actions(out)) == names and set(actions(out).values()) == {"running"}
    assert (tmp_path / "runs" / "student-cache" / "manifest.json").is_file()
    kd = (tmp_path / "runs" / "tiny-kd" / "recipe.resolved.yaml").read_text()
    assert "student-cache" in kd  # the student distilled from the cache stage's cache
    published = tmp_path / "published" / "student"
    assert (published / "student-q8_0.gguf").is_file() and (published / "README.md").is_file()
    assert (tmp_path / "runs" / "every-cascade" / "cascade" / "cascade.json").is_file()
    # the summary gathers the comparison (with % of the teacher), the published paths and
    # the cascade report
    summary = out[out.index("pipeline summary") :]
    assert "comparison, stage compare" in summary and "% of tiny-ft" in summary
    assert "published/student (model card published/student/README.md)" in summary
    assert "student-q8_0.gguf" in summary and "cascade, stage cascade" in summary
    assert "teacher cache, stage cache: runs/student-cache" in summary
    assert "retention of stage student against its teacher" in summary
    assert "published, stage teacher" not in summary

    assert cli.main(["run", str(pipeline)]) == 0
    assert set(actions(capsys.readouterr().out).values()) == {"skipped"}

    # a longer-trained student reuses the cache: only it and what uses it run again
    text = (tmp_path / "tiny-kd.yaml").read_text().replace("lr: 1.0e-2", "lr: 2.0e-2")
    (tmp_path / "tiny-kd.yaml").write_text(text)
    assert cli.main(["run", str(pipeline)]) == 0
    assert actions(capsys.readouterr().out) == {
        "teacher": "skipped",
        "cache": "skipped",
        "student": "running",
        "compare": "running",
        "publish": "running",
        "cascade": "running",
    }

    # a rebuilt cache re-runs the student and everything after it, not the teacher
    assert cli.main(["run", str(pipeline), "--only", "cache"]) == 0
    assert actions(capsys.readouterr().out) == {"cache": "running"}
    assert cli.main(["run", str(pipeline)]) == 0
    ran = actions(capsys.readouterr().out)
    assert ran.pop("teacher") == "skipped" and ran.pop("cache") == "skipped"
    assert set(ran.values()) == {"running"}

    # changing the teacher re-runs every stage, the cache included
    text = (tmp_path / "tiny-ft.yaml").read_text().replace("lr: 5.0e-3", "lr: 4.0e-3")
    (tmp_path / "tiny-ft.yaml").write_text(text)
    assert cli.main(["run", str(pipeline)]) == 0
    assert set(actions(capsys.readouterr().out).values()) == {"running"}
