"""still.nodes and still.rank_failures: machines as schedulers name them → one machine's
overrides and every machine's command; the elastic agent's failure report → the rank to name."""

import argparse

import pytest

from still import nodes, rank_failures
from still.errors import StillError


def test_slurm_nodelists_expand_in_order_with_their_zero_padding():
    assert nodes.expand_nodelist("gpu[01-03,07],head") == [
        "gpu01",
        "gpu02",
        "gpu03",
        "gpu07",
        "head",
    ]
    assert nodes.expand_nodelist("a[9-10]") == ["a9", "a10"]
    assert nodes.expand_nodelist("127.0.0.1,127.0.0.1") == ["127.0.0.1"] * 2


def test_slurm_variables_place_this_machine():
    env = {
        "SLURM_NNODES": "2",
        "SLURM_NODEID": "1",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_GPUS_ON_NODE": "8",
        "MASTER_PORT": "29611",
    }
    machines = nodes.from_slurm(env)
    assert machines.machine_rank == 1 and machines.hosts == ("gpu07", "gpu08")
    assert machines.overrides(1) == [
        "distributed.num_machines=2",
        "distributed.machine_rank=1",
        "distributed.main_process_ip=gpu07",
        "distributed.main_process_port=29611",
        "distributed.num_processes=8",
    ]


def test_a_hostfile_gives_every_machine_its_exact_command(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("# head first\nnode-a slots=4\n\nnode-b slots=4  # the other\n")
    machines = nodes.from_hostfile(str(hosts))
    assert machines.hosts == ("node-a", "node-b") and machines.per_machine == 4
    lines = nodes.commands(machines, "r.yaml", ["name=a b"], resume=True)
    assert lines[1] == (
        "machine 1 (node-b): still run r.yaml 'name=a b' distributed.num_machines=2 "
        "distributed.machine_rank=1 distributed.main_process_ip=node-a "
        "distributed.num_processes=4 --resume"
    )


def test_torchrun_flags_name_machine_0_and_this_rank():
    machines = nodes.from_rdzv(3, 2, "head:29400", nproc=None)
    assert machines.machine_rank == 2 and machines.port == 29400 and len(machines.hosts) == 3
    assert "distributed.main_process_ip=head" in machines.overrides(2)
    assert nodes.from_rdzv(2, 0, "head", nproc=2).port is None  # the recipe's port


def _args(**given):
    fields = {"nodes_file": None, "slurm": False, "nnodes": None, "node_rank": None}
    return argparse.Namespace(**{**fields, "rdzv_endpoint": None, "nproc": None, **given})


def test_no_machine_flag_means_one_machine_and_half_a_flag_is_refused():
    assert nodes.from_args(_args()) is None
    with pytest.raises(StillError, match="need --rdzv-endpoint"):
        nodes.from_args(_args(nnodes=2))


# --------------------------------------------------------------------------- rank failures
def _report(*failures):
    """The table torch.distributed.elastic prints for failed workers (its format, 2.13)."""
    blocks = [
        f"[{i}]:\n  time      : 2026-12-06_22:00:00\n  host      : box\n"
        f"  rank      : {rank} (local_rank: {rank})\n"
        f"  exitcode  : {code} (pid: {pid})\n  error_file: <N/A>\n  traceback : x"
        for i, (rank, code, pid) in enumerate(failures)
    ]
    return "Failures:\n" + "\n".join(blocks)


def test_the_rank_that_died_is_named_not_the_ones_that_lost_it():
    lost = rank_failures.LOST_CONTACT_EXIT
    failures = rank_failures.parse_failures(_report((0, lost, 100), (1, -9, 101)))
    assert [f.rank for f in failures] == [0, 1]
    said = rank_failures.describe(failures, set(), world_size=2, timeout_s=10)
    assert said == "rank 1 (pid 101) was killed by SIGKILL; the other ranks were stopped"
    raised = rank_failures.parse_failures(_report((1, 1, 101)))
    assert "rank 1 (pid 101) failed with exit code 1" in rank_failures.describe(
        raised, {100}, world_size=2, timeout_s=10
    )


def test_a_rank_the_agent_had_to_stop_while_the_others_timed_out_stalled():
    lost = rank_failures.LOST_CONTACT_EXIT
    failures = rank_failures.parse_failures(_report((0, lost, 100), (1, -9, 101)))
    stopped = rank_failures.stopped_pids(
        "W1206 torch/distributed/elastic/multiprocessing/api.py:1028] "
        "Sending process 101 closing signal SIGTERM"
    )
    assert stopped == {101}
    said = rank_failures.describe(failures, stopped, world_size=2, timeout_s=10)
    assert said.startswith("rank(s) 1 stalled: rank(s) 0 waited 10 s (distributed.timeout_s)")
    assert rank_failures.describe([], set(), 2, 10) is None
