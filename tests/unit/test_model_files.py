"""Model files are checked before any library reads them (still.model_files, still.model_dirs),
and `still check` refuses the model dirs `still run` refuses."""

import json
import shutil
import struct

import pytest
from bad_model_files import LFS_POINTER, model_file_cases, pickle_cases, write_gguf

from still import cli, models
from still.errors import StillError
from still.model_dirs import check_custom_code
from still.model_files import check_gguf, check_safetensors, open_gguf


@pytest.fixture(scope="module")
def broken(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("broken_models")
    return {**model_file_cases(tiny_model_dir, root), **pickle_cases(tiny_model_dir, root)}


# --------------------------------------------------------------------------- GGUF
def test_every_truncation_of_a_gguf_is_refused_and_the_whole_file_reads(tmp_path):
    valid = write_gguf(tmp_path / "valid.gguf").read_bytes()
    check_gguf(tmp_path / "valid.gguf")
    assert len(open_gguf(tmp_path / "valid.gguf").tensors) == 2
    cut = tmp_path / "cut.gguf"
    for size in range(len(valid)):
        cut.write_bytes(valid[:size])
        with pytest.raises(StillError, match=r"cut\.gguf: (empty|not a GGUF|truncated GGUF)"):
            check_gguf(cut)


def test_gguf_array_counts_beyond_the_file_are_refused_without_looping(tmp_path):
    # one metadata key holding an array of 2**60 uint8: gguf's own reader would loop on it
    header = b"GGUF" + struct.pack("<IQQ", 3, 0, 1)
    key = b"general.big"
    entry = struct.pack("<Q", len(key)) + key + struct.pack("<IIQ", 9, 0, 2**60)
    path = tmp_path / "big.gguf"
    path.write_bytes(header + entry)
    with pytest.raises(StillError, match="truncated GGUF: its header runs past the end"):
        check_gguf(path)


def test_gguf_wrong_magic_lfs_pointer_and_old_version(broken):
    with pytest.raises(StillError, match=r"lfs_gguf\.gguf: is a git-lfs pointer.*git lfs pull"):
        check_gguf(broken["LFS_GGUF"])
    with pytest.raises(StillError, match="not a GGUF file .*HTML page"):
        check_gguf(broken["HTML_GGUF"])
    with pytest.raises(StillError, match="GGUF version 1 is not supported"):
        check_gguf(broken["OLD_GGUF"])


def test_a_bad_gguf_is_refused_before_the_conversion_cache_is_touched(
    broken, tmp_path, monkeypatch
):
    monkeypatch.setenv("STILL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(StillError, match="truncated GGUF: tensor 'output_norm.weight' ends at"):
        models.resolve(str(broken["TRUNC_GGUF"]))
    assert not (tmp_path / "cache").exists()


# --------------------------------------------------------------------------- safetensors
def test_safetensors_header_is_checked_against_the_file(tiny_model_dir, tmp_path):
    valid = (tiny_model_dir / "model.safetensors").read_bytes()
    assert "model.embed_tokens.weight" in check_safetensors(tiny_model_dir / "model.safetensors")
    path = tmp_path / "model.safetensors"
    path.write_bytes(valid + b"\0\0")
    with pytest.raises(StillError, match="2 bytes after its last tensor"):
        check_safetensors(path)
    path.write_bytes(valid[:-1])
    with pytest.raises(StillError, match="truncated safetensors: its tensors need"):
        check_safetensors(path)
    path.write_text(LFS_POINTER)
    with pytest.raises(StillError, match="git-lfs pointer"):
        check_safetensors(path)


@pytest.mark.parametrize(
    "name, message",
    [
        ("TRUNC_SAFETENSORS", r"model\.safetensors: truncated safetensors"),
        ("BAD_HEADER_SAFETENSORS", "damaged safetensors header"),
        ("CONFIG_NOT_JSON", r"config\.json:2: invalid JSON"),
        ("UNKNOWN_MODEL_TYPE", r"unknown model_type 'lama' \(did you mean 'llama'\?"),
        ("NO_WEIGHTS", "no weights: neither model.safetensors nor pytorch_model.bin"),
        ("MISSING_SHARD", "names shard model-00002-of-00002.safetensors"),
    ],
)
def test_resolve_checks_the_files_of_a_model_dir(broken, name, message):
    with pytest.raises(StillError, match=message):
        models.resolve(str(broken[name]))


# --------------------------------------------------------------------------- library errors
def test_custom_code_names_the_recipe_key_and_never_runs(broken):
    resolved = models.resolve(str(broken["CUSTOM_CODE"]))
    with pytest.raises(StillError) as info:
        models.verify(resolved, trust_remote_code=False, key="teacher")
    assert "teacher.trust_remote_code: true" in str(info.value)
    assert "modeling_tinyx.py" in str(info.value) and "trust that code" in str(info.value)
    with pytest.raises(StillError, match=r"model\.trust_remote_code: true"):
        models.load_tokenizer(str(broken["CUSTOM_CODE"]))  # SystemExit if its code ran
    # trusted, the refusal is lifted (what then runs is the user's choice)
    check_custom_code(broken["CUSTOM_CODE"], "config.json", trust_remote_code=True, key="model")


def test_auto_map_on_a_known_architecture_is_not_custom_code(tiny_model_dir, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_x.X"}
    (model_dir / "config.json").write_text(json.dumps(config))
    model, _ = models.load_model(str(model_dir))
    assert model.config.model_type == "llama"


def test_shape_mismatch_missing_tokenizer_and_non_causal_models(broken):
    for name, message in (
        ("SHAPE_MISMATCH", r"tensor model\.embed_tokens\.weight has shape \[320, 32\]"),
        ("NO_TOKENIZER", "no tokenizer files"),
        ("NOT_CAUSAL", "a 'vit' model is not a causal language model"),
    ):
        with pytest.raises(StillError, match=message):
            models.load_model(str(broken[name]))


def test_a_pickle_that_is_not_only_tensors_is_refused_even_when_pickles_are_allowed(broken):
    with pytest.raises(StillError, match=r"pickled \(pytorch_model\.bin\)"):
        models.load_model(str(broken["EVIL_PICKLE"]))
    with pytest.raises(StillError, match="objects other than tensors.*student.allow_pickle"):
        models.load_model(str(broken["EVIL_PICKLE"]), allow_pickle=True, key="student")


def test_section_key_names_the_student_section():
    from still.distill_sections import StudentSection
    from still.sections import ModelSection

    assert models.section_key(StudentSection(ref="x")) == "student"
    assert models.section_key(ModelSection(ref="x")) == "model"


# --------------------------------------------------------------------------- check == run
def test_check_refuses_the_pickle_only_dir_that_run_refuses(tiny_model_dir, tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM

    pickled = tmp_path / "pickled"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    shutil.copytree(tiny_model_dir, pickled, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    (tmp_path / "train.jsonl").write_text('{"question": "q?", "answer": "a."}\n' * 4)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"kind: finetune\nname: r\noutput_dir: {tmp_path / 'runs'}\nmodel: {{ref: '{pickled}'}}\n"
        "lora: {r: 4, alpha: 8}\ndata:\n  train: {path: train.jsonl, format: instruction, "
        "prompt: question, response: answer}\n  max_len: 64\ntrain: {max_steps: 1, batch_size: 2}\n"
    )
    lines = {}
    for verb in ("check", "run"):
        assert cli.main([verb, str(recipe)]) == 2
        lines[verb] = [x for x in capsys.readouterr().err.splitlines() if "error" in x]
    assert lines["check"] == lines["run"] and len(lines["run"]) == 1
    assert "its weights are pickled" in lines["run"][0] and "model.allow_pickle" in lines["run"][0]
    assert not (tmp_path / "runs").exists()
    # allowed, the same dir loads
    loaded, _ = models.load_model(str(pickled), allow_pickle=True)
    assert loaded.config.model_type == "llama"
