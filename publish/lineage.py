"""Where a published model came from: the walk back to its base, its license, its hub id,
and the published dir's own lineage record.

A run's lineage names its base (a fine-tune), or its teacher (a distilled student, whose
teacher may itself be a run with a base). The walk follows those links through run dirs
until it reaches a model that is not a run, so the card names the pretrained model at the
root and carries that model's license.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from publish.portable import data_files
from still import __version__
from still.builtins import BUILTINS
from still.rundir import RunDir

# Hub ids of the built-ins, for the card's `base_model` (a local path is no use to the hub).
BUILTIN_HUB_IDS = {
    "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "gemma-3-270m": "google/gemma-3-270m",
}


def _lineage_at(ref: str) -> dict | None:
    """The lineage of `ref` when it is a dir some `still` step wrote, else None."""
    run = RunDir(ref)
    return run.read_lineage() if run.lineage_file.is_file() else None


def base_of(lineage: dict) -> str | None:
    """The pretrained model at the root: the run's base, or its teacher's base."""
    if lineage.get("base"):
        return _root_base(lineage["base"])
    teacher = lineage.get("teacher")
    teacher_lineage = _lineage_at(teacher) if teacher else None
    if teacher_lineage is not None:
        return base_of(teacher_lineage)
    return lineage.get("student") or teacher


def _root_base(ref: str) -> str:
    base_lineage = _lineage_at(ref)
    if base_lineage is not None:  # a base that is itself a run: follow it
        return base_of(base_lineage) or ref
    return ref


def license_of(lineage: dict) -> str | None:
    """The base model's license: a built-in's, or the one in a local/cached model card."""
    base = base_of(lineage)
    if not base:
        return None
    if base.startswith("builtin:"):
        builtin = BUILTINS.get(base.removeprefix("builtin:"))
        return builtin.license if builtin else None
    card_path = Path(base) / "README.md"
    if not card_path.exists() and not Path(base).exists():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(base, "README.md")
        card_path = Path(cached) if isinstance(cached, str) else card_path
    if card_path.exists():
        from huggingface_hub import ModelCard

        return ModelCard.load(card_path).data.to_dict().get("license")
    return None


def hub_id_of(ref: str | None) -> str | None:
    """`ref` as a hub id (a built-in's, or an `org/name` that is not a local path), else None."""
    if not ref:
        return None
    if ref.startswith("builtin:"):
        return BUILTIN_HUB_IDS.get(ref.removeprefix("builtin:"))
    return None if Path(ref).exists() or ref.count("/") != 1 else ref


def lineage_chain(result) -> list[dict]:
    """base → (teacher →) student or fine-tune → published, for a `flow.Publication`, each
    named as the published dir names it (`publish.portable`)."""
    lineage, name = result.lineage, result.project.name
    base = base_of(lineage)
    chain = [{"role": "base", "ref": name(base), "hub_id": hub_id_of(base)}]
    if lineage.get("teacher"):
        teacher_lineage = _lineage_at(lineage["teacher"]) or {}
        chain.append(
            {
                "role": "teacher",
                "ref": name(lineage["teacher"]),
                "kind": teacher_lineage.get("kind"),
                "method": teacher_lineage.get("method"),
            }
        )
    chain.append(
        {
            "role": "student" if lineage.get("kind") == "distill" else "fine-tuned",
            "ref": name(str(result.run_dir.resolve())),
            "kind": lineage.get("kind"),
            "name": lineage.get("name"),
            "method": lineage.get("method"),
            "carved": lineage.get("carved"),
        }
    )
    chain.append(
        {
            "role": "published",
            "ref": name(str(result.out.resolve())),
            "merged": result.merge.get("merged"),
            "gguf": [g["file"] for g in result.gguf],
        }
    )
    return chain


def published_lineage(result, files: dict[str, str]) -> dict:
    """The published dir's lineage.json: the chain, the source run's own lineage, every check
    and the sha256 of each weight file (`files`: relative path → sha256). No absolute path:
    models and runs are named as `publish.portable` says, data files by basename and sha256."""
    project = result.project
    return project.scrub(
        {
            "kind": "published",
            "name": result.out.name,
            "chain": lineage_chain(result),
            "base": project.name(base_of(result.lineage)),
            "teacher": project.name(result.lineage.get("teacher")),
            "source_run": project.name(str(result.run_dir.resolve())),
            "source_lineage": project.lineage(result.lineage),
            "data": data_files(result.lineage.get("data", [])),
            "dtype": result.dtype,
            "merge": result.merge,
            "eval_limit": result.eval_limit,
            "gguf": result.gguf,
            "gguf_fp32_reference": result.gguf_fp32 or None,
            "files": files,
            "license": license_of(result.lineage),
            "command": project.command(result.command),
            "still_version": __version__,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
    )


def local_parents(result) -> dict:
    """The parents as paths on this machine, for what stays on it (the W&B artifact links)."""
    return {
        "base": base_of(result.lineage),
        "teacher": result.lineage.get("teacher"),
        "student": result.lineage.get("student"),
        "source_run": str(result.run_dir.resolve()),
    }
