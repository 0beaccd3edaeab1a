"""Tracking on whole recipes: offline W&B runs read back from their own files, TensorBoard.

Every W&B assertion decodes the `run-<id>.wandb` file the run left (tests/wandb_records.py),
so what is checked is what `wandb sync` would upload.
"""

import json
import textwrap

import pytest
from wandb_records import offline_runs

from still import cli
from still.rundir import RunDir

pytest.importorskip("wandb")

TASK = """\
# Run: still eval --model M --task qa.yaml
name: qa
type: generate
data: {path: train.jsonl}
prompt: "{{ question }}"
target: "{{ answer }}"
chat_template: true
generation: {max_new_tokens: 4}
metrics: [rouge_l, token_f1]
"""
TRACK = "track: {wandb: {project: still-test, tags: [ci]}}\n"


@pytest.fixture
def offline(monkeypatch, tmp_path):
    for key in ("WANDB_API_KEY", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_DIR", "WANDB_RUN_GROUP"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("STILL_CACHE", str(tmp_path / "cache"))
    # artifact staging copies and caches stay in the test's tmp dir, not in ~/.local/share/wandb
    for key in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_ARTIFACT_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(key, str(tmp_path / "wandb-home" / key.lower()))
    yield
    import wandb

    if wandb.run is not None:
        wandb.run.finish()


def test_pipeline_runs_hold_config_metrics_eval_tables_and_model_artifacts(
    finetune_recipe, tmp_path, offline, capsys
):
    (tmp_path / "qa.yaml").write_text(TASK)
    teacher = finetune_recipe(name="tiny-teacher", extra=TRACK + "eval_tasks: [qa.yaml]\n")
    assert cli.main(["run", str(teacher), "train.max_steps=4"]) == 0
    teacher_dir = tmp_path / "runs" / "tiny-teacher"
    assert f"wandb sync {teacher_dir}/wandb/offline-run-" in capsys.readouterr().out

    student = tmp_path / "student.yaml"
    student.write_text(
        textwrap.dedent(f"""\
        # Run: still run student.yaml
        kind: distill
        name: tiny-student
        output_dir: {tmp_path / "runs"}
        teacher: {{ref: "{teacher_dir}"}}
        student: {{init: {{keep_layers: [0]}}}}
        data:
          train: {{path: train.jsonl, format: instruction, prompt: question, response: answer}}
          max_len: 64
        train: {{lr: 1.0e-2, batch_size: 4, max_steps: 3, warmup_ratio: 0.0}}
        """)
        + TRACK
    )
    assert cli.main(["run", str(student)]) == 0
    student_dir = tmp_path / "runs" / "tiny-student"

    compare = tmp_path / "eval.yaml"
    compare.write_text(
        textwrap.dedent(f"""\
        # Run: still run eval.yaml
        kind: eval
        name: tiny-compare
        output_dir: {tmp_path / "runs"}
        models: ["{teacher_dir}", "{student_dir}"]
        tasks: [qa.yaml]
        limit: 4
        batch_size: 4
        """)
        + TRACK
    )
    assert cli.main(["run", str(compare)]) == 0

    (ft,) = offline_runs(teacher_dir)
    (kd,) = offline_runs(student_dir)
    evals = offline_runs(tmp_path / "runs" / "tiny-compare")
    runs = [ft, kd, *evals]
    # one pipeline: a group named after the recipes' directory, a job_type per kind
    assert {run.group for run in runs} == {tmp_path.name}
    assert [run.job_type for run in runs] == ["finetune", "distill", "eval", "eval", "compare"]
    assert [run.name for run in runs] == [
        "tiny-teacher",
        "tiny-student",
        "eval-tiny-teacher",
        "eval-tiny-student",
        "tiny-compare",
    ]
    assert all(
        run.exit_code == 0 and run.started > 0 and run.project == "still-test" and "ci" in run.tags
        for run in runs
    )

    # config: the resolved recipe, the run dir, lineage, plus Trainer's TrainingArguments
    assert (
        ft.config["recipe"]["name"] == "tiny-teacher"
        and ft.config["recipe"]["train"]["max_steps"] == 4
    )
    assert (
        ft.config["run_dir"] == str(teacher_dir.resolve())
        and str(teacher_dir.resolve()) in ft.notes
    )
    assert ft.config["lineage"]["base"] == ft.config["recipe"]["model"]["ref"]
    assert ft.config["learning_rate"] == 5e-3
    saved = ft.directory / "files" / "recipe.resolved.yaml"
    assert saved.read_text() == (teacher_dir / "recipe.resolved.yaml").read_text()
    # training metrics: the same losses as metrics.jsonl, step by step
    local = [row["loss"] for row in RunDir(teacher_dir).metrics() if "loss" in row]
    assert ft.metric("train/loss") == pytest.approx(local) and len(local) == 4
    assert kd.metric("train/kd_loss") and kd.config["lineage"]["teacher"] == str(teacher_dir)

    # the end-of-run eval lands in the training run: per-task summary + per-sample table
    assert 0 <= ft.summary["eval/qa/rouge_l"] <= 1 and ft.summary["eval/qa/n"] == 8
    samples = ft.table("eval/qa/samples")
    assert len(samples["data"]) == 8 and {
        "model",
        "prompt",
        "target",
        "prediction",
        "rouge_l",
    } <= set(samples["columns"])
    local_samples = [
        json.loads(line)
        for line in (teacher_dir / "eval" / "qa.samples.jsonl").read_text().splitlines()
    ]
    predictions = [row[samples["columns"].index("prediction")] for row in samples["data"]]
    assert predictions == [row["prediction"] for row in local_samples]

    # final models as `model` artifacts whose metadata carries lineage: base → teacher → student
    (ft_model,) = [a for a in ft.artifacts if a.type == "model"]
    (kd_model,) = [a for a in kd.artifacts if a.type == "model"]
    assert ft_model.name == "tiny-teacher" and "final" in ft_model.aliases
    ft_meta, kd_meta = json.loads(ft_model.metadata), json.loads(kd_model.metadata)
    assert (
        ft_meta["lineage"]["base"] == ft.config["lineage"]["base"]
        and ft_meta["format"] == "adapter"
    )
    assert kd_meta["lineage"]["teacher"] == str(teacher_dir) and kd_meta["format"] == "model"
    files = {entry.path for entry in ft_model.manifest.contents}
    assert {"adapter_model.safetensors", "adapter_config.json", "lineage.json"} <= files

    # eval runs: one per model, same summary keys as the training run; the comparison run
    assert evals[0].config["model"]["training_run_id"] == ft.run_id
    assert evals[1].config["model"]["lineage"]["teacher"] == str(teacher_dir)
    assert all(
        "eval/qa/token_f1" in run.summary and len(run.table("eval/qa/samples")["data"]) == 4
        for run in evals[:2]
    )
    table = evals[2].table("compare/table")
    assert (
        table["columns"][:5] == ["task", "metric", "model", "mean", "stderr"]
        and len(table["data"]) == 4
    )
    assert {row[2] for row in table["data"]} == {"tiny-teacher", "tiny-student"}
    assert any(key.startswith("compare/plot") for row in evals[2].history for key in row)

    # `still compare --wandb`: the same table in a comparison run of its own
    results = tmp_path / "runs" / "tiny-compare"
    assert (
        cli.main(
            [
                "compare",
                str(results / "tiny-teacher"),
                str(results / "tiny-student"),
                "--out",
                str(tmp_path / "cmp"),
                "--wandb",
                "still-test",
                "--wandb-group",
                tmp_path.name,
            ]
        )
        == 0
    )
    (cli_run,) = offline_runs(tmp_path / "cmp")
    assert (cli_run.job_type, cli_run.group, cli_run.name) == ("compare", tmp_path.name, "cmp")
    assert cli_run.table("compare/table")["data"] == table["data"]


def test_resume_continues_the_same_wandb_run(finetune_recipe, tmp_path, offline):
    import shutil

    recipe = finetune_recipe(extra=TRACK)
    assert cli.main(["run", str(recipe), "train.max_steps=4", "train.save_steps=2"]) == 0
    run_dir = tmp_path / "runs" / "tiny-ft"
    shutil.rmtree(run_dir / "checkpoints" / "checkpoint-4")
    shutil.rmtree(run_dir / "adapter")
    assert (
        cli.main(["run", str(recipe), "train.max_steps=4", "train.save_steps=2", "--resume"]) == 0
    )
    first, second = offline_runs(run_dir)
    assert first.run_id == second.run_id == (run_dir / "wandb_run_id").read_text()
    assert first.name == second.name == "tiny-ft"

    # the second part logs the training steps after the checkpoint it resumed from (2)
    def loss_steps(run):
        return [row["train/global_step"] for row in run.history if "train/loss" in row]

    assert loss_steps(first) == [1, 2, 3, 4] and loss_steps(second) == [3, 4]


def test_a_wandb_failure_warns_and_training_goes_on(
    finetune_recipe, tmp_path, offline, monkeypatch, capsys
):
    import wandb

    def broken_init(*args, **kwargs):
        raise RuntimeError("wandb-core crashed\nwith a long trace")

    working_init = wandb.init
    monkeypatch.setattr(wandb, "init", broken_init)
    assert cli.main(["run", str(finetune_recipe(extra=TRACK)), "train.max_steps=2"]) == 0
    run_dir = tmp_path / "runs" / "tiny-ft"
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    assert len([r for r in RunDir(run_dir).metrics() if "loss" in r]) == 2
    err = capsys.readouterr().err
    assert (
        "still: warning: W&B init failed, continuing without it (RuntimeError: wandb-core crashed)"
        in err
    )
    assert "with a long trace" not in err
    monkeypatch.setattr(wandb, "init", working_init)

    # a failure while logging: one warning, W&B off for the rest of the run, training ends normally
    from wandb.sdk.wandb_run import Run

    monkeypatch.setattr(
        Run, "log", lambda self, *a, **k: (_ for _ in ()).throw(OSError("disk full"))
    )
    assert (
        cli.main(["run", str(finetune_recipe(name="tiny-ft2", extra=TRACK)), "train.max_steps=3"])
        == 0
    )
    err = capsys.readouterr().err
    assert err.count("still: warning: W&B logging (on_log) failed") == 1 and "disk full" in err
    assert (tmp_path / "runs" / "tiny-ft2" / "adapter").is_dir()


def test_secrets_never_reach_the_wandb_files(finetune_recipe, tmp_path, offline, monkeypatch):
    fake = {
        "WANDB_API_KEY": "fakewandbkey0123456789abcdef",
        "HF_TOKEN": "hf_FAKEtoken0123456789SECRET",
    }
    for key, value in fake.items():
        monkeypatch.setenv(key, value)
    recipe = finetune_recipe(
        extra="track: {wandb: {project: still-test, mode: offline, log_model: false}}\n"
    )
    run_dir = tmp_path / "runs" / "tiny-ft"
    # a key-shaped secret pasted into a free-text field is refused before anything is written
    pasted = f"data.system_prompt=Answer briefly. {fake['HF_TOKEN']}"
    assert cli.main(["run", str(recipe), "train.max_steps=2", pasted]) == 2
    assert not run_dir.exists()
    # one that is not key-shaped (the value of a secret variable): the run dir keeps it, W&B
    # must not get it
    prompt = f"data.system_prompt=Answer briefly. {fake['WANDB_API_KEY']}"
    assert cli.main(["run", str(recipe), "train.max_steps=2", "data.max_len=256", prompt]) == 0
    assert fake["WANDB_API_KEY"] in (run_dir / "recipe.resolved.yaml").read_text()
    (run,) = offline_runs(run_dir)  # waits until wandb-core has written the whole run file
    assert run.config["recipe"]["data"]["system_prompt"] == "Answer briefly. <redacted>"
    assert "<redacted>" in (run.directory / "files" / "recipe.resolved.yaml").read_text()
    assert not [a for a in run.artifacts if a.type == "model"]  # log_model: false
    files = [p for p in (run_dir / "wandb").rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files)
    for path in files:
        for value in fake.values():
            assert value.encode() not in path.read_bytes(), f"{value} leaked into {path}"


def test_tensorboard_event_files(finetune_recipe, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert (
        cli.main(
            ["run", str(finetune_recipe(extra="track: {tensorboard: true}\n")), "train.max_steps=3"]
        )
        == 0
    )
    board = tmp_path / "runs" / "tiny-ft" / "tensorboard"
    assert list(board.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(board))
    events.Reload()
    losses = [event.value for event in events.Scalars("train/loss")]
    local = [
        row["loss"] for row in RunDir(tmp_path / "runs" / "tiny-ft").metrics() if "loss" in row
    ]
    assert losses == pytest.approx(local) and len(losses) == 3


def test_a_published_model_is_an_artifact_in_its_source_runs_group(tmp_path, offline):
    from still.tracking import log_published_model

    source = tmp_path / "runs" / "pydocs-student"
    source.mkdir(parents=True)
    (source / "lineage.json").write_text("{}")
    (source / "recipe.resolved.yaml").write_text(
        "# Resolved from /somewhere/recipes/quickstart/student.yaml\n"
        "kind: distill\nname: pydocs-student\n"
        "track:\n  wandb: {project: still-test, tags: [ci], mode: auto, log_model: end}\n"
    )
    out = tmp_path / "published" / "pydocs-student"
    out.mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"\0" * 64)
    lineage = {
        "kind": "published",
        "source_run": str(source),
        "base": "builtin:smollm2-135m-instruct",
    }
    log_published_model(out, lineage, source_run_dir=source)
    assert not (out / "wandb").exists()  # the published dir holds only the model
    (run,) = offline_runs(source)
    assert (run.job_type, run.group, run.name, run.project) == (
        "publish",
        "quickstart",
        "publish-pydocs-student",
        "still-test",
    )
    (artifact,) = [a for a in run.artifacts if a.type == "model"]
    assert artifact.name == "pydocs-student" and "published" in artifact.aliases
    assert json.loads(artifact.metadata)["lineage"]["source_run"] == str(source)
    assert {e.path for e in artifact.manifest.contents} == {"model.safetensors", "lineage.json"}
    # an untracked source run: nothing opened
    (source / "recipe.resolved.yaml").write_text("kind: distill\nname: pydocs-student\n")
    log_published_model(out, lineage, source_run_dir=source)
    assert len(offline_runs(source)) == 1


def test_an_eval_that_fails_is_a_failed_eval_run(tmp_path, offline, capsys):
    (tmp_path / "qa.yaml").write_text(TASK)
    (tmp_path / "train.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(
        textwrap.dedent(f"""\
        # Run: still run eval.yaml
        kind: eval
        name: broken
        output_dir: {tmp_path / "runs"}
        models: ["{tmp_path / "no-such-model"}"]
        tasks: [qa.yaml]
        """)
        + TRACK
    )
    assert cli.main(["run", str(recipe)]) == 2
    assert "still: error:" in capsys.readouterr().err
    (run,) = offline_runs(tmp_path / "runs" / "broken")
    assert (run.job_type, run.exit_code) == ("eval", 1)
