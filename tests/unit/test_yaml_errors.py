"""still.yaml_errors: YAML with lines (duplicate keys refused) and the one-line pydantic error."""

from typing import Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from still import recipe as recipe_module
from still.errors import StillError
from still.yaml_errors import key_lines, one_line_error, parse_yaml, where


class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    learning: float = Field(1.0, gt=0)
    mode: Literal["fast", "slow"] = "fast"


class Outer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    inner: Inner = Field(default_factory=Inner)
    modes: list[Literal["fast", "slow"]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _named(self):
        if self.name == "bad":
            raise ValueError("name may not be 'bad'")
        return self


def error_for(text: str, **options) -> StillError:
    node, data = parse_yaml(text, "f.yaml")
    with pytest.raises(ValidationError) as caught:
        Outer.model_validate(data)
    return one_line_error(caught.value, Outer, key_lines(node, "f.yaml"), "f.yaml", **options)


def test_key_lines_cover_mappings_and_list_items():
    node, data = parse_yaml("a:\n  b: 1\n  c: [x, y]\nd:\n  - 1\n  - 2\n", "f.yaml")
    lines = key_lines(node, "f.yaml")
    assert data == {"a": {"b": 1, "c": ["x", "y"]}, "d": [1, 2]}
    assert lines[("a", "b")] == ("f.yaml", 2) and lines[("d", 1)] == ("f.yaml", 6)
    assert where(lines, ("a", "c", 5), "f.yaml") == "f.yaml:3"
    assert where(lines, ("nope",), "f.yaml") == "f.yaml"


@pytest.mark.parametrize(
    "text, key, line, first",
    [
        ("train: {lr: 1}\nname: x\ntrain: {lr: 2}\n", "train", 3, 1),
        ("train:\n  lr: 1\n  seed: 0\n  lr: 2\n", "lr", 4, 2),
        ("a: {b: 1, b: 2}\n", "b", 1, 1),
        ("- {x: 1}\n- x: 1\n  y: 2\n  x: 3\n", "x", 4, 2),
    ],
)
def test_a_key_given_twice_names_both_lines(text, key, line, first):
    with pytest.raises(StillError) as caught:
        parse_yaml(text, "f.yaml")
    assert str(caught.value) == f"f.yaml:{line}: duplicate key '{key}' (first at line {first})"


def test_the_same_key_in_different_mappings_or_merged_is_fine():
    node, data = parse_yaml(
        "a: {x: 1}\nb: {x: 2}\nbase: &b {y: 1}\nc:\n  <<: *b\n  y: 2\n", "f.yaml"
    )
    assert data["c"] == {"y": 2} and data["a"] == {"x": 1}
    recursive, _ = parse_yaml("a: &x [*x]\n", "f.yaml")  # an alias inside its own anchor
    assert key_lines(recursive, "f.yaml")[("a", 0)] == ("f.yaml", 1)


def test_syntax_errors_are_one_line_at_their_line():
    with pytest.raises(StillError, match=r"^f\.yaml:3: invalid YAML: expected ',' or '\]'"):
        parse_yaml("a: 1\nb: [bad\nc: {d: 1}\n", "f.yaml")


def test_unknown_key_suggests_the_closest_or_lists_the_valid_ones():
    error = error_for("name: x\ninner:\n  learning_rat: 2\n")
    assert str(error) == "f.yaml:3: unknown key 'learning_rat' in inner (did you mean 'learning'?)"
    error = error_for("name: x\nzzz: 1\n", whole="task")
    assert str(error) == "f.yaml:2: unknown key 'zzz' in task (valid keys: name, inner, modes)"


def test_values_name_the_key_path_and_what_was_given():
    error = error_for("name: x\ninner: {learning: -1, mode: quick}\n")
    assert str(error) == (
        "f.yaml:2: inner.learning: Input should be greater than 0 (got -1) (+1 more)"
    )
    assert str(error_for("inner: {}\n")) == "f.yaml: missing required key 'name'"


def test_literal_suggestions_and_whole_document_rules_when_asked():
    error = error_for("name: x\nmodes: [fast, slwo]\n", suggest_values=True)
    assert str(error) == (
        "f.yaml:2: modes.1: Input should be 'fast' or 'slow' (got \"slwo\") (did you mean 'slow'?)"
    )
    error = error_for("inner: {}\nname: bad\n", whole="task", anchor=("name",))
    assert str(error) == "f.yaml:2: task: name may not be 'bad'"


def test_a_recipe_with_two_train_blocks_is_refused(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "kind: finetune\nname: x\nmodel: {ref: m}\ndata: {train: {path: t.jsonl}}\n"
        "train: {lr: 0.1}\ntrain: {max_steps: 2}\n"
    )
    with pytest.raises(StillError) as caught:
        recipe_module.load(path)
    assert str(caught.value) == f"{path.resolve()}:6: duplicate key 'train' (first at line 5)"
