"""`still cache` then distill from the cache: the same loss curve as online KD when every token
is cached, close for a small k on a peaked teacher, refused when the recipe no longer fits it,
and resumable shard by shard."""

import json
import shutil
import textwrap

import pytest
from safetensors.torch import load_file, save_file

from distill import cache as cache_module
from still import cli
from still.rundir import RunDir

VOCAB = 320  # the tiny tokenizer's


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_model_dir_4layers):
    """A distill recipe whose teacher is peaked (final norm x6), as trained teachers are."""
    root = tmp_path_factory.mktemp("teacher_cache")
    teacher = root / "teacher"
    shutil.copytree(tiny_model_dir_4layers, teacher)
    weights = load_file(teacher / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] * 6
    save_file(weights, teacher / "model.safetensors", metadata={"format": "pt"})
    rows = [
        ("What does json.dumps do?", "Serialize obj to a JSON formatted str."),
        ("What does abs do?", "Return the absolute value."),
        ("What does len do?", "Return the number of items."),
        ("What does min do?", "Return the smallest item."),
        ("What does max do?", "Return the largest item."),
    ]
    (root / "train.jsonl").write_text(
        "".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in rows)
    )
    (root / "eval.jsonl").write_text(
        json.dumps({"question": "What does sum do?", "answer": "Sums items."}) + "\n"
    )
    (root / "distill.yaml").write_text(
        textwrap.dedent(f"""\
        kind: distill
        name: x
        teacher: {{ref: "{teacher}"}}
        student: {{init: {{keep_layers: [0, 3]}}}}
        distill: {{loss: forward_kl, temperature: 2.0, ce_weight: 0.5}}
        data:
          train: {{path: train.jsonl, format: instruction, prompt: question, response: answer}}
          eval: {{path: eval.jsonl, format: instruction, prompt: question, response: answer}}
          max_len: 64
        train: {{lr: 1.0e-2, batch_size: 2, max_steps: 5, warmup_ratio: 0.0, seed: 3,
          loss_chunk_size: 16}}
        """)
    )
    return root


def _still(work, monkeypatch, *args) -> int:
    monkeypatch.chdir(work)
    return cli.main(list(args))


def _losses(run_dir):
    return [row["loss"] for row in RunDir(run_dir).metrics() if "loss" in row]


def _kd_losses(run_dir):
    return [row["kd_loss"] for row in RunDir(run_dir).metrics() if "kd_loss" in row]


@pytest.fixture(scope="module")
def online(work):
    with pytest.MonkeyPatch.context() as monkeypatch:
        assert _still(work, monkeypatch, "run", "distill.yaml", "name=online") == 0
    return work / "runs" / "online"


def test_full_k_cache_trains_like_online_kd(work, online, monkeypatch, capsys):
    k = f"distill.cache_top_k={VOCAB}"
    assert (
        _still(work, monkeypatch, "cache", "distill.yaml", "distill.teacher_cache=cache-full", k)
        == 0
    )
    out = capsys.readouterr().out
    assert "train: 5 examples" in out and "eval: 1 examples" in out and "top-k mass 1.0000" in out
    assert (
        _still(
            work,
            monkeypatch,
            "run",
            "distill.yaml",
            "name=from-cache",
            "distill.teacher_cache=cache-full",
            k,
        )
        == 0
    )
    run_dir = work / "runs" / "from-cache"
    # fp16 storage of the teacher's log-probs is the only difference (2.8e-4 relative seen)
    assert _losses(run_dir) == pytest.approx(_losses(online), rel=1e-3)
    eval_loss = [r["eval_loss"] for r in RunDir(run_dir).metrics() if "eval_loss" in r]
    online_eval = [r["eval_loss"] for r in RunDir(online).metrics() if "eval_loss" in r]
    assert eval_loss and eval_loss == pytest.approx(online_eval, rel=1e-3)
    assert (run_dir / "model" / "model.safetensors").exists()


def test_small_k_on_a_peaked_teacher_is_close_and_small(work, online, monkeypatch):
    assert (
        _still(
            work,
            monkeypatch,
            "cache",
            "distill.yaml",
            "distill.teacher_cache=cache-16",
            "distill.cache_top_k=16",
        )
        == 0
    )
    manifest = json.loads((work / "cache-16" / "manifest.json").read_text())
    train = manifest["splits"]["train"]
    assert train["mass_covered"] > 0.9 and 0 < train["kl_full_to_cached"] < 0.1
    # 16 fp16 log-probs + 16 uint16 ids + one fp16 rest per token, plus the file's header/offsets
    assert 16 * 2 + 16 * 2 + 2 <= train["bytes_per_token"] < 16 * 2 + 16 * 2 + 2 + 20
    assert (
        _still(
            work,
            monkeypatch,
            "run",
            "distill.yaml",
            "name=from-cache-16",
            "distill.teacher_cache=cache-16",
            "distill.cache_top_k=16",
        )
        == 0
    )
    cached, full = _kd_losses(work / "runs" / "from-cache-16"), _kd_losses(online)
    # At step 1 both students are the same model: merging the tail into one bucket can only
    # lower KL, and by little when the tail is small. Later they have trained on different losses.
    assert cached[0] <= full[0] + 1e-3 and cached[0] == pytest.approx(full[0], rel=0.05)
    assert cached == pytest.approx(full, rel=0.15)


def test_a_cache_for_other_data_or_temperature_is_refused(work, monkeypatch, capsys):
    assert (
        _still(
            work,
            monkeypatch,
            "cache",
            "distill.yaml",
            "distill.teacher_cache=cache-check",
            "distill.cache_top_k=8",
        )
        == 0
    )
    capsys.readouterr()
    args = [
        "run",
        "distill.yaml",
        "name=refused",
        "distill.teacher_cache=cache-check",
        "distill.cache_top_k=8",
    ]
    assert _still(work, monkeypatch, *args, "distill.temperature=1.0") == 2
    assert (
        "does not fit this recipe: it was made with another temperature (2.0, recipe: 1.0)"
        in capsys.readouterr().err
    )
    assert _still(work, monkeypatch, *args, "data.max_len=32") == 2
    assert (
        "the train data (files or data settings) changed since it was made"
        in capsys.readouterr().err
    )
    assert not (work / "runs" / "refused").exists()
    assert (
        _still(
            work,
            monkeypatch,
            "run",
            "distill.yaml",
            "name=refused",
            "distill.teacher_cache=nowhere",
        )
        == 2
    )
    assert "no teacher cache at" in capsys.readouterr().err


def test_an_interrupted_cache_resumes_at_the_missing_shard(work, monkeypatch):
    monkeypatch.setattr(cache_module, "EXAMPLES_PER_SHARD", 2)
    args = ["cache", "distill.yaml", "distill.teacher_cache=cache-resume", "distill.cache_top_k=8"]
    assert _still(work, monkeypatch, *args) == 0
    shards = sorted((work / "cache-resume" / "train").glob("shard-*.safetensors"))
    assert len(shards) == 3
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in shards}
    shards[1].unlink()  # as if killed while writing it
    assert _still(work, monkeypatch, *args) == 0
    after = {
        p.name: (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(shards[0].parent.glob("shard-*"))
    }
    assert after.keys() == before.keys()
    assert after[shards[0].name] == before[shards[0].name]  # not redone
    assert after[shards[1].name][0] == before[shards[1].name][0]  # redone, same bytes
    rows = cache_module.TeacherCache(
        work / "cache-resume",
        "train",
        json.loads((work / "cache-resume" / "manifest.json").read_text()),
    )
    log_probs, ids, rest_log = rows.rows([4, 0])
    assert log_probs.shape[1] == ids.shape[1] == 8 and rest_log.shape[0] == log_probs.shape[0]


def test_uint8_log_probs_take_one_byte_and_train_alike(work, online, monkeypatch):
    args = ["distill.teacher_cache=cache-u8", "distill.cache_top_k=16", "distill.cache_dtype=uint8"]
    assert _still(work, monkeypatch, "cache", "distill.yaml", *args) == 0
    train = json.loads((work / "cache-u8" / "manifest.json").read_text())["splits"]["train"]
    # 16 uint8 steps + 16 uint16 ids + fp16 rest, top and step per token
    assert 16 + 16 * 2 + 6 <= train["bytes_per_token"] < 16 + 16 * 2 + 6 + 20
    assert 0 < train["kl_full_to_cached"] < 0.1
    assert _still(work, monkeypatch, "run", "distill.yaml", "name=from-cache-u8", *args) == 0
    assert _kd_losses(work / "runs" / "from-cache-u8") == pytest.approx(
        _kd_losses(online), rel=0.15
    )
