"""The verbs that need only the core (no training, eval or publish package): `schema`,
`models`, `init`, `link`, and the end of `run` under a launcher (`leave_process_group`).
still/cli.py dispatches to them; kept apart to hold cli.py under the house size limit."""

from __future__ import annotations

import json
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
    import os

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
