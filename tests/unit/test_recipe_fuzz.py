"""Property: whatever YAML a user writes, `still.recipe.load` returns a recipe or raises
StillError (one line for the CLI), never another exception."""

import string

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from still.errors import StillError
from still.recipe import RECIPE_KINDS, apply_override, load

# Real key names make the fuzzer reach deep validation, not just "unknown key".
KEYS = sorted(
    {name for cls in RECIPE_KINDS.values() for name in cls.model_fields}
    | {
        "ref",
        "r",
        "alpha",
        "lr",
        "max_steps",
        "batch_size",
        "train",
        "eval",
        "path",
        "format",
        "prompt",
        "response",
        "init",
        "keep_layers",
        "keep_ratio",
        "kd_weight",
        "ce_weight",
        "extends",
        "from",
        "wandb",
        "precision",
        "save_total_limit",
        "max_nonfinite_steps",
    }
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.sampled_from(["finetune", "distill", "eval", "lora", "full", "chat", "x.yaml"]),
)
keys = st.one_of(
    st.sampled_from(KEYS), st.text(string.ascii_letters + "_.", min_size=1, max_size=10)
)
trees = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=5)
    ),
    max_leaves=25,
)
recipes = st.dictionaries(keys, trees, max_size=8).map(
    lambda d: d if "kind" in d else {**d, "kind": "finetune"}
)
overrides = st.lists(
    st.builds(
        lambda k, v: f"{k}={v}",
        st.sampled_from(KEYS + ["train.lr", "lora.r", "data.train.path", "a..b"]),
        st.text(max_size=8),
    ),
    max_size=2,
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=recipes, extra=overrides)
def test_loader_returns_a_recipe_or_a_still_error(tmp_path, data, extra):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    try:
        load(path, extra)
    except StillError as exc:
        assert str(exc) and "\n" not in str(exc)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    text=st.lists(
        st.sampled_from(
            list("kind: finetune\n-[]{}&*!|>'\"#%@`,?\t ") + ["name", "extends", "\n  "]
        ),
        max_size=60,
    ).map("".join)
)
def test_loader_survives_arbitrary_text(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    try:
        load(path)
    except StillError:
        pass


def test_override_errors_are_still_errors():
    data, origins = {"train": {"lr": 1}}, {}
    for bad in ("nokey", "=1", "train.lr.x.y=1"):
        try:
            apply_override(data, origins, bad)
        except StillError:
            pass


BASES = {
    "finetune": {
        "kind": "finetune",
        "name": "f",
        "model": {"ref": "m"},
        "lora": {"r": 4},
        "data": {"train": {"path": "t.jsonl", "format": "instruction"}, "max_len": 64},
        "train": {"lr": 1e-3, "max_steps": 2},
    },
    "distill": {
        "kind": "distill",
        "name": "d",
        "teacher": {"ref": "m"},
        "student": {"init": {"keep_ratio": 0.5}},
        "distill": {"kd_weight": 1},
        "data": {"train": {"path": "t.jsonl"}},
    },
    "eval": {"kind": "eval", "name": "e", "models": ["m"], "tasks": ["t.yaml"]},
}


def _mutate(base: dict, path: list, value):
    """Replace (or add) the value at a key path inside a copy of a valid recipe."""
    import copy

    data = copy.deepcopy(base)
    node = data
    for key in path[:-1]:
        child = node.get(key) if isinstance(node, dict) else None
        if not isinstance(child, dict):
            break
        node = child
    if isinstance(node, dict):
        node[path[-1]] = value
    return data


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    kind=st.sampled_from(sorted(BASES)), path=st.lists(keys, min_size=1, max_size=3), value=trees
)
def test_one_bad_value_in_a_valid_recipe_is_a_still_error(tmp_path, kind, path, value):
    file = tmp_path / "r.yaml"
    file.write_text(yaml.safe_dump(_mutate(BASES[kind], path, value)))
    try:
        load(file)
    except StillError as exc:
        assert str(exc) and "\n" not in str(exc)
