"""CUDA-only paths on the tiny model: bf16 by default, bf16 chunked CE, Liger, QLoRA, torch.compile.

Run on a machine with a GPU: `pytest -m gpu`. The default suite skips them (`-m 'not gpu'`).
"""

import importlib.util

import pytest
import torch

from still import cli
from still.rundir import RunDir

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def curve(run_dir, key="loss"):
    return [row[key] for row in RunDir(run_dir).metrics() if key in row]


def run(recipe, name, *overrides):
    """Train 6 steps; a non-zero exit shows the captured `still: error:` line in the report."""
    assert (
        cli.main(
            [
                "run",
                str(recipe),
                f"name={name}",
                "train.max_steps=6",
                "train.lr=2e-2",
                "train.eval_steps=3",
                *overrides,
            ]
        )
        == 0
    )


def test_precision_auto_trains_in_bf16_on_cuda(finetune_recipe, tmp_path):
    run(finetune_recipe(), "bf16")
    run_dir = tmp_path / "runs" / "bf16"
    checkpoints = sorted((run_dir / "checkpoints").glob("checkpoint-*"))
    assert checkpoints, list(run_dir.iterdir())
    args = torch.load(checkpoints[-1] / "training_args.bin", weights_only=False)
    assert (args.bf16, args.use_cpu) == (True, False)
    losses = curve(run_dir)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses


def test_chunked_loss_matches_the_models_loss_in_bf16(finetune_recipe, tmp_path):
    recipe = finetune_recipe()
    run(recipe, "chunked", "train.loss_chunk_size=5")
    run(recipe, "full-logits", "train.loss_chunk_size=null")
    for key in ("loss", "eval_loss"):
        chunked, full = (
            curve(tmp_path / "runs" / "chunked", key),
            curve(tmp_path / "runs" / "full-logits", key),
        )
        assert len(chunked) == len(full) >= 3
        assert chunked == pytest.approx(full, rel=2e-2), key  # bf16 matmuls, same fp32 softmax


@pytest.mark.skipif(
    importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel not installed"
)
def test_liger_kernel_trains_like_the_plain_model(finetune_recipe, tmp_path):
    recipe = finetune_recipe()
    run(recipe, "plain")
    run(recipe, "liger", "train.liger_kernel=true")
    plain, liger = curve(tmp_path / "runs" / "plain"), curve(tmp_path / "runs" / "liger")
    assert liger[-1] < liger[0]
    assert liger == pytest.approx(plain, rel=3e-2)


@pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed"
)
def test_qlora_trains_on_a_4bit_base_and_merges_at_full_precision(finetune_recipe, tmp_path):
    import json

    run(finetune_recipe(), "qlora", "method=qlora")
    run_dir = tmp_path / "runs" / "qlora"
    losses = curve(run_dir)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses
    assert json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["r"] > 0
    assert cli.main(["merge", str(run_dir), "--out", str(tmp_path / "merged")]) == 0
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config, config  # merged into the unquantized base


def test_torch_compile_trains_like_eager(finetune_recipe, tmp_path):
    recipe = finetune_recipe()
    run(recipe, "eager")
    run(recipe, "compiled", "train.torch_compile=true")
    eager, compiled = curve(tmp_path / "runs" / "eager"), curve(tmp_path / "runs" / "compiled")
    assert compiled == pytest.approx(eager, rel=3e-2)
    torch._dynamo.reset()


def tiny_bf16_model_and_rows():
    """The tiny Llama on CUDA in bf16, in eval mode, and four random examples of mixed lengths."""
    from tiny_models import build_tiny_llama, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_llama(tokenizer).to("cuda", torch.bfloat16).eval()
    generator = torch.Generator().manual_seed(0)
    rows = [
        {
            "input_ids": (
                ids := torch.randint(4, len(tokenizer), (n,), generator=generator).tolist()
            ),
            "labels": ids,
        }
        for n in (7, 12, 3, 9)
    ]
    return model, rows


def test_packed_sdpa_runs_on_the_flash_kernel_in_bf16():
    """Packed sdpa passes no mask, so sdpa restricted to its flash kernel accepts it; the block
    mask it replaced does not. Per-example logits equal each example alone (bf16 tolerance)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from still.attention import use_packed_sdpa
    from still.data import PackedCollator

    model, rows = tiny_bf16_model_and_rows()
    with torch.no_grad():
        alone = [
            model(input_ids=torch.tensor([r["input_ids"]], device="cuda")).logits[0] for r in rows
        ]
        blocked = {
            k: v.cuda() for k, v in PackedCollator(0, mask_dtype=torch.bfloat16)(rows).items()
        }
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), pytest.raises(RuntimeError):
            model(**blocked)
        assert use_packed_sdpa(model)
        packed = {k: v.cuda() for k, v in PackedCollator(0, attention="position_ids")(rows).items()}
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            logits = model(**packed).logits[0]
    start = 0
    for row, reference in zip(rows, alone):
        here = logits[start : start + len(row["input_ids"])]
        torch.testing.assert_close(here.float(), reference.float(), atol=3e-2, rtol=3e-2)
        start += len(row["input_ids"])


@pytest.mark.skipif(
    importlib.util.find_spec("torch.nn.attention.varlen") is None, reason="torch < 2.10"
)
def test_varlen_kernel_passes_its_check_and_matches_the_loop_in_bf16():
    """torch's varlen kernel is used on CUDA once its check passes; then a packed batch's logits
    equal the per-example loop's (bf16 tolerance)."""
    from still import attention
    from still.data import PackedCollator

    model, rows = tiny_bf16_model_and_rows()
    assert attention.use_packed_sdpa(model)
    batch = {k: v.cuda() for k, v in PackedCollator(0, attention="position_ids")(rows).items()}
    attention._varlen.checked.clear()
    with torch.no_grad():
        kernel = model(**batch).logits
    assert attention._varlen.checked and all(attention._varlen.checked.values()), (
        attention._varlen.checked
    )
    devices, attention._varlen.devices = attention._varlen.devices, ()
    try:
        with torch.no_grad():
            loop = model(**batch).logits
    finally:
        attention._varlen.devices = devices
    torch.testing.assert_close(kernel.float(), loop.float(), atol=3e-2, rtol=3e-2)
