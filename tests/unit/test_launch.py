"""still.launch: the `distributed:` section → plan → accelerate/DeepSpeed configs. The launched
runs themselves are in tests/recipes/test_multiprocess.py; the teacher's placement is in
tests/unit/distill/test_teacher.py."""

import json
import os
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from still import launch
from still.errors import StillError
from still.sections import DistributedSection


def dist(**fields) -> DistributedSection:
    return DistributedSection(**fields)


def test_plan_defaults_to_one_process_on_cpu_and_ddp_for_several(monkeypatch):
    monkeypatch.setattr(launch, "_visible_gpus", lambda: 0)
    assert launch.plan(dist()) == launch.LaunchPlan("single", 1, 1)
    assert not launch.plan(dist()).needs_launcher
    several = launch.plan(dist(), nproc=2)
    assert several == launch.LaunchPlan("ddp", 2, 1) and several.needs_launcher
    assert launch.plan(dist(num_processes=3)).per_machine == 3
    assert launch.plan(dist(num_processes=3), nproc=2).per_machine == 2  # --nproc wins


def test_plan_counts_every_machine_and_launches_sharding_even_for_one_process():
    two_nodes = launch.plan(dist(num_processes=4, num_machines=2, main_process_ip="10.0.0.1"))
    assert two_nodes.total_processes == 8
    assert launch.plan(dist(strategy="zero3")).needs_launcher  # ZeRO-3 offload on one GPU


@pytest.mark.parametrize(
    "fields, nproc, message",
    [
        ({"strategy": "single"}, 2, "strategy is single but 2 processes"),
        ({}, 0, "--nproc 0"),
        ({"strategy": "fsdp"}, 2, "fsdp needs GPUs"),
    ],
)
def test_plan_refuses_what_cannot_run(fields, nproc, message, monkeypatch):
    monkeypatch.setattr(launch, "_visible_gpus", lambda: 0)  # a CPU-only machine
    with pytest.raises(StillError, match=message):
        launch.plan(dist(**fields), nproc=nproc)


@pytest.mark.parametrize(
    "fields, message",
    [
        (
            {"strategy": "ddp", "offload_optimizer": "cpu"},
            "offload_optimizer needs strategy zero2 or zero3",
        ),
        ({"strategy": "fsdp", "offload_optimizer": "cpu"}, "FSDP offloads it with offload_params"),
        (
            {"strategy": "zero2", "offload_params": "cpu"},
            "offload_params needs strategy zero3 or fsdp",
        ),
        (
            {"strategy": "fsdp", "offload_params": "nvme", "nvme_path": "/nvme"},
            "FSDP offloads to CPU only",
        ),
        ({"strategy": "zero3", "offload_params": "nvme"}, "needs nvme_path"),
        ({"num_machines": 2}, "need main_process_ip"),
        ({"num_machines": 2, "machine_rank": 2, "main_process_ip": "h"}, "not below num_machines"),
    ],
)
def test_section_rejects_inconsistent_settings(fields, message):
    with pytest.raises(ValidationError, match=message):
        dist(**fields)


def test_only_distill_recipes_place_a_teacher():
    from still.distill_sections import DistillDistributedSection

    with pytest.raises(ValidationError, match="teacher: shard needs strategy zero3 or fsdp"):
        DistillDistributedSection(strategy="ddp", teacher="shard")
    assert DistillDistributedSection(strategy="zero3", teacher="shard").teacher == "shard"
    with pytest.raises(ValidationError, match="teacher"):
        dist(teacher="shard")


def test_deepspeed_config_leaves_training_values_to_trainer_and_offloads_on_request():
    zero2 = launch.deepspeed_config(dist(strategy="zero2"), 2)
    assert zero2["zero_optimization"]["stage"] == 2
    assert zero2["train_micro_batch_size_per_gpu"] == zero2["gradient_accumulation_steps"] == "auto"
    assert zero2["bf16"] == {"enabled": "auto"} and "optimizer" not in zero2
    assert "stage3_gather_16bit_weights_on_model_save" not in zero2["zero_optimization"]

    offloaded = launch.deepspeed_config(
        dist(
            strategy="zero3",
            offload_optimizer="cpu",
            offload_params="nvme",
            nvme_path="/local/nvme",
        ),
        3,
    )
    zero = offloaded["zero_optimization"]
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero["offload_optimizer"]["device"] == "cpu"
    assert zero["offload_param"] == {
        "device": "nvme",
        "nvme_path": "/local/nvme",
        "pin_memory": True,
    }
    assert offloaded["optimizer"]["type"] == "AdamW"  # DeepSpeed's CPU Adam for offloaded state


def test_accelerate_config_per_strategy(tmp_path):
    ds = launch.accelerate_config(
        dist(strategy="zero3"),
        launch.LaunchPlan("zero3", 2, 1),
        mixed_precision="bf16",
        deepspeed_file=tmp_path / "ds.json",
    )
    assert ds["distributed_type"] == "DEEPSPEED" and ds["num_processes"] == 2
    assert ds["deepspeed_config"]["deepspeed_config_file"] == str(tmp_path / "ds.json")
    # accelerate refuses a top-level mixed_precision next to a DeepSpeed file
    assert "mixed_precision" not in ds
    ddp = launch.accelerate_config(
        dist(), launch.LaunchPlan("ddp", 2, 1), mixed_precision="no", deepspeed_file=None
    )
    assert ddp["distributed_type"] == "MULTI_GPU" and ddp["mixed_precision"] == "no"
    fsdp = launch.accelerate_config(
        dist(strategy="fsdp", offload_params="cpu"),
        launch.LaunchPlan("fsdp", 8, 1),
        mixed_precision="bf16",
        deepspeed_file=None,
    )
    assert fsdp["distributed_type"] == "FSDP" and fsdp["fsdp_config"]["fsdp_version"] == 2
    assert fsdp["fsdp_config"]["fsdp_offload_params"] is True
    nodes = dist(
        num_processes=8,
        num_machines=2,
        machine_rank=1,
        main_process_ip="10.1.2.3",
        main_process_port=29600,
    )
    multi = launch.accelerate_config(
        nodes, launch.plan(nodes), mixed_precision="bf16", deepspeed_file=None
    )
    assert (multi["num_processes"], multi["num_machines"], multi["machine_rank"]) == (16, 2, 1)
    assert (multi["main_process_ip"], multi["main_process_port"]) == ("10.1.2.3", 29600)
    zero3 = launch.accelerate_config(
        nodes, launch.LaunchPlan("zero3", 8, 2), mixed_precision="bf16", deepspeed_file=Path("d")
    )
    # every machine runs its own launcher (not accelerate's default: pdsh from machine 0)
    assert zero3["deepspeed_config"]["deepspeed_multinode_launcher"] == "standard"


def test_write_configs_writes_reusable_files(tmp_path):
    section = dist(strategy="zero2")
    command = launch.command(tmp_path / "launch" / "accelerate.yaml", "r e.yaml", ["name=a b"])
    config_file = launch.write_configs(
        section,
        launch.LaunchPlan("zero2", 2, 1),
        tmp_path / "launch",
        mixed_precision="no",
        command=command,
    )
    config = yaml.safe_load(config_file.read_text())
    deepspeed_file = Path(config["deepspeed_config"]["deepspeed_config_file"])
    assert json.loads(deepspeed_file.read_text())["zero_optimization"]["stage"] == 2
    script = (tmp_path / "launch" / "launch.sh").read_text()
    # the elastic agent's SIGTERM-to-SIGKILL grace is bounded by distributed.timeout_s
    assert script.splitlines()[-1].startswith(
        f"TORCH_ELASTIC_SHUTDOWN_TIMEOUT=30 accelerate launch --config_file {config_file} "
        "-m still.cli run "
    )
    assert "'name=a b'" in script  # quoted for the shell
    assert os.access(tmp_path / "launch" / "launch.sh", os.X_OK)


def test_launched_as_reads_accelerate_environment(tmp_path, monkeypatch):
    for name in (
        "ACCELERATE_USE_FSDP",
        "ACCELERATE_USE_DEEPSPEED",
        "ACCELERATE_DEEPSPEED_ZERO_STAGE",
        "ACCELERATE_DEEPSPEED_CONFIG_FILE",
        "WORLD_SIZE",
    ):
        monkeypatch.delenv(name, raising=False)
    assert launch.launched_as() == "single"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launch.launched_as() == "ddp"
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    assert launch.launched_as() == "zero2"
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(config))
    assert launch.launched_as() == "zero3"  # the file wins over the flag
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert launch.launched_as() == "fsdp"


def test_nproc_inside_a_launch_is_refused(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from still import cli

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f'kind: finetune\nname: x\nmodel: {{ref: "{tiny_model_dir}"}}\n'
        "data: {train: {path: t.jsonl, format: completion}}\n"
    )
    (tmp_path / "t.jsonl").write_text('{"text": "hello"}\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert cli.main(["run", str(recipe), "--nproc", "2"]) == 2
    assert "--nproc under `accelerate launch`" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_restarts_and_timeout_reach_the_launcher():
    """max_restarts goes to torchrun's elastic agent (through accelerate launch), timeout_s
    bounds the agent's grace before SIGKILL."""
    argv = launch.command(Path("a.yaml"), "r.yaml", [], max_restarts=2)
    assert argv[argv.index("--max_restarts") + 1] == "2" and argv.index(
        "--max_restarts"
    ) < argv.index("-m")
    assert argv[argv.index("--rdzv_backend") + 1] == "c10d"  # a fresh rendezvous per restart
    assert "--max_restarts" not in launch.command(Path("a.yaml"), "r.yaml", [])
    with_restarts = launch.launcher_env(dist(max_restarts=1, main_process_port=29611))
    assert with_restarts["PET_RDZV_ENDPOINT"] == "127.0.0.1:29611"
    assert with_restarts["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    assert launch.launcher_env(dist(timeout_s=10)) == {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "10"}
    assert launch.launcher_env(dist()) == {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "30"}


def _through(text: bytes, capfd) -> tuple[bool, bytes, str]:
    read, write = os.pipe()
    os.write(write, text)
    os.close(write)
    user_error, report = launch._pass_stderr_through(read)
    os.close(read)
    return user_error, report, capfd.readouterr().err


AGENT = b"E1206 22:00:00.0 1 torch/distributed/elastic/multiprocessing/api.py:1002] failed (x)\n"


def test_the_agents_final_report_is_read_not_shown_but_a_restart_shows_what_followed(capfd):
    final = (
        b"step 1\r"
        + AGENT
        + b'Traceback (most recent call last):\n  File "x", line 1\n    run()\n    ^^^^\n'
        + b"torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n"
        + b"  rank      : 1 (local_rank: 1)\n  exitcode  : -9 (pid: 7)\n"
    )
    user_error, report, shown = _through(final, capfd)
    assert not user_error and shown == "step 1\r"
    assert AGENT in report and b"exitcode  : -9 (pid: 7)" in report
    # with restarts left the agent goes on: the workers' next lines show, and what was held
    _, _, shown = _through(b"step 1\n" + AGENT + b"[rank0]: resuming\n", capfd)
    assert shown == "step 1\n" + AGENT.decode() + "[rank0]: resuming\n"
