"""Shared, built-once ground for the family tests: each family's tokenizer and its saved twin.

The twins (tests/families.py) are built in the tests, never downloaded; a session builds each
family's at most once, whichever test asks first.
"""

import pytest
from families import build_tokenizer, save_twin


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
def twin_dir(tmp_path_factory):
    """family name -> an HF dir with the family's tiny model, tokenizer and generation config."""
    saved = {}

    def get(name: str):
        if name not in saved:
            saved[name] = save_twin(name, tmp_path_factory.mktemp(f"twin-{name}"))
        return saved[name]

    return get
