"""`still publish RUN --out DIR`: ship a run as a model others can run.

Reads top to bottom: check the targets (dir, hub repo) → merge the adapter into its base
reloaded in fp32 and check the logits did not move → GGUF files from the fp32 weights, each
loaded back and compared → cast to `dtype` (bf16 by default) and save safetensors, tokenizer,
chat template, generation config → re-score the recipe's eval tasks on the saved weights (and
the base / teacher for comparison) → lineage.json, the recipe and the model card, which name
what the model came from without an absolute path (`publish.portable`) → rename the staging
dir into place → upload (or show what would be uploaded).

Everything is built in a staging dir beside `--out` and renamed at the end, so a failure at
any step leaves no half-written output and nothing on the hub.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from eval.llama_cpp import runtime_version
from publish import hub as hub_client
from publish.card import build_card
from publish.gguf_files import KQuantSource, check_types, write_gguf
from publish.gguf_table import measure_files, score_files
from publish.lineage import base_of, license_of, local_parents, published_lineage
from publish.merge import DTYPES, check_texts, merged_model, refuse_existing_out, save_model
from publish.portable import Project
from publish.quantize import LLAMA_CPP_TYPES
from publish.samples import FALLBACK, Samples, calibration_texts, run_samples
from still import models
from still.errors import StillError
from still.fsutil import atomic_write_json, file_sha256, staged_dir
from still.rundir import LINEAGE, RunDir

QUICK_LIMIT = 32  # rows per task under --quick
TABLE_TEXTS = 32  # held-out examples behind the GGUF table's perplexity
WEIGHT_SUFFIXES = (".safetensors", ".gguf")  # the files whose sha256 lineage.json records


@dataclass
class Publication:
    """What a publish produced; the card and lineage are written from it."""

    run_dir: Path
    out: Path
    lineage: dict
    recipe: dict
    recipe_text: str
    samples: Samples = FALLBACK  # the run's own texts: merge/GGUF checks, the card's example
    dtype: str = "bf16"  # of the published safetensors (a key of merge.DTYPES)
    project: Project | None = None  # how paths are named in the card and lineage
    merge: dict = field(default_factory=dict)
    evals: list[dict] = field(default_factory=list)
    comparisons: dict[str, list[dict]] = field(default_factory=dict)
    eval_limit: int | None = None
    gguf: list[dict] = field(default_factory=list)
    gguf_fp32: dict = field(default_factory=dict)  # the fp32 row of the GGUF table
    command: str | None = None
    hub: str | None = None
    tasks: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.project = self.project or Project.of_run(self.run_dir)


def publish(
    run: str | Path,
    out: str | Path,
    *,
    gguf_types: list[str] | tuple[str, ...] = (),
    dtype: str = "bf16",
    hub: str | None = None,
    force: bool = False,
    replace_out: bool = False,
    quick: bool = False,
    evaluate: bool = True,
    compare: bool = True,
    dry_run: bool = False,
    private: bool = False,
    tasks: list[str] | tuple[str, ...] = (),
    command: str | None = None,
) -> Path:
    """Publish run dir `run` into `out` (and to hub repo `hub`). Returns `out`.

    The merged model is scored on `tasks` (task YAMLs), else on the recipe's `eval_tasks`.
    Its safetensors are `dtype` (bf16, fp16, fp32); the merge check and GGUF use fp32.
    `force` replaces `out` and uploads over an existing hub repo; `replace_out` (a pipeline
    stage re-publishing into its own dir) replaces `out` only.
    """
    source, out = _finished_run(Path(run)), Path(out)
    check_types(gguf_types, None)
    if dtype not in DTYPES:
        raise StillError(f"unknown dtype '{dtype}'", hint=f"choose from {', '.join(DTYPES)}")
    refuse_existing_out(out, force or replace_out)
    if dry_run and not hub:
        raise StillError("--dry-run shows a hub upload; it needs --hub ORG/NAME")
    api = None
    if hub and not dry_run:
        api = hub_client.hub_api()
        hub_client.refuse_existing_repo(api, hub, force)

    recipe = source.recipe_data()
    result = Publication(
        source.path,
        out,
        source.read_lineage(),
        recipe,
        source.recipe_text(),
        dtype=dtype,
        command=command,
        hub=hub,
    )
    result.eval_limit = QUICK_LIMIT if quick else None
    result.tasks = [str(task) for task in tasks or recipe.get("eval_tasks") or []]
    if evaluate:
        _check_tasks(result.tasks)
    result.samples = run_samples(source)
    # an empty dir already there passed refuse_existing_out and is replaced, as with --force
    with staged_dir(out, replace=force or replace_out or out.exists()) as staging:
        published = _build(result, staging, gguf_types, evaluate=evaluate, compare=compare)
    print(f"still: published {source.path} to {out}")
    from still.tracking import log_published_model

    # a W&B `model` artifact in the source run's project and group, when that run was tracked
    # the artifact carries the portable lineage; its links to the parents use their local dirs
    log_published_model(out, published, source_run_dir=source.path, parents=local_parents(result))
    if hub:
        hub_client.upload(api, hub, out, dry_run=dry_run, private=private)
    return out


def _build(
    result: Publication, staging: Path, gguf_types, *, evaluate: bool, compare: bool
) -> dict:
    """Everything that goes into the published dir, written into `staging`; its lineage."""
    model, tokenizer, result.merge = merged_model(result.run_dir, result.samples)
    # GGUF from the fp32 weights, so before the cast; and before the evals: an architecture
    # the export refuses fails in seconds, not minutes.
    k_quants = KQuantSource(
        model,
        tokenizer,
        staging,
        name=result.out.name,
        license=license_of(result.lineage),
        calibration=(
            calibration_texts(RunDir(result.run_dir))
            if any(t in LLAMA_CPP_TYPES for t in gguf_types)
            else []
        ),
    )
    with k_quants:  # one f32 source and importance matrix for every k-quant type
        for gguf_type in gguf_types:
            result.gguf.append(_write_gguf(model, tokenizer, staging, gguf_type, result, k_quants))
    if result.gguf and runtime_version() is not None:  # the on-device table, from fp32 too
        held_out = list(run_samples(RunDir(result.run_dir), count=TABLE_TEXTS).texts)
        result.gguf_fp32 = measure_files(model, tokenizer, staging, result.gguf, held_out)
    save_model(model, tokenizer, staging, name=result.out.name, dtype=result.dtype)
    del model
    if evaluate and result.tasks:
        _run_evals(result, staging, compare=compare)
        if result.gguf_fp32:
            result.gguf_fp32["tasks"] = score_files(
                result.gguf, staging, result.tasks, result.eval_limit, result.evals
            )
            if result.dtype != "fp32":  # the tasks scored the published safetensors
                result.gguf_fp32["type"] = f"fp32 (tasks: the {result.dtype} safetensors)"
    elif evaluate:
        print(
            "still: no eval tasks in the run's recipe: the card will have no scores "
            "(add --task T.yaml)"
        )
    files = {
        str(path.relative_to(staging)): file_sha256(path)
        for path in sorted(staging.rglob("*"))
        if path.is_file() and path.suffix in WEIGHT_SUFFIXES
    }
    lineage = published_lineage(result, files)
    atomic_write_json(staging / LINEAGE, lineage)
    (staging / "recipe.yaml").write_text(
        result.project.recipe_text(result.recipe_text), encoding="utf-8"
    )
    build_card(result).save(staging / "README.md")
    return lineage


# --------------------------------------------------------------------------- inputs
def _finished_run(path: Path) -> RunDir:
    """The run dir, refused unless `still run` wrote it and it saved a model."""
    run = RunDir(path)
    if not run.path.is_dir():
        raise StillError(f"run dir not found: {run.path}")
    if not run.is_run_dir():
        raise StillError(
            f"{run.path} is not a still run dir "
            f"(no {run.lineage_file.name} / {run.recipe_file.name})",
            hint="publish takes the dir a `still run` wrote, e.g. runs/pydocs-student",
        )
    if run.saved_model() is None:
        raise StillError(
            f"run dir {run.path} holds no finished model "
            f"(no {run.model_dir.name}/ or {run.adapter_dir.name}/)",
            hint="the run may have stopped early: resume it with `still run RECIPE --resume`",
        )
    return run


def _check_tasks(tasks: list[str]) -> None:
    """Every task YAML loads (file, keys, data) before any model is loaded."""
    from eval.lm_eval_tasks import is_lm_eval_task
    from eval.tasks import load_task

    for task in tasks:
        if is_lm_eval_task(task):
            continue  # lm-eval's task: built, and its data loaded, by the eval that scores it
        if not Path(task).is_file():
            raise StillError(
                f"eval task {task} not found", hint="pass --task T.yaml, or --no-eval to skip"
            )
        load_task(task)


# --------------------------------------------------------------------------- GGUF
def _write_gguf(
    model, tokenizer, staging: Path, gguf_type: str, result: Publication, k_quants: KQuantSource
) -> dict:
    name = result.out.name
    path = staging / f"{name}-{gguf_type}.gguf"
    report = write_gguf(
        model,
        tokenizer,
        path,
        gguf_type,
        name=name,
        license=license_of(result.lineage),
        texts=check_texts(tokenizer, result.samples),
        k_quants=k_quants,
        check_tokenizer=not result.gguf,  # the tokenizer is the same in every file: once
    )
    exact = report["exact_max_abs_diff"]
    print(
        f"still: {path.name}: "
        + (f"loads back exactly (Δ {exact:.2g}); " if exact is not None else "loads back; ")
        + f"vs fp32: rms Δlogit {report['rms_relative_diff']:.3g} of std (tolerance "
        f"{report['tolerance']}), top-1 agreement {report['top1_agreement']:.1%}"
    )
    if "llama_cpp" in report:
        runtime = report["llama_cpp"]
        print(
            f"still: {path.name} in llama.cpp: mean KL {runtime['mean_kl']:.3g} per token, "
            f"top-1 agreement {runtime['top1_agreement']:.1%}, greedy tokens agree "
            f"{runtime['greedy_agreement']:.0%}"
        )
    return report


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
    references = (("base", base_of(result.lineage)), ("teacher", result.lineage.get("teacher")))
    for role, ref in references:
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
