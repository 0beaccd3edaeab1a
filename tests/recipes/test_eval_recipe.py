"""Eval recipes and `still eval`: models × tasks, results in run dirs, cache, compare."""

import json
import textwrap

from still import cli

TASK = """\
# Run: still eval --model M --task {name}.yaml
name: {name}
type: {type}
data: {{path: {data}}}
prompt: "{{{{ question }}}}"
target: "{{{{ answer }}}}"
chat_template: true
{extra}
"""


def write_tasks(tmp_path, qa_files):
    train, _ = qa_files
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    choice = tmp_path / "choice.jsonl"
    choice.write_text(
        "".join(
            json.dumps(
                {
                    "id": str(i),
                    "question": r["question"],
                    "choices": [r["answer"], rows[(i + 1) % len(rows)]["answer"]],
                    "label": 0,
                }
            )
            + "\n"
            for i, r in enumerate(rows)
        )
    )
    qa = tmp_path / "qa.yaml"
    qa.write_text(
        TASK.format(
            name="qa",
            type="generate",
            data=train.name,
            extra="generation: {max_new_tokens: 6}\nmetrics: [rouge_l, token_f1]",
        )
    )
    mc = tmp_path / "mc.yaml"
    mc.write_text(
        TASK.format(
            name="mc",
            type="multiple_choice",
            data=choice.name,
            extra="choices: choices\nlabel: label",
        )
    )
    return qa, mc


def test_eval_recipe_scores_models_and_compares(
    tmp_path, qa_files, finetune_recipe, tiny_model_dir, monkeypatch, capsys
):
    monkeypatch.setenv("STILL_CACHE", str(tmp_path / "cache"))
    qa, mc = write_tasks(tmp_path, qa_files)
    ft = finetune_recipe()
    assert cli.main(["run", str(ft), "train.max_steps=4", f"eval_tasks=[{qa}]"]) == 0
    run_dir = tmp_path / "runs" / "tiny-ft"
    assert json.loads((run_dir / "eval" / "qa.json").read_text())["n"] == 8  # end-of-run eval

    recipe = tmp_path / "eval.yaml"
    recipe.write_text(
        textwrap.dedent(f"""\
        # Run: still run eval.yaml
        kind: eval
        name: cmp
        output_dir: {tmp_path / "runs"}
        models: ["{tiny_model_dir}", "{run_dir}"]
        tasks: [qa.yaml, mc.yaml]
        reference: "{tiny_model_dir}"
        batch_size: 4
        """)
    )
    assert cli.main(["run", str(recipe)]) == 0
    out = tmp_path / "runs" / "cmp"
    assert (out / "compare.md").exists() and (out / "compare.png").stat().st_size > 1000
    table = (out / "compare.md").read_text()
    assert "tiny-ft" in table and "acc" in table and "rouge_l" in table and "paired" in table
    capsys.readouterr()
    # second time: every result comes from the cache
    assert cli.main(["eval", str(recipe)]) == 0
    assert capsys.readouterr().out.count("(cached)") == 4


def test_eval_cli_model_and_task(tmp_path, qa_files, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setenv("STILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    qa, mc = write_tasks(tmp_path, qa_files)
    assert (
        cli.main(["eval", "--model", str(tiny_model_dir), "--task", str(mc), "--limit", "3"]) == 0
    )
    summary = json.loads((tmp_path / "runs" / "eval" / tiny_model_dir.name / "mc.json").read_text())
    assert summary["n"] == 3 and set(summary["metrics"]) == {"acc", "acc_norm"}
    assert cli.main(["eval", "--model", str(tiny_model_dir)]) == 2
    assert "needs an eval recipe, or at least one --model and one --task" in capsys.readouterr().err


def test_a_distill_run_ends_with_its_retention_table(
    tmp_path, qa_files, distill_recipe, monkeypatch, capsys
):
    """The student is scored, then its teacher on the same tasks (once: cached by content),
    and the table says how much of the teacher the student keeps, with paired CIs."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("STILL_CACHE", str(tmp_path / "cache"))
    qa, mc = write_tasks(tmp_path, qa_files)
    recipe = distill_recipe()
    tasks = f"eval_tasks=[{qa}, {mc}]"
    assert cli.main(["run", str(recipe), "train.max_steps=2", tasks]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "runs" / "tiny-kd"
    assert json.loads((run / "eval" / "mc.json").read_text())["model_name"] == "tiny-kd"
    teacher = json.loads((run / "retention" / "teacher" / "mc.json").read_text())
    assert teacher["model_name"] == "teacher" and teacher["n"] == 8
    table = (run / "retention" / "compare.md").read_text()
    assert "% of teacher" in table and "Δ vs teacher [95% paired CI]" in table
    assert "| mc | acc" in table and "| qa | rouge_l" in table
    assert "still: retention of tiny-kd against its teacher" in out
    # a second student of the same teacher scores the teacher from the cache
    assert cli.main(["run", str(recipe), "name=tiny-kd-2", "train.max_steps=2", tasks]) == 0
    assert "still: teacher on mc (cached)" in capsys.readouterr().out
