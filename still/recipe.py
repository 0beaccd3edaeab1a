"""Recipes: YAML in, a typed, validated `Recipe` out.

`load(path, overrides)` reads the YAML (following `extends:` chains), applies dotted CLI
overrides, resolves file paths, and validates against the pydantic sections in
`still/sections.py`. Every key remembers the file and line it came from, so a mistake is
reported as `teacher.yaml:12: unknown key 'lerning_rate' in train (did you mean 'lr'?)`.

Path rule: file paths inside a recipe (`extends`, data files, task YAMLs) are relative to the
YAML file that names them; model references and `output_dir` are resolved like
`from_pretrained` does, relative to the current directory.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from still.errors import StillError
from still.sections import RECIPE_KINDS, Recipe

# Where a value came from: (file, 1-based line) or a description such as "override 'a.b=1'".
Origin = tuple[str, int | None]
KeyPath = tuple[str | int, ...]

# Keys whose string values are file paths relative to the YAML that sets them. "*" matches any
# list index.
PATH_KEYS: tuple[KeyPath, ...] = (
    ("data", "train", "path"),
    ("data", "eval", "path"),
    ("distill", "teacher_cache"),
    ("generate", "out"),
    ("eval_tasks", "*"),
    ("tasks", "*"),
)


# Names users bring from HF TrainingArguments, axolotl, TRL and PEFT, mapped to ours, so that
# "did you mean" finds `lr` for `lerning_rate` (plain fuzzy matching would say `logging_steps`).
KNOWN_SYNONYMS = {
    "learning_rate": "lr",
    "per_device_train_batch_size": "batch_size",
    "micro_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "num_train_epochs": "epochs",
    "num_epochs": "epochs",
    "lr_scheduler_type": "scheduler",
    "lr_scheduler": "scheduler",
    "optim": "optimizer",
    "warmup": "warmup_ratio",
    "lora_r": "r",
    "rank": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "target_modules": "target",
    "use_rslora": "rslora",
    "use_dora": "dora",
    "sequence_len": "max_len",
    "max_seq_length": "max_len",
    "max_length": "max_len",
    "sample_packing": "packing",
    "model_name_or_path": "ref",
    "base_model": "ref",
    "path_or_id": "ref",
    "temp": "temperature",
    "deepspeed": "distributed",
    "fsdp": "distributed",
    "nproc": "num_processes",
    "nproc_per_node": "num_processes",
    "num_gpus": "num_processes",
    "nnodes": "num_machines",
    "node_rank": "machine_rank",
    "master_addr": "main_process_ip",
    "master_port": "main_process_port",
}


# --------------------------------------------------------------------------- YAML with lines
def parse_yaml(text: str, path: Path) -> tuple[yaml.Node | None, object]:
    """(node tree for line numbers, data); a syntax error is one line at its file:line."""
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader), yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise StillError(f"{where}: invalid YAML: {problem}") from None


def _read_yaml(path: Path) -> tuple[dict, dict[KeyPath, Origin]]:
    """Parse one YAML file into (data, {key path: (file, line)})."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StillError(f"recipe file not found: {path}") from None
    except OSError as exc:
        raise StillError(f"cannot read recipe {path}: {exc.strerror}") from None
    node, data = parse_yaml(text, path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise StillError(f"{path}: a recipe must be a mapping of keys, got {type(data).__name__}")
    origins: dict[KeyPath, Origin] = {}
    _collect_lines(node, (), str(path), origins)
    return data, origins


def _collect_lines(node, prefix: KeyPath, file: str, origins: dict[KeyPath, Origin]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            origins[prefix + (key,)] = (file, key_node.start_mark.line + 1)
            _collect_lines(value_node, prefix + (key,), file, origins)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            origins[prefix + (index,)] = (file, item.start_mark.line + 1)
            _collect_lines(item, prefix + (index,), file, origins)


# --------------------------------------------------------------------------- extends + merge
def deep_merge(base: dict, override: dict) -> dict:
    """Mappings merge key by key; anything else (lists included) is replaced by `override`."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _load_chain(path: Path, seen: tuple[Path, ...]) -> tuple[dict, dict[KeyPath, Origin]]:
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(p.name for p in (*seen, path))
        raise StillError(f"{path}: extends cycle: {chain}", hint="remove one of the extends: links")
    data, origins = _read_yaml(path)
    _resolve_paths(data, origins, path.parent)
    parent_ref = data.pop("extends", None)
    origins.pop(("extends",), None)
    if parent_ref is None:
        return data, origins
    if not isinstance(parent_ref, str):
        raise StillError(f"{path}: extends must be a path to another recipe YAML")
    parent_path = (path.parent / parent_ref).resolve()
    if not parent_path.exists():
        raise StillError(f"{path}: extends: file not found: {parent_ref} (looked at {parent_path})")
    parent_data, parent_origins = _load_chain(parent_path, (*seen, path))
    merged = deep_merge(parent_data, data)
    # A key set in the child wins, so its origin does too; list items come from whichever won.
    merged_origins = {k: v for k, v in parent_origins.items() if not _overridden_by(k, data)}
    merged_origins.update(origins)
    return merged, merged_origins


def _overridden_by(key_path: KeyPath, child: dict) -> bool:
    node: Any = child
    for part in key_path:
        if isinstance(node, dict) and part in node:
            if not isinstance(node[part], dict):
                return True
            node = node[part]
        else:
            return False
    return True


def _resolve_paths(data: dict, origins: dict[KeyPath, Origin], base_dir: Path) -> None:
    """Make relative file paths absolute against the YAML that names them."""
    for pattern in PATH_KEYS:
        for key_path, value in _matching(data, pattern, ()):
            if isinstance(value, str) and not _is_remote(value) and not Path(value).is_absolute():
                _set(data, key_path, str((base_dir / value).resolve()))


def _is_remote(value: str) -> bool:
    return "://" in value or value.startswith("hf:")


def _matching(node: Any, pattern: KeyPath, prefix: KeyPath):
    if not pattern:
        yield prefix, node
        return
    head, rest = pattern[0], pattern[1:]
    if head == "*" and isinstance(node, list):
        for index, item in enumerate(node):
            yield from _matching(item, rest, prefix + (index,))
    elif isinstance(node, dict) and head in node:
        yield from _matching(node[head], rest, prefix + (head,))


def _set(data: Any, key_path: KeyPath, value: Any) -> None:
    for part in key_path[:-1]:
        data = data[part]
    data[key_path[-1]] = value


# --------------------------------------------------------------------------- overrides
def apply_override(data: dict, origins: dict[KeyPath, Origin], override: str) -> None:
    """Apply one `a.b.c=value` override; the value is parsed as YAML (`[a, b]`, `1e-4`, `null`)."""
    if "=" not in override:
        raise StillError(
            f"bad override '{override}': expected KEY=VALUE", hint="e.g. train.max_steps=10"
        )
    dotted, raw_value = override.split("=", 1)
    keys = [k for k in dotted.strip().split(".")]
    if not all(keys):
        raise StillError(f"bad override '{override}': empty key in '{dotted}'")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else ""
    except yaml.YAMLError:
        value = raw_value
    if isinstance(value, bool) and raw_value.strip().lower() not in ("true", "false"):
        # YAML 1.1 reads on/off/yes/no as booleans; `name=off` means the name. A bool field
        # still gets a bool: pydantic reads "off"/"yes" as one.
        value = raw_value.strip()
    node = data
    for depth, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
            # a section the override created is reported at the override, not the file
            origins[tuple(keys[: depth + 1])] = (f"override '{override}'", None)
        elif not isinstance(child, dict):
            where = ".".join(keys[: depth + 1])
            raise StillError(f"bad override '{override}': '{where}' is not a section")
        node = child
    node[keys[-1]] = value
    origin = ("override", None)
    key_path = tuple(keys)
    for existing in [k for k in origins if k[: len(key_path)] == key_path]:
        origins.pop(existing)
    origins[key_path] = (f"override '{override}'", None)
    if isinstance(value, list):
        for index in range(len(value)):
            origins[key_path + (index,)] = origin


# --------------------------------------------------------------------------- validation errors
def _fields_at(model_cls: type[BaseModel], loc: KeyPath) -> dict | None:
    """The pydantic fields of the section at `loc`, for did-you-mean suggestions."""
    cls: Any = model_cls
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(cls, "model_fields", None)
        if not fields:
            return None
        field = fields.get(part) or next(
            (f for f in fields.values() if f.alias == part), None
        )
        if field is None:
            return None
        cls = _section_type(field.annotation)
        if cls is None:
            return None
    return getattr(cls, "model_fields", None)


def _section_type(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list, typing.Annotated):
        for arg in typing.get_args(annotation):
            found = _section_type(arg)
            if found is not None:
                return found
    return None


def _suggest(key: str, names: list[str]) -> str | None:
    synonyms = {alias: ours for alias, ours in KNOWN_SYNONYMS.items() if ours in names}
    close = difflib.get_close_matches(key.lower(), [*names, *synonyms], n=1, cutoff=0.6)
    if not close:
        close = difflib.get_close_matches(key.lower(), names, n=1, cutoff=0.5)
    return synonyms.get(close[0], close[0]) if close else None


def _where(origins: dict[KeyPath, Origin], loc: KeyPath, default_file: str) -> str:
    for end in range(len(loc), 0, -1):
        origin = origins.get(tuple(loc[:end]))
        if origin:
            file, line = origin
            return f"{file}:{line}" if line else file
    return default_file


def _describe(error: dict, recipe_cls: type[BaseModel]) -> tuple[KeyPath, str]:
    # pydantic names union branches in the path (`function-after[...]`, `literal['all-linear']`,
    # `list[str]`); users know only their keys.
    loc = tuple(
        p for p in error["loc"] if not (isinstance(p, str) and (p.startswith("function-") or "[" in p))
    )
    section = ".".join(str(p) for p in loc[:-1]) or "the recipe"
    key = loc[-1] if loc else ""
    kind = error["type"]
    if kind == "extra_forbidden":
        fields = _fields_at(recipe_cls, loc[:-1]) or {}
        names = [f.alias or n for n, f in fields.items()]
        suggestion = _suggest(str(key), names)
        hint = f" (did you mean '{suggestion}'?)" if suggestion else f" (valid keys: {', '.join(names)})"
        return loc, f"unknown key '{key}' in {section}{hint}"
    dotted = ".".join(str(p) for p in loc) or "recipe"
    if kind == "missing":
        return loc, f"missing required key '{dotted}'"
    got = error.get("input")
    got_text = "" if isinstance(got, dict) else f" (got {json.dumps(got, default=str)})"
    message = error["msg"].removeprefix("Value error, ")
    return loc, f"{dotted}: {message}{got_text}"


def _validation_error(exc: ValidationError, cls, origins, recipe_file: str) -> StillError:
    errors = exc.errors()
    loc, message = _describe(errors[0], cls)
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return StillError(f"{_where(origins, loc, recipe_file)}: {message}{more}")


# --------------------------------------------------------------------------- public API
def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, merge, override and validate a recipe. Raises `StillError` on any user mistake."""
    recipe_path = Path(path)
    if not recipe_path.exists():
        raise StillError(f"recipe file not found: {path}")
    data, origins = _load_chain(recipe_path, ())
    for override in overrides:
        apply_override(data, origins, override)
    kind = data.get("kind")
    cls = RECIPE_KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        where = _where(origins, ("kind",), str(recipe_path))
        close = difflib.get_close_matches(str(kind), RECIPE_KINDS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        valid = " | ".join(RECIPE_KINDS)
        if kind is None:
            raise StillError(f"{where}: missing required key 'kind' ({valid})")
        raise StillError(f"{where}: kind must be one of {valid}, got '{kind}'{hint}")
    try:
        recipe = cls.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc, cls, origins, str(recipe_path)) from None
    recipe._source = str(recipe_path.resolve())
    return recipe


def to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML (what a run dir stores and what `still validate` prints)."""
    dumped = recipe.model_dump(mode="json", exclude_none=True, by_alias=True)
    data = {"kind": dumped.pop("kind"), **dumped}
    header = f"# Resolved from {recipe._source}\n" if getattr(recipe, "_source", None) else ""
    return header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def recipe_hash(recipe: Recipe) -> str:
    payload = json.dumps(recipe.model_dump(mode="json"), sort_keys=True).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


def json_schema() -> dict:
    """One JSON schema covering every recipe kind (for editors and `still schema`)."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "still recipe",
        "oneOf": [cls.model_json_schema() for cls in RECIPE_KINDS.values()],
    }
