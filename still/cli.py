"""`still` command line. User mistakes print one line and exit 2; bugs keep their traceback.

Heavy imports (torch, transformers) happen inside the verbs, so `still validate` and
`still schema` answer instantly.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from still import cli_args, cli_core, cli_parser
from still.errors import StillError
from still.launch import LaunchFailed, quiet_imports
from still.secrets import redact

EXIT_USER_ERROR = 2


def _cmd_validate(args) -> int:
    from still import recipe as recipe_module

    recipe = recipe_module.load(args.recipe, args.overrides)
    if recipe.kind == "pipeline":
        from still.pipeline import check_stages, plan

        # every stage loads, every reference resolves, and each verb's own checks pass
        check_stages(plan(recipe), _check_stage)
        print(recipe_module.to_yaml(recipe), end="")
        return 0
    with quiet_imports():
        from eval.checks import check_eval_recipe, check_recipe_tasks
    # the task files a recipe names are part of it: validate reads them too
    (check_eval_recipe if recipe.kind == "eval" else check_recipe_tasks)(recipe)
    print(recipe_module.to_yaml(recipe), end="")
    return 0


def _cmd_run(args) -> int:
    from still import recipe as recipe_module
    from still.rundir import open_run_dir

    if cli_core.place_on_machines(args):  # a hostfile without --node-rank: the plan only
        return 0
    recipe = recipe_module.load(args.recipe, args.overrides)
    if recipe.kind == "pipeline":
        return _run_pipeline(recipe, args)
    if args.from_stage or args.only:
        flag = "--from" if args.from_stage else "--only"
        raise StillError(f"{flag} picks stages of a pipeline; {args.recipe} is kind: {recipe.kind}")
    if recipe.kind == "eval":
        with quiet_imports():
            from eval.run import run_eval_recipe

        return run_eval_recipe(recipe, force=args.force)
    from still import launch

    if launch.inside_launch():
        if args.nproc:
            raise StillError(
                "--nproc under `accelerate launch`: the launcher already set the processes",
                hint="drop --nproc, or run `still run` without accelerate launch",
            )
        launch.note_launcher_mismatch(recipe.distributed)
        launch.join_process_group(recipe.distributed)
        # a group that torchrun's elastic agent restarted continues from its checkpoint
        args.resume = args.resume or launch.restart_count() > 0
    else:
        plan = launch.plan(recipe.distributed, args.nproc)
        if plan.needs_launcher:
            return _launch(recipe, plan, args)
    with open_run_dir(recipe, resume=args.resume, force=args.force) as run:
        with quiet_imports():
            if recipe.kind == "finetune":
                from finetune.sft import run as run_recipe
            else:
                from distill.kd import run as run_recipe
        try:
            run_recipe(recipe, run, resume=args.resume)
        except Exception as exc:
            cli_core.exit_if_lost_contact(exc)
            raise
    cli_core.leave_process_group()
    return _strict_exit(run) if args.strict else 0


def _run_pipeline(pipeline, args) -> int:
    """Plan and check every stage, then run or skip each in order (still/pipeline.py)."""
    from still import pipeline as pipelines
    from still import pipeline_run

    for flag, given in (
        ("--resume", args.resume),
        ("--nproc", args.nproc),
        ("--strict", args.strict),
    ):
        if given:
            raise StillError(
                f"{flag} applies to one recipe, not a pipeline",
                hint="drop it, or run that stage's recipe alone",
            )
    stages = pipelines.plan(pipeline)
    pipelines.preflight(stages, _check_stage)
    done = pipeline_run.run(
        pipeline,
        stages,
        lambda stage: _run_stage(stage, force=args.force),
        start=args.from_stage,
        only=args.only,
        force=args.force,
    )
    print(pipeline_run.summary(stages, done))
    return 0


def _check_stage(stage) -> None:
    """What a publish or cascade stage's verb would refuse, checked before any stage runs."""
    with quiet_imports():
        if stage.kind == "publish":
            from eval.checks import check_tasks
            from publish.gguf_files import check_types

            check_types(stage.recipe.gguf, None)
            check_tasks(stage.recipe.tasks)
        elif stage.kind == "cascade":
            from eval.checks import check_eval_recipe
            from eval.run import check_cascade

            check_cascade(stage.recipe, check_eval_recipe(stage.recipe))


def _run_stage(stage, *, force: bool = False) -> None:
    """One pipeline stage, replacing what its dir held (the pipeline decided it runs)."""
    import argparse
    import shutil

    from still.rundir import open_run_dir

    recipe = stage.recipe
    with quiet_imports():
        if stage.kind == "publish":
            # the pipeline replaces its own published dir; it uploads over a hub repo only
            # where this stage uploaded before (it has a record) or the pipeline ran with --force
            flags = {"no_eval": not recipe.eval, "no_compare": not recipe.compare}
            flags |= {"force": force or stage.run.read_stage() is not None, "replace_out": True}
            options = {**recipe.model_dump(), "task": recipe.tasks, **flags, "dry_run": False}
            return _cmd_publish(argparse.Namespace(**options))
        if stage.kind == "cache":
            from distill.cache import build_cache

            shutil.rmtree(stage.path, ignore_errors=True)  # a cache of another teacher or data
            for report in build_cache(recipe):
                print(f"still: teacher cache {stage.path} {report.summary()}")
            return None
        if stage.kind in ("eval", "cascade"):
            from eval.run import run_cascade, run_eval_recipe

            if stage.kind == "cascade":  # scores of unchanged models come from the eval cache
                return run_cascade(recipe)
            return run_eval_recipe(recipe, force=True)
        if recipe.kind == "finetune":
            from finetune.sft import run as run_recipe
        else:
            from distill.kd import run as run_recipe
    with open_run_dir(recipe, force=True) as run:
        run_recipe(recipe, run, resume=False)
    return None


def _launch(recipe, plan, args) -> int:
    """Open the run dir here, write the launch configs into it, and start the processes."""
    import tempfile

    from still import launch
    from still.rundir import open_run_dir

    with quiet_imports():
        from still.train import precision_flags

    flags = precision_flags(recipe.train)
    mixed_precision = "bf16" if flags["bf16"] else "fp16" if flags["fp16"] else "no"
    dist = recipe.distributed
    if dist.machine_rank > 0:
        # Machine 0 opens the run dir (on the shared filesystem) and writes the run; the others
        # only start their processes, from configs kept outside the run dir.
        launch_dir = Path(tempfile.mkdtemp(prefix=f"still-launch-{recipe.name}-"))
        config = launch.write_configs(
            dist, plan, launch_dir, mixed_precision=mixed_precision, command=[]
        )
        cli_core.start_processes(config, args, plan, dist, run=None)
        return 0
    with open_run_dir(recipe, resume=args.resume, force=args.force) as run:
        launch_dir = run.launch_dir.resolve()
        config_file = launch_dir / "accelerate.yaml"
        by_hand = launch.command(
            config_file, args.recipe, args.overrides, max_restarts=dist.max_restarts
        )
        launch.write_configs(
            dist, plan, launch_dir, mixed_precision=mixed_precision, command=by_hand
        )
        print(
            f"still: launching {plan.total_processes} process(es) with {plan.strategy}; "
            f"configs in {launch_dir}"
        )
        # LaunchFailed cleans up the run dir on its way out, unless the run saved something
        cli_core.start_processes(config_file, args, plan, dist, run=run)
    return _strict_exit(run) if args.strict else 0


def _strict_exit(run) -> int:
    """--strict: exit 3 when the forgetting check flagged a drop (the run dir is kept)."""
    flagged = (run.read_regression() or {}).get("flagged")
    if flagged:
        print(f"still: error: forgetting check: {'; '.join(flagged)}", file=sys.stderr)
    return 3 if flagged else 0


def _cmd_cache(args) -> int:
    from still import recipe as recipe_module

    with quiet_imports():
        from distill.cache import build_cache

    recipe = recipe_module.load(args.recipe, args.overrides)
    if recipe.kind != "distill":
        raise StillError(
            f"still cache needs a distill recipe; {args.recipe} is kind: {recipe.kind}"
        )
    for report in build_cache(recipe):
        print(f"still: teacher cache {recipe.distill.teacher_cache} {report.summary()}")
    return 0


def _cmd_generate(args) -> int:
    from still import recipe as recipe_module

    recipe = recipe_module.load(args.recipe, args.overrides)
    if recipe.kind != "distill":
        raise StillError(
            f"still generate needs a distill recipe; {args.recipe} is kind: {recipe.kind}"
        )
    if recipe.generate is None:
        raise StillError(
            f"{args.recipe} has no generate: section",
            hint="add generate: {out: teacher-written.jsonl} (docs/distillation.md)",
        )
    with quiet_imports():
        from distill.seqkd import generate

    report = generate(recipe, force=args.force)
    print(
        f"still: teacher-written data {report.summary()} -> {report.out} "
        f"(report: {report.out}.report.json)"
    )
    return 0


def _cmd_check(args) -> int:
    from still import recipe as recipe_module

    recipe = recipe_module.load(args.recipe, args.overrides)
    if recipe.kind in ("eval", "pipeline"):
        raise StillError(
            f"`still check` inspects finetune and distill recipes; this one is kind: {recipe.kind}",
            hint="check a stage's recipe" if recipe.kind == "pipeline" else None,
        )
    if args.probe is not None:
        from eval.checks import check_count

        check_count(args.probe, "--probe")
    if args.probe is not None and recipe.kind != "distill":
        raise StillError(
            "--probe trains a distill recipe's student candidates; this recipe is kind: "
            f"{recipe.kind}",
            hint="drop --probe",
        )
    with quiet_imports():
        from still.preflight import print_shipped_report

        if print_shipped_report(recipe) is not None:  # real sizes of hub ids not downloaded
            return 0
        if recipe.kind == "finetune":
            from finetune.sft import check

            check(recipe)
        else:
            from distill.kd import check

            check(recipe, probe_steps=args.probe)
    return 0


def _cmd_eval(args) -> int:
    from still import recipe as recipe_module

    with quiet_imports():
        from eval.run import eval_models, run_eval_recipe

    if args.recipe:
        recipe = recipe_module.load(args.recipe, [])
        if recipe.kind != "eval":
            raise StillError(
                f"{args.recipe} is a {recipe.kind} recipe",
                hint="`still eval` takes an eval recipe or --model/--task",
            )
        return run_eval_recipe(
            recipe,
            force=args.force,
            limit=args.limit,
            batch_size=args.batch_size,
            backend=args.backend,
        )
    return eval_models(
        args.model,
        args.task,
        out=args.out,
        limit=args.limit,
        batch_size=args.batch_size,
        force=args.force,
        backend=args.backend,
    )


def _cmd_cascade(args) -> int:
    from still import recipe as recipe_module

    recipe = recipe_module.load(args.recipe, args.overrides)
    if recipe.kind != "eval":
        raise StillError(
            f"{args.recipe} is a {recipe.kind} recipe",
            hint="`still cascade` takes an eval recipe with a cascade: section",
        )
    with quiet_imports():
        from eval.run import run_cascade

    return run_cascade(recipe, force=args.force, limit=args.limit)


def _cmd_serve(args) -> int:
    try:
        with quiet_imports():
            from publish.serve import serve
    except ModuleNotFoundError as missing:
        if missing.name not in ("fastapi", "uvicorn", "starlette"):
            raise
        raise StillError(
            f"`still serve` needs {missing.name}, which is not installed",
            hint="pip install 'still[serve]'",
        ) from None

    return serve(
        Path(args.cascade),
        host=args.host,
        port=args.port,
        teacher_url=args.teacher_url,
        teacher_model=args.teacher_model,
        on_teacher_error=args.on_teacher_error,
        max_queue=args.max_queue,
        timeout_s=args.timeout,
    )


def _cmd_compare(args) -> int:
    with quiet_imports():
        from eval.compare import compare

    out = Path(args.out) if args.out else Path.cwd()
    compare(
        [Path(p) for p in args.inputs], reference=args.reference, teacher=args.teacher, out_dir=out
    )
    if args.wandb:
        with quiet_imports():
            from still.wandb_logs import log_comparison_run

        log_comparison_run(out, project=args.wandb, group=args.wandb_group, inputs=args.inputs)
    return 0


def _cmd_merge(args) -> int:
    with quiet_imports():
        from publish.merge import merge_run

    merge_run(args.run, Path(args.out), force=args.force)
    return 0


def _cmd_publish(args) -> int:
    import shlex

    with quiet_imports():
        from publish.flow import publish

    gguf_types = [t for value in args.gguf for t in value.split(",") if t]
    publish(
        args.run,
        Path(args.out),
        gguf_types=gguf_types,
        dtype=args.dtype,
        hub=args.hub,
        force=args.force,
        replace_out=getattr(args, "replace_out", False),
        quick=args.quick,
        evaluate=not args.no_eval,
        compare=not args.no_compare,
        dry_run=args.dry_run,
        private=args.private,
        tasks=args.task,
        command=shlex.join(
            ["still", "publish", args.run, "--out", args.out, *_publish_flags(args)]
        ),
    )
    return 0


def _publish_flags(args) -> list[str]:
    flags = [f"--gguf={t}" for t in args.gguf] + ([f"--hub={args.hub}"] if args.hub else [])
    flags += [f"--task={t}" for t in args.task] + [f"--dtype={args.dtype}"]
    names = ("dry_run", "private", "quick", "no_eval", "no_compare", "force")
    return flags + ["--" + name.replace("_", "-") for name in names if getattr(args, name)]


HANDLERS = {
    "cache": _cmd_cache,
    "cascade": _cmd_cascade,
    "check": _cmd_check,
    "compare": _cmd_compare,
    "eval": _cmd_eval,
    "generate": _cmd_generate,
    "init": cli_core.init_verb,
    "link": cli_core.link,
    "merge": _cmd_merge,
    "models": cli_core.models,
    "publish": _cmd_publish,
    "run": _cmd_run,
    "schema": cli_core.schema,
    "serve": _cmd_serve,
    "validate": _cmd_validate,
}


def build_parser() -> argparse.ArgumentParser:
    return cli_parser.build_parser(HANDLERS)


def parse(argv: list[str]) -> argparse.Namespace:
    """The verb's arguments; any mistake in them is a StillError with a usage hint."""
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    cli_args.require_verb(args, parser, list(args.verbs))
    keys = None
    if hasattr(args, "overrides"):
        # Overrides may come after flags too (`still run r.yaml --force train.lr=1e-4`).
        args.overrides += [e for e in extras if "=" in e and not e.startswith("-")]
        extras = [e for e in extras if e not in args.overrides]
        if extras:
            from still.recipe import dotted_keys

            keys = dotted_keys()
    cli_args.refuse_extras(args.verb, args.verbs[args.verb], extras, argv, keys)
    cli_args.require_recipe(args, getattr(args, "needs_recipe", False))
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # peft reads transformers' renamed property on every adapter it attaches; nothing a user can
    # change.
    warnings.filterwarnings(
        "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
    )
    try:
        args = parse(argv)
        return args.handler(args)
    except StillError as exc:
        # a key that reached a message anyway (a server echoing it, an argument) is never shown
        print(f"still: error: {redact(str(exc))}", file=sys.stderr)
        return EXIT_USER_ERROR
    except LaunchFailed as exc:
        if exc.reason:
            print(f"still: error: {exc.reason}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("still: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
