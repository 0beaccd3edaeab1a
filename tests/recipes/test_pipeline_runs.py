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
    assert "pipeline summary (3 of 3 stages)" in out and "compare.md:" in out
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
