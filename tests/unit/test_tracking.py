"""still.tracking without training: modes, redaction, tracker selection, tables, lineage."""

import json

import pytest

from still import tracking, wandb_logs
from still.errors import StillError
from still.recipe import FinetuneRecipe
from still.rundir import RunDir
from still.sections import TrackSection, WandbSection


def recipe_with(track: dict, tmp_path) -> FinetuneRecipe:
    return FinetuneRecipe(
        kind="finetune",
        name="unit",
        output_dir=str(tmp_path),
        model={"ref": "m"},
        data={"train": {"path": "t.jsonl"}},
        track=track,
    )


def test_redact_hides_secret_keys_and_secret_values(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefSECRET")
    config = {
        "model": {"ref": "org/m", "hub_token": "hf_x", "api_key": "k", "revision": None},
        "notes": ["pushed with hf_abcdefSECRET", 3],
        "password": "",
    }
    assert tracking.redact(config) == {
        "model": {
            "ref": "org/m",
            "hub_token": "<redacted>",
            "api_key": "<redacted>",
            "revision": None,
        },
        "notes": ["pushed with <redacted>", 3],
        "password": "",  # nothing to hide
    }


def test_mode_env_wins_then_recipe_then_key_and_route(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.wandb_mode("online") == "disabled"
    monkeypatch.delenv("WANDB_MODE")
    assert tracking.wandb_mode("offline") == "offline"
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert tracking.wandb_mode("auto") == "offline"
    # a key but no route to the server: offline, and a line that says why
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    assert tracking.wandb_mode("auto") == "offline"
    assert "W&B is not reachable" in capsys.readouterr().out


def test_trackers_from_the_track_section(tmp_path):
    plain = tracking.start_tracking(
        recipe_with({}, tmp_path), RunDir(tmp_path), job_type="finetune"
    )
    assert plain.report_to == [] and [type(c).__name__ for c in plain.callbacks] == ["MetricsJsonl"]
    other = tracking.start_tracking(
        recipe_with({"report_to": ["mlflow"]}, tmp_path), RunDir(tmp_path), job_type="finetune"
    )
    assert other.report_to == ["mlflow"]
    with pytest.raises(StillError, match="unknown tracker 'mlfow'"):
        tracking.start_tracking(
            recipe_with({"report_to": ["mlfow"]}, tmp_path), RunDir(tmp_path), job_type="finetune"
        )
    with pytest.raises(ValueError, match="set 'wandb' with track.wandb"):
        TrackSection(report_to=["wandb"])


def test_tensorboard_writes_into_the_run_dir(tmp_path):
    pytest.importorskip("tensorboard")
    board = tracking.start_tracking(
        recipe_with({"tensorboard": True}, tmp_path), RunDir(tmp_path), job_type="finetune"
    )
    (callback,) = [c for c in board.callbacks if type(c).__name__ == "TensorBoardCallback"]
    assert callback.logging_dir == str(tmp_path / "tensorboard")


def test_wandb_disabled_adds_no_callback(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    result = tracking.start_tracking(
        recipe_with({"wandb": {"project": "p"}}, tmp_path), RunDir(tmp_path), job_type="finetune"
    )
    assert len(result.callbacks) == 1
    assert not (tmp_path / "wandb").exists()


def test_stable_run_id_is_made_once(tmp_path):
    first = tracking.stable_run_id(RunDir(tmp_path))
    assert first and tracking.stable_run_id(RunDir(tmp_path)) == first and len(first) == 12


def test_lineage_parents_are_the_still_run_dirs(tmp_path):
    teacher = tmp_path / "runs" / "pydocs-teacher"
    teacher.mkdir(parents=True)
    (teacher / "lineage.json").write_text("{}")
    lineage = {
        "base": "builtin:smollm2-135m-instruct",
        "teacher": str(teacher),
        "student": None,
        "data": [{"path": str(teacher)}],
    }
    assert tracking.lineage_parents(lineage) == ["pydocs-teacher:latest"]
    assert tracking.artifact_name("org/model name") == "org-model-name"


def test_samples_table_has_a_row_per_question_and_a_column_per_metric(tmp_path):
    pytest.importorskip("wandb")
    rows = [
        {
            "idx": 0,
            "id": "a",
            "prompt": "p0",
            "target": "t0",
            "prediction": "x",
            "metrics": {"rouge_l": 0.5},
        },
        {
            "idx": 1,
            "id": "b",
            "prompt": "p1",
            "target": "t1",
            "prediction": "y",
            "choices": [1, 2],
            "metrics": {"rouge_l": 1.0, "exact_match": 1.0},
        },
    ]
    path = tmp_path / "qa.samples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = wandb_logs.samples_table(path, model_name="m")
    assert table.columns == [
        "model",
        "idx",
        "id",
        "prompt",
        "target",
        "prediction",
        "choices",
        "rouge_l",
        "exact_match",
    ]
    assert table.data[0] == ["m", 0, "a", "p0", "t0", "x", None, 0.5, None]
    assert table.data[1][6] == "[1, 2]"


def test_logging_without_an_active_run_is_a_no_op(tmp_path):
    wandb = pytest.importorskip("wandb")
    assert wandb.run is None
    wandb_logs.log_eval_task({"task": "qa", "metrics": {}}, tmp_path / "missing.jsonl")
    wandb_logs.log_comparison(tmp_path)
    tracking.finish_training_run(RunDir(tmp_path), {"loss": 1.0})
    assert tracking.log_model_artifact(tmp_path, name="m", lineage={}) is None


def test_link_refuses_untracked_dirs_and_offline_mode(tmp_path, capsys, monkeypatch):
    from still import cli

    assert cli.main(["link", str(tmp_path)]) == 2
    assert "not a W&B-tracked still run dir" in capsys.readouterr().err
    assert cli.main(["link"]) == 2  # RUN_DIR is required: one line, no SystemExit
    assert "the following arguments are required: RUN_DIR" in capsys.readouterr().err
    (tmp_path / "wandb_run_id").write_text("abc")
    (tmp_path / "lineage.json").write_text("{}")
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert cli.main(["link", str(tmp_path)]) == 2
    assert "linking lineage needs W&B online" in capsys.readouterr().err


def test_log_model_choice_reaches_trainers_callback():
    pytest.importorskip("wandb")
    from transformers.integrations.integration_utils import WandbLogModel

    # "end" is still's own artifact (with lineage), so Trainer's callback logs no final model
    assert tracking.ResilientWandbCallback("end")._log_model == WandbLogModel.FALSE
    assert tracking.ResilientWandbCallback("checkpoint")._log_model == WandbLogModel.CHECKPOINT
    # YAML `log_model: false` is a boolean
    assert WandbSection(log_model=False).log_model == "false"


class FakeRun:
    """Stands in for an online wandb Run: records use_artifact calls, refuses one name."""

    offline = False

    def __init__(self):
        self.used = []

    def use_artifact(self, name):
        if name.startswith("missing"):
            raise ValueError(f"artifact {name} not found")
        self.used.append(name)


def test_online_runs_mark_parent_models_as_inputs(tmp_path, capsys):
    for name in ("pydocs-teacher", "missing-run"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "lineage.json").write_text("{}")
    run = FakeRun()
    parents = tracking.lineage_parents(
        {"teacher": str(tmp_path / "pydocs-teacher"), "base": str(tmp_path / "missing-run")}
    )
    tracking.use_artifacts(run, parents)
    assert run.used == ["pydocs-teacher:latest"]
    assert "W&B use_artifact missing-run:latest failed" in capsys.readouterr().err
    run.offline = True
    tracking.use_artifacts(run, ["pydocs-teacher:latest"])
    assert run.used == ["pydocs-teacher:latest"]  # offline runs cannot use artifacts
