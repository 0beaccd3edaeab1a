"""Where models meet tasks: `still eval`, eval recipes, and the eval at the end of a training run.

Each model is loaded once (fp32, adapters unmerged) and scored on every task; results go to
the model's run dir (`runs/<name>/eval/`) when the model is a run dir, otherwise under the
eval run's dir, one folder per model. Results are cached by the model's content hash, so
re-scoring an unchanged checkpoint is free.
"""

from __future__ import annotations

import gc
from pathlib import Path

from eval import llama_cpp, lm_eval_tasks
from eval.checks import check_count, check_eval_recipe, check_tasks, display_name, model_among
from eval.harness import (
    HARNESS_VERSION,
    cache_entry_for,
    evaluate,
    is_cached,
    reuse_cached,
    store_results,
)
from eval.lm_eval_tasks import LmEvalTask
from still import builtins, models, tracking, wandb_logs
from still.errors import StillError
from still.model_files import check_gguf
from still.rundir import RunDir


def is_run_dir(ref: str) -> bool:
    return RunDir(Path(ref).expanduser()).is_run_dir()


def eval_cache_dir() -> Path:
    return builtins.cache_dir() / "eval"


# How a model is scored: `auto` scores a .gguf file through llama.cpp (as it ships) and
# everything else with transformers; `transformers` scores a .gguf file's weights dequantized.
BACKENDS = ("auto", "llama.cpp", "transformers")


def uses_llama_cpp(ref: str, backend: str = "auto") -> bool:
    gguf_file = str(ref).endswith(".gguf")
    if backend == "llama.cpp" and not gguf_file:
        raise StillError(
            f"--backend llama.cpp scores GGUF files; '{ref}' is not a .gguf file",
            hint="publish the model with --gguf and score the file, or drop --backend",
        )
    return gguf_file and backend != "transformers"


def check_backend(refs: list[str], backend: str) -> None:
    """Before any model loads: the llama.cpp runtime is there for every GGUF file it scores."""
    if any(uses_llama_cpp(ref, backend) for ref in refs):
        llama_cpp.runtime()


def load_for_scoring(ref: str, backend: str = "auto"):
    """(model, tokenizer, content hash) as the backend scores `ref`."""
    if uses_llama_cpp(ref, backend):
        path = Path(ref).expanduser()
        if path.is_dir():
            raise StillError(f"{ref}: is a directory, not a GGUF file", hint="name the .gguf file")
        if not path.is_file():
            raise StillError(f"GGUF file not found: {ref}")
        check_gguf(path)  # size, magic, header and tensor extents: llama.cpp would abort on them
        model, tokenizer = llama_cpp.load(path)
        return model, tokenizer, llama_cpp.file_hash(path)
    model, tokenizer = models.load_model(ref, dtype="float32")
    return model, tokenizer, models.model_content_hash(model, tokenizer)


def evaluate_model(
    ref: str,
    task_paths: list[str],
    *,
    out_dir: Path,
    batch_size: int = 8,
    limit: int | None = None,
    use_cache: bool = True,
    name: str | None = None,
    backend: str = "auto",
) -> list[dict]:
    """Score one model on several tasks; returns one summary per task."""
    check_count(batch_size, "--batch-size")
    tasks = check_tasks(task_paths, limit=limit)  # every task error before the model loads
    check_backend([ref], backend)
    model, tokenizer, model_hash = load_for_scoring(ref, backend)
    name = name or display_name(ref)
    summaries = []
    for task in tasks:
        settings = {
            "batch_size": batch_size,
            "limit": limit,
            "out_dir": out_dir,
            "cache_dir": eval_cache_dir() if use_cache else None,
            "model_hash": model_hash,
            "model_name": name,
        }
        if isinstance(task, LmEvalTask):  # lm-eval's task and metrics, our model and files
            task_summaries = evaluate_lm_eval(model, tokenizer, task, **settings)
        else:
            task_summaries = [evaluate(model, tokenizer, task, **settings)]
        for summary in task_summaries:
            # into the active W&B run, if any: an eval run, or the training run this eval ends
            wandb_logs.log_eval_task(
                summary, Path(out_dir) / f"{summary['task']}.samples.jsonl", model_name=name
            )
            cached = " (cached)" if summary.get("cache_hit") else ""
            metrics = ", ".join(
                f"{k} {v['mean']:.4f} ± {v['stderr']:.4f}" for k, v in summary["metrics"].items()
            )
            print(f"still: {name} on {summary['task']}{cached}: {metrics}")
        summaries.extend(task_summaries)
    del model
    gc.collect()
    return summaries


def run_eval_recipe(
    recipe,
    *,
    force: bool = False,
    limit: int | None = None,
    batch_size: int | None = None,
    backend: str = "auto",
) -> int:
    """`still run` / `still eval` on an eval recipe: every model × every task, then compare."""
    from eval.compare import compare

    check_count(limit, "--limit")
    check_count(batch_size, "--batch-size")
    limit = limit if limit is not None else recipe.limit  # an explicit 0 is refused, not dropped
    tasks = check_eval_recipe(recipe, limit=limit)  # models, every task and row: before any load
    if recipe.cascade is not None:
        check_cascade(recipe, tasks)
    check_backend(recipe.models, backend)
    out_root = Path(recipe.output_dir) / recipe.name
    names = [display_name(ref) for ref in recipe.models]
    result_dirs = []
    for ref, name in zip(recipe.models, names):
        out_dir = out_root / name
        # One W&B eval run per model (when the recipe tracks), so runs compare side by side.
        run = tracking.start_wandb(
            recipe,
            out_root,
            job_type="eval",
            name=f"eval-{name}",
            config={"model": _model_config(ref, name)},
        )
        model_artifact = tracking.still_run_artifact(ref)
        tracking.use_artifacts(
            run, [model_artifact] if model_artifact else []
        )  # online: a lineage edge
        try:
            evaluate_model(
                ref,
                recipe.tasks,
                out_dir=out_dir,
                batch_size=batch_size if batch_size is not None else recipe.batch_size,
                limit=limit,
                use_cache=not force,
                name=name,
                backend=backend,
            )
        except BaseException:
            tracking.finish_wandb(exit_code=1)  # marked failed in W&B
            raise
        tracking.finish_wandb()
        result_dirs.append(out_dir)
    if len(result_dirs) > 1:
        # Checked above to name one of the models; compare knows them by display name.
        reference = _named(recipe.reference, recipe.models, "reference")
        teacher = _named(recipe.teacher, recipe.models, "teacher")
        compare(result_dirs, reference=reference, teacher=teacher, out_dir=out_root)
        if tracking.start_wandb(recipe, out_root, job_type="compare", name=recipe.name) is not None:
            wandb_logs.log_comparison(out_root)
            tracking.finish_wandb()
    if recipe.cascade is not None:
        by_ref = dict(zip(recipe.models, result_dirs))
        cascade_report(recipe, tasks, {ref: by_ref[ref] for ref in cascade_models(recipe)})
    return 0


def cascade_models(recipe) -> tuple[str, str]:
    """(student, teacher) of an eval recipe's `cascade:` section, each one of its models."""
    settings = recipe.cascade
    student = model_among(settings.student, recipe.models, "cascade.student", at="cascade.student")
    teacher = model_among(settings.teacher, recipe.models, "cascade.teacher", at="cascade.teacher")
    if display_name(student) == display_name(teacher):
        raise StillError(
            f"cascade: the student and the teacher are the same model ({student})",
            hint="a cascade defers from a small model to a different, stronger one",
        )
    return student, teacher


def check_cascade(recipe, tasks) -> None:
    """Before any model loads: the cascade's models, and every task gives the signals asked."""
    from eval.cascade import signals_for

    cascade_models(recipe)
    for task in tasks:
        if isinstance(task, LmEvalTask):
            raise StillError(
                f"cascade: {task.ref} is an lm-eval task; a cascade reads our task YAMLs' "
                "per-answer signals",
                hint="list task YAMLs of type generate or multiple_choice in tasks",
            )
        signals_for(task.type, recipe.cascade.signals, task.name)


def _absolute_ref(ref: str) -> str:
    """A model reference that still names the model from another directory (`still serve`)."""
    path = Path(ref).expanduser()
    return str(path.resolve()) if path.exists() else ref


def run_cascade(recipe, *, force: bool = False, limit: int | None = None) -> int:
    """`still cascade R.yaml`: score the cascade's student and teacher on the recipe's tasks
    (from the cache when unchanged) and write the cascade report."""
    if recipe.cascade is None:
        raise StillError(
            f"recipe {recipe.name} has no cascade: section",
            hint="add cascade: {student: ..., teacher: ..., target_quality: 0.95}",
        )
    check_count(limit, "--limit")
    limit = limit if limit is not None else recipe.limit
    tasks = check_eval_recipe(recipe, limit=limit)
    check_cascade(recipe, tasks)
    out_root = Path(recipe.output_dir) / recipe.name
    result_dirs = {}
    for ref in cascade_models(recipe):
        result_dirs[ref] = out_root / display_name(ref)
        evaluate_model(
            ref,
            recipe.tasks,
            out_dir=result_dirs[ref],
            batch_size=recipe.batch_size,
            limit=limit,
            use_cache=not force,
            name=display_name(ref),
        )
    cascade_report(recipe, tasks, result_dirs)
    return 0


def cascade_report(recipe, tasks, result_dirs: dict) -> dict:
    """Analyse the scored student and teacher on every task; write out_root/cascade/."""
    from eval.cascade import analyse_task
    from eval.cascade_report import write_report

    student, teacher = cascade_models(recipe)
    analysed = [
        analyse_task(
            result_dirs[student], result_dirs[teacher], task.name, task.type, recipe.cascade
        )
        for task in tasks
    ]
    out_dir = Path(recipe.output_dir) / recipe.name / "cascade"
    serve = {
        "student": _absolute_ref(student),
        "teacher": _absolute_ref(teacher),
        "generation": {
            task.name: {
                "max_new_tokens": task.generation.max_new_tokens,
                "stop": list(task.generation.stop),
            }
            for task in tasks
            if task.type == "generate"
        },
    }
    report = write_report(out_dir, display_name(student), display_name(teacher), analysed, serve)
    for task in report["tasks"]:
        chosen = task["signals"][task["winner"]]["test"]
        low, high = chosen["deferral"]["ci"]
        share = chosen["share_of_teacher"]["value"]
        print(
            f"still: cascade on {task['task']}: {task['winner']} defers "
            f"{chosen['deferral']['value']:.1%} [{low:.1%}, {high:.1%}] of test questions for "
            f"{chosen['quality']['value']:.3f} {task['metric']} "
            f"({'—' if share is None else f'{share:.1%}'} of the teacher's)"
        )
    print(f"still: cascade report in {out_dir}")
    if tracking.start_wandb(recipe, out_dir, job_type="cascade", name=f"{recipe.name}-cascade"):
        wandb_logs.log_cascade(out_dir)
        tracking.finish_wandb()
    return report


def _named(wanted: str | None, refs: list[str], role: str) -> str | None:
    return display_name(model_among(wanted, refs, role, at=role)) if wanted else None


def _model_config(ref: str, name: str) -> dict:
    """What an eval run records about its model: the reference, and its lineage if a run dir."""
    config = {"ref": ref, "name": name}
    run = RunDir(Path(ref).expanduser())
    if run.is_run_dir():
        config["lineage"] = run.read_lineage()
        run_id = run.tracker_run_id()
        if run_id:
            config["training_run_id"] = run_id
    return config


def eval_models(
    refs: list[str],
    task_paths: list[str],
    *,
    out: str | None = None,
    limit: int | None = None,
    batch_size: int | None = None,
    force: bool = False,
    backend: str = "auto",
) -> int:
    """`still eval --model REF --task T.yaml [...]`: each model scored on every task. Results
    go to `out` (one subdir per model when there are several), the run dir's eval/, or
    runs/eval/NAME. `backend` (BACKENDS) says how a .gguf file is scored."""
    if not refs or not task_paths:
        raise StillError(
            "`still eval` needs an eval recipe, or at least one --model and one --task"
        )
    check_count(limit, "--limit")
    check_count(batch_size, "--batch-size")
    batch_size = batch_size if batch_size is not None else 8
    check_tasks(task_paths, limit=limit)  # before the first model loads
    check_backend(refs, backend)
    for ref in refs:
        if out and len(refs) > 1:
            out_dir = Path(out) / display_name(ref)
        elif out:
            out_dir = Path(out)
        elif is_run_dir(ref):
            out_dir = RunDir(ref).eval_dir
        else:
            out_dir = Path("runs") / "eval" / display_name(ref)
        evaluate_model(
            ref,
            task_paths,
            out_dir=out_dir,
            batch_size=batch_size,
            limit=limit,
            use_cache=not force,
            backend=backend,
        )
        print(f"still: results in {out_dir}")
    return 0


def evaluate_run(run: RunDir, task_paths: list[str]) -> None:
    """The eval at the end of a finetune/distill run: the saved run dir on the recipe's tasks."""
    if task_paths:
        evaluate_model(str(run.path), task_paths, out_dir=run.eval_dir, name=run.name)


def evaluate_lm_eval(
    model,
    tokenizer,
    task: LmEvalTask,
    *,
    batch_size: int,
    limit: int | None,
    out_dir: Path,
    cache_dir: Path | None,
    model_hash: str,
    model_name: str | None = None,
) -> list[dict]:
    """Score `model` on an lm-eval task: one summary per leaf task, written (and cached) as
    `evaluate` writes ours. The cache key adds lm-eval's version to the harness version."""
    import lm_eval

    out_dir = Path(out_dir)
    variant = f"lm-eval-{lm_eval.__version__}-limit-{limit or 'all'}"
    entry = cache_entry_for(cache_dir, model_hash, task.digest, variant)
    if is_cached(entry, task.outputs):
        return [reuse_cached(entry, leaf, out_dir, model_name) for leaf in task.outputs]
    summaries = []
    for leaf, (found, raw_samples) in lm_eval_tasks.run_lm_eval_task(
        model, tokenizer, task, batch_size=batch_size, limit=limit
    ).items():
        samples = lm_eval_tasks.merged_samples(raw_samples)
        summary = lm_eval_tasks.summary_for(
            leaf,
            found,
            samples,
            task_hash=task.digest,
            model_hash=model_hash,
            harness_version=HARNESS_VERSION,
            lm_eval_version=lm_eval.__version__,
            source=task.ref,
            batch_size=batch_size,
            limit=limit,
        )
        summaries.append(store_results(entry, out_dir, leaf, summary, samples, model_name))
    return summaries
