"""What a local model dir or adapter dir must hold before a library is asked to load it.

`still.models.resolve` runs the checks that need no setting (config.json is JSON and names an
architecture this transformers knows; every weight file is whole; pickled weights only with
`allow_pickle`), and `still.models.verify` the ones that depend on `trust_remote_code` (the
dir's own Python code, its tokenizer files, weight shapes against its config). `still check`
and `still run` reach both through the same calls, so they refuse the same dirs, and each
refusal names the file and the recipe key (`model.…`, `teacher.…`, `student.…`) that fixes it.
"""

from __future__ import annotations

import difflib
from functools import lru_cache
from pathlib import Path

from still.errors import StillError
from still.model_files import (
    PICKLE_SUFFIXES,
    check_safetensors,
    read_json_object,
    refuse_lfs_pointer,
)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "spiece.model",
    "vocab.txt",
)
CUSTOM_CODE_RISK = "only if you trust that code: it runs on this machine with your permissions"


# --------------------------------------------------------------------------- files alone
def check_model_dir(path: Path, *, allow_pickle: bool = False, key: str = "model") -> dict:
    """config.json, the architecture it names and the weight files; returns the config."""
    config = read_json_object(path / "config.json", what="model config")
    _check_model_type(path / "config.json", config)
    _check_weights(path, ("model", "pytorch_model"), allow_pickle=allow_pickle, key=key)
    return config


def check_adapter_dir(path: Path, *, allow_pickle: bool = False, key: str = "model") -> dict:
    """adapter_config.json (with the base it names) and the adapter weights; returns it."""
    config = read_json_object(path / "adapter_config.json", what="adapter config")
    base = config.get("base_model_name_or_path")
    if not base or not isinstance(base, str):
        raise StillError(
            f"{path / 'adapter_config.json'}: no base_model_name_or_path",
            hint="set it to the base model the adapter was trained from",
        )
    _check_weights(path, ("adapter_model",), allow_pickle=allow_pickle, key=key)
    return config


def _known_model_types() -> list[str]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return list(CONFIG_MAPPING.keys())


def _check_model_type(config_path: Path, config: dict) -> None:
    if config.get("auto_map"):
        return  # the dir brings its own code: `verify` decides, knowing trust_remote_code
    import transformers

    model_type = config.get("model_type")
    known = _known_model_types()
    if isinstance(model_type, str) and model_type in known:
        return
    if not isinstance(model_type, str) or not model_type:
        raise StillError(
            f"{config_path}: no model_type", hint="the config is damaged; save the model again"
        )
    close = difflib.get_close_matches(model_type, known, n=1, cutoff=0.8)
    hint = (
        f"did you mean '{close[0]}'? Or transformers {transformers.__version__} is too old "
        "for it: pip install -U transformers"
        if close
        else f"transformers {transformers.__version__} does not know it: pip install -U "
        "transformers, or check the config"
    )
    raise StillError(f"{config_path}: unknown model_type '{model_type}'", hint=hint)


def _check_weights(path: Path, stems: tuple[str, ...], *, allow_pickle: bool, key: str) -> None:
    files = sorted(p for p in path.iterdir() if p.name.startswith(stems) and p.is_file())
    safetensors = [p for p in files if p.suffix == ".safetensors"]
    _check_index(path / f"{stems[0]}.safetensors.index.json")
    for file in safetensors:
        check_safetensors(file)
    if safetensors:
        return
    pickles = [p for p in files if p.suffix in PICKLE_SUFFIXES]
    if not pickles:
        raise StillError(
            f"{path}: no weights: neither {stems[0]}.safetensors nor {stems[-1]}.bin",
            hint="copy the weight files into the dir, or name the dir that has them",
        )
    if not allow_pickle:
        raise StillError(
            f"cannot load model {path}: its weights are pickled ({pickles[0].name}), and "
            "loading a pickle can run code",
            hint=f"set {key}.allow_pickle: true to load .bin weights",
        )
    for file in pickles:
        with file.open("rb") as handle:
            head = handle.read(64)
        refuse_lfs_pointer(file, head)
        if not head.startswith((b"PK\x03\x04", b"\x80")):
            raise StillError(
                f"{file}: not a PyTorch weights file (neither a zip nor a pickle)",
                hint="fetch the file again, or save the weights with safetensors",
            )


def _check_index(index: Path) -> None:
    """A sharded checkpoint's index names its shards; every one must be there."""
    if not index.is_file():
        return
    weight_map = read_json_object(index, what="weights index").get("weight_map")
    if not isinstance(weight_map, dict):
        raise StillError(f"{index}: no weight_map", hint="fetch the index again")
    present = {p.name for p in index.parent.iterdir()}
    missing = sorted({str(shard) for shard in weight_map.values()} - present)
    if missing:
        raise StillError(
            f"{index}: names shard {missing[0]}, which is not in {index.parent}"
            + (f" ({len(missing)} shards missing)" if len(missing) > 1 else ""),
            hint="an incomplete download? fetch the missing shards",
        )


# --------------------------------------------------------------------------- with settings
def check_custom_code(path: Path, config_name: str, *, trust_remote_code: bool, key: str) -> None:
    """A dir whose config maps to its own .py files loads only with trust_remote_code."""
    config_path = path / config_name
    if trust_remote_code or not config_path.is_file():
        return
    config = read_json_object(config_path, what="config")
    auto_map = config.get("auto_map")
    if not auto_map or config.get("model_type") in _known_model_types():
        return
    targets = auto_map.values() if isinstance(auto_map, dict) else [auto_map]
    flat = [t for v in targets for t in (v if isinstance(v, list) else [v]) if isinstance(t, str)]
    modules = sorted({t.split("--")[-1].rsplit(".", 1)[0] + ".py" for t in flat}) or ["?"]
    raise StillError(
        f"{config_path}: the model needs its own Python code ({', '.join(modules)}), which "
        f"runs only with {key}.trust_remote_code: true",
        hint=f"set it {CUSTOM_CODE_RISK}",
    )


def check_tokenizer_files(path: Path) -> None:
    if not path.is_dir():
        return
    present = [name for name in TOKENIZER_FILES if (path / name).is_file()]
    if not present:
        raise StillError(
            f"{path}: no tokenizer files: neither {' nor '.join(TOKENIZER_FILES[:2])}",
            hint="save the tokenizer into the dir with tokenizer.save_pretrained, or copy its "
            "base model's",
        )
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if name in present:
            read_json_object(path / name, what="tokenizer file")


def _fingerprint(path: Path) -> tuple:
    return tuple(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(path.iterdir())
        if p.suffix in (".json", ".safetensors")
    )


def check_weight_shapes(path: Path, *, trust_remote_code: bool) -> None:
    """Every tensor in the dir's safetensors has the shape its config.json implies."""
    _weight_shapes(path, trust_remote_code, _fingerprint(path))


@lru_cache(maxsize=32)
def _weight_shapes(path: Path, trust_remote_code: bool, fingerprint: tuple) -> None:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    files = [path / name for name, *_ in fingerprint if name.endswith(".safetensors")]
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ValueError, TypeError, KeyError, OSError) as error:
        raise StillError(
            f"{path / 'config.json'}: transformers cannot read it ({_first_line(error)})",
            hint="the config is damaged or from another library; save the model again",
        ) from None
    if not files or getattr(config, "quantization_config", None):
        return  # quantized checkpoints store packed shapes
    try:
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        if "Unrecognized configuration class" in str(error):
            raise StillError(
                f"{path}: a '{config.model_type}' model is not a causal language model: "
                "transformers has no AutoModelForCausalLM for it",
                hint="the kit trains and scores AutoModelForCausalLM models; name a decoder model",
            ) from None
        raise StillError(
            f"{path / 'config.json'}: cannot build its model ({_first_line(error)})",
            hint="a value in the config is wrong; save the model again",
        ) from None
    expected = {name: list(tensor.shape) for name, tensor in model.state_dict().items()}
    for file in files:
        for name, info in check_safetensors(file).items():
            if name in expected and info["shape"] != expected[name]:
                raise StillError(
                    f"{file}: tensor {name} has shape {info['shape']}, but config.json "
                    f"implies {expected[name]}",
                    hint="the config and the weights come from different models; copy the "
                    "config that was saved with these weights",
                )


def _first_line(error: Exception) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0][:160]
