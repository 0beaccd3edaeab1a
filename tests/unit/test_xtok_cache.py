"""The teacher cache across tokenizers (distill/xtok_cache.py and the cached loss in
distill/xtok_losses.py): with every teacher token cached it is the online loss; with a small k
the buckets carry the right masses; and `still cache` + `still run` on two tiny models with
different tokenizers train like the online teacher, refusing a cache made for another pair."""

import json

import pytest
import torch
from test_cross_tokenizer import _inputs, _recipe, loss_settings, partial_map

from distill.losses import MIN_REST_MASS
from distill.xtok_cache import teacher_entries
from distill.xtok_losses import CachedTeacher, uld_top_k, xtok_cached_kd_loss, xtok_kd_loss
from still.losses import IGNORE_INDEX


def _cached(teacher_log_probs, k, mapping):
    matched = torch.zeros(mapping.teacher_vocab, dtype=torch.bool)
    matched[mapping.teacher_ids] = True
    entries = teacher_entries(teacher_log_probs, k, matched)
    teacher = CachedTeacher(
        entries["values"],
        entries["ids"],
        entries["matched_rest_log"],
        entries["unmatched_rest_log"],
    )
    return teacher, entries


@pytest.mark.parametrize("mode", ["uld", "gold"])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "reverse_kl"])
def test_with_every_teacher_token_cached_it_is_the_online_loss(mode, divergence):
    hidden, head, teacher_rows, teacher_head, labels, index = _inputs()
    mapping = partial_map()
    settings = loss_settings(mode, mapping, divergence)
    a_hidden, a_head = hidden.clone().requires_grad_(), head.clone().requires_grad_()
    online = xtok_kd_loss(
        a_hidden, a_head, teacher_rows, teacher_head, labels, index, chunk_size=5, **settings
    )
    online.loss.backward()
    keep = labels != IGNORE_INDEX
    rows = teacher_rows[index[keep].clamp(min=0)] @ teacher_head.T
    teacher, _ = _cached(torch.log_softmax(rows / 1.5, -1), mapping.teacher_vocab, mapping)
    b_hidden, b_head = hidden.clone().requires_grad_(), head.clone().requires_grad_()
    cached = xtok_cached_kd_loss(
        b_hidden, b_head, teacher, index[keep] >= 0, labels, chunk_size=4, **settings
    )
    cached.loss.backward()
    assert online.kd_sum > 0 and cached.n_tokens == online.n_tokens
    for got, want in [(cached.kd_sum, online.kd_sum), (cached.ce_sum, online.ce_sum)]:
        assert abs(got.item() - want.item()) < 1e-6 * max(1.0, abs(want.item()))
    assert torch.allclose(a_hidden.grad, b_hidden.grad, atol=1e-6)
    assert torch.allclose(a_head.grad, b_head.grad, atol=1e-6)


def test_the_buckets_hold_the_mass_outside_the_top_k_on_each_side_of_the_map():
    mapping = partial_map()  # teacher vocab 17, 6 entries matched
    log_probs = torch.log_softmax(torch.randn(4, 17, dtype=torch.float64) * 2, -1)
    _, entries = _cached(log_probs, 3, mapping)
    matched = torch.zeros(17, dtype=torch.bool)
    matched[mapping.teacher_ids] = True
    outside = torch.ones_like(log_probs, dtype=torch.bool).scatter_(-1, entries["ids"], False)
    probs = log_probs.exp()
    want_matched = (probs * (outside & matched)).sum(-1).clamp(min=MIN_REST_MASS)
    want_unmatched = (probs * (outside & ~matched)).sum(-1).clamp(min=MIN_REST_MASS)
    assert torch.allclose(entries["matched_rest_log"].exp(), want_matched, atol=1e-12)
    assert torch.allclose(entries["unmatched_rest_log"].exp(), want_unmatched, atol=1e-12)
    total = entries["values"].exp().sum(-1) + entries["rest_log"].exp()
    assert torch.allclose(total, torch.ones(4, dtype=torch.float64), atol=1e-12)


def test_uld_against_a_top_k_is_a_lower_bound_that_is_exact_without_a_rest():
    student = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)
    # a teacher of [0.6, 0.25, 0.1, 0.05] known by its top 2 and a rest of 0.15
    f64 = torch.float64
    top = torch.tensor([[0.6, 0.25]], dtype=f64)
    got = uld_top_k(student, top, torch.tensor([0.15], dtype=f64)).item()
    assert got == pytest.approx(0.1 + 0.05 + abs(0.2 - 0.15), abs=1e-12)
    full = torch.tensor([[0.6, 0.25, 0.1, 0.05]], dtype=f64)
    exact = uld_top_k(student, full, torch.zeros(1, dtype=f64)).item()
    assert exact == pytest.approx(0.1 + 0.05 + 0.1 + 0.05, abs=1e-12)
    assert got <= exact


# --------------------------------------------------------------------------- end to end
def _losses(run_dir, key="loss"):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row[key] for row in rows if key in row]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    from xtok_models import save_teacher

    return save_teacher(tmp_path_factory.mktemp("metaspace_teacher_cache"))


def test_a_full_cache_across_tokenizers_trains_like_the_online_teacher(
    teacher_dir, tiny_model_dir, tmp_path, monkeypatch, capsys
):
    from still import cli

    recipe = _recipe(tmp_path, teacher_dir, tiny_model_dir, ce=0.5)
    monkeypatch.chdir(tmp_path)
    steps = ["train.max_steps=6"]
    assert cli.main(["run", recipe.name, "name=online", *steps]) == 0
    cache = ["distill.teacher_cache=cache", "distill.cache_top_k=366"]  # the teacher's vocab
    assert cli.main(["cache", recipe.name, *cache]) == 0
    out = capsys.readouterr().out
    assert "cross-tokenizer KD (gold): vocab overlap" in out and "top-k mass 1.0000" in out
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert set(manifest["cross_tokenizer"]) == {
        "teacher_tokenizer_sha256",
        "teacher_chat_template_sha256",
        "vocab_map_sha256",
    }
    assert manifest["dtypes"]["aligned"] == "uint8"
    assert cli.main(["run", recipe.name, "name=cached", *steps, *cache]) == 0
    runs = tmp_path / "runs"
    # fp16 storage of the teacher's log-probs and buckets is the only difference
    assert _losses(runs / "cached") == pytest.approx(_losses(runs / "online"), rel=2e-3)
    evals = _losses(runs / "cached", "eval_loss")
    assert evals and evals == pytest.approx(_losses(runs / "online", "eval_loss"), rel=2e-3)
    # another teacher template renders other teacher tokens: the cache no longer fits
    other = "distill.teacher_chat_template='{% for m in messages %}{{ m.content }}{% endfor %}'"
    capsys.readouterr()
    assert cli.main(["run", recipe.name, "name=x", *steps, *cache, other]) == 2
    err = capsys.readouterr().err
    assert "does not fit this recipe: it was made with another" in err
    assert "distill.teacher_chat_template" in err and "Traceback" not in err
    assert not (runs / "x").exists()


def test_a_small_k_cache_across_tokenizers_trains_with_uld(
    teacher_dir, tiny_model_dir, tmp_path, monkeypatch
):
    from still import cli

    recipe = _recipe(tmp_path, teacher_dir, tiny_model_dir, cross="uld", ce=0.0)
    monkeypatch.chdir(tmp_path)
    cache = ["distill.teacher_cache=cache", "distill.cache_top_k=8", "distill.cache_dtype=uint8"]
    assert cli.main(["cache", recipe.name, *cache]) == 0
    assert cli.main(["run", recipe.name, *cache]) == 0
    kd = _losses(tmp_path / "runs" / "tiny-xtok", "kd_loss")
    assert len(kd) == 12 and all(0 < value < 2 for value in kd)
    assert sum(kd[-4:]) < 0.9 * sum(kd[:4])


@pytest.mark.multiproc
def test_two_processes_read_a_cross_tokenizer_cache_like_one(teacher_dir, tiny_model_dir, tmp_path):
    """DDP over a cache made across tokenizers: each rank reads its own examples' rows."""
    import os
    import subprocess
    import sys

    recipe = _recipe(tmp_path, teacher_dir, tiny_model_dir, ce=0.5)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cache = ["distill.teacher_cache=cache", "distill.cache_top_k=64"]
    base = [sys.executable, "-m", "still.cli"]
    for args in (
        ["cache", recipe.name, *cache],
        ["run", recipe.name, "train.max_steps=4", "name=single", *cache],
        [
            "run",
            recipe.name,
            "train.max_steps=4",
            "name=two",
            "train.batch_size=2",
            "distributed.strategy=ddp",
            "--nproc",
            "2",
            *cache,
        ],
    ):
        done = subprocess.run(
            base + args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stderr[-3000:]
    single, two = (_losses(tmp_path / "runs" / name) for name in ("single", "two"))
    assert len(single) == 4 and two == pytest.approx(single, abs=1e-4)
