"""The verbs that need only the core (no training, eval or publish package): `schema`,
`models`, `init`, `link`; and the parts of `run` across processes and machines: this machine's
place in a hostfile or SLURM job, the launch, a lost rank and the end under a launcher.
still/cli.py dispatches to them; kept apart to hold cli.py under the house size limit."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

from still.launch import quiet_imports


def schema(args) -> int:
    from still.recipe import json_schema

    print(json.dumps(json_schema(), indent=2, ensure_ascii=False))
    return 0


def models(args) -> int:
    from still.builtins import cache_dir, describe_builtins

    for row in describe_builtins():
        state = (
            f"installed {row['installed']}"
            if row["installed"]
            else f"not installed: {row['install']}"
        )
        cached = f"converted: {row['cached']}" if row["cached"] else "not converted yet"
        print(
            f"{row['ref']:32} {row['description']}\n"
            f"{'':32} {state}; {cached}; license {row['license']}"
        )
    print(f"cache: {cache_dir()}")
    return 0


def init_verb(args) -> int:
    from still.init import DEFAULT_BASE, init

    init(
        args.data,
        test=args.test,
        base=args.base or DEFAULT_BASE,
        name=args.name,
        group_by=args.group_by,
        force=args.force,
    )
    return 0


def link(args) -> int:
    with quiet_imports():
        from still.wandb_logs import link_lineage

    for run_dir in args.runs:
        parents = link_lineage(Path(run_dir))
        print(f"still: {run_dir}: linked {', '.join(parents) or 'no still-run parents'}")
    return 0


def leave_process_group() -> None:
    """Under a launcher: wait for every rank (the main one may still be scoring eval_tasks),
    close the process group, and end the process without interpreter teardown.

    A rank whose gloo threads are still referenced at teardown (DDP's reducer held in a
    reference cycle, say) dies in C++ with "terminate called without an active exception".
    The barrier and destroy_process_group alone still let that happen in CI (1 of 14 two-process
    runs); by now the run dir is complete and closed, so nothing is lost by skipping teardown.
    """
    import gc
    import logging

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()  # drop cycles that still hold the process group before it is destroyed
    dist.barrier()
    dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# --------------------------------------------------------------------------- several machines
def place_on_machines(args) -> bool:
    """`still run` with --nodes-file/--slurm/--rdzv-endpoint: print each machine's command and
    add this machine's `distributed.*` overrides; True when there is no machine to run (a
    hostfile without --node-rank: the plan only)."""
    from still import nodes

    machines = nodes.from_args(args)
    if machines is None:
        return False
    if not machines.machine_rank:  # machine 0 (or a plan only) prints every machine's part
        lines = nodes.commands(machines, args.recipe, args.overrides, args.resume)
        print(f"still: {len(lines)} machine(s) from {machines.source}:", *lines, sep="\n  ")
    if machines.machine_rank is None:
        return True
    args.overrides = [*args.overrides, *machines.overrides(machines.machine_rank)]
    return False


def start_processes(config_file: Path, args, plan, dist, *, run) -> None:
    """`accelerate launch` this machine's processes (still.launch); when a rank fails, its one
    line gains the last complete checkpoint and the command that resumes."""
    from still import launch

    run_dir = run.path if run is not None else None
    try:
        launch.launch(
            config_file, args.recipe, args.overrides, run_dir,
            resume=args.resume, dist=dist, world_size=plan.total_processes,
        )  # fmt: skip
    except launch.LaunchFailed as exc:
        if exc.reason:
            exc.reason += "; " + _resume_advice(run, args)
        raise


def _resume_advice(run, args) -> str:
    from still.checkpoint import MARKER, list_checkpoints

    argv = ["still", "run", args.recipe, *args.overrides]
    argv += ["--nproc", str(args.nproc)] if args.nproc else []
    advice = "resume with: " + " ".join(shlex.quote(a) for a in [*argv, "--resume"])
    if run is None:  # another machine holds the run dir
        return advice
    complete = [c for c in list_checkpoints(run.checkpoints) if (c / MARKER).exists()]
    last = f"last complete checkpoint: {complete[0].name}" if complete else "no checkpoint yet"
    return f"{last}; {advice}"


def exit_if_lost_contact(exc: BaseException) -> None:
    """In a launched rank: a collective failed because another rank died or stalled. Say so in
    one line and exit LOST_CONTACT_EXIT at once (no teardown: the process group is broken), so
    the launcher names the rank that failed first, not this one."""
    from still import rank_failures

    if not rank_failures.is_lost_contact(exc):
        return
    print(rank_failures.lost_contact_line(int(os.environ.get("RANK", "0")), exc), file=sys.stderr)
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(rank_failures.LOST_CONTACT_EXIT)
