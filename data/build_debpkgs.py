"""Build the `debpkgs` dataset from this machine's Debian package database: a second real domain
to check the kit's defaults on (not part of `make demo`).

Run: python data/build_debpkgs.py --out data/debpkgs

Each available binary package becomes one question/answer pair ("What does the Debian package
`zstd` do?" -> its synopsis, "fast lossless compression algorithm -- CLI tool"), read from
`apt-cache dumpavail`. Rows are split by *source* package with a stable hash (libfoo1, libfoo-dev
and foo-doc share a split), so test questions are about software never seen in training, and a
stable hash of the package name keeps one package in `SAMPLE_PER_MILLE` / 1000, so the splits are
about the size of `pydocs`. Standard library only. The output depends on the apt lists of the
machine; the suite, apt's package count and sha256 of every file are recorded in manifest.json.
For one database the output is byte-identical from run to run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

from dataset_files import sha256_of, shuffled_choices, write_jsonl, write_text

BUILD_COMMAND = "python data/build_debpkgs.py --out data/debpkgs"
SPLIT_SALT = "debpkgs-split-v1"
SAMPLE_SALT = "debpkgs-sample-v1"
SAMPLE_PER_MILLE = 80
CHOICE_SEED = 20261203
MIN_ANSWER_CHARS = 12
SPLITS = ("train", "validation", "test")
# Packages that describe no software of their own.
SKIP_WORDS = ("transitional", "dummy package", "metapackage", "debug symbols")
SKIP_SUFFIXES = ("-dbgsym", "-dbg")


def read_packages(text: str) -> list[dict]:
    """`apt-cache dumpavail` stanzas → {name, source, section, synopsis}, first one per name."""
    packages, seen = [], set()
    for stanza in text.split("\n\n"):
        fields = {}
        for line in stanza.splitlines():
            if line[:1] in (" ", "\t") or ":" not in line:
                continue  # continuation lines (long descriptions, tags)
            key, value = line.split(":", 1)
            fields[key] = value.strip()
        name = fields.get("Package")
        if not name or name in seen or "Description" not in fields:
            continue
        seen.add(name)
        source = fields.get("Source", name).split(" ", 1)[0]  # "libzstd (1.5.4-1)" → libzstd
        packages.append(
            {
                "name": name,
                "source": source,
                "section": fields.get("Section", "misc").rsplit("/", 1)[-1],
                "synopsis": fields["Description"],
            }
        )
    return sorted(packages, key=lambda package: package["name"])


def _bucket(salt: str, key: str, size: int) -> int:
    return int(hashlib.sha256(f"{salt}:{key}".encode()).hexdigest(), 16) % size


def keep(package: dict) -> bool:
    synopsis = package["synopsis"].lower()
    return (
        len(package["synopsis"]) >= MIN_ANSWER_CHARS
        and not any(word in synopsis for word in SKIP_WORDS)
        and not package["name"].endswith(SKIP_SUFFIXES)
        and _bucket(SAMPLE_SALT, package["name"], 1000) < SAMPLE_PER_MILLE
    )


def split_of(source: str) -> str:
    bucket = _bucket(SPLIT_SALT, source, 100)
    return "train" if bucket < 80 else "validation" if bucket < 90 else "test"


def qa_rows(packages: list[dict]) -> list[dict]:
    rows, seen = [], set()
    for package in packages:
        if not keep(package) or package["synopsis"] in seen:
            continue  # one answer, one package: a repeated synopsis cannot be told apart
        seen.add(package["synopsis"])
        rows.append(
            {
                "id": package["name"],
                "source": package["source"],
                "section": package["section"],
                "question": f"What does the Debian package `{package['name']}` do?",
                "answer": package["synopsis"],
            }
        )
    return rows


def choice_rows(rows: list[dict], seed: int) -> list[dict]:
    """4-way "which package is this" questions; distractors from the same section first."""
    rng = random.Random(seed)
    by_section: dict[str, list[str]] = {}
    for row in rows:
        by_section.setdefault(row["section"], []).append(row["id"])
    everyone = [row["id"] for row in rows]
    out = []
    for row in rows:
        same = [name for name in by_section[row["section"]] if name != row["id"]]
        distractors = rng.sample(same, min(3, len(same)))
        others = [name for name in everyone if name != row["id"] and name not in distractors]
        distractors += rng.sample(others, 3 - len(distractors))
        choices, label = shuffled_choices(rng, row["id"], distractors)
        out.append(
            {
                "id": row["id"],
                "section": row["section"],
                "question": f"Which Debian package is this: {row['answer']}",
                "choices": choices,
                "label": label,
            }
        )
    return out


def readme_text(counts: dict[str, int], suite: str) -> str:
    table = "\n".join(f"| {name} | {count} |" for name, count in counts.items())
    return f"""# debpkgs: what Debian packages do, answered by their synopses

"What does the Debian package `zstd` do?" answered with the package's one-line synopsis
("fast lossless compression algorithm -- CLI tool"): the kit's second domain, for checking
that defaults chosen on `pydocs` hold elsewhere. Not part of `make demo`.

- **Source**: the apt package lists of a {suite} machine (`apt-cache dumpavail`); package
  synopses are written by each package's Debian maintainers.
- **Built with**: `{BUILD_COMMAND}` (standard library only).
- **Rows**: one binary package in {SAMPLE_PER_MILLE} of every 1000 (stable hash of its name),
  without transitional, dummy, meta and debug-symbol packages, synopses of at least
  {MIN_ANSWER_CHARS} characters, each synopsis once.
- **Splits**: by source package (sha256 of `"{SPLIT_SALT}:<source>"` mod 100: <80 train, <90
  validation, else test), so test packages come from software never seen in training.
- `choice_*.jsonl`: the same rows as 4-way multiple choice ("Which Debian package is this: ..."),
  distractors from the same section first, seeded.

| file | rows |
|---|---|
{table}
"""


def suite_name() -> str:
    try:
        return f"Debian {Path('/etc/debian_version').read_text().strip()}"
    except OSError:
        return "Debian"


def build(out_dir: Path, text: str) -> dict:
    packages = read_packages(text)
    rows = qa_rows(packages)
    split_rows = {name: [row for row in rows if split_of(row["source"]) == name] for name in SPLITS}
    files = {f"{name}.jsonl": split_rows[name] for name in SPLITS}
    files["choice_validation.jsonl"] = choice_rows(split_rows["validation"], CHOICE_SEED)
    files["choice_test.jsonl"] = choice_rows(split_rows["test"], CHOICE_SEED + 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    for filename, file_rows in files.items():
        write_jsonl(out_dir / filename, file_rows)
    counts = {
        filename.removesuffix(".jsonl"): len(file_rows) for filename, file_rows in files.items()
    }
    suite = suite_name()
    write_text(out_dir / "README.md", readme_text(counts, suite))
    manifest = {
        "suite": suite,
        "build_command": BUILD_COMMAND,
        "packages_available": len(packages),
        "split_salt": SPLIT_SALT,
        "sample_per_mille": SAMPLE_PER_MILLE,
        "counts": counts,
        "sha256": {name: sha256_of(out_dir / name) for name in [*files, "README.md"]},
    }
    write_text(out_dir / "manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "debpkgs")
    parser.add_argument(
        "--dumpavail", type=Path, help="a saved `apt-cache dumpavail` (default: run it)"
    )
    args = parser.parse_args(argv)
    if args.dumpavail:
        text = args.dumpavail.read_text(encoding="utf-8", errors="replace")
    else:
        text = subprocess.run(
            ["apt-cache", "dumpavail"], capture_output=True, text=True, check=True
        ).stdout
    manifest = build(args.out, text)
    print(json.dumps(manifest["counts"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
