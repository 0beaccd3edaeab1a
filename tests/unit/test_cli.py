"""The CLI as a user meets it: exit codes, one-line errors, no tracebacks."""

import json
import subprocess
import sys
import textwrap


def still(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "still.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


RECIPE = textwrap.dedent(
    """\
    # Run: still run r.yaml
    kind: finetune
    name: t
    model: {ref: some/model}
    data:
      train: {path: train.jsonl}
    train:
      lerning_rate: 1.0e-4
    """
)


def test_validate_misspelled_key_is_one_line_exit_2(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE)
    result = still("validate", str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"still: error: {path.resolve()}:8: "
        "unknown key 'lerning_rate' in train (did you mean 'lr'?)"
    ]
    assert "Traceback" not in result.stderr


def test_validate_prints_resolved_recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.replace("lerning_rate", "lr"))
    result = still("validate", str(path), "train.max_steps=3")
    assert result.returncode == 0, result.stderr
    assert (
        "max_steps: 3" in result.stdout
        and f"path: {tmp_path.resolve()}/train.jsonl" in result.stdout
    )


def test_schema_is_json():
    result = still("schema")
    assert result.returncode == 0
    assert "oneOf" in json.loads(result.stdout)


def test_cache_needs_a_distill_recipe_with_a_cache_dir(tmp_path, tiny_model_dir):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f'kind: finetune\nname: x\nmodel: {{ref: "{tiny_model_dir}"}}\n'
        "data: {train: {path: t.jsonl, format: completion}}\n"
    )
    result = still("cache", str(recipe))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"still: error: still cache needs a distill recipe; {recipe} is kind: finetune"
    ]


def test_publish_of_a_missing_run_is_one_line(tmp_path):
    result = still("publish", str(tmp_path / "nope"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"still: error: run dir not found: {tmp_path / 'nope'}"
    ]


def test_models_lists_builtins():
    result = still("models")
    assert result.returncode == 0
    assert (
        "builtin:smollm2-135m-instruct" in result.stdout and "builtin:gemma-3-270m" in result.stdout
    )


def test_run_refuses_existing_run_dir(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.replace("lerning_rate", "lr"))
    (tmp_path / "runs" / "t").mkdir(parents=True)
    (tmp_path / "runs" / "t" / "something").write_text("x")
    result = still("run", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "still: error: run dir runs/t already exists "
        "(add --resume to continue it, --force to start over, or change `name`)"
    ]


def test_run_with_unknown_model_leaves_no_run_dir(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.replace("lerning_rate", "lr").replace("some/model", "./no/such/dir"))
    result = still("run", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "still: error: model path not found: ./no/such/dir"
    ]
    assert not (tmp_path / "runs" / "t").exists()
