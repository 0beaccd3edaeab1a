"""Cross-tokenizer KD losses (distill/xtok_losses.py): properties on tensors, and a short
`still run` of a distill recipe whose teacher and student tokenizers differ."""

import json

import pytest
import torch

from distill.align import VocabMap
from distill.losses import forward_kl, jsd, kd_loss
from distill.xtok_losses import (
    VocabSplit,
    uld_distance,
    xtok_divergence,
    xtok_kd_loss,
    xtok_kd_loss_from_logits,
)
from still.losses import IGNORE_INDEX


def identity_map(vocab: int) -> VocabMap:
    ids = torch.arange(vocab)
    return VocabMap(ids, ids.clone(), vocab, vocab)


def partial_map(student_vocab=11, teacher_vocab=17, seed=0) -> VocabMap:
    generator = torch.Generator().manual_seed(seed)
    student_ids = torch.randperm(student_vocab, generator=generator)[:6].sort().values
    teacher_ids = torch.randperm(teacher_vocab, generator=generator)[:6]
    return VocabMap(student_ids, teacher_ids, student_vocab, teacher_vocab)


def test_uld_of_identical_distributions_is_zero_and_ignores_order():
    probs = torch.softmax(torch.randn(5, 9, dtype=torch.float64), -1)
    assert torch.equal(uld_distance(probs, probs), torch.zeros(5, dtype=torch.float64))
    shuffled = probs[:, torch.randperm(9)]
    assert uld_distance(shuffled, probs).abs().max() < 1e-15
    # a longer vocabulary padded with zero-probability entries changes nothing
    padded = torch.cat([probs, torch.zeros(5, 4, dtype=torch.float64)], -1)
    assert uld_distance(probs, padded).abs().max() < 1e-15
    assert uld_distance(padded, probs).abs().max() < 1e-15


def test_uld_is_the_l1_of_sorted_probabilities():
    student = torch.tensor([[0.1, 0.6, 0.3]], dtype=torch.float64)
    teacher = torch.tensor([[0.5, 0.2, 0.2, 0.1]], dtype=torch.float64)
    # sorted: [0.6, 0.3, 0.1, 0] vs [0.5, 0.2, 0.2, 0.1]
    expected = 0.1 + 0.1 + 0.1 + 0.1
    assert uld_distance(student, teacher).item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "divergence,params,reference",
    [("forward_kl", {}, forward_kl), ("jsd", {"beta": 0.3}, jsd)],
)
def test_hybrid_with_one_vocabulary_equals_same_tokenizer_kd(dtype, divergence, params, reference):
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(7, 13, generator=generator, dtype=dtype) * 3
    teacher = torch.randn(7, 13, generator=generator, dtype=dtype) * 3
    split = VocabSplit(identity_map(13), "cpu")
    hybrid = xtok_divergence(
        torch.log_softmax(student, -1),
        torch.log_softmax(teacher, -1),
        mode="gold",
        split=split,
        divergence=divergence,
        params=params,
    )
    expected = reference(student, teacher, 1.0, **params)
    assert (hybrid - expected).abs().max() < 1e-6


def test_hybrid_loss_with_one_vocabulary_equals_kd_loss_at_a_temperature():
    generator = torch.Generator().manual_seed(2)
    student = torch.randn(9, 13, generator=generator)
    teacher = torch.randn(9, 13, generator=generator)
    labels = torch.randint(0, 13, (9,), generator=generator)
    labels[2] = IGNORE_INDEX
    out = xtok_kd_loss_from_logits(
        student,
        teacher,
        labels,
        torch.ones(9, dtype=torch.bool),
        mode="gold",
        mapping=identity_map(13),
        temperature=2.0,
        ce_weight=0.0,
        kd_weight=1.0,
    )
    same = kd_loss(student, teacher, labels != IGNORE_INDEX, temperature=2.0, reduction="sum")
    assert abs(out.kd_sum.item() - same.item()) < 1e-5 * max(1.0, same.item())


def _inputs(seed=0, tokens=14, student_hidden=8, teacher_hidden=6, vs=11, vt=17):
    generator = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    hidden = torch.randn(tokens, student_hidden, generator=generator, dtype=f64)
    head = torch.randn(vs, student_hidden, generator=generator, dtype=f64)
    teacher_rows = torch.randn(tokens + 3, teacher_hidden, generator=generator, dtype=f64)
    teacher_head = torch.randn(vt, teacher_hidden, generator=generator, dtype=f64) * 2
    labels = torch.randint(0, vs, (tokens,), generator=generator)
    labels[[1, 5]] = IGNORE_INDEX
    index = torch.randint(0, tokens + 3, (tokens,), generator=generator)
    index[[0, 4, 9]] = -1  # unaligned: CE only
    return hidden, head, teacher_rows, teacher_head, labels, index


def loss_settings(mode, mapping, divergence) -> dict:
    """The loss settings of the chunked-vs-naive (and cached-vs-online) comparisons."""
    return dict(
        mode=mode,
        mapping=mapping,
        divergence=divergence,
        temperature=1.5,
        beta=0.4,
        ce_weight=0.3,
        kd_weight=0.7,
    )


@pytest.mark.parametrize("mode", ["uld", "gold"])
@pytest.mark.parametrize("chunk_size", [1, 5, 64])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_chunked_equals_naive(mode, chunk_size, divergence):
    hidden, head, teacher_rows, teacher_head, labels, index = _inputs()
    settings = loss_settings(mode, partial_map() if mode == "gold" else None, divergence)
    a_hidden, a_head = hidden.clone().requires_grad_(), head.clone().requires_grad_()
    chunked = xtok_kd_loss(
        a_hidden,
        a_head,
        teacher_rows,
        teacher_head,
        labels,
        index,
        chunk_size=chunk_size,
        **settings,
    )
    chunked.loss.backward()
    b_hidden, b_head = hidden.clone().requires_grad_(), head.clone().requires_grad_()
    keep = labels != IGNORE_INDEX
    naive = xtok_kd_loss_from_logits(
        b_hidden[keep] @ b_head.T,
        teacher_rows[index[keep].clamp(min=0)] @ teacher_head.T,
        labels[keep],
        index[keep] >= 0,
        **settings,
    )
    naive.loss.backward()
    assert chunked.n_tokens == naive.n_tokens == 12
    for got, want in [
        (chunked.loss, naive.loss),
        (chunked.kd_sum, naive.kd_sum),
        (chunked.ce_sum, naive.ce_sum),
    ]:
        assert abs(got.item() - want.item()) < 1e-9 * max(1.0, abs(want.item()))
    assert torch.allclose(a_hidden.grad, b_hidden.grad, atol=1e-9)
    assert torch.allclose(a_head.grad, b_head.grad, atol=1e-9)
    assert chunked.kd_sum > 0


def test_unaligned_and_masked_rows_carry_no_kd():
    hidden, head, teacher_rows, teacher_head, labels, _ = _inputs()
    index = torch.full_like(labels, -1)
    out = xtok_kd_loss(
        hidden,
        head,
        teacher_rows,
        teacher_head,
        labels,
        index,
        mode="uld",
        mapping=None,
        ce_weight=1.0,
        kd_weight=1.0,
    )
    assert out.kd_sum.item() == 0.0 and out.ce_sum.item() > 0
    masked = torch.full_like(labels, IGNORE_INDEX)
    h = hidden.clone().requires_grad_()
    out = xtok_kd_loss(
        h,
        head,
        teacher_rows,
        teacher_head,
        masked,
        index,
        mode="gold",
        mapping=partial_map(),
        ce_weight=1.0,
        kd_weight=1.0,
    )
    out.loss.backward()
    assert out.loss.item() == 0.0 and not torch.isnan(h.grad).any() and out.n_tokens == 0


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    from xtok_models import save_teacher

    return save_teacher(tmp_path_factory.mktemp("metaspace_teacher"))


def _recipe(tmp_path, teacher, student, cross="auto", extra="", ce=0.5):
    from tiny_models import QA

    rows = [{"question": q, "answer": a} for q, a in QA]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    path = tmp_path / "xtok.yaml"
    path.write_text(
        f"""# Run: still run xtok.yaml
kind: distill
name: tiny-xtok
output_dir: {tmp_path / "runs"}
teacher: {{ref: "{teacher}"}}
student: {{ref: "{student}"}}
method: full
distill: {{cross_tokenizer: {cross}, kd_weight: 1.0, ce_weight: {ce}}}
data:
  train: {{path: train.jsonl, format: instruction, prompt: question, response: answer}}
  eval: {{path: val.jsonl}}
  max_len: 64
train: {{lr: 3.0e-3, batch_size: 4, max_steps: 12, warmup_ratio: 0.0, seed: 0, logging_steps: 1,
         loss_chunk_size: 16}}
{extra}"""
    )
    return path


@pytest.mark.parametrize("packing", [False, True])
def test_cross_tokenizer_run_trains_and_the_loss_falls(
    teacher_dir, tiny_model_dir, tmp_path, capsys, packing
):
    from still import cli

    recipe = _recipe(tmp_path, teacher_dir, tiny_model_dir, ce=0.0)  # the loss is KD alone
    args = ["run", str(recipe)] + (["data.packing=true"] if packing else [])
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "cross-tokenizer KD (gold): vocab overlap" in out
    run = tmp_path / "runs" / "tiny-xtok"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    kd = [row["kd_loss"] for row in rows if "kd_loss" in row]
    assert len(kd) == 12 and all(v == v for v in kd)
    assert sum(kd[-4:]) / 4 < 0.9 * sum(kd[:4]) / 4
    evals = [row["eval_loss"] for row in rows if "eval_loss" in row]
    assert evals[-1] < evals[0]
    lineage = json.loads((run / "lineage.json").read_text())
    assert lineage["cross_tokenizer"]["mode"] == "gold"
    assert 0 < lineage["cross_tokenizer"]["aligned_share"] <= 1
    # the student's tokenizer is saved with the student
    from transformers import AutoTokenizer

    saved = next(p for p in run.rglob("tokenizer_config.json") if "checkpoint" not in str(p))
    assert len(AutoTokenizer.from_pretrained(saved.parent)) == 320


def test_check_prints_the_preflight_numbers(teacher_dir, tiny_model_dir, tmp_path, capsys):
    from still import cli

    recipe = _recipe(tmp_path, teacher_dir, tiny_model_dir, cross="uld")
    assert cli.main(["check", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "cross-tokenizer KD (uld): vocab overlap" in out
    assert "train loss positions aligned" in out and "exact-match share" in out
    assert not (tmp_path / "runs").exists()


def test_on_policy_samples_are_retokenized_for_the_teacher(teacher_dir, tiny_model_dir, tmp_path):
    """λ = 1: every batch is the student's own samples, re-rendered by both tokenizers."""
    from still import cli

    recipe = _recipe(
        tmp_path,
        teacher_dir,
        tiny_model_dir,
        ce=0.0,
        extra="",
    )
    args = [
        "run",
        str(recipe),
        "distill.on_policy_ratio=1.0",
        "distill.on_policy_max_new_tokens=12",
        "train.max_steps=4",
    ]
    assert cli.main(args) == 0
    rows = [
        json.loads(line)
        for line in (tmp_path / "runs" / "tiny-xtok" / "metrics.jsonl").read_text().splitlines()
    ]
    logged = [row for row in rows if "kd_loss" in row]
    assert len(logged) == 4
    assert all(row["on_policy_fraction"] == 1.0 for row in logged)
    assert all(0 < row["kd_loss"] < 10 for row in logged)


@pytest.mark.multiproc
@pytest.mark.parametrize("strategy", ["ddp", "zero2", "zero3"])
def test_two_processes_match_one(teacher_dir, tiny_model_dir, tmp_path, strategy):
    """Collation is per process: 2 ranks x 2 examples give the loss curve of 1 rank x 4 (ZeRO-3
    partitions the heads, so its loss calls the head modules instead of the chunked loss)."""
    import os
    import subprocess
    import sys

    recipe = _recipe(tmp_path, teacher_dir, tiny_model_dir, ce=0.5)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "still.cli", "run", recipe.name, "train.max_steps=4"]
    for extra in (
        ["name=single"],
        ["name=two", "train.batch_size=2", f"distributed.strategy={strategy}", "--nproc", "2"],
    ):
        done = subprocess.run(
            base + extra, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stderr[-3000:]

    def losses(name):
        path = tmp_path / "runs" / name / "metrics.jsonl"
        return [
            json.loads(line)["loss"] for line in path.read_text().splitlines() if '"loss"' in line
        ]

    assert len(losses("single")) == 4
    assert losses("two") == pytest.approx(losses("single"), abs=1e-4)
