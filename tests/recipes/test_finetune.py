"""The finetune recipe kind, end to end on the tiny model (a few CPU steps each)."""

import json

import pytest
import torch

from still import cli, models
from still.rundir import RunDir


def train_losses(run_dir):
    return {row["step"]: row["loss"] for row in RunDir(run_dir).metrics() if "loss" in row}


def test_lora_run_writes_a_complete_run_dir_and_learns(finetune_recipe, tmp_path):
    recipe = finetune_recipe(extra="")
    assert cli.main(["run", str(recipe), "train.max_steps=12", "train.lr=2e-2"]) == 0
    run_dir = tmp_path / "runs" / "tiny-ft"
    for name in (
        "recipe.resolved.yaml",
        "lineage.json",
        "metrics.jsonl",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "adapter/tokenizer_config.json",
    ):
        assert (run_dir / name).exists(), name
    lineage = json.loads((run_dir / "lineage.json").read_text())
    assert lineage["base"] and len(lineage["data"][0]["sha256"]) == 64
    losses = train_losses(run_dir)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    # the same 8 examples every epoch: the loss must fall clearly
    assert losses[12] < 0.8 * losses[1]
    evals = [row["eval_loss"] for row in RunDir(run_dir).metrics() if "eval_loss" in row]
    assert len(evals) >= 2 and evals[-1] < evals[0]  # eval_on_start gives the base model's loss

    model, tokenizer = models.load_model(str(run_dir))
    assert hasattr(model, "peft_config")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What does abs do?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]


def test_same_seed_same_losses(finetune_recipe, tmp_path):
    recipe = finetune_recipe()
    assert cli.main(["run", str(recipe), "train.max_steps=3", "name=a"]) == 0
    assert cli.main(["run", str(recipe), "train.max_steps=3", "name=b"]) == 0
    a, b = train_losses(tmp_path / "runs" / "a"), train_losses(tmp_path / "runs" / "b")
    assert a == b and len(a) == 3


def test_resume_continues_from_the_last_checkpoint(finetune_recipe, tmp_path):
    import shutil

    recipe = finetune_recipe()
    assert cli.main(["run", str(recipe), "name=straight"]) == 0
    assert cli.main(["run", str(recipe), "name=cut"]) == 0
    cut = tmp_path / "runs" / "cut"
    # pretend the run died after step 4: drop what came later
    shutil.rmtree(cut / "checkpoints" / "checkpoint-6")
    shutil.rmtree(cut / "adapter")
    rows = [r for r in RunDir(cut).metrics() if r["step"] <= 4]
    (cut / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    assert cli.main(["run", str(recipe), "name=cut", "--resume"]) == 0
    straight, resumed = train_losses(tmp_path / "runs" / "straight"), train_losses(cut)
    assert sorted(resumed) == sorted(straight) == [1, 2, 3, 4, 5, 6]
    for step in (5, 6):
        assert resumed[step] == pytest.approx(straight[step], abs=1e-5)
    assert (cut / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("method", ["full", "dora"])
def test_full_and_dora(finetune_recipe, tmp_path, method):
    recipe = finetune_recipe()
    assert (
        cli.main(["run", str(recipe), f"method={method}", "train.max_steps=2", "train.lr=1e-3"])
        == 0
    )
    run_dir = tmp_path / "runs" / "tiny-ft"
    saved = run_dir / ("model" if method == "full" else "adapter")
    assert saved.exists()
    if method == "dora":
        assert json.loads((saved / "adapter_config.json").read_text())["use_dora"] is True
    model, _ = models.load_model(str(run_dir))
    assert model(torch.tensor([[3, 4, 5]])).logits.isfinite().all()


def test_padding_instead_of_packing_trains_too(finetune_recipe, tmp_path):
    recipe = finetune_recipe()
    assert cli.main(["run", str(recipe), "data.packing=false", "train.max_steps=2"]) == 0
    assert len(train_losses(tmp_path / "runs" / "tiny-ft")) == 2


def test_check_refuses_when_no_token_carries_loss(finetune_recipe, tmp_path, capsys):
    # max_len 8 cuts every example before its response starts
    recipe = finetune_recipe()
    assert cli.main(["check", str(recipe), "data.max_len=8"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("still: error:")]
    assert len(errors) == 1 and "no loss token" in errors[0] and "Traceback" not in err
    assert cli.main(["run", str(recipe), "data.max_len=8"]) == 2
    assert not (tmp_path / "runs" / "tiny-ft").exists()


def test_check_reports_without_training(finetune_recipe, tmp_path, capsys):
    assert cli.main(["check", str(finetune_recipe())]) == 0
    out = capsys.readouterr().out
    assert "8 examples" in out and "eos trained: yes" in out and "trainable" in out
    assert "«Serialize obj to a JSON formatted str.<|im_end|>»" in out or "«" in out
    assert not (tmp_path / "runs").exists()


def test_qlora_on_cpu_is_a_one_line_error(finetune_recipe, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert cli.main(["run", str(finetune_recipe()), "method=qlora"]) == 2
    assert "qlora needs a CUDA GPU" in capsys.readouterr().err


def test_resume_continues_the_same_wandb_run(finetune_recipe, tmp_path):
    """Each `still run` is its own process, as a real resume is: both log to one W&B run id."""
    import os
    import shutil
    import subprocess
    import sys

    pytest.importorskip("wandb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_MODE="offline", HF_HUB_OFFLINE="1")
    recipe = finetune_recipe(extra="track: {wandb: {project: still-test}}\n")
    run = [sys.executable, "-m", "still.cli", "run", str(recipe), "train.max_steps=4"]
    assert subprocess.run(run, env=env, capture_output=True, timeout=300).returncode == 0
    run_dir = tmp_path / "runs" / "tiny-ft"
    shutil.rmtree(run_dir / "checkpoints" / "checkpoint-4")
    shutil.rmtree(run_dir / "adapter")
    first = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert (
        subprocess.run(run + ["--resume"], env=env, capture_output=True, timeout=300).returncode
        == 0
    )
    run_id = (run_dir / "wandb_run_id").read_text()
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(first) == 1 and len(runs) == 2, runs
    assert all(path.name.endswith(f"-{run_id}") for path in runs)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_chunked_loss_gives_the_models_own_loss_curve(
    finetune_recipe, tmp_path, monkeypatch, method
):
    """train.loss_chunk_size (the default) vs null (the model's full-logits loss): same run."""
    from finetune import sft

    calls = []
    chunked_loss = sft.linear_cross_entropy
    monkeypatch.setattr(
        sft, "linear_cross_entropy", lambda *a, **k: calls.append(k) or chunked_loss(*a, **k)
    )
    recipe = finetune_recipe()
    common = [
        "run",
        str(recipe),
        f"method={method}",
        "train.max_steps=4",
        "train.grad_accum=2",
        "train.lr=1e-2",
        "train.eval_steps=2",
    ]
    assert cli.main([*common, "name=chunked", "train.loss_chunk_size=3"]) == 0
    assert len(calls) > 8 and all(
        call["chunk_size"] == 3 for call in calls
    )  # every train + eval batch
    calls.clear()
    assert cli.main([*common, "name=full-logits", "train.loss_chunk_size=null"]) == 0
    assert not calls
    assert_same_curves(tmp_path / "runs" / "chunked", tmp_path / "runs" / "full-logits")
    losses = [
        row["loss"] for row in RunDir(tmp_path / "runs" / "chunked").metrics() if "loss" in row
    ]
    assert losses[-1] < losses[0]


def assert_same_curves(run_a, run_b):
    """Two runs logged the same loss, eval loss and grad norm at every step (rel 1e-4)."""
    rows_a, rows_b = (RunDir(run).metrics() for run in (run_a, run_b))
    for key in ("loss", "eval_loss", "grad_norm"):
        a = [row[key] for row in rows_a if key in row]
        b = [row[key] for row in rows_b if key in row]
        assert len(a) == len(b) >= 3, key
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5), key


def test_packed_sdpa_gives_the_block_masks_curve(finetune_recipe, tmp_path, monkeypatch):
    """Packing switches the tiny Llama to packed sdpa; forcing the block mask gives the same run."""
    from finetune import sft
    from still import attention
    from still import recipe as recipe_module
    from still.rundir import open_run_dir

    calls = []
    per_example = attention._per_example
    monkeypatch.setattr(
        attention, "_per_example", lambda *a, **k: calls.append(a[4]) or per_example(*a, **k)
    )
    recipe = finetune_recipe()
    common = [
        "run",
        str(recipe),
        "train.max_steps=4",
        "train.grad_accum=2",
        "train.lr=1e-2",
        "train.eval_steps=2",
    ]
    assert cli.main([*common, "name=packed-sdpa"]) == 0
    # every layer of every train forward (4 steps x 2 micro-batches x 2 layers), each batch's 4
    # examples apart; then eval batches (the first calls are the one-row logits probe)
    packed_calls = [rows for rows in calls if len(rows[0]) > 1]
    assert len(packed_calls) > 16 and all(
        len(rows) == 1 and len(rows[0]) == 4 for rows in packed_calls[:16]
    )
    calls.clear()
    block_mask = recipe_module.load(recipe, [*common[2:], "name=block-mask"])
    with open_run_dir(block_mask) as run:
        sft.run(block_mask, run, attention="block_mask")
    assert not calls
    assert_same_curves(tmp_path / "runs" / "packed-sdpa", tmp_path / "runs" / "block-mask")
    assert json.loads(
        (tmp_path / "runs" / "packed-sdpa" / "adapter" / "adapter_config.json").read_text()
    )


def test_liger_kernel_on_cpu_is_a_one_line_error(finetune_recipe, tmp_path, capsys):
    recipe = finetune_recipe()
    assert cli.main(["run", str(recipe), "train.liger_kernel=true"]) == 2
    err = capsys.readouterr().err
    assert "train.liger_kernel: true needs a CUDA GPU" in err and "Traceback" not in err
    assert not (tmp_path / "runs" / "tiny-ft" / "adapter").exists()


def test_torch_compile_trains_the_same_curve(finetune_recipe, tmp_path):
    import torch._dynamo

    recipe = finetune_recipe()
    common = ["run", str(recipe), "train.max_steps=2"]
    assert cli.main([*common, "name=eager"]) == 0
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    assert cli.main([*common, "name=compiled", "train.torch_compile=true"]) == 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it really was compiled
    eager, compiled = (
        train_losses(tmp_path / "runs" / "eager"),
        train_losses(tmp_path / "runs" / "compiled"),
    )
    assert sorted(compiled) == sorted(eager) == [1, 2]
    assert [compiled[s] for s in (1, 2)] == pytest.approx([eager[s] for s in (1, 2)], rel=1e-4)
    torch._dynamo.reset()


@pytest.mark.parametrize("method", ["lora", "full"])
def test_gradient_checkpointing_recomputes_and_trains_the_same_curve(
    finetune_recipe, tmp_path, mlp_forwards, method
):
    common = ["run", str(finetune_recipe()), "train.max_steps=2", f"method={method}"]
    assert cli.main([*common, "name=plain"]) == 0
    plain_calls = len(mlp_forwards)
    mlp_forwards.clear()
    assert cli.main([*common, "name=checkpointed", "train.gradient_checkpointing=true"]) == 0
    # The same evals and training forwards, plus each of the 2 layers rerun in each step's backward.
    assert len(mlp_forwards) == plain_calls + 2 * 2
    plain, checkpointed = (
        train_losses(tmp_path / "runs" / "plain"),
        train_losses(tmp_path / "runs" / "checkpointed"),
    )
    assert sorted(checkpointed) == sorted(plain) == [1, 2]
    assert [checkpointed[s] for s in (1, 2)] == pytest.approx([plain[s] for s in (1, 2)], rel=1e-5)


def test_soft_capped_model_trains_with_its_own_loss(
    finetune_recipe, tmp_path, tiny_tokenizer_dir, monkeypatch, capsys
):
    """Gemma-2-style logits (capped after the head) cannot be rebuilt from hidden states: the
    run notices and uses the model's loss, which gives the same curve as asking for it."""
    from tiny_models import build_tiny_softcapped
    from transformers import AutoTokenizer

    from finetune import sft

    model_dir = tmp_path / "capped"
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    build_tiny_softcapped(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    calls = []
    monkeypatch.setattr(sft, "linear_cross_entropy", lambda *a, **k: calls.append(k))
    recipe = finetune_recipe()
    common = ["run", str(recipe), f"model.ref={model_dir}", "train.max_steps=3", "train.lr=1e-2"]
    assert cli.main([*common, "name=default"]) == 0
    assert "training with its own full-logits loss" in capsys.readouterr().out
    assert cli.main([*common, "name=model-loss", "train.loss_chunk_size=null"]) == 0
    assert not calls
    default, own = (
        train_losses(tmp_path / "runs" / "default"),
        train_losses(tmp_path / "runs" / "model-loss"),
    )
    assert default == own and len(default) == 3
