"""`still publish RUN --out DIR`: ship a run as a model others can run.

Reads top to bottom: check the targets (dir, hub repo) → merge the adapter into its base
reloaded in fp32 and check the logits did not move → save safetensors, tokenizer, chat
template, generation config → re-score the recipe's eval tasks on the merged model (and the
base / teacher for comparison) → GGUF files, each loaded back and compared → lineage.json and
the model card → rename the staging dir into place → upload (or show what would be uploaded).

Everything is built in a temp dir beside `--out` and renamed at the end, so a failure at any
step leaves no half-written output and nothing on the hub.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from still import __version__, models
from still.errors import StillError
from still.rundir import LINEAGE, RESOLVED_RECIPE, file_sha256

QUICK_LIMIT = 32  # rows per task under --quick
# fp32 adapter model vs fp32 merged model: max |Δ logit| / max(1, max |logit|). Only the order
# of float operations differs (W·x + B·A·x vs (W + B·A)·x).
MERGE_TOLERANCE = 1e-4
# Texts the merge and GGUF checks run on, besides a chat-formatted question.
CHECK_TEXTS = [
    "What does json.dumps do? Serialize obj to a JSON formatted str.",
    "def mean(values):\n    return sum(values) / len(values)  # 12345",
]
# Hub ids of the built-ins, for the card's `base_model` (a local path is no use to the hub).
BUILTIN_HUB_IDS = {
    "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "gemma-3-270m": "google/gemma-3-270m",
}


@dataclass
class Publication:
    """What a publish produced; the card and lineage are written from it."""

    run_dir: Path
    out: Path
    lineage: dict
    recipe: dict
    recipe_text: str
    merge: dict = field(default_factory=dict)
    evals: list[dict] = field(default_factory=list)
    comparisons: dict[str, list[dict]] = field(default_factory=dict)
    eval_limit: int | None = None
    gguf: list[dict] = field(default_factory=list)
    command: str | None = None
    hub: str | None = None
    tasks: list[str] = field(default_factory=list)


def publish(
    run: str | Path,
    out: str | Path,
    *,
    gguf_types: list[str] | tuple[str, ...] = (),
    hub: str | None = None,
    force: bool = False,
    quick: bool = False,
    evaluate: bool = True,
    compare: bool = True,
    dry_run: bool = False,
    private: bool = False,
    tasks: list[str] | tuple[str, ...] = (),
    command: str | None = None,
    api=None,
) -> Path:
    """Publish run dir `run` into `out` (and to hub repo `hub`). Returns `out`.

    The merged model is scored on `tasks` (task YAMLs), else on the recipe's `eval_tasks`.
    """
    from still.gguf_export import GGUF_TYPES

    run_dir, out = Path(run), Path(out)
    lineage, recipe_text = _read_run_dir(run_dir)
    unknown = [t for t in gguf_types if t not in GGUF_TYPES]
    if unknown:
        raise StillError(f"unknown GGUF type '{unknown[0]}'", hint=f"choose from {', '.join(GGUF_TYPES)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise StillError(f"output dir {out} already exists", hint="add --force to replace it")
    if dry_run and not hub:
        raise StillError("--dry-run shows a hub upload; it needs --hub ORG/NAME")
    if hub and not dry_run:
        api = api or _hub_api()
        _refuse_existing_repo(api, hub, force)

    recipe = yaml.safe_load(recipe_text) or {}
    result = Publication(run_dir, out, lineage, recipe, recipe_text, command=command, hub=hub)
    result.eval_limit = QUICK_LIMIT if quick else None
    result.tasks = [str(task) for task in tasks] or [str(task) for task in recipe.get("eval_tasks") or []]
    if evaluate:
        _check_tasks(result.tasks)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        _build(result, staging, gguf_types, evaluate=evaluate, compare=compare)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"still: published {run_dir} to {out}")
    from still.tracking import log_published_model

    # a W&B `model` artifact in the source run's project and group, when that run was tracked
    log_published_model(out, json.loads((out / "lineage.json").read_text()), source_run_dir=run_dir)
    if hub:
        _upload(api, hub, out, dry_run=dry_run, private=private)
    return out


def _build(result: Publication, staging: Path, gguf_types, *, evaluate: bool, compare: bool) -> None:
    """Everything that goes into the published dir, written into `staging`."""
    from still.card import build_card

    model, tokenizer, result.merge = merged_model(result.run_dir)
    save_model(model, tokenizer, staging, name=result.out.name)
    # GGUF before the evals: an architecture the export refuses fails in seconds, not minutes.
    for gguf_type in gguf_types:
        result.gguf.append(_write_gguf(model, tokenizer, staging, result.out.name, gguf_type, result))
    del model
    if evaluate and result.tasks:
        _run_evals(result, staging, compare=compare)
    elif evaluate:
        print("still: no eval tasks in the run's recipe: the card will have no scores (add --task T.yaml)")
    _write_lineage(result, staging)
    (staging / "recipe.yaml").write_text(result.recipe_text)
    build_card(result).save(staging / "README.md")


def _check_tasks(tasks: list[str]) -> None:
    """Every task YAML loads (file, keys, data) before any model is loaded."""
    from eval.tasks import load_task

    for task in tasks:
        if not Path(task).is_file():
            raise StillError(f"eval task {task} not found", hint="pass --task T.yaml, or --no-eval to skip")
        load_task(task)


# --------------------------------------------------------------------------- inputs
def _read_run_dir(run_dir: Path) -> tuple[dict, str]:
    if not run_dir.is_dir():
        raise StillError(f"run dir not found: {run_dir}")
    if not (run_dir / LINEAGE).exists() or not (run_dir / RESOLVED_RECIPE).exists():
        raise StillError(
            f"{run_dir} is not a still run dir (no {LINEAGE} / {RESOLVED_RECIPE})",
            hint="publish takes the dir a `still run` wrote, e.g. runs/pydocs-student",
        )
    if not (run_dir / "model").is_dir() and not (run_dir / "adapter").is_dir():
        raise StillError(
            f"run dir {run_dir} holds no finished model (no model/ or adapter/)",
            hint="the run may have stopped early: resume it with `still run RECIPE --resume`",
        )
    return json.loads((run_dir / LINEAGE).read_text()), (run_dir / RESOLVED_RECIPE).read_text()


def check_texts(tokenizer) -> list[str]:
    texts = list(CHECK_TEXTS)
    if getattr(tokenizer, "chat_template", None):
        chat = [{"role": "user", "content": "What does os.path.join do?"}]
        texts.append(tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
    return texts


# --------------------------------------------------------------------------- merge + save
def merged_model(run_dir: Path):
    """(model, tokenizer, report): the run's model in fp32, its adapter merged and checked."""
    import torch

    resolved = models.resolve(str(run_dir))
    # fp32 and no quantization_config: a QLoRA adapter is merged into the full-precision base,
    # never into the 4-bit weights it was trained against.
    model, tokenizer = models.load_model(str(run_dir), dtype="float32")
    model.eval()
    if resolved.adapter is None:
        return model, tokenizer, {"merged": False, "source": "model/ (full weights)"}
    samples = [torch.tensor([tokenizer(text)["input_ids"]]) for text in check_texts(tokenizer)]
    with torch.inference_mode():
        before = [model(input_ids=ids).logits.float() for ids in samples]
    merged = model.merge_and_unload()
    merged.eval()
    with torch.inference_mode():
        after = [merged(input_ids=ids).logits.float() for ids in samples]
    diff = max((a - b).abs().max().item() for a, b in zip(before, after))
    scale = max(1.0, max(a.abs().max().item() for a in before))
    report = {
        "merged": True,
        "source": "adapter/ merged into the fp32 base",
        "base_weights": resolved.weights,
        "max_abs_logit_diff": diff,
        "tolerance": MERGE_TOLERANCE * scale,
        "tokens": sum(ids.shape[1] for ids in samples),
    }
    if diff > MERGE_TOLERANCE * scale:
        raise StillError(
            f"the merged model's logits differ from the adapter model's by {diff:.3g} "
            f"(tolerance {MERGE_TOLERANCE * scale:.3g})",
            hint="the adapter may use a layer type PEFT cannot merge exactly",
        )
    return merged, tokenizer, report


def save_model(model, tokenizer, target: Path, *, name: str) -> None:
    """Safetensors weights, config, generation config, tokenizer and chat template."""
    from transformers import GenerationConfig

    model.config.name_or_path = name
    generation = getattr(model, "generation_config", None) or GenerationConfig()
    if generation.eos_token_id is None and tokenizer.eos_token_id is not None:
        generation.eos_token_id = tokenizer.eos_token_id
    if generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if generation.bos_token_id is None:
        generation.bos_token_id = tokenizer.bos_token_id
    model.generation_config = generation
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)


# --------------------------------------------------------------------------- eval
def _run_evals(result: Publication, staging: Path, *, compare: bool) -> None:
    """The recipe's eval tasks on the merged model; base and teacher on the same rows."""
    from eval.run import evaluate_model

    tasks = result.tasks
    result.evals = evaluate_model(
        str(staging), tasks, out_dir=staging / "eval", limit=result.eval_limit, name=result.out.name
    )
    if not compare:
        return
    for role, ref in (("base", base_of(result.lineage)), ("teacher", result.lineage.get("teacher"))):
        if ref and _resolvable(ref):
            result.comparisons[role] = evaluate_model(
                ref, tasks, out_dir=staging / "eval" / role, limit=result.eval_limit, name=role
            )


def _resolvable(ref: str) -> bool:
    try:
        models.resolve(ref)
    except StillError as exc:
        print(f"still: not comparing against {ref}: {exc}")
        return False
    return True


def _write_gguf(model, tokenizer, staging: Path, name: str, gguf_type: str, result: Publication) -> dict:
    from still.gguf_export import check_config, export_gguf, verify_gguf

    path = staging / f"{name}-{gguf_type}.gguf"
    export_gguf(model, tokenizer, path, gguf_type, name=name, license=license_of(result.lineage))
    check_config(path, model.config)
    # The tokenizer is the same in every file: compare it once.
    report = verify_gguf(path, model, tokenizer, gguf_type, check_texts(tokenizer), check_tokenizer=not result.gguf)
    report.update(file=path.name, bytes=path.stat().st_size)
    print(
        f"still: {path.name}: loads back exactly (Δ {report['exact_max_abs_diff']:.2g}); vs fp32: "
        f"rms Δlogit {report['rms_relative_diff']:.3g} of std (tolerance {report['tolerance']}), "
        f"top-1 agreement {report['top1_agreement']:.1%}"
    )
    return report


# --------------------------------------------------------------------------- lineage
def base_of(lineage: dict) -> str | None:
    """The pretrained model at the root: the run's base, or its teacher's base."""
    if lineage.get("base"):
        return _root_base(lineage["base"])
    teacher = lineage.get("teacher")
    if teacher and (Path(teacher) / LINEAGE).exists():
        return base_of(json.loads((Path(teacher) / LINEAGE).read_text()))
    return lineage.get("student") or teacher


def _root_base(ref: str) -> str:
    path = Path(ref)
    if (path / LINEAGE).exists():  # a base that is itself a run: follow it
        return base_of(json.loads((path / LINEAGE).read_text())) or ref
    return ref


def license_of(lineage: dict) -> str | None:
    """The base model's license: a built-in's, or the one in a local/cached model card."""
    base = base_of(lineage)
    if not base:
        return None
    if base.startswith("builtin:"):
        builtin = models.BUILTINS.get(base.removeprefix("builtin:"))
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
    if not ref:
        return None
    if ref.startswith("builtin:"):
        return BUILTIN_HUB_IDS.get(ref.removeprefix("builtin:"))
    return None if Path(ref).exists() or ref.count("/") != 1 else ref


def lineage_chain(result: Publication) -> list[dict]:
    """base → (teacher →) student or fine-tune → published."""
    lineage = result.lineage
    chain = [{"role": "base", "ref": base_of(lineage), "hub_id": hub_id_of(base_of(lineage))}]
    if lineage.get("teacher"):
        teacher = Path(lineage["teacher"])
        teacher_lineage = json.loads((teacher / LINEAGE).read_text()) if (teacher / LINEAGE).exists() else {}
        chain.append(
            {"role": "teacher", "ref": lineage["teacher"], "kind": teacher_lineage.get("kind"),
             "method": teacher_lineage.get("method")}
        )
    chain.append(
        {"role": "student" if lineage.get("kind") == "distill" else "fine-tuned",
         "ref": str(result.run_dir.resolve()), "kind": lineage.get("kind"), "name": lineage.get("name"),
         "method": lineage.get("method"), "carved": lineage.get("carved")}
    )
    chain.append(
        {"role": "published", "ref": str(result.out.resolve()), "merged": result.merge.get("merged"),
         "gguf": [g["file"] for g in result.gguf]}
    )
    return chain


def _write_lineage(result: Publication, staging: Path) -> None:
    files = {
        str(path.relative_to(staging)): file_sha256(path)
        for path in sorted(staging.rglob("*"))
        if path.is_file() and path.suffix in (".safetensors", ".gguf")
    }
    lineage = {
        "kind": "published",
        "name": result.out.name,
        "chain": lineage_chain(result),
        "base": base_of(result.lineage),
        "teacher": result.lineage.get("teacher"),
        "source_run": str(result.run_dir.resolve()),
        "source_lineage": result.lineage,
        "data": result.lineage.get("data", []),
        "merge": result.merge,
        "eval_limit": result.eval_limit,
        "gguf": result.gguf,
        "files": files,
        "license": license_of(result.lineage),
        "command": result.command,
        "still_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    (staging / LINEAGE).write_text(json.dumps(lineage, indent=2, default=str))


# --------------------------------------------------------------------------- hub
def hub_token() -> str | None:
    """The token comes from the environment only (HF_TOKEN), never from a flag or a file."""
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")


def _hub_api():
    from huggingface_hub import HfApi

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        raise StillError("--hub needs the network but HF_HUB_OFFLINE is set", hint="unset it, or use --dry-run")
    token = hub_token()
    if not token:
        raise StillError("--hub needs a token in the environment", hint="export HF_TOKEN=hf_... (write access)")
    return HfApi(token=token)


def _refuse_existing_repo(api, repo_id: str, force: bool) -> None:
    try:
        exists = api.repo_exists(repo_id)
        files = [f for f in api.list_repo_files(repo_id) if f != ".gitattributes"] if exists else []
    except Exception as exc:  # network, auth: the hub's own message says which
        raise StillError(f"cannot reach hub repo {repo_id}: {str(exc).splitlines()[0]}") from None
    if files and not force:
        raise StillError(
            f"hub repo {repo_id} already has files ({len(files)}, e.g. {files[0]})",
            hint="add --force to upload a new revision over them",
        )


def upload_plan(folder: Path) -> list[tuple[str, int]]:
    return [(str(p.relative_to(folder)), p.stat().st_size) for p in sorted(folder.rglob("*")) if p.is_file()]


def _upload(api, repo_id: str, folder: Path, *, dry_run: bool, private: bool) -> None:
    plan = upload_plan(folder)
    total = sum(size for _, size in plan)
    if dry_run:
        print(f"still: dry run: would create {'private ' if private else ''}repo {repo_id} and upload "
              f"{len(plan)} files ({total / 1e6:.1f} MB) from {folder}:")
        for name, size in plan:
            print(f"  {name:48} {size / 1e6:10.3f} MB")
        print(f"  token: {'HF_TOKEN is set' if hub_token() else 'no HF_TOKEN in the environment (needed for the real upload)'}")
        return
    try:
        api.create_repo(repo_id, repo_type="model", exist_ok=True, private=private)
        commit = api.upload_folder(
            folder_path=str(folder), repo_id=repo_id, repo_type="model",
            commit_message=f"still publish {folder.name}",
        )
    except Exception as exc:
        raise StillError(f"upload to {repo_id} failed: {str(exc).splitlines()[0]}",
                         hint=f"the local copy in {folder} is complete; rerun with --force") from None
    print(f"still: uploaded {len(plan)} files to {getattr(commit, 'commit_url', None) or repo_id}")
