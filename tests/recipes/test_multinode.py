"""Two machines on one host: `num_machines: 2`, machine_rank 0 and 1, one process each, started
as a scheduler would (a hostfile, SLURM's variables, torchrun's --rdzv flags). They rendezvous
through the accelerate/DeepSpeed configs `still run` writes, and train exactly like one machine
with two processes.

Machine 1 runs in a directory of its own (its own copy of the recipe and data, its own
STILL_CACHE), so what it writes is visible: never the model, the metrics or the run dir's files,
only what each rank must save for itself (its RNG state, its ZeRO shards)."""

import re
import shutil

import pytest
from launched import losses, run, still, two_machines, write_recipe

pytestmark = pytest.mark.multiproc


@pytest.fixture(scope="module")
def machines(tmp_path_factory, tiny_model_dir, tiny_model_dir_4layers):
    root = tmp_path_factory.mktemp("machine0")
    other = tmp_path_factory.mktemp("machine1")
    for kind in ("finetune", "distill"):
        write_recipe(root, kind, tiny_model_dir, tiny_model_dir_4layers)
        write_recipe(other, kind, tiny_model_dir, tiny_model_dir_4layers)
    (root / "hosts").write_text("# machine 0 first\n127.0.0.1 slots=1\n127.0.0.1 slots=1\n")
    shutil.copy(root / "hosts", other / "hosts")
    return root, other


# Each case is a 1 x 2 baseline plus two machines: 80-120 s on 2 shared cores. One runs in the
# default suite, so CI proves two machines rendezvous; the other three are slow.
CASES = [
    ("finetune", "ddp", "hostfile"),
    pytest.param("distill", "ddp", "slurm", marks=pytest.mark.slow),
    pytest.param("finetune", "zero3", "rdzv", marks=pytest.mark.slow),
    pytest.param("distill", "zero3", "hostfile", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("kind,strategy,how", CASES)
def test_two_machines_match_one_machine_with_two_processes(machines, kind, strategy, how):
    root, other = machines
    name = f"{kind}-{strategy}-{how}"
    run(root, still(f"{kind}.yaml", f"name={name}-1x2", f"distributed.strategy={strategy}",
                    "--nproc", "2"))  # fmt: skip
    results = two_machines(
        (root, other), f"{kind}.yaml", name, how, [f"distributed.strategy={strategy}"]
    )
    out0, out1 = results[0][1], results[1][1]

    assert losses(root / "runs" / name) == pytest.approx(
        losses(root / "runs" / f"{name}-1x2"), abs=1e-4
    )
    # machine 0 printed both machines' commands; machine 1 only ran its part
    plan = [line for line in out0.splitlines() if re.match(r"\s+machine \d \(", line)]
    assert len(plan) == 2 and "distributed.machine_rank=1" in plan[1]
    assert not any(line.lstrip().startswith("machine ") for line in out1.splitlines())
    saved = "model/model.safetensors" if kind == "distill" else "adapter/adapter_model.safetensors"
    assert (root / "runs" / name / saved).is_file()
    # written once, by the global main process: machine 1 holds only its rank's own state
    written = [p for p in (other / "runs").rglob("*") if p.is_file()]
    assert written and all(p.name == "rng_state_1.pth" or "rank_1_" in p.name for p in written), (
        written
    )
    # each machine's local main tokenized into its own cache (its other ranks would wait)
    for rank, cwd in enumerate((root, other)):
        assert list((cwd / f"cache-{rank}" / "data").glob("*-train.arrow"))


def test_printing_the_plan_of_a_hostfile_runs_nothing(machines):
    root, _ = machines
    result = run(root, still("finetune.yaml", "name=plan", "--nodes-file", "hosts"))
    lines = result.stdout.splitlines()
    assert lines[0] == "still: 2 machine(s) from hostfile hosts:"
    assert lines[2].strip() == (
        "machine 1 (127.0.0.1): still run finetune.yaml name=plan distributed.num_machines=2 "
        "distributed.machine_rank=1 distributed.main_process_ip=127.0.0.1 "
        "distributed.num_processes=1"
    )
    assert not (root / "runs" / "plan").exists()
