"""How a published dir names what it was made from, without an absolute path.

A published model travels (to the hub, to another machine), so its card, lineage.json and
recipe copy cannot name models, data and recipes by where they lay on the publishing machine
(a temp dir, a home dir). The rule, applied by `Project`:

- a hub id or `builtin:NAME` stays as it is, and so does any reference that is already
  relative; a dir in the Hugging Face hub cache (`…/models--ORG--NAME/snapshots/…`) is named
  by its hub id `ORG/NAME`;
- an absolute path inside the project is written relative to it (`runs/pydocs-teacher`,
  `recipes/quickstart/student.yaml`). The project is the dir that holds the run's output dir:
  the run dir's grandparent (`runs/<name>` → the dir `still run` was started in, under the
  default `output_dir: runs`, which is what a recipe's model references are relative to);
- an absolute path outside the project is named by its last component alone (the dir's or
  file's name);
- a data file is named by its basename and sha256 (`{"file": "train.jsonl", "sha256": …}`):
  where it lay says nothing to a reader, its hash says exactly which file it was.

Fields known to hold a model or a path (base, teacher, the chain, the source run) are named so
always. Elsewhere (the recipe copy, the rest of a lineage) a string is taken for a path only
when it looks like one: absolute, one line, and either on disk or two or more components with
no space. A system prompt such as Qwen3's `/no_think` is text and stays.

The training-time lineage keeps its absolute paths (later steps follow them to the teacher and
the base); only what goes into the published dir is rewritten.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml

from still.rundir import SOURCE_HEADER

HUB_CACHE_PREFIX = "models--"  # huggingface_hub's cache dir of a model: models--ORG--NAME
MODEL_KEYS = ("base", "teacher", "student")  # a run lineage's model references


@dataclass(frozen=True)
class Project:
    root: Path  # absolute

    @classmethod
    def of_run(cls, run_dir: str | Path) -> Project:
        return cls(Path(run_dir).resolve().parent.parent)

    def name(self, ref):
        """A model reference or a path as the published dir writes it; other values as they
        are. A string is taken for a path when it is absolute or starts with `~`."""
        if not isinstance(ref, str) or not _absolute(ref):
            return ref
        path = Path(ref).expanduser().resolve()
        hub_dir = next((p for p in path.parts if p.startswith(HUB_CACHE_PREFIX)), None)
        if hub_dir:  # hub repo names cannot hold "--": the cache's separator is unambiguous
            return hub_dir.removeprefix(HUB_CACHE_PREFIX).replace("--", "/")
        # a run dir right under the filesystem root has no project worth naming paths from
        if self.root != Path(self.root.anchor) and path.is_relative_to(self.root):
            return path.relative_to(self.root).as_posix() or "."
        return path.name

    def scrub(self, value):
        """`value` (JSON-like) with every string that looks like a path renamed by `name`."""
        if isinstance(value, dict):
            return {key: self.scrub(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [self.scrub(item) for item in value]
        return self.name(value) if isinstance(value, str) and _looks_like_path(value) else value

    def lineage(self, lineage: dict) -> dict:
        """A run's lineage.json as the published dir carries it."""
        models = {key: self.name(lineage[key]) for key in MODEL_KEYS if key in lineage}
        return self.scrub({**lineage, **models, "data": data_files(lineage.get("data", []))})

    def recipe_text(self, text: str) -> str:
        """The resolved recipe with its paths renamed (and its header naming its source so)."""
        first, _, rest = text.partition("\n")
        header = ""
        if first.startswith(SOURCE_HEADER):
            header = f"{SOURCE_HEADER}{self.name(first.removeprefix(SOURCE_HEADER).strip())}\n"
            text = rest
        data = yaml.safe_load(text) if text.strip() else None
        if not isinstance(data, dict):
            return header + text
        note = "# Published copy: paths are relative to the project; one outside it is a name.\n"
        body = yaml.safe_dump(self.scrub(data), sort_keys=False, allow_unicode=True)
        return header + note + body

    def command(self, command: str | None) -> str | None:
        """A shell command with each path argument (`PATH` or `--flag=PATH`) renamed."""
        if not command:
            return command
        words = []
        for word in shlex.split(command):
            flag, equals, value = word.partition("=")
            if equals and flag.startswith("--"):
                words.append(f"{flag}={self.name(value)}")
            else:
                words.append(self.name(word))
        return shlex.join(words)


def _absolute(value: str) -> bool:
    return os.path.isabs(value) or value.startswith("~")


def _looks_like_path(value: str) -> bool:
    if "\n" in value or not _absolute(value):
        return False
    path = Path(value).expanduser()
    if len(path.parts) < 2:  # "/" itself (a token in a vocabulary, say)
        return False
    try:
        on_disk = path.exists()
    except OSError:  # a name too long to be a path
        return False
    return on_disk or (len(path.parts) > 2 and not any(c.isspace() for c in value))


def data_files(entries: list[dict]) -> list[dict]:
    """Lineage data entries with each local file named by its basename and sha256."""
    named = []
    for entry in entries:
        if entry.get("path"):
            rest = {k: v for k, v in entry.items() if k not in ("path", "sha256")}
            named.append({"file": Path(entry["path"]).name, "sha256": entry.get("sha256"), **rest})
        else:
            named.append(entry)
    return named
