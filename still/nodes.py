"""Several machines, described the way schedulers do: a hostfile (`still run R.yaml --nodes-file
hosts`), SLURM's environment (`--slurm`, inside `srun`), or torchrun's flags (`--nnodes N
--node-rank K --rdzv-endpoint HOST:PORT`). Each becomes the `distributed.*` overrides one machine
runs with (num_machines, machine_rank, main_process_ip/port, processes per machine), and the
exact `still run` command for every machine is printed, so what runs is what you can rerun.

Nothing is launched here: `still run` goes on with those overrides exactly as if they were typed.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from still.errors import StillError

_SLOTS_RE = re.compile(r"^slots=(\d+)$")


@dataclass(frozen=True)
class Nodes:
    hosts: tuple[str, ...]  # machine 0 (the rendezvous host) first
    per_machine: int | None  # processes per machine; None: the recipe's (or every GPU)
    port: int | None  # rendezvous port; None: the recipe's main_process_port
    machine_rank: int | None  # this machine; None: only print the plan
    source: str

    def overrides(self, rank: int) -> list[str]:
        out = [
            f"distributed.num_machines={len(self.hosts)}",
            f"distributed.machine_rank={rank}",
            f"distributed.main_process_ip={self.hosts[0]}",
        ]
        if self.port is not None:
            out.append(f"distributed.main_process_port={self.port}")
        if self.per_machine is not None:
            out.append(f"distributed.num_processes={self.per_machine}")
        return out


def from_hostfile(path: str) -> Nodes:
    """DeepSpeed's hostfile format: one `HOST [slots=N]` per line, machine 0 first, # comments."""
    file = Path(path)
    if not file.is_file():
        raise StillError(f"--nodes-file {path}: no such file")
    hosts, slots = [], set()
    for number, raw in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        host, *rest = line.split()
        match = _SLOTS_RE.match(rest[0]) if len(rest) == 1 else None
        if rest and (match is None or int(match.group(1)) < 1):
            raise StillError(
                f"{path}:{number}: expected `HOST` or `HOST slots=N` (N >= 1), got {raw.strip()!r}"
            )
        hosts.append(host)
        slots.add(int(match.group(1)) if match else None)
    if not hosts:
        raise StillError(f"--nodes-file {path}: no hosts in it")
    if len(slots) > 1:
        raise StillError(
            f"{path}: every machine needs the same slots (processes); got {sorted(slots, key=str)}"
        )
    return Nodes(tuple(hosts), slots.pop(), None, None, f"hostfile {path}")


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list (`gpu[01-03,07],head`) → host names, in order."""
    hosts = []
    for match in re.finditer(r"([^,\[]+)(?:\[([^\]]*)\])?(?:,|$)", nodelist):
        prefix, ranges = match.group(1), match.group(2)
        if ranges is None:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            low, _, high = part.partition("-")
            if not low.isdigit() or (high and not high.isdigit()):
                raise StillError(f"SLURM_JOB_NODELIST {nodelist!r}: cannot read {part!r}")
            for number in range(int(low), int(high or low) + 1):
                hosts.append(f"{prefix}{number:0{len(low)}d}")
    return hosts


def _slurm_int(env, name: str) -> int:
    value = env.get(name)
    if value is None or not value.strip().isdigit():
        raise StillError(
            f"--slurm: {name} is {'not set' if value is None else repr(value)}",
            hint="run `still run --slurm` inside `srun` (one task per node)",
        )
    return int(value)


def from_slurm(env=None) -> Nodes:
    """The job's machines from SLURM's variables (one `still run` task per node)."""
    env = os.environ if env is None else env
    nnodes, node_id = _slurm_int(env, "SLURM_NNODES"), _slurm_int(env, "SLURM_NODEID")
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise StillError("--slurm: SLURM_JOB_NODELIST is not set", hint="run it inside `srun`")
    hosts = expand_nodelist(nodelist)
    if len(hosts) != nnodes:
        raise StillError(
            f"--slurm: SLURM_NNODES is {nnodes} but SLURM_JOB_NODELIST {nodelist!r} "
            f"names {len(hosts)} host(s)"
        )
    if node_id >= nnodes:
        raise StillError(f"--slurm: SLURM_NODEID {node_id} is not below SLURM_NNODES {nnodes}")
    gpus = env.get("SLURM_GPUS_ON_NODE")
    per_machine = int(gpus) if gpus and gpus.isdigit() and int(gpus) > 0 else None
    port = env.get("MASTER_PORT")
    port_number = int(port) if port and port.isdigit() else None
    return Nodes(tuple(hosts), per_machine, port_number, node_id, "SLURM")


def from_rdzv(nnodes: int, node_rank: int, endpoint: str, nproc: int | None) -> Nodes:
    """torchrun's way of saying it: --nnodes, --node-rank, --rdzv-endpoint HOST[:PORT]."""
    host, _, port = endpoint.rpartition(":") if ":" in endpoint else (endpoint, "", "")
    if not host or (port and not port.isdigit()):
        raise StillError(f"--rdzv-endpoint {endpoint!r}: expected HOST or HOST:PORT")
    if nnodes < 1 or not 0 <= node_rank < nnodes:
        raise StillError(f"--node-rank {node_rank} is not in 0 .. --nnodes {nnodes} - 1")
    # Only machine 0's address matters to the rendezvous; the others are named by their rank.
    hosts = (host, *(f"<machine {rank}>" for rank in range(1, nnodes)))
    return Nodes(hosts, nproc, int(port) if port else None, node_rank, "--rdzv-endpoint")


def from_args(args) -> Nodes | None:
    """The machines `still run`'s flags describe, or None when no flag names several."""
    given = [
        name
        for name, on in (
            ("--nodes-file", args.nodes_file is not None),
            ("--slurm", args.slurm),
            ("--rdzv-endpoint", args.rdzv_endpoint is not None),
        )
        if on
    ]
    if len(given) > 1:
        raise StillError(f"{' and '.join(given)}: give one way to name the machines")
    if args.nodes_file is not None:
        nodes = from_hostfile(args.nodes_file)
        if args.node_rank is not None and not 0 <= args.node_rank < len(nodes.hosts):
            raise StillError(
                f"--node-rank {args.node_rank}: {args.nodes_file} lists {len(nodes.hosts)} host(s)"
            )
        per_machine = args.nproc or nodes.per_machine
        return Nodes(nodes.hosts, per_machine, None, args.node_rank, nodes.source)
    if args.slurm:
        nodes = from_slurm()
        per_machine = args.nproc or nodes.per_machine
        return Nodes(nodes.hosts, per_machine, nodes.port, nodes.machine_rank, nodes.source)
    if args.rdzv_endpoint is not None:
        if args.nnodes is None or args.node_rank is None:
            raise StillError("--rdzv-endpoint needs --nnodes and --node-rank (as torchrun does)")
        return from_rdzv(args.nnodes, args.node_rank, args.rdzv_endpoint, args.nproc)
    if args.nnodes is not None or args.node_rank is not None:
        raise StillError(
            "--nnodes/--node-rank need --rdzv-endpoint HOST:PORT, or --nodes-file with --node-rank"
        )
    return None


def commands(nodes: Nodes, recipe_path: str, overrides: list[str], resume: bool) -> list[str]:
    """The exact `still run` command for each machine, machine 0 first."""
    lines = []
    for rank, host in enumerate(nodes.hosts):
        argv = ["still", "run", recipe_path, *overrides, *nodes.overrides(rank)]
        argv += ["--resume"] if resume else []
        lines.append(f"machine {rank} ({host}): " + " ".join(shlex.quote(a) for a in argv))
    return lines
