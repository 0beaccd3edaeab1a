"""CLI messages that point somewhere: broken overrides, a missing recipe, `--flags` that are
recipe keys, non-ASCII names as themselves, and no library noise before (or instead of) them."""

import os
import subprocess
import sys
import textwrap

import pytest

from still import cli

RECIPE = textwrap.dedent(
    """\
    # Run: still run r.yaml
    kind: finetune
    name: t
    model: {ref: some/model}
    data:
      train: {path: train.jsonl}
    """
)


def _error(capsys, argv, cwd, monkeypatch) -> str:
    monkeypatch.chdir(cwd)
    assert cli.main(argv) == 2
    out = capsys.readouterr()
    lines = out.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("still: error: "), out.err
    assert out.out == ""
    return lines[0].removeprefix("still: error: ")


@pytest.fixture
def recipe_dir(tmp_path):
    (tmp_path / "r.yaml").write_text(RECIPE)
    return tmp_path


# --------------------------------------------------------------------------- overrides
@pytest.mark.parametrize(
    "override, expected",
    [
        (
            "train.lr=[1e-4",
            "bad override 'train.lr=[1e-4': the value is not valid YAML: the list opened with [ "
            "is not closed (e.g. train.lr=[1e-4]; quote the whole override for the shell)",
        ),
        (
            "eval_tasks=[a.yaml, b.yaml",
            "bad override 'eval_tasks=[a.yaml, b.yaml': the value is not valid YAML: the list "
            "opened with [ is not closed (e.g. eval_tasks=[a.yaml, b.yaml]; quote the whole "
            "override for the shell)",
        ),
        (
            "lora={r: 8",
            "bad override 'lora={r: 8': the value is not valid YAML: the mapping opened with { "
            "is not closed (e.g. lora={r: 8}; quote the whole override for the shell)",
        ),
        (
            "name='abc",
            "bad override 'name='abc': the value is not valid YAML: the quoted string opened "
            "with ' is not closed (e.g. name='abc'; quote the whole override for the shell)",
        ),
    ],
)
def test_a_broken_override_value_names_the_override(
    override, expected, recipe_dir, capsys, monkeypatch
):
    assert _error(capsys, ["validate", "r.yaml", override], recipe_dir, monkeypatch) == expected


def test_yaml_that_is_not_a_collection_is_still_a_plain_string(recipe_dir):
    from still import recipe

    overrides = ["eval_tasks=[a.yaml]", "data.train.prompt=q: a: b", "name=off"]
    loaded = recipe.load(recipe_dir / "r.yaml", overrides)
    assert loaded.eval_tasks == ["a.yaml"] and loaded.data.train.prompt == "q: a: b"
    assert loaded.name == "off"


# --------------------------------------------------------------------------- missing recipe
@pytest.mark.parametrize("verb", ["run", "validate", "check", "cache", "generate"])
def test_a_verb_without_its_recipe_says_a_recipe_is_required(verb, tmp_path, capsys, monkeypatch):
    assert _error(capsys, [verb], tmp_path, monkeypatch) == (
        f"still {verb}: a recipe path is required (usage: still {verb} RECIPE.yaml [key=value ...])"
    )
    # flags alone are not a recipe either
    assert "a recipe path is required" in _error(
        capsys, [verb, "--force"] if verb in ("run", "generate") else [verb], tmp_path, monkeypatch
    )


def test_no_verb_lists_the_verbs(tmp_path, capsys, monkeypatch):
    message = _error(capsys, [], tmp_path, monkeypatch)
    assert message.startswith("a verb is required (usage: still VERB ...; verbs: run,")


def test_a_missing_required_flag_is_one_line_with_usage(tmp_path, capsys, monkeypatch):
    assert _error(capsys, ["merge", "some-run"], tmp_path, monkeypatch) == (
        "still merge: the following arguments are required: --out "
        "(usage: still merge [-h] --out OUT [--force] run)"
    )


# --------------------------------------------------------------------------- unknown flags
@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            ["run", "r.yaml", "--max_steps", "5"],
            "still run: unknown flag --max_steps (recipe keys are set as key=value: "
            "write train.max_steps=5)",
        ),
        (
            ["run", "--max_steps", "5", "r.yaml"],
            "still run: unknown flag --max_steps (recipe keys are set as key=value: "
            "write train.max_steps=5)",
        ),
        (
            ["validate", "r.yaml", "--lr=1e-4"],
            "still validate: unknown flag --lr (recipe keys are set as key=value: "
            "write train.lr=1e-4)",
        ),
        (
            ["check", "r.yaml", "--learning-rate", "3e-4"],
            "still check: unknown flag --learning-rate (recipe keys are set as key=value: "
            "write train.lr=3e-4)",
        ),
        (
            ["run", "r.yaml", "--temperature", "2"],
            "still run: unknown flag --temperature (recipe keys are set as key=value: did you "
            "mean distill.temperature=2 or generate.temperature=2?)",
        ),
        (
            ["run", "r.yaml", "--max-step", "3"],
            "still run: unknown flag --max-step (recipe keys are set as key=value: did you "
            "mean train.max_steps=3?)",
        ),
        (
            ["run", "r.yaml", "--xyzzy"],
            "still run: unknown flag --xyzzy (flags of still run: -h --help --resume --force "
            "--nproc --nodes-file --slurm --nnodes --node-rank --rdzv-endpoint --strict --from "
            "--only)",
        ),
        (["eval", "--modle", "m"], "still eval: unknown flag --modle (did you mean --model?)"),
    ],
)
def test_an_unknown_flag_points_at_the_recipe_key(argv, expected, recipe_dir, capsys, monkeypatch):
    assert _error(capsys, argv, recipe_dir, monkeypatch) == expected


# --------------------------------------------------------------------------- non-ASCII
@pytest.mark.parametrize(
    "argv, text, shown",
    [
        (["validate", "r.yaml", "name=modèle-ü"], None, '(got "modèle-ü")'),
        (["validate", "r.yaml"], RECIPE.replace("name: t", "name: modèle-ü"), '(got "modèle-ü")'),
        (
            ["validate", "r.yaml"],
            RECIPE + "train: {lérning_rate: 1.0}\n",
            "unknown key 'lérning_rate' in train",
        ),
        (["validate", "recettes/modèle.yaml"], None, "recipe file not found: recettes/modèle.yaml"),
        (["validate", "r.yaml", "train.lr=très"], None, '(got "très")'),
    ],
)
def test_non_ascii_is_shown_as_itself(argv, text, shown, recipe_dir, capsys, monkeypatch):
    if text is not None:
        (recipe_dir / "r.yaml").write_text(text, encoding="utf-8")
    message = _error(capsys, argv, recipe_dir, monkeypatch)
    assert shown in message and "\\u" not in message and "\\x" not in message


# --------------------------------------------------------------------------- noise
def _still(args, cwd, **env):
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **env}
    return subprocess.run(
        [sys.executable, "-m", "still.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=full_env,
        timeout=600,
    )


def _tracked_recipe(tmp_path, model_dir) -> None:
    (tmp_path / "r.yaml").write_text(
        textwrap.dedent(
            f"""\
            kind: finetune
            name: quiet
            model: {{ref: "{model_dir}"}}
            lora: {{r: 2, alpha: 4}}
            data:
              train: {{path: train.jsonl, format: instruction, prompt: q, response: a}}
              max_len: 32
            train: {{max_steps: 1, batch_size: 2}}
            track: {{wandb: {{project: still-test}}}}
            """
        )
    )


NOISE = ("[INFO] Running in WANDB offline mode", "Setting accelerator to CPU", "ds_accelerator")


def test_an_error_after_the_training_stack_is_imported_is_the_only_line(tmp_path, tiny_model_dir):
    _tracked_recipe(tmp_path, tiny_model_dir)  # train.jsonl is missing
    result = _still(["run", "r.yaml"], tmp_path, WANDB_MODE="offline")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"still: error: data file not found: {tmp_path.resolve()}/train.jsonl "
        "(check the path (relative to the YAML))"
    ]
    assert not (tmp_path / "runs" / "quiet").exists()


def test_a_tracked_offline_run_prints_no_library_notices(tmp_path, tiny_model_dir):
    pytest.importorskip("wandb")
    _tracked_recipe(tmp_path, tiny_model_dir)
    (tmp_path / "train.jsonl").write_text('{"q": "What is 1?", "a": "One."}\n' * 4)
    home = tmp_path / "wandb-home"
    result = _still(
        ["run", "r.yaml"],
        tmp_path,
        WANDB_MODE="offline",
        WANDB_CONFIG_DIR=str(home / "config"),
        WANDB_CACHE_DIR=str(home / "cache"),
        WANDB_DATA_DIR=str(home / "data"),
        STILL_CACHE=str(tmp_path / "cache"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    console = result.stdout + result.stderr
    assert "still: W&B is offline; sync later with" in console  # still's own line stays
    for notice in NOISE:
        assert notice not in console
