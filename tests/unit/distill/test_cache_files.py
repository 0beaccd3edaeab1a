"""A damaged teacher cache on disk is one StillError line, never a library traceback."""

import json

import pytest
import torch
from safetensors.torch import save_file

from distill.cache import TeacherCache, read_manifest
from still.errors import StillError

GOOD = {
    "splits": {"train": {}},
    "top_k": 4,
    "examples_per_shard": 1024,
    "complete": True,
    "data_sha256": {},
    "dtypes": {"log_probs": "float16"},
}


def test_a_good_manifest_reads(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps(GOOD))
    assert read_manifest(tmp_path / "manifest.json") == GOOD


@pytest.mark.parametrize(
    "text, message",
    [
        ("{", r"manifest\.json:1: invalid JSON"),
        ("[]", "expected a JSON object, got list"),
        (json.dumps({**GOOD, "top_k": "4"}), r"damaged teacher cache manifest \(top_k is '4'\)"),
        (json.dumps({**GOOD, "examples_per_shard": 0}), r"examples_per_shard is 0"),
        (json.dumps({**GOOD, "splits": ["train"]}), r"splits is \['train'\]"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "data_sha256"}), "data_sha256 is None"),
    ],
)
def test_a_damaged_manifest_is_one_line(tmp_path, text, message):
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(StillError, match=message):
        read_manifest(tmp_path / "manifest.json")


def _cache(tmp_path) -> TeacherCache:
    (tmp_path / "train").mkdir()
    return TeacherCache(tmp_path, "train", GOOD)


def test_a_missing_truncated_or_incomplete_shard_is_one_line(tmp_path):
    cache = _cache(tmp_path)
    with pytest.raises(StillError, match=r"shard-00000\.safetensors is missing"):
        cache.rows([0])
    shard = tmp_path / "train" / "shard-00000.safetensors"
    save_file({"ids": torch.zeros(3, 4, dtype=torch.int32)}, shard)
    with pytest.raises(StillError, match=r"damaged teacher cache shard \(no offsets, rest_log\)"):
        cache.rows([0])
    shard.write_bytes(shard.read_bytes()[:-5])
    with pytest.raises(StillError, match=r"shard-00000\.safetensors"):
        cache.rows([0])


def test_a_cross_tokenizer_shard_without_its_columns_is_one_line(tmp_path):
    (tmp_path / "train").mkdir()
    cache = TeacherCache(tmp_path, "train", {**GOOD, "cross_tokenizer": {"vocab_map_sha256": "x"}})
    save_file(
        {
            "ids": torch.zeros(3, 4, dtype=torch.int32),
            "log_probs": torch.zeros(3, 4, dtype=torch.float16),
            "rest_log": torch.zeros(3, dtype=torch.float16),
            "offsets": torch.tensor([0, 3]),
        },
        tmp_path / "train" / "shard-00000.safetensors",
    )
    with pytest.raises(StillError, match=r"\(no aligned, matched_rest_log, unmatched_rest_log\)"):
        cache.columns([0])
