"""Helpers for running whole recipes on the tiny models: data files and recipe YAMLs in tmp."""

import json
import textwrap

import pytest
from tiny_models import QA  # shared with tests that write their own data files


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def qa_files(tmp_path):
    rows = [{"question": q, "answer": a} for q, a in QA]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    val = write_jsonl(tmp_path / "val.jsonl", rows[:4])
    return train, val


def write_recipe(tmp_path, kind: str, name: str, models: str, train: str, extra: str):
    """A recipe YAML in tmp_path on the QA files, runs under tmp_path/runs; returns its path."""
    text = (
        textwrap.dedent(
            f"""\
        # Run: still run {name}.yaml
        kind: {kind}
        name: {name}
        output_dir: {tmp_path / "runs"}
        """
        )
        + textwrap.dedent(models)
        + textwrap.dedent(
            f"""\
        data:
          train: {{path: train.jsonl, format: instruction, prompt: question, response: answer}}
          eval: {{path: val.jsonl}}
          max_len: 64
        train: {train}
        """
        )
    )
    path = tmp_path / f"{name}.yaml"
    path.write_text(text + textwrap.dedent(extra))
    return path


@pytest.fixture
def finetune_recipe(tmp_path, qa_files, tiny_model_dir):
    """Write a finetune recipe for the tiny model; keyword args become extra YAML text."""

    def make(name="tiny-ft", extra=""):
        models = f"""\
            model: {{ref: "{tiny_model_dir}"}}
            lora: {{r: 4, alpha: 8, dropout: 0.0}}
            """
        train = (
            "{lr: 5.0e-3, batch_size: 4, max_steps: 6, save_steps: 2, warmup_ratio: 0.0, seed: 3}"
        )
        return write_recipe(tmp_path, "finetune", name, models, train, extra)

    return make


@pytest.fixture
def distill_recipe(tmp_path, qa_files, tiny_model_dir_4layers):
    """Write a distill recipe: the 4-layer tiny teacher and a student carved from it."""

    def make(name="tiny-kd", student="init: {keep_layers: [0, 3]}", extra=""):
        models = f"""\
            teacher: {{ref: "{tiny_model_dir_4layers}"}}
            student: {{{student}}}
            distill: {{loss: forward_kl, temperature: 2.0, kd_weight: 1.0, ce_weight: 0.0}}
            """
        train = (
            "{lr: 1.0e-2, batch_size: 4, max_steps: 10, save_steps: 5, warmup_ratio: 0.0, seed: 1, "
            "loss_chunk_size: 16}"
        )
        return write_recipe(tmp_path, "distill", name, models, train, extra)

    return make


@pytest.fixture
def mlp_forwards(monkeypatch):
    """Counts Llama MLP forwards: one per layer and forward pass, counting checkpointing reruns."""
    from transformers.models.llama import modeling_llama

    calls = []
    forward = modeling_llama.LlamaMLP.forward

    def counting(self, *args, **kwargs):
        calls.append(1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", counting)
    return calls
