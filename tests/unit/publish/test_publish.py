"""`still publish` on tiny run dirs: merge equality, the card, lineage, GGUF, refusals, hub."""

import json
import os
import re
import shutil
import stat
import sys

import pytest
import torch
import yaml

from publish.flow import publish
from publish.merge import check_texts
from publish.samples import FALLBACK, run_samples
from still import cli, models
from still.errors import StillError
from still.fsutil import file_sha256
from still.rundir import RunDir

ROWS = [
    ("What does abs do?", "Return the absolute value."),
    ("What does len do?", "Return the number of items."),
    ("What does min do?", "Return the smallest item."),
    ("What does max do?", "Return the largest item."),
    ("What does repr do?", "Return the canonical string."),
    ("What does sorted do?", "Return a new sorted list."),
]
# The run's own held-out rows: the samples publish checks on and the card shows come from here.
EVAL_ROWS = [
    ("What does ord do?", "Return the code point of a character."),
    ("What does chr do?", "Return the character of a code point."),
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in rows))
    return path


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STILL_CACHE", str(tmp_path / "cache"))  # eval results cache


@pytest.fixture
def base_dir(tmp_path, tiny_model_dir):
    """The tiny Llama with a model card that states a license, as a hub base would."""
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    (base / "README.md").write_text("---\nlicense: mit\n---\n# tiny base\n")
    return base


@pytest.fixture
def tasks(tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", ROWS)
    choice = tmp_path / "choice.jsonl"
    choice.write_text(
        "".join(
            json.dumps({"question": q, "choices": [a, "Join paths.", "Sort it."], "label": 0})
            + "\n"
            for q, a in ROWS
        )
    )
    qa = tmp_path / "qa.yaml"
    qa.write_text(
        "name: qa\ntype: generate\ndata: {path: qa.jsonl}\nprompt: '{{ question }}'\n"
        "target: '{{ answer }}'\nchat_template: true\ngeneration: {max_new_tokens: 4}\n"
        "metrics: [rouge_l, exact_match]\n"
    )
    mc = tmp_path / "mc.yaml"
    mc.write_text(
        "name: mc\ntype: multiple_choice\ndata: {path: choice.jsonl}\n"
        "prompt: '{{ question }}'\n"
        "choices: choices\nlabel: label\nchat_template: true\nmetrics: [acc]\n"
    )
    return [str(qa), str(mc)], data


def write_run(run_dir, lineage, tasks=(), kind="finetune", data=None):
    """What `still run` leaves behind, written through RunDir's own file names."""
    run = RunDir(run_dir)
    run.path.mkdir(parents=True, exist_ok=True)
    recipe = {
        "kind": kind,
        "name": run.name,
        "train": {"lr": 0.001, "max_steps": 2, "seed": 0},
        "eval_tasks": list(tasks),
        **({"data": data} if data else {}),
    }
    header = f"# Resolved from {run.path.parent.parent / 'recipes' / run.name}.yaml\n"
    run.recipe_file.write_text(header + yaml.safe_dump(recipe))
    run.lineage_file.write_text(json.dumps({"kind": kind, "name": run.name, **lineage}))
    run.metrics_file.write_text(json.dumps({"step": 2, "loss": 1.5, "eval_loss": 1.7}) + "\n")
    return run_dir


@pytest.fixture
def lora_run(tmp_path, base_dir, tasks):
    """A finetune run dir with a LoRA adapter whose B is non-zero, so merging changes weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    task_paths, data = tasks
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    adapted = get_peft_model(model, config)
    run = RunDir(tmp_path / "runs" / "tiny-ft")
    adapted.save_pretrained(run.adapter_dir)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(run.adapter_dir)
    lineage = {
        "base": str(base_dir),
        "method": "lora",
        "recipe_sha256": "abc123",
        "data": [{"path": str(data), "sha256": file_sha256(data)}],
    }
    held_out = write_jsonl(tmp_path / "held-out.jsonl", EVAL_ROWS)
    data_section = {
        "train": {
            "path": str(data),
            "format": "instruction",
            "prompt": "question",
            "response": "answer",
        },
        "eval": {"path": str(held_out)},
    }
    return write_run(run.path, lineage, task_paths, data=data_section)


def logits(model, tokenizer, text="What does abs do?"):
    with torch.inference_mode():
        return model(**tokenizer(text, return_tensors="pt")).logits


def test_lora_run_publishes_a_merged_dir_that_loads_and_generates(lora_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = publish(lora_run, tmp_path / "published", compare=False, dtype="fp32")
    for name in (
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "chat_template.jinja",
        "README.md",
        "lineage.json",
        "recipe.yaml",
        "eval/qa.json",
        "eval/mc.json",
    ):
        assert (out / name).is_file(), name
    assert not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert not hasattr(merged, "peft_config")
    adapter_model, _ = models.load_model(str(lora_run), dtype="float32")
    base, _ = models.load_model(str(tmp_path / "base"), dtype="float32")
    expected = logits(adapter_model.eval(), tokenizer)
    assert torch.allclose(logits(merged, tokenizer), expected, atol=1e-4)
    assert (logits(base.eval(), tokenizer) - expected).abs().max() > 1e-2  # the adapter mattered
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What does abs do?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    generated = merged.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    lineage = json.loads((out / "lineage.json").read_text())
    merge = lineage["merge"]
    assert merge["merged"] and merge["max_abs_logit_diff"] <= merge["tolerance"]


def test_card_holds_license_base_data_hashes_and_real_eval_numbers(lora_run, tmp_path, tasks):
    from huggingface_hub import ModelCard

    out = publish(lora_run, tmp_path / "published", quick=True)
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "mit"  # carried from the base's card
    assert card.data.base_model is None  # a local path is not a hub id
    assert "fine-tuned" in card.data.tags and "lora" in card.data.tags
    results = {(r.dataset_name, r.metric_type): r for r in card.data.eval_results}
    assert set(results) == {("qa", "rouge_l"), ("qa", "exact_match"), ("mc", "acc")}
    for task in ("qa", "mc"):
        summary = json.loads((out / "eval" / f"{task}.json").read_text())
        for metric, value in summary["metrics"].items():
            result = results[(task, metric)]
            assert result.metric_value == pytest.approx(value["mean"], abs=1e-6)
            assert result.metric_args["stderr"] == pytest.approx(value["stderr"], abs=1e-6)
            assert result.metric_args["n"] == summary["n"] == len(ROWS)
            assert f"{value['mean']:.4f} ± {value['stderr']:.4f}" in card.text
        base_summary = json.loads((out / "eval" / "base" / f"{task}.json").read_text())
        assert base_summary["n"] == summary["n"]  # compared on the same rows
    assert "model-index" in (out / "README.md").read_text()
    _, data = tasks
    assert file_sha256(data) in card.text and "| `qa.jsonl` |" in card.text
    assert "fine-tuned (lora) from `base`" in card.text  # named relative to the project
    assert "| base |" in card.text and "(Δ " in card.text and "first 32 rows" in card.text
    assert "still run recipes/tiny-ft.yaml" in card.text and "Intended use and limits" in card.text
    assert "max_steps: 2" in card.text  # the resolved recipe


@pytest.fixture
def distill_run(tmp_path, base_dir, tiny_model_dir_4layers):
    """A teacher run (adapter on the base) and a distilled student saved as full weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = tmp_path / "runs" / "teacher"
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(r=2, target_modules="all-linear")
    )
    model.save_pretrained(RunDir(teacher).adapter_dir)
    write_run(teacher, {"base": str(base_dir), "method": "lora"})
    student = tmp_path / "runs" / "student"
    full = RunDir(student).model_dir
    AutoModelForCausalLM.from_pretrained(tiny_model_dir_4layers).save_pretrained(full)
    AutoTokenizer.from_pretrained(tiny_model_dir_4layers).save_pretrained(full)
    lineage = {
        "teacher": str(teacher),
        "student": None,
        "base": None,
        "method": "full",
        "carved": {"kept_layers": [0, 3], "param_fraction": 0.5},
    }
    return write_run(student, lineage, kind="distill")


def test_distilled_full_model_publishes_with_teacher_in_lineage(distill_run, tmp_path):
    from huggingface_hub import ModelCard
    from safetensors.torch import load_file

    out = publish(distill_run, tmp_path / "published-student", dtype="fp32")
    lineage = json.loads((out / "lineage.json").read_text())
    roles = [link["role"] for link in lineage["chain"]]
    assert roles == ["base", "teacher", "student", "published"]
    assert lineage["chain"][0]["ref"] == "base"  # through the teacher's lineage
    assert lineage["teacher"] == "runs/teacher"  # relative to the project, tmp_path
    assert lineage["merge"]["merged"] is False
    ours = load_file(out / "model.safetensors")
    theirs = load_file(RunDir(distill_run).model_dir / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "mit" and "distillation" in card.data.tags
    assert "| teacher |" in card.text and "2 layers, 50.0%" in card.text


def test_existing_output_dir_is_refused_and_kept(lora_run, tmp_path, capsys):
    out = tmp_path / "published"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(StillError, match="already exists"):
        publish(lora_run, out)
    assert (out / "mine.txt").read_text() == "keep me"
    assert cli.main(["publish", str(lora_run), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"still: error: output dir {out} already exists (add --force to replace it)"
    ]
    assert cli.main(["publish", str(lora_run), "--out", str(out), "--force", "--no-eval"]) == 0
    assert not (out / "mine.txt").exists() and (out / "model.safetensors").exists()


def test_a_failure_midway_leaves_nothing_behind(lora_run, tmp_path, monkeypatch):
    import huggingface_hub

    def broken(*args, **kwargs):
        raise OSError("disk full")

    # the card is written last, after the weights: the disk fills up at the library boundary
    monkeypatch.setattr(huggingface_hub.ModelCard, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        publish(lora_run, tmp_path / "out" / "published", evaluate=False)
    assert list((tmp_path / "out").iterdir()) == []  # no staging dir, no half output


def test_not_a_run_dir_and_unknown_gguf_type(tmp_path, tiny_model_dir, lora_run):
    with pytest.raises(StillError, match="not a still run dir"):
        publish(tiny_model_dir, tmp_path / "x")
    with pytest.raises(StillError, match="unknown GGUF type 'q3_k_s'"):
        publish(lora_run, tmp_path / "x", gguf_types=["q3_k_s"])
    assert not (tmp_path / "x").exists()


def test_publish_with_gguf_records_the_round_trip(lora_run, tmp_path):
    from transformers import AutoModelForCausalLM

    out = publish(lora_run, tmp_path / "published", gguf_types=["f16", "q8_0"], evaluate=False)
    lineage = json.loads((out / "lineage.json").read_text())
    assert [g["file"] for g in lineage["gguf"]] == ["published-f16.gguf", "published-q8_0.gguf"]
    for report in lineage["gguf"]:
        assert report["exact_max_abs_diff"] <= 1e-4
        assert report["rms_relative_diff"] <= report["tolerance"]
        assert lineage["files"][report["file"]] == file_sha256(out / report["file"])
    reloaded = AutoModelForCausalLM.from_pretrained(out, gguf_file="published-f16.gguf")
    assert reloaded.config.num_hidden_layers == 2
    assert "published-q8_0.gguf" in (out / "README.md").read_text()


# --------------------------------------------------------------------------- hub
class FakeHub:
    """Stands in for huggingface_hub.HfApi: records calls, never touches the network."""

    def __init__(self, existing_files=()):
        self.existing_files = list(existing_files)
        self.calls = []

    def repo_exists(self, repo_id):
        self.calls.append(("repo_exists", repo_id))
        return bool(self.existing_files)

    def list_repo_files(self, repo_id):
        self.calls.append(("list_repo_files", repo_id))
        return self.existing_files

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        return SimpleCommit()


class SimpleCommit:
    commit_url = "https://huggingface.co/org/tiny/commit/1"


@pytest.fixture
def online_hub(monkeypatch):
    """`install(hub)`: every `HfApi(token=...)` publish builds is `hub`; a token is set and the
    hub is reachable, as for a user uploading for real."""
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")

    def install(hub):
        monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: hub)
        return hub

    return install


def test_hub_upload_creates_the_repo_and_uploads_the_folder(lora_run, tmp_path, online_hub):
    hub = online_hub(FakeHub())
    out = publish(lora_run, tmp_path / "published", hub="org/tiny", evaluate=False)
    names = [call[0] for call in hub.calls]
    assert names == ["repo_exists", "create_repo", "upload_folder"]
    upload = hub.calls[-1][1]
    assert upload["repo_id"] == "org/tiny" and upload["folder_path"] == str(out)


def test_hub_repo_with_files_is_refused_before_any_work(lora_run, tmp_path, online_hub):
    hub = online_hub(FakeHub(existing_files=[".gitattributes", "model.safetensors"]))
    with pytest.raises(StillError, match="already has files"):
        publish(lora_run, tmp_path / "published", hub="org/tiny")
    assert not (tmp_path / "published").exists()
    assert all(call[0] in ("repo_exists", "list_repo_files") for call in hub.calls)
    publish(lora_run, tmp_path / "published", hub="org/tiny", force=True, evaluate=False)
    assert hub.calls[-1][0] == "upload_folder"


def test_dry_run_shows_the_files_and_calls_nothing(lora_run, tmp_path, capsys, monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda **kwargs: pytest.fail("built a client"))
    out = publish(lora_run, tmp_path / "published", hub="org/tiny", dry_run=True, evaluate=False)
    printed = capsys.readouterr().out
    assert "dry run: would create repo org/tiny" in printed
    for name in ("model.safetensors", "README.md", "lineage.json", "tokenizer.json"):
        assert name in printed and (out / name).exists()
    assert "no HF_TOKEN" in printed


def test_token_comes_from_the_environment_only(lora_run, tmp_path, monkeypatch):
    import huggingface_hub

    seen = {}

    class RecordingApi(FakeHub):
        def __init__(self, token=None):
            super().__init__()
            seen["token"] = token

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    with pytest.raises(StillError, match="needs a token in the environment"):
        publish(lora_run, tmp_path / "published", hub="org/tiny", evaluate=False)
    assert not (tmp_path / "published").exists()
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    publish(lora_run, tmp_path / "published", hub="org/tiny", evaluate=False)
    assert seen["token"] == "hf_test_token"


def test_offline_hub_is_a_one_line_error(lora_run, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    with pytest.raises(StillError, match="HF_HUB_OFFLINE"):
        publish(lora_run, tmp_path / "published", hub="org/tiny")


def test_cli_flags_reach_publish(lora_run, tasks, tmp_path, capsys, monkeypatch):
    """Every flag, through the real verb: its effect shows in the published dir."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", lambda **kwargs: pytest.fail("built a client"))
    task_paths, _ = tasks
    out = tmp_path / "o"
    assert (
        cli.main(
            [
                "publish",
                str(lora_run),
                "--out",
                str(out),
                "--gguf",
                "f16,q8_0",
                "--hub",
                "org/x",
                "--dry-run",
                "--quick",
                "--task",
                task_paths[1],
                "--no-compare",
            ]
        )
        == 0
    )
    lineage = json.loads((out / "lineage.json").read_text())
    assert [g["file"] for g in lineage["gguf"]] == ["o-f16.gguf", "o-q8_0.gguf"]  # --gguf a,b
    assert "dry run: would create repo org/x" in capsys.readouterr().out  # --hub, --dry-run
    assert lineage["eval_limit"] == 32  # --quick
    assert (out / "eval" / "mc.json").exists() and not (out / "eval" / "qa.json").exists()  # --task
    assert not (out / "eval" / "base").exists()  # --no-compare (and evaluating was on)
    # the command as typed, its paths named relative to the project (tmp_path)
    assert lineage["command"].startswith("still publish runs/tiny-ft --out o ")
    assert "--task=mc.yaml --dtype=bf16" in lineage["command"]
    assert "--force" not in lineage["command"]


def test_task_flag_scores_a_run_whose_recipe_names_no_tasks(distill_run, tasks, tmp_path):
    task_paths, _ = tasks
    assert (
        cli.main(
            [
                "publish",
                str(distill_run),
                "--out",
                str(tmp_path / "p"),
                "--task",
                task_paths[1],
                "--no-compare",
            ]
        )
        == 0
    )
    from huggingface_hub import ModelCard

    card = ModelCard.load(tmp_path / "p" / "README.md")
    assert [(r.dataset_name, r.metric_type) for r in card.data.eval_results] == [("mc", "acc")]
    lineage = json.loads((tmp_path / "p" / "lineage.json").read_text())
    assert "--task=mc.yaml" in lineage["command"]


def test_merge_verb_writes_the_merged_model_and_refuses_a_full_model(
    lora_run, distill_run, tmp_path
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert cli.main(["merge", str(lora_run), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    adapter_model, _ = models.load_model(str(lora_run), dtype="float32")
    expected = logits(adapter_model.eval(), tokenizer)
    assert torch.allclose(logits(merged, tokenizer), expected, atol=1e-4)
    assert (tmp_path / "merged" / "generation_config.json").exists()
    from publish.merge import merge_run

    with pytest.raises(StillError, match="no LoRA adapter"):
        merge_run(str(distill_run), tmp_path / "merged2")


def test_a_missing_task_is_refused_before_any_model_loads(lora_run, tmp_path, monkeypatch):
    import transformers

    monkeypatch.setattr(
        transformers.AutoModelForCausalLM,
        "from_pretrained",
        lambda *args, **kwargs: pytest.fail("loaded a model"),
    )
    with pytest.raises(StillError, match="eval task .*nope.yaml not found"):
        publish(lora_run, tmp_path / "p", tasks=[str(tmp_path / "nope.yaml")])
    assert not (tmp_path / "p").exists()


# --------------------------------------------------------------------------- the run's own texts
def test_check_texts_and_the_cards_example_come_from_the_runs_data(lora_run, tmp_path):
    from huggingface_hub import ModelCard
    from transformers import AutoTokenizer

    samples = run_samples(RunDir(lora_run))
    assert samples.from_run and samples.prompts == tuple(q for q, _ in EVAL_ROWS)  # held out first
    tokenizer = AutoTokenizer.from_pretrained(RunDir(lora_run).adapter_dir)
    texts = check_texts(tokenizer, samples)
    assert texts[:2] == [f"{q}\n{a}" for q, a in EVAL_ROWS]
    assert EVAL_ROWS[0][0] in texts[2] and texts[2].endswith("assistant\n")  # chat-formatted
    out = publish(lora_run, tmp_path / "published", evaluate=False)
    card = ModelCard.load(out / "README.md")
    assert f'"content": "{EVAL_ROWS[0][0]}"' in card.text
    assert "json.dumps" not in card.text
    merge = json.loads((out / "lineage.json").read_text())["merge"]
    assert merge["tokens"] == sum(len(tokenizer(text)["input_ids"]) for text in texts)


def test_samples_fall_back_to_train_data_then_to_neutral_texts(lora_run, tmp_path):
    (tmp_path / "held-out.jsonl").unlink()
    samples = run_samples(RunDir(lora_run))
    assert samples.from_run and samples.prompts == tuple(q for q, _ in ROWS[:2])
    (tmp_path / "qa.jsonl").unlink()
    assert run_samples(RunDir(lora_run)) == FALLBACK
    assert not any("What does" in text for text in FALLBACK.prompts + FALLBACK.texts)
    out = publish(lora_run, tmp_path / "published", evaluate=False)  # still checks and publishes
    assert FALLBACK.prompts[0] in (out / "README.md").read_text()


def test_card_shows_the_forgetting_check_the_run_recorded(lora_run, tmp_path):
    from eval.regression import regression_report

    base_dir, result_dir = tmp_path / "base-scores", tmp_path / "result-scores"
    for directory, hits in ((base_dir, [1, 1, 0, 1]), (result_dir, [1, 0, 0, 0])):
        directory.mkdir()
        (directory / "geo.samples.jsonl").write_text(
            "".join(
                json.dumps({"idx": i, "id": f"q{i}", "metrics": {"acc": float(hit)}}) + "\n"
                for i, hit in enumerate(hits)
            )
        )
    summary = [{"task": "geo", "metrics": {"acc": {"mean": 0.75}}}]
    report = regression_report(
        summary,
        [{"task": "geo", "metrics": {"acc": {"mean": 0.25}}}],
        base_dir,
        result_dir,
        tolerance=0.02,
    )
    RunDir(lora_run).write_regression({**report, "base": "tiny-base"})
    out = publish(lora_run, tmp_path / "published", evaluate=False, compare=False)
    text = (out / "README.md").read_text()
    assert "## Forgetting check" in text and "base (tiny-base)" in text
    assert "Flagged (a drop beyond 0.02): geo acc -0.5000 (tolerance 0.02)." in text
    row = next(line for line in text.splitlines() if line.startswith("| geo | acc |"))
    assert "| 0.7500 | 0.2500 | -0.5000 [" in row and row.endswith("| drop beyond tolerance |")


# --------------------------------------------------------------------------- portable
# A path-shaped word: "/" right after a start, a space, a quote, a backtick, "(" or "=".
ABSOLUTE_WORD = re.compile(r"(?:^|[\s`'\"(=])/[\w.~-]")


def json_strings(value):
    if isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from json_strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from json_strings(item)
    elif isinstance(value, str):
        yield value


def structured_strings(path, text):
    """Every string value of a JSON, JSONL or YAML file, and of the card's YAML blocks."""
    if path.suffix == ".json":
        return list(json_strings(json.loads(text)))
    if path.suffix == ".jsonl":
        return [s for line in text.splitlines() if line for s in json_strings(json.loads(line))]
    if path.suffix == ".yaml":
        return list(json_strings(yaml.safe_load(text)))
    if path.suffix == ".md":  # the metadata, and the recipe the card quotes
        blocks = [text.split("---")[1], *re.findall(r"```yaml\n(.*?)```", text, re.S)]
        return [s for block in blocks for s in json_strings(yaml.safe_load(block))]
    return []


def assert_portable(out, forbidden):
    """No text file of `out` holds an absolute path or one of the `forbidden` strings."""
    texts = [p for p in sorted(out.rglob("*")) if p.is_file() and p.suffix not in WEIGHTS]
    assert {p.name for p in texts} >= {"README.md", "lineage.json", "recipe.yaml", "config.json"}
    for path in texts:
        text = path.read_text(encoding="utf-8")  # every file that is not weights is text
        for needle in forbidden:
            assert needle not in text, (path.name, needle)
        assert not ABSOLUTE_WORD.search(text), (path.name, ABSOLUTE_WORD.search(text))
        # a path names something below the root (the tokenizer's vocabulary holds "/" itself)
        absolute = [s for s in structured_strings(path, text) if re.match(r"[/~][\w.~-]", s)]
        assert absolute == [], path.name


def assert_umask_modes(out, reference_model_dir, tmp_path):
    """Every file has the mode save_pretrained's config.json gets in a fresh dir (what open()
    gives under the umask), every dir the mode of a fresh mkdir. (safetensors 0.8 writes its
    own file 0600 whatever the umask, so its file is no reference.)"""
    from transformers import AutoModelForCausalLM

    fresh = tmp_path / "fresh-save"
    AutoModelForCausalLM.from_pretrained(reference_model_dir).save_pretrained(fresh)
    file_mode, dir_mode = stat.S_IMODE(os.stat(fresh / "config.json").st_mode), None
    (tmp_path / "fresh-dir").mkdir()
    dir_mode = stat.S_IMODE(os.stat(tmp_path / "fresh-dir").st_mode)
    umask = os.umask(0o022)
    os.umask(umask)
    assert (file_mode, dir_mode) == (0o666 & ~umask, 0o777 & ~umask)
    for path in [out, *out.rglob("*")]:
        expected = dir_mode if path.is_dir() else file_mode
        assert stat.S_IMODE(path.stat().st_mode) == expected, (path.name, oct(path.stat().st_mode))


WEIGHTS = (".safetensors", ".gguf")


def test_a_published_dir_names_no_absolute_path_and_has_normal_modes(
    lora_run, tasks, tmp_path, tmp_path_factory, base_dir
):
    """Issue 22's "done when": published from a run dir in a temp folder, through the CLI, with
    GGUF, evals (this model, the base) and a task given by its absolute path."""
    from pathlib import Path

    task_paths, _ = tasks
    out = tmp_path / "published"
    argv = ["publish", str(lora_run), "--out", str(out), "--gguf", "f16", "--quick"]
    assert cli.main([*argv, "--task", task_paths[1]]) == 0
    repo = Path(__file__).resolve().parents[3]
    forbidden = [str(tmp_path), str(tmp_path_factory.getbasetemp()), str(repo), str(Path.home())]
    assert_portable(out, forbidden)
    assert_umask_modes(out, base_dir, tmp_path)
    lineage = json.loads((out / "lineage.json").read_text())
    assert [link["ref"] for link in lineage["chain"]] == ["base", "runs/tiny-ft", "published"]
    _, data = tasks
    assert lineage["data"][0] == {"file": "qa.jsonl", "sha256": file_sha256(data)}
    assert lineage["source_lineage"]["base"] == "base" and lineage["source_run"] == "runs/tiny-ft"
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["data"]["train"]["path"] == "qa.jsonl" and recipe["eval_tasks"][0] == "qa.yaml"
    assert (out / "recipe.yaml").read_text().startswith("# Resolved from recipes/tiny-ft.yaml\n")


def test_a_distilled_students_card_names_its_teacher_and_an_outside_base_by_name(
    distill_run, tmp_path, tmp_path_factory, tiny_model_dir
):
    """The base lies outside the project (a session temp dir): it is named by its dir name."""
    teacher = RunDir(tmp_path / "runs" / "teacher")
    lineage = teacher.read_lineage()
    teacher.lineage_file.write_text(json.dumps({**lineage, "base": str(tiny_model_dir)}))
    out = publish(distill_run, tmp_path / "published-student", evaluate=False)
    assert_portable(out, [str(tmp_path), str(tmp_path_factory.getbasetemp())])
    published = json.loads((out / "lineage.json").read_text())
    assert published["chain"][0]["ref"] == tiny_model_dir.name
    assert published["teacher"] == "runs/teacher"
    text = (out / "README.md").read_text()
    assert "distilled from the teacher `runs/teacher`" in text
    assert f"| base | `{tiny_model_dir.name}` |" in text


def safetensors_dtypes(path):
    from safetensors import safe_open

    with safe_open(path, "pt") as weights:
        return {weights.get_slice(key).get_dtype() for key in weights.keys()}


def test_dtype_bf16_by_default_fp32_on_request_checks_and_gguf_in_fp32(lora_run, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    default = publish(lora_run, tmp_path / "bf16", gguf_types=["f16"], evaluate=False)
    full = publish(lora_run, tmp_path / "fp32", dtype="fp32", evaluate=False)
    assert safetensors_dtypes(default / "model.safetensors") == {"BF16"}
    assert safetensors_dtypes(full / "model.safetensors") == {"F32"}
    config = [json.loads((d / "config.json").read_text())["dtype"] for d in (default, full)]
    assert config == ["bfloat16", "float32"]
    lineages = [json.loads((d / "lineage.json").read_text()) for d in (default, full)]
    assert [lineage["dtype"] for lineage in lineages] == ["bf16", "fp32"]
    # the merge check ran on the fp32 weights both times: the same numbers, at fp32's precision
    assert lineages[0]["merge"] == lineages[1]["merge"]
    assert lineages[0]["merge"]["max_abs_logit_diff"] <= lineages[0]["merge"]["tolerance"]
    card = (default / "README.md").read_text()
    assert "Weights are bf16 safetensors" in card and "cast from fp32 to bf16" in card
    # the GGUF was written from fp32, not from the bf16 cast
    fp32, bf16 = load_file(full / "model.safetensors"), load_file(default / "model.safetensors")
    assert torch.equal(fp32[MLP].to(torch.bfloat16), bf16[MLP])
    gguf = AutoModelForCausalLM.from_pretrained(default, gguf_file="bf16-f16.gguf")
    from_gguf = gguf.state_dict()[MLP]
    assert torch.equal(from_gguf, fp32[MLP].half().float())
    assert not torch.equal(from_gguf, bf16[MLP].float())


MLP = "model.layers.0.mlp.down_proj.weight"  # no q/k reordering between the formats


def test_an_unknown_dtype_is_one_line_before_any_work(lora_run, tmp_path, capsys):
    with pytest.raises(StillError, match=r"unknown dtype 'int8' \(choose from bf16, fp16, fp32"):
        publish(lora_run, tmp_path / "p", dtype="int8")
    assert cli.main(["publish", str(lora_run), "--out", str(tmp_path / "p"), "--dtype", "f32"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "still: error: still publish: unknown choice for --dtype 'f32' (did you mean 'fp32'?)"
    ]
    assert not (tmp_path / "p").exists()


def test_the_cards_example_is_a_prompt_of_the_runs_own_non_python_data(lora_run, tmp_path):
    """A run on the debpkgs domain: its card asks a debpkgs question, not a pydocs one."""
    from pathlib import Path

    debpkgs = Path(__file__).resolve().parents[3] / "data" / "debpkgs"
    data = {
        "train": {
            "path": str(debpkgs / "train.jsonl"),
            "format": "instruction",
            "prompt": "question",
            "response": "answer",
        },
        "eval": {"path": str(debpkgs / "validation.jsonl")},
    }
    lineage = RunDir(lora_run).read_lineage()
    write_run(lora_run, {k: v for k, v in lineage.items() if k not in ("kind", "name")}, data=data)
    first = json.loads((debpkgs / "validation.jsonl").read_text().splitlines()[0])
    out = publish(lora_run, tmp_path / "published", evaluate=False)
    card = (out / "README.md").read_text()
    example = json.dumps({"role": "user", "content": first["question"]}, ensure_ascii=False)
    assert "Debian package" in first["question"] and f"messages = [{example}]" in card
    assert not any(question in card for question, _ in ROWS + EVAL_ROWS)
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["data"]["eval"]["path"] == "validation.jsonl"  # outside the project: a name


def test_the_wandb_artifact_gets_the_portable_lineage_and_links_parents_by_local_dir(
    distill_run, tmp_path, monkeypatch
):
    import still.tracking

    calls = []
    monkeypatch.setattr(
        still.tracking, "log_published_model", lambda *args, **kwargs: calls.append(kwargs)
    )
    out = publish(distill_run, tmp_path / "published-student", evaluate=False)
    (call,) = calls
    assert call["parents"]["teacher"] == str((tmp_path / "runs" / "teacher").resolve())
    assert call["parents"]["source_run"] == str(RunDir(distill_run).path.resolve())
    assert json.loads((out / "lineage.json").read_text())["teacher"] == "runs/teacher"


def test_gguf_files_get_an_on_device_table_measured_in_llama_cpp(lora_run, tmp_path, tasks):
    if not os.environ.get("CI"):  # in CI the setup installs the runtime: fail, never skip
        pytest.importorskip("llama_cpp")
    types = ["q8_0", "q6_k"]
    out = publish(lora_run, tmp_path / "o", gguf_types=types, compare=False, dtype="fp32")
    lineage = json.loads((out / "lineage.json").read_text())
    fp32 = lineage["gguf_fp32_reference"]
    assert fp32["type"] == "fp32" and fp32["perplexity"] > 1 and fp32["prompt_tokens_per_s"] > 0
    for report in lineage["gguf"]:
        row = report["table"]
        assert row["bytes"] == (out / report["file"]).stat().st_size < fp32["bytes"]
        assert row["generate_tokens_per_s"] > 0 and row["perplexity"] > 1
        cell = row["tasks"]["mc"]["acc"]  # scored through llama.cpp, paired with the fp32 scores
        assert cell["low"] <= cell["delta"] <= cell["high"]
        assert (out / "eval" / f"gguf-{report['type']}" / "mc.samples.jsonl").is_file()
        assert report["llama_cpp"]["top1_agreement"] > 0.5
    card = (out / "README.md").read_text()
    section = card.split("## On-device: GGUF in llama.cpp")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["fp32", "q8_0", "q6_k"]
    assert "mc acc" in rows[0] and "qa rouge_l" in rows[0]


def test_k_quants_without_the_runtime_are_refused_before_any_work(lora_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` raises ImportError
    expected = r"^GGUF q4_k_m \(written by llama.cpp's quantizer\) needs llama-cpp-python"
    with pytest.raises(StillError, match=expected):
        publish(lora_run, tmp_path / "o", gguf_types=["q4_k_m"])
    assert not (tmp_path / "o").exists()
