"""Same-family logit KD through `still run` and `still cache` on every family's twin: a 4-layer
teacher taught to a student carved from it, with the family's chat format, stop tokens and
padded vocabulary rows; the cached teacher trains like the online one; on-policy samples end at
the family's end-of-turn token."""

import json
import math

import pytest
import torch
from families import FAMILIES, FAMILY, build_model, build_tokenizer, save_twin
from tiny_models import QA

from still import cli, models
from still.rundir import RunDir

RECIPE = """\
kind: distill
name: online
teacher: {{ref: "{teacher}"}}
student: {{init: {{keep_layers: [0, 3]}}}}
distill: {{loss: forward_kl, temperature: 2.0, ce_weight: 0.5}}
data:
  train: {{path: train.jsonl, format: instruction, prompt: question, response: answer}}
  eval: {{path: eval.jsonl, format: instruction, prompt: question, response: answer}}
  max_len: 128  # Qwen2.5's default system prompt alone is ~70 of these tokens
train: {{lr: 1.0e-2, batch_size: 2, max_steps: 3, warmup_ratio: 0.0, seed: 3,
  loss_chunk_size: 16}}
"""


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A run root per family (teacher twin, data, recipe) and its online KD run, made once."""
    runs = {}

    def online(name: str):
        if name not in runs:
            root = tmp_path_factory.mktemp(f"kd-{name}")
            save_twin(name, root / "teacher", layers=4, hidden=32, seed=1)
            rows = [json.dumps({"question": q, "answer": a}) + "\n" for q, a in QA[:6]]
            (root / "train.jsonl").write_text("".join(rows))
            (root / "eval.jsonl").write_text("".join(rows[:2]))
            (root / "distill.yaml").write_text(RECIPE.format(teacher=root / "teacher"))
            with pytest.MonkeyPatch.context() as monkeypatch:
                monkeypatch.chdir(root)
                assert cli.main(["run", "distill.yaml"]) == 0
            runs[name] = root
        return runs[name]

    return online


def metric(run_dir, key) -> list[float]:
    return [row[key] for row in RunDir(run_dir).metrics() if key in row]


@pytest.mark.parametrize("name", FAMILIES)
def test_a_carved_student_learns_from_its_family_teacher_and_reloads(name, work):
    root = work(name)
    run_dir = root / "runs" / "online"
    kd = metric(run_dir, "kd_loss")
    assert len(kd) == 3 and all(math.isfinite(value) for value in kd)
    assert kd[-1] < kd[0]  # one repeated small set: the student moves toward the teacher
    teacher, teacher_tokenizer = models.load_model(str(root / "teacher"))
    student, tokenizer = models.load_model(str(run_dir))
    assert type(student) is type(teacher) and student.config.num_hidden_layers == 2
    for field in ("vocab_size", "hidden_size", "tie_word_embeddings", "head_dim"):
        assert getattr(student.config, field, None) == getattr(teacher.config, field, None)
    if getattr(teacher.config, "layer_types", None):
        assert student.config.layer_types == [teacher.config.layer_types[i] for i in (0, 3)]
    tied = student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    assert tied == FAMILY[name].config.get("tie_word_embeddings", True)
    assert tokenizer.get_vocab() == teacher_tokenizer.get_vocab()
    assert tokenizer.chat_template == teacher_tokenizer.chat_template
    assert (tokenizer.eos_token, tokenizer.pad_token) == (FAMILY[name].eos, FAMILY[name].pad)
    assert student.generation_config.eos_token_id == teacher.generation_config.eos_token_id
    # trained: the saved student is not the carve it started from
    carved = teacher.state_dict()["model.layers.3.self_attn.o_proj.weight"]
    assert not torch.equal(student.state_dict()["model.layers.1.self_attn.o_proj.weight"], carved)


@pytest.mark.parametrize("name", ["qwen3", "gemma3", "phi3"])
def test_a_full_teacher_cache_trains_like_the_online_teacher(name, work, monkeypatch, capsys):
    """k = the tokenizer's vocabulary (not the head's padded rows): exact KD but for the
    cache's fp16 storage."""
    root = work(name)
    monkeypatch.chdir(root)
    vocab = len(build_tokenizer(name))
    cache = ["distill.teacher_cache=cache", f"distill.cache_top_k={vocab}"]
    assert cli.main(["cache", "distill.yaml", *cache]) == 0
    assert "top-k mass 1.0000" in capsys.readouterr().out
    assert cli.main(["run", "distill.yaml", "name=cached", *cache]) == 0
    online, cached = root / "runs" / "online", root / "runs" / "cached"
    assert metric(cached, "loss") == pytest.approx(metric(online, "loss"), rel=1e-3)
    assert metric(cached, "eval_loss") == pytest.approx(metric(online, "eval_loss"), rel=1e-3)


def test_a_student_padded_otherwise_than_its_teacher_learns_the_real_tokens(
    work, monkeypatch, capsys
):
    """Qwen pads its head to a multiple of 64 (320 rows for 300 tokens); a student of the same
    tokenizer with no padding rows shares the 300 real tokens, not the rows."""
    root = work("qwen3")
    tokenizer = build_tokenizer("qwen3")
    student = build_model("qwen3", tokenizer, layers=2, seed=4, vocab_size=len(tokenizer))
    student.save_pretrained(root / "unpadded")
    tokenizer.save_pretrained(root / "unpadded")
    monkeypatch.chdir(root)
    recipe = ["run", "distill.yaml", "name=unpadded", "train.max_steps=2"]
    assert cli.main([*recipe, f"student.ref={root / 'unpadded'}", "student.init=null"]) == 0
    out = capsys.readouterr().out
    assert "vocab padding differs (teacher 320, student 300 rows); KD uses the 300 real" in out
    kd = metric(root / "runs" / "unpadded", "kd_loss")
    assert len(kd) == 2 and all(math.isfinite(value) for value in kd)


def test_width_pruning_a_moe_teacher_is_one_line(work, monkeypatch, capsys):
    monkeypatch.chdir(work("qwen3_moe"))
    init = "student.init={prune: width, size: 0.6, calibration_samples: 2}"
    assert cli.main(["check", "distill.yaml", init]) == 2
    err = capsys.readouterr().err
    assert "cannot width-prune Qwen3MoeForCausalLM: it has a weight model.layers.0.mlp" in err
    errors = [line for line in err.splitlines() if line.startswith("still: error:")]
    assert len(errors) == 1 and "use prune: depth" in errors[0] and "Traceback" not in err


def test_the_size_chooser_offers_a_moe_teacher_only_depth(work, monkeypatch, capsys):
    """Width and both would be refused if picked: `still check` does not list them."""
    monkeypatch.chdir(work("qwen3_moe"))
    assert cli.main(["check", "distill.yaml"]) == 0
    out = capsys.readouterr().out
    rows = [
        line.split()[0] for line in out.splitlines() if line.startswith("    ") and "/s" in line
    ]
    assert "student candidates at" in out and rows == ["depth"], out


# --------------------------------------------------------------------------- on-policy stops
@pytest.mark.parametrize("name", ["gemma3", "phi3", "llama3"])
def test_on_policy_samples_end_at_the_end_of_turn_token(name, tmp_path):
    """Gemma-3 ends a turn with <end_of_turn> and Phi-3 with <|end|>, neither the tokenizer's
    eos: sampling must stop there and train on the turn up to and including it."""
    import datasets
    from transformers import TrainingArguments

    from distill.kd_trainer import KDTrainer
    from still.data import PaddedCollator
    from still.distill_sections import DistillSection

    family = FAMILY[name]
    tokenizer = build_tokenizer(name)
    teacher = build_model(name, tokenizer, layers=2, seed=1).eval()
    student = build_model(name, tokenizer, layers=1, seed=2)
    end_of_turn = tokenizer.convert_tokens_to_ids(family.end_of_turn)
    answer = tokenizer.encode(" Return it.", add_special_tokens=False)
    seen = {}

    def generate(input_ids, max_new_tokens, eos_token_id, **settings):
        seen["stops"] = eos_token_id
        tail = [*answer, end_of_turn, *answer, *answer][:max_new_tokens]
        return torch.cat([input_ids, torch.tensor([tail] * len(input_ids))], dim=1)

    student.generate = generate  # the sampler's draw, fixed: this tests what is done with it
    trainer = KDTrainer(
        model=student,
        args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True),
        train_dataset=datasets.Dataset.from_list([{"input_ids": [5, 6], "labels": [5, 6]}]),
        data_collator=PaddedCollator(models.pad_token_id(tokenizer)),
        processing_class=tokenizer,
        teacher=teacher,
        distill=DistillSection(on_policy_ratio=1.0, on_policy_max_new_tokens=16),
        vocab_size=len(tokenizer),
        loss_chunk_size=16,
    )
    prompt = tokenizer.encode("What does abs do?", add_special_tokens=False)
    dataset_answer = answer * 3 + [end_of_turn]  # a budget longer than the sampled turn
    ids = torch.tensor([prompt + dataset_answer] * 2)
    labels = torch.tensor([[-100] * len(prompt) + dataset_answer] * 2)
    _, sampled_labels = trainer._student_answers(student, {"input_ids": ids}, labels)
    assert end_of_turn in seen["stops"] and tokenizer.eos_token_id in seen["stops"]
    for row in sampled_labels.tolist():
        assert [token for token in row if token != -100] == [*answer, end_of_turn]


def test_a_lora_student_of_a_moe_is_guarded_as_a_finetune_is(work, monkeypatch, capsys):
    """distill's LoRA goes through still.train.add_lora too: no adapter that skips the experts."""
    monkeypatch.chdir(work("qwen3_moe"))
    assert cli.main(["run", "distill.yaml", "name=lora-moe", "method=lora"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("still: error:")]
    assert len(errors) == 1 and "Traceback" not in err
    assert "lora.dropout: 0.05 cannot apply to Qwen3MoeForCausalLM's fused expert" in errors[0]
