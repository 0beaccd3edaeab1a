"""One resolver for every place a model is named, and the loader built on it.

A reference is one of:
  builtin:NAME      an offline built-in shipped as a PyPI package (see `still.builtins`)
  path/to/x.gguf    a GGUF file: dequantized once, cached as safetensors
  path/to/run       a `still` run dir: its full model, or its base + LoRA adapter
  path/to/adapter   a PEFT adapter dir (adapter_config.json names the base)
  path/to/hf_dir    a local transformers dir (config.json)
  org/name          a hub id (online users; offline it must already be in the HF cache)

GGUF conversion and its cache live in `still.builtins`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError

from still.builtins import BUILTINS, CONVERTED_MARKER, cache_dir, convert_gguf
from still.errors import StillError
from still.formats import TURN_PROBE, special_token_ids
from still.model_dirs import (
    CUSTOM_CODE_RISK,
    check_adapter_dir,
    check_custom_code,
    check_model_dir,
    check_tokenizer_files,
    check_weight_shapes,
)
from still.rundir import RunDir


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


def resolve(ref: str, *, allow_pickle: bool = False, key: str = "model") -> ResolvedModel:
    """Turn a reference into local weights (+ adapter). Converts GGUF on first use.

    Every local file is checked here (`still.model_dirs`, `still.model_files`) before any
    library reads it, and pickled weights are refused unless `allow_pickle`: `still check` and
    `still run` both resolve through this, so they refuse the same references. `key` is the
    recipe section the reference came from (model, teacher, student), named in the hints.
    """
    ref = str(ref).strip()
    if not ref:
        raise StillError("empty model reference", hint="e.g. builtin:smollm2-135m-instruct")
    if ref.startswith("builtin:"):
        return _resolve_builtin(ref)
    path = Path(ref).expanduser()
    if path.suffix == ".gguf":
        if path.is_dir():
            raise StillError(f"{ref}: is a directory, not a GGUF file", hint="name the .gguf file")
        if not path.is_file():
            raise StillError(f"GGUF file not found: {ref}")
        return ResolvedModel(ref, "gguf", str(convert_gguf(path)))
    if path.is_dir():
        return _resolve_dir(ref, path, allow_pickle=allow_pickle, key=key)
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


def _resolve_dir(ref: str, path: Path, *, allow_pickle: bool, key: str) -> ResolvedModel:
    run = RunDir(path)
    has_lineage = run.lineage_file.exists()
    options = dict(allow_pickle=allow_pickle, key=key)
    if has_lineage and (run.model_dir / "config.json").exists():
        check_model_dir(run.model_dir, **options)
        return ResolvedModel(ref, "run", str(run.model_dir))
    if has_lineage and (run.adapter_dir / "adapter_config.json").exists():
        base = run.read_lineage().get("base")
        if not base or not isinstance(base, str):
            raise StillError(f"run dir {ref}: {run.lineage_file.name} does not name its base model")
        check_adapter_dir(run.adapter_dir, **options)
        return ResolvedModel(
            ref,
            "run",
            resolve(base, **options).weights,
            run.adapter_dir,
            _tokenizer_in(run.adapter_dir),
        )
    if has_lineage and (path / "config.json").exists():
        check_model_dir(path, **options)
        return ResolvedModel(ref, "dir", str(path))  # a `still publish` output: a plain model dir
    if has_lineage:
        raise StillError(
            f"run dir {ref} holds no finished model (no model/ or adapter/)",
            hint="the run may have stopped early: resume it with `still run RECIPE --resume`",
        )
    if (path / "adapter_config.json").exists():
        base = check_adapter_dir(path, **options)["base_model_name_or_path"]
        weights = resolve(base, **options).weights
        return ResolvedModel(ref, "adapter", weights, path, _tokenizer_in(path))
    if (path / "config.json").exists():
        check_model_dir(path, **options)
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


def end_of_turn_token(tokenizer, chat_template: str | None = None) -> int | None:
    """The special token a chat template (default: the tokenizer's own) writes right after an
    assistant's text, such as `<|im_end|>` or `<end_of_turn>`; None without one."""
    if not (chat_template or getattr(tokenizer, "chat_template", None)):
        return None
    try:
        text = tokenizer.apply_chat_template(
            TURN_PROBE, chat_template=chat_template, tokenize=False
        )
    except Exception:  # noqa: BLE001 — a template that rejects the probe has no known end token
        return None
    after = text.rfind(TURN_PROBE[-1]["content"])
    if after < 0:
        return None
    ids = tokenizer(text[after + len(TURN_PROBE[-1]["content"]) :], add_special_tokens=False)
    first = ids["input_ids"][:1]
    return first[0] if first and first[0] in special_token_ids(tokenizer) else None


def stop_token_ids(model, tokenizer) -> list[int]:
    """The tokenizer's eos, every eos the model's generation config names, and the token its
    chat template ends an assistant turn with (chat models often end a turn with a token other
    than the tokenizer's eos; a base model fine-tuned on a turn format has no config for it)."""
    ids = {tokenizer.eos_token_id, end_of_turn_token(tokenizer)}
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


def verify(resolved: ResolvedModel, *, trust_remote_code: bool, key: str = "model") -> None:
    """What loading would refuse, checked without loading a weight: the dir's own Python code
    without `trust_remote_code`, missing tokenizer files, weights shaped unlike the config.

    `load_tokenizer` and `load_model` both call it, so `still check` (tokenizer + a model on
    the meta device) refuses what `still run` would.
    """
    options = dict(trust_remote_code=trust_remote_code, key=key)
    weights = Path(resolved.weights)
    local = weights.is_dir() and not (weights / CONVERTED_MARKER).exists()
    if local:
        check_custom_code(weights, "config.json", **options)
    tokenizer_dir = Path(resolved.tokenizer_path)
    if tokenizer_dir.is_dir():
        check_custom_code(tokenizer_dir, "tokenizer_config.json", **options)
        check_tokenizer_files(tokenizer_dir)
    if local:
        check_weight_shapes(weights, trust_remote_code=trust_remote_code)


def load_tokenizer(ref_or_resolved, *, trust_remote_code: bool = False, key: str = "model"):
    from transformers import AutoTokenizer

    resolved = (
        ref_or_resolved
        if isinstance(ref_or_resolved, ResolvedModel)
        # a tokenizer reads no weights; the model's loader refuses pickles
        else resolve(ref_or_resolved, allow_pickle=True, key=key)
    )
    verify(resolved, trust_remote_code=trust_remote_code, key=key)
    try:
        return AutoTokenizer.from_pretrained(
            resolved.tokenizer_path, trust_remote_code=trust_remote_code
        )
    # tokenizers raises a bare Exception for a tokenizer.json it cannot parse: a user file
    except Exception as exc:  # noqa: BLE001
        raise _load_error(
            exc,
            f"cannot load tokenizer for {resolved.ref}",
            key,
            hint="its files are damaged or from a newer library; save the tokenizer again",
        ) from None


def _load_error(
    exc: Exception, what: str, key: str, *, known_only: bool = False, hint: str | None = None
):
    """A library's error at load time, told with the recipe key that fixes it; None for one
    not recognised when `known_only` (it may be a bug, and keeps its traceback)."""
    import pickle

    text = str(exc)
    first = (text.splitlines() or [type(exc).__name__])[0][:200]
    if "trust_remote_code" in text:
        return StillError(
            f"{what}: it needs its own Python code, which runs only with "
            f"{key}.trust_remote_code: true",
            hint=f"set it {CUSTOM_CODE_RISK}",
        )
    if isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in text:
        return StillError(
            f"{what}: its pickled weights hold objects other than tensors, which are not "
            f"loaded even with {key}.allow_pickle: true",
            hint="convert the weights to safetensors where you trust the file",
        )
    if "ignore_mismatched_sizes" in text or "size mismatch" in text:
        return StillError(
            f"{what}: the weights' shapes do not match config.json",
            hint="the config and the weights come from different models",
        )
    if known_only and not isinstance(exc, (OSError, SafetensorError)):
        return None
    if isinstance(exc, KeyError) or len(first) < 40:  # a bare key or word says little alone
        first = f"{type(exc).__name__}: {first}"
    return StillError(f"{what}: {first}", hint=hint)


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
    key: str = "model",
):
    """Load (model, tokenizer) for any reference; an adapter stays unmerged (PeftModel).

    `key` is the recipe section the reference came from (model, teacher, student): errors
    name its settings, e.g. `teacher.trust_remote_code`.
    """
    import pickle

    from transformers import AutoModelForCausalLM

    resolved = resolve(ref, allow_pickle=allow_pickle, key=key)
    verify(resolved, trust_remote_code=trust_remote_code, key=key)
    kwargs = dict(
        dtype=pick_dtype(dtype),
        trust_remote_code=trust_remote_code,
        use_safetensors=None if allow_pickle else True,
    )
    for name, value in (
        ("attn_implementation", attn_implementation),
        ("revision", revision),
        ("device_map", device_map),
        ("quantization_config", quantization_config),
    ):
        if value is not None:
            kwargs[name] = value
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved.weights, **kwargs)
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError, SafetensorError) as exc:
        error = _load_error(exc, f"cannot load model {ref}", key, known_only=True)
        if error is None:
            raise
        raise error from None
    if resolved.adapter is not None:
        model = attach_adapter(model, resolved.adapter, trainable=trainable_adapter)
    tokenizer = load_tokenizer(resolved, trust_remote_code=trust_remote_code, key=key)
    return model, tokenizer


def section_key(spec) -> str:
    """The recipe key of a model section, for hints: `student` for a student, else `model`
    (a distill teacher's loader passes key="teacher")."""
    return "student" if type(spec).__name__ == "StudentSection" else "model"


def load_from_section(spec, *, key: str | None = None, **kwargs):
    """`load_model` with the options of a recipe's model/teacher/student section."""
    return load_model(
        spec.ref,
        dtype=spec.dtype,
        trust_remote_code=spec.trust_remote_code,
        allow_pickle=spec.allow_pickle,
        attn_implementation=spec.attn_implementation,
        revision=spec.revision,
        key=key or section_key(spec),
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
