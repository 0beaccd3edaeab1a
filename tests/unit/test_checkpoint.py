"""still.checkpoint: completion markers, resume choice, pruning, disk space, signals, NaN steps."""

import json
import os
import signal
from collections import namedtuple

import pytest
import torch

from still import checkpoint as ckpt
from still.errors import StillError
from still.rundir import RunDir


def fake_checkpoint(root, step, *, complete=True, size=64, legacy=False):
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if not legacy:
        (root / ckpt.USES_MARKERS).touch()
    (path / "model.safetensors").write_bytes(os.urandom(size))
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (path / "sub").mkdir()
    (path / "sub" / "rng.pth").write_bytes(b"rng")
    if complete:
        ckpt.write_marker(path)
    return path


def test_marker_lists_every_file_and_is_written_atomically(tmp_path):
    path = fake_checkpoint(tmp_path, 4)
    marker = json.loads((path / ckpt.MARKER).read_text())
    assert marker["step"] == 4
    assert sorted(marker["files"]) == ["model.safetensors", "sub/rng.pth", "trainer_state.json"]
    assert not list(path.glob("*.tmp"))
    assert ckpt.checkpoint_problem(path) is None


def test_checkpoint_problems_are_named(tmp_path):
    assert (
        ckpt.checkpoint_problem(fake_checkpoint(tmp_path, 1, complete=False))
        == "no completion marker"
    )
    corrupt = fake_checkpoint(tmp_path, 2)
    with (corrupt / "model.safetensors").open("r+b") as handle:
        handle.write(b"\0\0\0\0")
    assert "model.safetensors corrupt" in ckpt.checkpoint_problem(corrupt)
    missing = fake_checkpoint(tmp_path, 3)
    (missing / "sub" / "rng.pth").unlink()
    assert ckpt.checkpoint_problem(missing) == "sub/rng.pth missing"
    torn = fake_checkpoint(tmp_path, 5)
    (torn / ckpt.MARKER).write_text('{"files": {"model.saf')
    assert ckpt.checkpoint_problem(torn) == "unreadable completion marker"


def test_resume_picks_newest_complete_and_says_what_it_ignored(tmp_path, capsys):
    checkpoints = tmp_path / "checkpoints"
    fake_checkpoint(checkpoints, 2)
    fake_checkpoint(checkpoints, 4)
    corrupt = fake_checkpoint(checkpoints, 6)
    (corrupt / "model.safetensors").write_bytes(b"truncated")
    fake_checkpoint(checkpoints, 8, complete=False)
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 9))
        + '{"step": 9, "lo'
    )
    chosen = ckpt.resume_checkpoint(RunDir(tmp_path))
    assert chosen == str(checkpoints / "checkpoint-4")
    out = capsys.readouterr().out.splitlines()
    ignored = [line for line in out if "ignored" in line]
    assert ignored == [
        "still: --resume: ignored incomplete checkpoints: checkpoint-8 (no completion marker), "
        "checkpoint-6 (model.safetensors corrupt (sha256 mismatch))"
    ]
    # they would mix stale files into the checkpoints the resumed run writes again
    assert [p.name for p in ckpt.list_checkpoints(checkpoints)] == ["checkpoint-4", "checkpoint-2"]
    # metrics past the resumed step are logged again; the torn last line is dropped
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3, 4]


def test_resume_with_no_complete_checkpoint_starts_over(tmp_path, capsys):
    fake_checkpoint(tmp_path / "checkpoints", 2, complete=False)
    assert ckpt.resume_checkpoint(RunDir(tmp_path)) is None
    assert ckpt.resume_checkpoint(RunDir(tmp_path / "nothing")) is None
    assert "starting from step 0" in capsys.readouterr().out


def test_runs_from_before_markers_resume_unverified(tmp_path, capsys):
    fake_checkpoint(tmp_path / "checkpoints", 2, complete=False, legacy=True)
    fake_checkpoint(tmp_path / "checkpoints", 4, complete=False, legacy=True)
    assert ckpt.resume_checkpoint(RunDir(tmp_path)).endswith("checkpoint-4")
    assert "unverified" in capsys.readouterr().out


def test_prune_keeps_newest_complete_and_never_the_last_complete(tmp_path):
    for step in (1, 2, 3):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 4, complete=False)  # e.g. being written by another rank
    removed = ckpt.prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in removed] == ["checkpoint-1"]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [
        "checkpoint-4",
        "checkpoint-3",
        "checkpoint-2",
    ]
    assert ckpt.prune_checkpoints(tmp_path, keep=1) and (tmp_path / "checkpoint-3").exists()


def test_disk_space_check_refuses_a_save_that_would_not_fit(tmp_path, monkeypatch):
    fake_checkpoint(tmp_path, 2, size=10 * 2**20)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(
        ckpt.shutil, "disk_usage", lambda path: usage(100 * 2**20, 90 * 2**20, 12 * 2**20)
    )
    with pytest.raises(StillError) as info:
        ckpt.check_disk_space(tmp_path, 4)
    assert "not enough disk space to save checkpoint-4" in str(info.value)
    assert "12 MiB free, about 15 MiB needed; the last complete one is checkpoint-2" in str(
        info.value
    )
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: usage(100 * 2**20, 10, 20 * 2**20))
    ckpt.check_disk_space(tmp_path, 4)


# --------------------------------------------------------------------------- with a Trainer
def tiny_trainer(
    tmp_path, tiny_model_dir, *, steps, save_steps, callbacks, trainer_cls=None, **train
):
    import datasets
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from still.data import PackedCollator
    from still.sections import TrainSection

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rows = [{"input_ids": list(range(5, 25)), "labels": list(range(5, 25))}] * 8
    args = TrainingArguments(
        output_dir=str(tmp_path / "checkpoints"),
        max_steps=steps,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=None,
        logging_steps=1,
    )
    guard = ckpt.reliability_callbacks(TrainSection(**train))
    return (trainer_cls or Trainer)(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        data_collator=PackedCollator(0),
        callbacks=[*callbacks, *guard],
    )


def nan_loss_trainer(bad_steps):
    from transformers import Trainer

    class NaNLossTrainer(Trainer):
        """Injects a NaN loss at the given (1-based) optimizer steps."""

        def compute_loss(self, model, inputs, **kwargs):
            loss = super().compute_loss(model, inputs, **kwargs)
            if self.state.global_step + 1 in bad_steps:
                loss = loss * float("nan")
            return loss

    return NaNLossTrainer


class Snapshot:
    """Record trainable weights and AdamW step counts after every step."""

    def __init__(self):
        from transformers import TrainerCallback

        self.weights, self.adam_steps = {}, {}
        snap = self

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
                snap.weights[state.global_step] = torch.cat(
                    [p.detach().flatten().clone() for p in model.parameters()]
                )
                first = optimizer.param_groups[0]["params"][0]
                snap.adam_steps[state.global_step] = float(optimizer.state[first]["step"])

        self.callback = _Callback()


def test_a_nan_step_is_skipped_without_touching_weights_or_adam_state(
    tmp_path, tiny_model_dir, capsys
):
    snap = Snapshot()
    trainer = tiny_trainer(
        tmp_path,
        tiny_model_dir,
        steps=5,
        save_steps=100,
        callbacks=[snap.callback],
        trainer_cls=nan_loss_trainer({3}),
    )
    trainer.train()
    assert torch.equal(snap.weights[3], snap.weights[2])  # step 3 was skipped entirely
    assert not torch.equal(snap.weights[4], snap.weights[3])
    assert snap.adam_steps == {1: 1.0, 2: 2.0, 3: 2.0, 4: 3.0, 5: 4.0}  # bias correction unaffected
    assert all(torch.isfinite(w).all() for w in snap.weights.values())
    assert (
        "step 3: non-finite loss/gradients, update skipped (1 in a row, 1 in all)"
        in capsys.readouterr().err
    )


def test_consecutive_nan_steps_stop_with_the_last_good_checkpoint(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    trainer = tiny_trainer(
        tmp_path,
        tiny_model_dir,
        steps=12,
        save_steps=2,
        callbacks=[],
        trainer_cls=nan_loss_trainer(set(range(5, 13))),
        max_nonfinite_steps=3,
    )
    with pytest.raises(StillError) as info:
        trainer.train()
    assert "3 steps in a row with non-finite loss or gradients (up to step 7)" in str(info.value)
    assert "checkpoint-6" in str(info.value)
    checkpoints = tmp_path / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(checkpoints)] == ["checkpoint-6", "checkpoint-4"]
    for path in ckpt.list_checkpoints(checkpoints):
        assert ckpt.checkpoint_problem(path) is None
        weights = load_file(path / "model.safetensors")
        assert all(torch.isfinite(t).all() for t in weights.values())


def test_non_finite_weights_are_never_saved(tmp_path, tiny_model_dir):
    from transformers import TrainerCallback

    class PoisonAtStep2(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:
                with torch.no_grad():
                    next(model.parameters())[0, 0] = float("inf")

    trainer = tiny_trainer(
        tmp_path, tiny_model_dir, steps=4, save_steps=1, callbacks=[PoisonAtStep2()]
    )
    with pytest.raises(
        StillError,
        match="weights became non-finite at step 2; not saving them; "
        "the last good checkpoint is .*checkpoint-1",
    ):
        trainer.train()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == ["checkpoint-1"]


def test_sigterm_saves_and_stops_then_handlers_are_restored(tmp_path, tiny_model_dir):
    from transformers import TrainerCallback

    class SendSigterm(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 2:  # during step 3
                os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    trainer = tiny_trainer(
        tmp_path, tiny_model_dir, steps=10, save_steps=100, callbacks=[SendSigterm()]
    )
    trainer.train()
    assert trainer.state.global_step == 3
    assert ckpt.checkpoint_problem(tmp_path / "checkpoints" / "checkpoint-3") is None
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    stop = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, ckpt.SignalStop))
    assert (stop.received, stop.stopped_at) == ("SIGTERM", 3)


def test_resume_drops_undecodable_and_odd_metric_lines(tmp_path):
    from still.checkpoint import _truncate_metrics

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_bytes(
        b'{"step": 1, "loss": 2.0}\n{"step": "2"}\n[1, 2]\n{"step": 3}\n\xff\xfe\x00garbage\n'
    )
    _truncate_metrics(metrics, 2)
    assert metrics.read_text() == '{"step": 1, "loss": 2.0}\n'


def test_a_marker_that_is_not_a_mapping_of_files_is_unreadable(tmp_path):
    from still.checkpoint import MARKER, checkpoint_problem

    for payload in (b'{"files": [1, 2]}', b"\xff\xfe{", b'{"files": "x"}', b"[]"):
        (tmp_path / MARKER).write_bytes(payload)
        assert checkpoint_problem(tmp_path) == "unreadable completion marker"
