"""Inert settings: refused where the user writes them, never for defaults or inherited keys."""

import pytest

from still import recipe as recipe_module
from still.errors import StillError
from still.ignored import RULES

DATA = "data:\n  train: {path: train.jsonl}\n"


def _write(tmp_path, name: str, text: str):
    (tmp_path / "train.jsonl").write_text('{"text": "x"}\n')
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_never_count_as_written(tmp_path):
    # kd_weight 0 makes the default temperature inert, but nobody wrote it
    path = _write(
        tmp_path,
        "r.yaml",
        "kind: distill\nname: r\nteacher: {ref: t}\nstudent: {ref: s}\n"
        "distill: {kd_weight: 0, ce_weight: 1}\n" + DATA,
    )
    assert recipe_module.load(path).distill.kd_weight == 0


def test_a_key_inherited_from_a_base_recipe_is_not_refused(tmp_path):
    _write(
        tmp_path,
        "base.yaml",
        "kind: distill\nname: b\nteacher: {ref: t}\nstudent: {ref: s}\n"
        "distill: {temperature: 2.0, kd_weight: 1}\n" + DATA,
    )
    child = _write(
        tmp_path,
        "child.yaml",
        "extends: base.yaml\nname: c\ndistill: {kd_weight: 0, ce_weight: 1}\n",
    )
    assert recipe_module.load(child).distill.temperature == 2.0
    # the same key written by the child itself is refused
    child.write_text(
        "extends: base.yaml\nname: c\ndistill: {kd_weight: 0, ce_weight: 1, temperature: 3.0}\n"
    )
    with pytest.raises(StillError, match=r"child\.yaml:3: distill\.temperature would be ignored"):
        recipe_module.load(child)


def test_every_rule_has_a_bad_input_case():
    from pathlib import Path

    cases = (Path(__file__).parents[1] / "bad_inputs" / "cases_ignored.yaml").read_text()
    for rule in RULES:
        dotted = f"{rule.section}.{rule.key}" if rule.section else rule.key
        assert f"{dotted.replace('.', chr(92) + '.')} would be ignored" in cases, dotted


def test_an_override_that_defeats_a_file_key_is_not_refused_but_a_late_key_is(tmp_path):
    path = _write(
        tmp_path,
        "r.yaml",
        "kind: distill\nname: r\nteacher: {ref: t}\nstudent: {ref: s}\n"
        "distill: {temperature: 2.0}\n" + DATA,
    )
    # the baseline variant: kd_weight=0 on the command line over the file's temperature
    recipe = recipe_module.load(path, ["distill.kd_weight=0", "distill.ce_weight=1"])
    assert recipe.distill.temperature == 2.0
    # a key given on the command line next to what defeats it is the user's own statement
    with pytest.raises(StillError, match=r"override 'distill\.beta=0\.2': distill\.beta would"):
        recipe_module.load(path, ["distill.beta=0.2"])
