"""The shipped pydocs dataset (data/pydocs/) is well formed, split by module, and reproducible."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "data" / "pydocs"
BUILDER = REPO / "data" / "build_pydocs.py"
SPLITS = ("train", "validation", "test")
QA_FIELDS = ("id", "module", "kind", "question", "answer")
CHOICE_FIELDS = ("id", "module", "question", "choices", "label")
MIN_ROWS = {
    "train": 2400,
    "validation": 200,
    "test": 200,
    "choice_validation": 150,
    "choice_test": 150,
}


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def top_module(row: dict) -> str:
    return row["module"].split(".")[0]


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((DATA / "manifest.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict]]:
    return {name: read_jsonl(DATA / f"{name}.jsonl") for name in SPLITS}


@pytest.fixture(scope="module")
def choices() -> dict[str, list[dict]]:
    return {name: read_jsonl(DATA / f"choice_{name}.jsonl") for name in ("validation", "test")}


def test_rows_have_every_field_as_a_non_empty_string(splits):
    for name, rows in splits.items():
        for row in rows:
            assert tuple(row) == QA_FIELDS, (name, row)
            assert all(isinstance(row[key], str) and row[key].strip() for key in QA_FIELDS), row
            assert row["kind"] in ("function", "class", "method"), row
            assert row["id"].startswith(row["module"] + "."), row
            assert row["question"] == f"What does `{row['id']}` do?", row
            assert 20 <= len(row["answer"]) <= 300, row
            assert row["answer"] == " ".join(row["answer"].split()), row


def test_splits_are_disjoint_by_top_level_module_and_sorted(splits, manifest):
    modules = {name: {top_module(row) for row in rows} for name, rows in splits.items()}
    assert not modules["train"] & modules["validation"]
    assert not modules["train"] & modules["test"]
    assert not modules["validation"] & modules["test"]
    assert {name: sorted(found) for name, found in modules.items()} == manifest["modules"]
    all_ids = [row["id"] for rows in splits.values() for row in rows]
    assert len(all_ids) == len(set(all_ids))
    for rows in splits.values():
        assert [row["id"] for row in rows] == sorted(row["id"] for row in rows)
    all_answers = [row["answer"] for rows in splits.values() for row in rows]
    assert len(all_answers) == len(set(all_answers))


def test_counts_meet_targets_and_match_manifest(splits, choices, manifest):
    counts = {
        **{name: len(rows) for name, rows in splits.items()},
        **{f"choice_{name}": len(rows) for name, rows in choices.items()},
    }
    assert counts == manifest["counts"]
    assert sum(counts[name] for name in SPLITS) >= 3000
    for name, minimum in MIN_ROWS.items():
        assert counts[name] >= minimum, (name, counts[name])


def test_choice_rows_are_well_formed(splits, choices):
    for name, rows in choices.items():
        by_id = {row["id"]: row for row in splits[name]}
        for row in rows:
            assert tuple(row) == CHOICE_FIELDS, row
            assert len(row["choices"]) == 4 and len(set(row["choices"])) == 4, row
            assert isinstance(row["label"], int) and 0 <= row["label"] < 4, row
            assert row["choices"][row["label"]] == row["id"], row
            source = by_id[row["id"]]
            assert row["module"] == source["module"]
            assert row["question"].endswith(source["answer"])
            assert all(choice.startswith(row["module"] + ".") for choice in row["choices"]), row
        # A seeded shuffle, not a fixed slot: the gold answer sits in every position.
        assert {row["label"] for row in rows} == {0, 1, 2, 3}


def test_manifest_hashes_match_files_and_data_stays_small(manifest):
    for filename, digest in manifest["sha256"].items():
        assert hashlib.sha256((DATA / filename).read_bytes()).hexdigest() == digest, filename
    assert sum(path.stat().st_size for path in DATA.iterdir()) < 3_000_000


def test_rebuild_is_byte_identical(manifest, tmp_path):
    here = ".".join(map(str, sys.version_info[:3]))
    if (here, sys.platform) != (manifest["python_version"], manifest["platform"]):
        pytest.skip(
            f"shipped data was built with Python {manifest['python_version']} on "
            f"{manifest['platform']}; docstrings differ on {here} {sys.platform}"
        )
    subprocess.run(
        [sys.executable, str(BUILDER), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=120,
        cwd=REPO,
    )
    rebuilt = json.loads((tmp_path / "manifest.json").read_text(encoding="utf-8"))
    if rebuilt["documented_modules"] != manifest["documented_modules"]:
        pytest.skip(
            "this interpreter has a different set of importable stdlib modules "
            "(optional C extensions) than the one that built the shipped data"
        )
    shipped = sorted(path.name for path in DATA.iterdir())
    assert sorted(path.name for path in tmp_path.iterdir()) == shipped
    for filename in shipped:
        assert (tmp_path / filename).read_bytes() == (DATA / filename).read_bytes(), filename
