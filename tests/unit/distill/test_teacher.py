"""distill.teacher: where the teacher goes once several processes run (the placement rule, and
FSDP sharding on two CPU processes)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from distill import teacher
from still.errors import StillError


def test_teacher_placement_rule():
    gib = 1 << 30
    assert (
        teacher.teacher_placement("auto", "ddp", 100 * gib, 80 * gib) == "replicate"
    )  # only copies possible
    assert (
        teacher.teacher_placement("auto", "zero3", 16 * gib, 80 * gib) == "replicate"
    )  # 20% of the device
    assert (
        teacher.teacher_placement("auto", "fsdp", 21 * gib, 80 * gib) == "shard"
    )  # over a quarter
    assert teacher.teacher_placement("replicate", "zero3", 140 * gib, 80 * gib) == "replicate"
    assert teacher.teacher_placement("shard", "fsdp", 1, 80 * gib) == "shard"
    with pytest.raises(StillError, match="needs a zero3 or fsdp launch; this one is zero2"):
        teacher.teacher_placement("shard", "zero2", 1, 80 * gib)


SHARD_SCRIPT = textwrap.dedent("""\
    import json, sys
    from types import SimpleNamespace
    import torch, torch.distributed as dist
    from transformers import AutoModelForCausalLM
    from distill import teacher as teacher_module

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    reference = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
    teacher = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval().requires_grad_(False)
    full_layer_params = sum(p.numel() for p in teacher.model.layers.parameters())
    teacher = teacher_module.shard_teacher_fsdp(
        teacher, torch.device("cpu"), SimpleNamespace(cpu_offload=None)
    )
    local_layer_params = sum(p.to_local().numel() for p in teacher.model.layers.parameters())
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]]) + rank  # each rank its own batch
    with torch.no_grad():
        ours = teacher(input_ids=ids, logits_to_keep=1, output_hidden_states=True).hidden_states[-1]
        theirs = reference(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        head = teacher.get_output_embeddings().weight
        head_diff = (head - reference.get_output_embeddings().weight).abs().max().item()
    row = {"rank": rank, "hidden_diff": (ours - theirs).abs().max().item(), "head_diff": head_diff,
           "local_layer_params": local_layer_params, "full_layer_params": full_layer_params}
    open(f"{sys.argv[2]}/rank{rank}.json", "w").write(json.dumps(row))
    dist.destroy_process_group()
""")


@pytest.mark.multiproc
def test_fsdp_teacher_is_sharded_and_gives_the_same_hidden_states(tiny_model_dir_4layers, tmp_path):
    script = tmp_path / "shard.py"
    script.write_text(SHARD_SCRIPT)
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[3])}
    result = subprocess.run(
        [
            str(torchrun),
            "--nproc_per_node",
            "2",
            str(script),
            str(tiny_model_dir_4layers),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("rank*.json"))]
    assert sorted(row["rank"] for row in rows) == [0, 1]
    for row in rows:
        assert row["hidden_diff"] < 1e-5 and row["head_diff"] == 0.0
        assert (
            row["local_layer_params"] * 2 == row["full_layer_params"]
        )  # half the layers' weights each
