"""Broken model and data files, built from the tiny model: each a way a download or a copy goes
wrong. Shared by tests/unit/test_model_files.py and the bad-input corpus (placeholders such as
{TRUNC_GGUF} in tests/bad_inputs/cases_files.yaml), which cannot hold binary files itself.
"""

import json
import shutil
import struct
from pathlib import Path

LFS_POINTER = (
    "version https://git-lfs.github.com/spec/v1\n"
    "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
    "size 104857600\n"
)
HTML_PAGE = "<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head></html>\n"
ROWS = [
    {"question": "What does abs do?", "answer": "Return the absolute value."},
    {"question": "What does len do?", "answer": "Return the number of items."},
]


def write_gguf(path: Path) -> Path:
    """A small well-formed GGUF: metadata, a vocabulary array, an f32 and an f16 tensor."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_string("general.name", "tiny")
    writer.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    writer.add_tensor("token_embd.weight", np.ones((4, 32), np.float32))
    writer.add_tensor("output_norm.weight", np.ones((64,), np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _model_copy(tiny: Path, root: Path, name: str) -> Path:
    target = root / name
    shutil.copytree(tiny, target)
    return target


def _edit_config(model_dir: Path, **changes) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    config.update(changes)
    (model_dir / "config.json").write_text(json.dumps(config))


def model_file_cases(tiny: Path, root: Path) -> dict[str, Path]:
    """Placeholder name -> a broken model file or dir."""
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    valid = write_gguf(root / "valid.gguf").read_bytes()
    for name, data in {
        "TRUNC_GGUF": valid[: len(valid) - 100],
        "TRUNC_GGUF_HEADER": valid[:60],
        "LFS_GGUF": LFS_POINTER.encode(),
        "EMPTY_GGUF": b"",
        "HTML_GGUF": HTML_PAGE.encode(),
        "OLD_GGUF": b"GGUF" + struct.pack("<IQQ", 1, 0, 0),
    }.items():
        out[name] = root / f"{name.lower()}.gguf"
        out[name].write_bytes(data)

    weights = (tiny / "model.safetensors").read_bytes()
    (header_length,) = struct.unpack("<Q", weights[:8])
    broken_weights = {
        "TRUNC_SAFETENSORS": weights[: len(weights) // 2],
        "BAD_HEADER_SAFETENSORS": weights[:8]
        + b"{"
        + b"x" * (header_length - 1)
        + weights[8 + header_length :],
        "LFS_SAFETENSORS": LFS_POINTER.encode(),
        "HTML_SAFETENSORS": HTML_PAGE.encode(),
    }
    for name, data in broken_weights.items():
        out[name] = _model_copy(tiny, root, name.lower())
        (out[name] / "model.safetensors").write_bytes(data)

    out["CONFIG_NOT_JSON"] = _model_copy(tiny, root, "config_not_json")
    (out["CONFIG_NOT_JSON"] / "config.json").write_text('{"model_type": "llama",\n  oops\n}')
    out["UNKNOWN_MODEL_TYPE"] = _model_copy(tiny, root, "unknown_model_type")
    _edit_config(out["UNKNOWN_MODEL_TYPE"], model_type="lama")
    out["CUSTOM_CODE"] = _model_copy(tiny, root, "custom_code")
    _edit_config(
        out["CUSTOM_CODE"],
        model_type="tinyx",
        auto_map={
            "AutoConfig": "configuration_tinyx.TinyXConfig",
            "AutoModelForCausalLM": "modeling_tinyx.TinyXForCausalLM",
        },
    )
    (out["CUSTOM_CODE"] / "modeling_tinyx.py").write_text("raise SystemExit('custom code ran')\n")
    (out["CUSTOM_CODE"] / "configuration_tinyx.py").write_text("raise SystemExit('ran')\n")
    out["SHAPE_MISMATCH"] = _model_copy(tiny, root, "shape_mismatch")
    _edit_config(out["SHAPE_MISMATCH"], hidden_size=64, head_dim=16)
    out["NOT_CAUSAL"] = _model_copy(tiny, root, "not_causal")
    (out["NOT_CAUSAL"] / "config.json").write_text(
        json.dumps({"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 1})
    )

    out["BAD_TOKENIZER_JSON"] = _model_copy(tiny, root, "bad_tokenizer_json")
    (out["BAD_TOKENIZER_JSON"] / "tokenizer.json").write_text('{"version": "1.0",\n')
    out["ODD_TOKENIZER_JSON"] = _model_copy(tiny, root, "odd_tokenizer_json")
    (out["ODD_TOKENIZER_JSON"] / "tokenizer.json").write_text('{"version": "1.0", "model": 7}\n')
    out["NO_TOKENIZER"] = root / "no_tokenizer"
    out["NO_TOKENIZER"].mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny / name, out["NO_TOKENIZER"] / name)
    out["NO_WEIGHTS"] = _model_copy(tiny, root, "no_weights")
    (out["NO_WEIGHTS"] / "model.safetensors").unlink()
    out["MISSING_SHARD"] = _model_copy(tiny, root, "missing_shard")
    (out["MISSING_SHARD"] / "model.safetensors").rename(
        out["MISSING_SHARD"] / "model-00001-of-00002.safetensors"
    )
    index = {
        "metadata": {},
        "weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"},
    }
    (out["MISSING_SHARD"] / "model.safetensors.index.json").write_text(json.dumps(index))
    return out


def pickle_cases(tiny: Path, root: Path) -> dict[str, Path]:
    """A pickle-only dir whose pickle holds more than tensors (fails weights_only loading)."""
    import fractions

    import torch

    evil = root / "evil_pickle"
    shutil.copytree(tiny, evil, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save({"model.norm.weight": fractions.Fraction(1, 3)}, evil / "pytorch_model.bin")
    return {"EVIL_PICKLE": evil}


def data_file_cases(root: Path) -> dict[str, Path]:
    """Data files in the wrong encoding or not text at all."""
    root.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(row) + "\n" for row in ROWS)
    accented = lines.replace("absolute", "absolùte")
    files = {
        "UTF16_JSONL": ("utf16.jsonl", lines.encode("utf-16")),
        "UTF16_CSV": ("utf16.csv", "question,answer\nabs,absolute\n".encode("utf-16")),
        "UTF16_JSON": ("utf16.json", json.dumps(ROWS).encode("utf-16")),
        "LATIN1_JSONL": ("latin1.jsonl", accented.encode("latin-1")),
        "NUL_JSONL": ("nul.jsonl", lines.encode().replace(b"abs", b"a\x00bs")),
        "BINARY_CSV": ("binary.csv", bytes(range(256)) * 4),
        "BINARY_JSONL": ("binary.jsonl", bytes(range(256)) * 4),
        "CORRUPT_PARQUET": ("corrupt.parquet", b"PAR1" + bytes(range(200)) + b"PAR1"),
        "GZIP_JSONL": ("gzipped.jsonl", b"\x1f\x8b\x08\x00" + bytes(100)),
        # recipe and task YAML: another encoding, a control character
        "UTF16_RECIPE": ("utf16-recipe.yaml", "kind: finetune\nname: x\n".encode("utf-16")),
        "CONTROL_RECIPE": ("control-recipe.yaml", b"kind: finetune\nname: x\x01\n"),
        "UTF16_TASK": ("utf16-task.yaml", "name: t\ntype: generate\n".encode("utf-16")),
        "CONTROL_TASK": ("control-task.yaml", b"name: t\x00\ntype: generate\n"),
    }
    out = {}
    for name, (filename, data) in files.items():
        out[name] = root / filename
        out[name].write_bytes(data)
    return out


def build_bad_files(tiny: Path, root: Path) -> dict[str, Path]:
    return {
        **model_file_cases(tiny, root / "models"),
        **pickle_cases(tiny, root / "pickles"),
        **data_file_cases(root / "data"),
    }
