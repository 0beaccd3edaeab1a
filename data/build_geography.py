"""Build the bundled `geography` dataset: general-knowledge multiple choice from the IANA time
zone database ("In which country is the city of Nairobi?"), for the forgetting check.

Run: python data/build_geography.py --out data/geography

The time zone database (public domain) names, for each country, the cities its zones are named
after (zone.tab) and the country's name (iso3166.tab). A country with a single zone is named by
one city, nearly always its capital or largest city (Europe/Paris, Asia/Tokyo, Africa/Nairobi):
those are the questions, but for zones named after the country itself (America/Aruba). The
three wrong choices are other countries of the same continent, so the continent alone does not
give the answer. Rows and choice order are seeded, so a given copy
of the database gives byte-identical files. Standard library only; the files are read from the
`tzdata` package when it is installed, else from /usr/share/zoneinfo.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from dataset_files import sha256_of, shuffled_choices, write_jsonl, write_text

BUILD_COMMAND = "python data/build_geography.py --out data/geography"
CONTINENTS = ("Africa", "America", "Asia", "Europe")
QUESTIONS = 100
SEED = 20261203


def zoneinfo_dir() -> Path:
    try:
        import tzdata  # the PyPI package (Apache-2.0 packaging of the public-domain database)

        return Path(tzdata.__file__).parent / "zoneinfo"
    except ImportError:
        return Path("/usr/share/zoneinfo")


def read_tab(path: Path) -> list[list[str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.split("\t") for line in lines if line and not line.startswith("#")]


def questions(zone_dir: Path) -> list[dict]:
    countries = {code: name for code, name in read_tab(zone_dir / "iso3166.tab")}
    zones_by_country: dict[str, list[str]] = {}
    for fields in read_tab(zone_dir / "zone.tab"):
        zones_by_country.setdefault(fields[0], []).append(fields[2])
    candidates = []
    for code in sorted(zones_by_country):
        zones = zones_by_country[code]
        continent = zones[0].split("/")[0]
        if len(zones) == 1 and continent in CONTINENTS and code in countries:
            city = zones[0].split("/")[-1].replace("_", " ")
            # a zone named after its country (America/Aruba) would give the answer away
            if (
                city.lower() not in countries[code].lower()
                and countries[code].lower() not in city.lower()
            ):
                candidates.append({"code": code, "continent": continent, "city": city})
    rng = random.Random(SEED)
    chosen = sorted(
        rng.sample(candidates, min(QUESTIONS, len(candidates))), key=lambda c: c["code"]
    )
    rows = []
    for item in chosen:
        same_continent = sorted(
            countries[c["code"]]
            for c in candidates
            if c["continent"] == item["continent"] and c["code"] != item["code"]
        )
        choices, label = shuffled_choices(
            rng, countries[item["code"]], rng.sample(same_continent, 3)
        )
        rows.append(
            {
                "id": item["code"],
                "continent": item["continent"],
                "city": item["city"],
                "question": f"In which country is the city of {item['city']}?",
                "choices": choices,
                "label": label,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/geography"))
    args = parser.parse_args()
    zone_dir = zoneinfo_dir()
    rows = questions(zone_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "choice_test.jsonl", rows)
    version_file = zone_dir / "tzdata.zi"
    version = (
        version_file.read_text(encoding="utf-8").splitlines()[0].removeprefix("# version ")
        if version_file.is_file()
        else None
    )
    manifest = {
        "build_command": BUILD_COMMAND,
        "source": "IANA time zone database: zone.tab and iso3166.tab (public domain)",
        "tzdata_version": version,
        "source_sha256": {name: sha256_of(zone_dir / name) for name in ("zone.tab", "iso3166.tab")},
        "questions": len(rows),
        "files": {"choice_test.jsonl": sha256_of(args.out / "choice_test.jsonl")},
    }
    write_text(args.out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    print(f"{len(rows)} questions -> {args.out}")


if __name__ == "__main__":
    main()
