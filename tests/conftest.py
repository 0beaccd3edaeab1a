"""Tiny local models and tokenizers for every test: nothing comes from the hub.

`tiny_tokenizer_dir` is a byte-level BPE trained here on a small corpus, with a ChatML chat
template (the template family SmolLM2 uses) and pad != eos. `tiny_model_dir` is a random
Llama of hidden 32 and 2 layers saved next to it, so `from_pretrained(dir)` loads both.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
from tiny_models import build_tiny_llama, build_tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    build_tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def tiny_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random 2-layer Llama (hidden 32) with its tokenizer, saved as an HF dir."""
    path = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = build_tiny_tokenizer()
    build_tiny_llama(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir_4layers(tmp_path_factory):
    """A random 4-layer Llama (hidden 64): a teacher to carve students from."""
    path = tmp_path_factory.mktemp("tiny_llama4")
    tokenizer = build_tiny_tokenizer()
    build_tiny_llama(tokenizer, hidden=64, layers=4, seed=1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
