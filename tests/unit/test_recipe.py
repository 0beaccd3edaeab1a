"""The recipe loader: merge, overrides, path rules, and one-line errors with file:line."""

import json
import textwrap
from pathlib import Path

import pytest

from still import recipe as recipe_module
from still.errors import StillError
from still.recipe import FinetuneRecipe

FINETUNE = """\
kind: finetune
name: t
model: {ref: some/model}
data:
  train: {path: train.jsonl, format: instruction, prompt: question, response: answer}
  eval: {path: val.jsonl}
train:
  lr: 1.0e-4
  max_steps: 5
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def test_load_resolves_defaults_and_relative_data_paths(tmp_path):
    recipe = recipe_module.load(write(tmp_path / "r" / "a.yaml", FINETUNE))
    assert isinstance(recipe, FinetuneRecipe)
    assert recipe.train.lr == 1e-4 and recipe.train.max_steps == 5
    assert recipe.data.train.path == str((tmp_path / "r" / "train.jsonl").resolve())
    # eval inherits the train source's format and field mapping
    assert recipe.data.eval.format == "instruction" and recipe.data.eval.response == "answer"
    assert recipe.lora.target == "all-linear"


def test_extends_chain_deep_merges_and_child_wins(tmp_path):
    write(tmp_path / "base" / "cpu.yaml", "train: {lr: 5.0e-4, batch_size: 2}\nlora: {r: 4}\n")
    write(tmp_path / "base" / "mid.yaml", "extends: cpu.yaml\ntrain: {batch_size: 3}\n")
    child = write(tmp_path / "c.yaml", "extends: base/mid.yaml\n" + FINETUNE)
    recipe = recipe_module.load(child)
    assert recipe.train.lr == 1e-4  # child
    assert recipe.train.batch_size == 3  # mid beats base
    assert recipe.lora.r == 4  # base, untouched
    assert recipe.train.max_steps == 5


def test_extends_cycle_is_rejected(tmp_path):
    write(tmp_path / "a.yaml", "extends: b.yaml\n" + FINETUNE)
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    with pytest.raises(StillError, match=r"extends cycle: a.yaml -> b.yaml -> a.yaml"):
        recipe_module.load(tmp_path / "a.yaml")


def test_extends_missing_file(tmp_path):
    write(tmp_path / "a.yaml", "extends: nope.yaml\n" + FINETUNE)
    with pytest.raises(StillError, match=r"a.yaml: extends: file not found: nope.yaml"):
        recipe_module.load(tmp_path / "a.yaml")


def test_unknown_key_names_file_line_and_suggestion(tmp_path):
    path = write(tmp_path / "a.yaml", FINETUNE.replace("lr: 1.0e-4", "lerning_rate: 1.0e-4"))
    with pytest.raises(StillError) as info:
        recipe_module.load(path)
    assert (
        str(info.value)
        == f"{path.resolve()}:8: unknown key 'lerning_rate' in train (did you mean 'lr'?)"
    )


def test_unknown_key_in_extended_file_points_at_that_file(tmp_path):
    base = write(tmp_path / "base.yaml", "# comment\nlora: {rank: 8}\n")
    child = write(tmp_path / "c.yaml", "extends: base.yaml\n" + FINETUNE)
    with pytest.raises(StillError) as info:
        recipe_module.load(child)
    assert str(info.value).startswith(
        f"{base.resolve()}:2: unknown key 'rank' in lora (did you mean 'r'?)"
    )


def test_wrong_type_and_out_of_range(tmp_path):
    path = write(tmp_path / "a.yaml", FINETUNE.replace("max_steps: 5", "max_steps: lots"))
    with pytest.raises(
        StillError, match=r"a.yaml:9: train.max_steps: Input should be a valid integer.*\"lots\""
    ):
        recipe_module.load(path)
    path = write(tmp_path / "b.yaml", FINETUNE.replace("lr: 1.0e-4", "lr: -1"))
    with pytest.raises(StillError, match=r"b.yaml:8: train.lr: Input should be greater than 0"):
        recipe_module.load(path)


def test_overrides_typed_nested_and_lists(tmp_path):
    path = write(tmp_path / "a.yaml", FINETUNE)
    recipe = recipe_module.load(
        path, ["train.max_steps=7", "lora.target=[q_proj, v_proj]", "train.lr=3e-4", "name=other"]
    )
    assert recipe.train.max_steps == 7
    assert recipe.lora.target == ["q_proj", "v_proj"]
    assert recipe.train.lr == pytest.approx(3e-4)
    assert recipe.name == "other"


def test_yaml_1_1_booleans_stay_words_in_overrides(tmp_path):
    path = write(tmp_path / "a.yaml", FINETUNE)
    recipe = recipe_module.load(
        path, ["name=off", "data.packing=no", "train.gradient_checkpointing=on"]
    )
    assert recipe.name == "off"  # not False
    assert recipe.data.packing is False and recipe.train.gradient_checkpointing is True


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "train.max_steps=abc",
            r"override 'train.max_steps=abc': train.max_steps: Input should be a valid integer",
        ),
        (
            "train.lerning_rate=1",
            r"override 'train.lerning_rate=1': unknown key 'lerning_rate' in train "
            r"\(did you mean 'lr'\?\)",
        ),
        ("train", r"bad override 'train': expected KEY=VALUE"),
        ("train.lr.x=1", r"bad override 'train.lr.x=1': 'train.lr' is not a section"),
        (
            "kind=finetun",
            r"kind must be one of finetune \| distill \| eval \| pipeline, got 'finetun' "
            r"\(did you mean 'finetune'\?\)",
        ),
    ],
)
def test_bad_overrides(tmp_path, override, message):
    with pytest.raises(StillError, match=message):
        recipe_module.load(write(tmp_path / "a.yaml", FINETUNE), [override])


def test_missing_file_and_malformed_yaml(tmp_path):
    with pytest.raises(StillError, match="recipe file not found"):
        recipe_module.load(tmp_path / "nope.yaml")
    bad = write(tmp_path / "bad.yaml", "kind: finetune\nname: [unclosed\n")
    with pytest.raises(StillError, match=r"bad.yaml:\d+: invalid YAML"):
        recipe_module.load(bad)
    scalar = write(tmp_path / "scalar.yaml", "just a string\n")
    with pytest.raises(StillError, match="a recipe must be a mapping"):
        recipe_module.load(scalar)


def test_missing_required_key(tmp_path):
    path = write(tmp_path / "a.yaml", "kind: finetune\nname: t\nmodel: {ref: x}\n")
    with pytest.raises(StillError, match=r"missing required key 'data'"):
        recipe_module.load(path)


def test_cross_field_validation_messages(tmp_path):
    path = write(
        tmp_path / "a.yaml", FINETUNE.replace("path: train.jsonl,", "path: t.jsonl, hf: x/y,")
    )
    with pytest.raises(StillError, match="give exactly one of 'path'"):
        recipe_module.load(path)


def test_resolved_yaml_round_trips(tmp_path):
    recipe = recipe_module.load(write(tmp_path / "a.yaml", FINETUNE), ["train.max_steps=3"])
    text = recipe_module.to_yaml(recipe)
    assert text.splitlines()[1] == "kind: finetune"
    again = recipe_module.load(write(tmp_path / "resolved.yaml", text))
    assert again.model_dump() == recipe.model_dump()
    assert recipe_module.recipe_hash(again) == recipe_module.recipe_hash(recipe)


def test_json_schema_covers_every_kind():
    schema = recipe_module.json_schema()
    titles = {entry["title"] for entry in schema["oneOf"]}
    assert titles == {"FinetuneRecipe", "DistillRecipe", "EvalRecipe", "PipelineRecipe"}
    json.dumps(schema)


def every_shipped_yaml():
    root = Path(__file__).resolve().parents[2] / "recipes"
    return sorted(root.rglob("*.yaml"))


@pytest.mark.parametrize(
    "path", every_shipped_yaml(), ids=lambda p: str(p.relative_to(p.parents[2]))
)
def test_every_shipped_yaml_loads_and_says_how_to_run(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# Run: "), f"{path} must start with '# Run: <command>'"
    if path.parent.name == "tasks":
        from eval.tasks import load_task

        load_task(path)
    else:
        recipe = recipe_module.load(path)
        if recipe.kind == "pipeline":
            from still.pipeline import plan

            plan(recipe)  # every stage loads and every reference resolves
