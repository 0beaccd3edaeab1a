"""The second domain (data/debpkgs/): the shipped files are well formed and split by source
package, and the builder, on a hand-written package list, keeps and splits what it says."""

import hashlib
import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "data" / "debpkgs"


def _builder():
    import sys

    if str(REPO / "data") not in sys.path:  # as when it runs as a script: its helpers beside it
        sys.path.insert(0, str(REPO / "data"))
    spec = importlib.util.spec_from_file_location("build_debpkgs", REPO / "data/build_debpkgs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_the_shipped_splits_share_no_source_package_and_match_the_manifest():
    manifest = json.loads((DATA / "manifest.json").read_text())
    sources = {}
    for split in ("train", "validation", "test"):
        rows = read_jsonl(DATA / f"{split}.jsonl")
        assert len(rows) == manifest["counts"][split] and len(rows) > 300
        sources[split] = {row["source"] for row in rows}
        assert all(row["question"].startswith("What does the Debian package `") for row in rows)
    assert not sources["train"] & sources["test"] and not sources["train"] & sources["validation"]
    for name, digest in manifest["sha256"].items():
        assert hashlib.sha256((DATA / name).read_bytes()).hexdigest() == digest, name
    for row in read_jsonl(DATA / "choice_test.jsonl"):
        assert len(set(row["choices"])) == 4 and row["choices"][row["label"]] == row["id"]


STANZAS = """Package: zstd
Source: libzstd (1.5.4-1)
Section: utils
Description: fast lossless compression algorithm -- CLI tool
Description-md5: d2e4

Package: libzstd-dev
Source: libzstd
Section: libdevel
Description: fast lossless compression algorithm -- development files
Tag: role::devel-lib,
 devel::library

Package: oldthing
Section: oldlibs
Description: transitional package for newthing

Package: tiny
Section: misc
Description: too short

Package: zstd
Section: utils
Description: a second stanza of a name already read
"""


def test_the_builder_reads_stanzas_and_groups_binaries_by_source(monkeypatch):
    builder = _builder()
    packages = builder.read_packages(STANZAS)
    assert [p["name"] for p in packages] == ["libzstd-dev", "oldthing", "tiny", "zstd"]
    zstd = next(p for p in packages if p["name"] == "zstd")
    assert zstd["source"] == "libzstd" and zstd["section"] == "utils"
    assert zstd["synopsis"] == "fast lossless compression algorithm -- CLI tool"
    monkeypatch.setattr(builder, "SAMPLE_PER_MILLE", 1000)  # keep every package
    rows = builder.qa_rows(packages)
    assert [row["id"] for row in rows] == ["libzstd-dev", "zstd"]  # no transitional, no short
    assert len({builder.split_of(row["source"]) for row in rows}) == 1  # one source, one split
