"""Shared, built-once ground for the family tests: each family's tokenizer and its saved twin.

The twins (tests/families.py) are built in the tests, never downloaded; a session builds each
family's at most once, whichever test asks first.
"""

import pytest
from families import (
    FAMILIES,
    build_model,
    build_tokenizer,
    chat_rows,
    save_twin,
    write_finetune_recipe,
)


@pytest.fixture(scope="session")
def family_tokenizer():
    """family name -> its tokenizer (built once per session; do not modify it)."""
    built = {}

    def get(name: str):
        if name not in built:
            built[name] = build_tokenizer(name)
        return built[name]

    return get


@pytest.fixture(scope="session")
def tokenizers(family_tokenizer):
    """family name -> its tokenizer, for every family."""
    return {name: family_tokenizer(name) for name in FAMILIES}


@pytest.fixture(scope="session")
def teachers(tokenizers):
    """family name -> a 4-layer twin (hidden 32): the teacher the carve and width tests cut
    (carving and pruning leave it unchanged)."""
    return {
        name: build_model(name, tokenizers[name], layers=4, hidden=32, seed=1).eval()
        for name in FAMILIES
    }


@pytest.fixture(scope="session")
def twin_dir(tmp_path_factory):
    """family name -> an HF dir with the family's tiny model, tokenizer and generation config."""
    saved = {}

    def get(name: str):
        if name not in saved:
            saved[name] = save_twin(name, tmp_path_factory.mktemp(f"twin-{name}"))
        return saved[name]

    return get


@pytest.fixture(scope="session")
def family_runs(tmp_path_factory, twin_dir):
    """(name, method) -> the run dir of a 3-step finetune of that twin through `still run`
    (trained once per session, shared by the finetune and merge tests)."""
    import json

    from still import cli

    directory = tmp_path_factory.mktemp("family-runs")
    (directory / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat_rows()))
    runs = {}

    def get(name: str, method: str = "lora"):
        if (name, method) not in runs:
            recipe = write_finetune_recipe(directory, name, method, twin_dir(name))
            assert cli.main(["run", recipe]) == 0, (name, method)
            runs[name, method] = directory / "runs" / f"{name}-{method}"
        return runs[name, method]

    get.directory = directory
    return get
