"""Recipes: YAML in, a typed, validated `Recipe` out.

`load(path, overrides)` reads the YAML (following `extends:` chains), applies dotted CLI
overrides, resolves file paths, and validates against the recipe models below, built from the
sections in `still/sections.py` and `still/distill_sections.py`. Every key remembers the file and
line it came from, so a mistake is reported as
`teacher.yaml:12: unknown key 'lerning_rate' in train (did you mean 'lr'?)`.

Path rule: file paths inside a recipe (`extends`, data files, task YAMLs) are relative to the
YAML file that names them; model references and `output_dir` are resolved like
`from_pretrained` does, relative to the current directory.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, PrivateAttr, ValidationError

from still.distill_sections import (
    DistillDistributedSection,
    DistillSection,
    DistillTrainSection,
    GenerateSection,
    StudentSection,
)
from still.errors import StillError
from still.ignored import refuse_ignored
from still.pipeline_sections import PipelineRecipe
from still.secrets import REDACTED, find_secret, redact, redact_value, secret_prefix
from still.sections import (
    CascadeSection,
    DataSection,
    DistributedSection,
    FinetuneTrainSection,
    LoraSection,
    ModelSection,
    Section,
    TrackSection,
)
from still.yaml_errors import (
    KeyPath,
    Origin,
    key_lines,
    one_line_error,
    parse_yaml,
    read_yaml_text,
    section_type,
    where,
)


# --------------------------------------------------------------------------- the recipe models
class RecipeBase(Section):
    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Run name: the run dir is output_dir/name.",
    )
    output_dir: str = Field("runs", description="Parent of the run dir (relative to the cwd).")
    track: TrackSection = Field(default_factory=TrackSection)
    _source: str | None = PrivateAttr(None)
    _origins: dict[KeyPath, Origin] = PrivateAttr(default_factory=dict)

    @property
    def source_path(self) -> str | None:
        """The YAML file this recipe was loaded from (None when built in code)."""
        return self._source

    def own_line(self, key_path: KeyPath) -> int | None:
        """The line at which the recipe's own file sets `key_path`; None when the value came
        from a file it extends, from an override, or from a default (the key lines are the
        ones `load` read, so no caller has to parse the file again)."""
        origin = self._origins.get(tuple(key_path))
        if not origin or origin[1] is None or self._source is None:
            return None
        return origin[1] if str(Path(origin[0]).resolve()) == self._source else None


def _regression_tasks():
    return Field(
        default_factory=list,
        description="The forgetting check: tasks (task YAMLs or lm_eval:NAME) scored on the base "
        "and on the result at the end, the change shown with paired CIs.",
    )


def _regression_tolerance():
    return Field(
        None,
        ge=0,
        description="A drop beyond this, in the metric's units (0.02: two points of accuracy), "
        "is flagged; `still run --strict` then exits 3. Unset: 0.02.",
    )


class FinetuneRecipe(RecipeBase):
    kind: Literal["finetune"]
    model: ModelSection
    method: Literal["lora", "dora", "qlora", "full"] = Field(
        "lora", description="lora / dora / qlora (4-bit base, GPU only) / full fine-tuning."
    )
    lora: LoraSection = Field(default_factory=LoraSection)
    data: DataSection
    train: FinetuneTrainSection = Field(default_factory=FinetuneTrainSection)
    distributed: DistributedSection = Field(default_factory=DistributedSection)
    eval_tasks: list[str] = Field(default_factory=list, description="Task YAMLs run at the end.")
    regression_tasks: list[str] = _regression_tasks()
    regression_tolerance: float | None = _regression_tolerance()


class DistillRecipe(RecipeBase):
    kind: Literal["distill"]
    teacher: ModelSection
    student: StudentSection
    method: Literal["full", "lora"] = Field("full", description="Train the student fully or LoRA.")
    lora: LoraSection = Field(default_factory=LoraSection)
    distill: DistillSection = Field(default_factory=DistillSection)
    data: DataSection
    train: DistillTrainSection = Field(default_factory=DistillTrainSection)
    distributed: DistillDistributedSection = Field(default_factory=DistillDistributedSection)
    eval_tasks: list[str] = Field(default_factory=list, description="Task YAMLs run at the end.")
    regression_tasks: list[str] = _regression_tasks()
    regression_tolerance: float | None = _regression_tolerance()
    generate: GenerateSection | None = Field(
        None,
        description="Sequence-level KD: `still generate R.yaml` writes the teacher's "
        "answers to data.train's prompts as a chat dataset.",
    )


class EvalRecipe(RecipeBase):
    kind: Literal["eval"]
    models: list[str] = Field(min_length=1, description="Model references or run dirs to score.")
    tasks: list[str] = Field(min_length=1, description="Task YAML files.")
    batch_size: int = Field(8, ge=1)
    limit: int | None = Field(None, ge=1, description="Score only the first N rows of each task.")
    reference: str | None = Field(None, description="Model the comparison is made against.")
    teacher: str | None = Field(None, description="Teacher, for teacher-retention %.")
    cascade: CascadeSection | None = Field(
        None, description="Measure a student-first cascade (`still cascade`): see docs/cascade.md."
    )


Recipe = FinetuneRecipe | DistillRecipe | EvalRecipe
RECIPE_KINDS: dict[str, type[Section]] = {
    "finetune": FinetuneRecipe,
    "distill": DistillRecipe,
    "eval": EvalRecipe,
    "pipeline": PipelineRecipe,
}


# Keys whose string values are file paths relative to the YAML that sets them. "*" matches any
# list index.
PATH_KEYS: tuple[KeyPath, ...] = (
    ("data", "train", "path"),
    ("data", "mix", "*", "path"),
    ("data", "eval", "path"),
    ("distill", "teacher_cache"),
    ("generate", "out"),
    ("eval_tasks", "*"),
    ("regression_tasks", "*"),
    ("tasks", "*"),
    ("stages", "*", "recipe"),
    ("stages", "*", "cascade"),
    ("stages", "*", "publish", "tasks", "*"),
)


# --------------------------------------------------------------------------- YAML with lines
def _read_yaml(path: Path) -> tuple[dict, dict[KeyPath, Origin]]:
    """Parse one YAML file into (data, {key path: (file, line)})."""
    text = read_yaml_text(path, "recipe")
    node, data = parse_yaml(text, path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise StillError(f"{path}: a recipe must be a mapping of keys, got {type(data).__name__}")
    origins = key_lines(node, str(path))
    refuse_secrets(data, origins, str(path))
    return data, origins


# --------------------------------------------------------------------------- secrets
_ENV_HINT = "put the key in an environment variable and name that variable, e.g. "
_ENV_EXAMPLE = "api_key_env: OPENAI_API_KEY"


def refuse_secrets(
    data: dict, origins: dict[KeyPath, Origin], default: str, *, what: str = "recipe"
) -> None:
    """A key-shaped value anywhere in `data` (or a `*_env` value that is not a variable's
    name) is refused at its file:line, shown redacted: a recipe is printed, stored and logged."""
    found = find_secret(data)
    if found is None:
        return
    key_path, value, is_key = found
    dotted = ".".join(str(part) for part in key_path)
    leaf = dotted.rsplit(".", 1)[-1]
    hint = _ENV_HINT + (f"{leaf}: OPENAI_API_KEY" if leaf.endswith("_env") else _ENV_EXAMPLE)
    if is_key:
        raise StillError(
            f"{where(origins, key_path, default)}: {dotted} holds what looks like an API key or "
            f"token ({redact(value)}); a {what} must not contain secrets",
            hint=hint,
        )
    prefix = secret_prefix(value)
    shown = value if prefix is None else prefix + REDACTED
    at = where(origins, key_path, default).replace(value, shown)
    raise StillError(
        f"{at}: {dotted} must be the name of an environment variable, got '{shown}'", hint=hint
    )


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
    return _extend(data, origins, path, seen)


def _extend(
    data: dict, origins: dict[KeyPath, Origin], path: Path, seen: tuple[Path, ...]
) -> tuple[dict, dict[KeyPath, Origin]]:
    """Resolve `data`'s paths against `path`'s dir and merge it over what it extends."""
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
    # lm_eval:NAME names an lm-eval task, not a file (an lm-eval YAML is given as a path)
    return "://" in value or value.startswith(("hf:", "lm_eval:"))


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
    named = f"override '{redact(override)}'"  # as messages and origins show it: never a key
    if "=" not in override:
        raise StillError(f"bad {named}: expected KEY=VALUE", hint="e.g. train.max_steps=10")
    dotted, raw_value = override.split("=", 1)
    dotted = dotted.strip()
    keys = dotted.split(".")
    if not all(keys):
        raise StillError(f"bad {named}: empty key in '{dotted}'")
    value = _override_value(dotted, raw_value, named)
    refuse_secrets({dotted: value}, {(dotted,): (named, None)}, named)
    node = data
    for depth, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
            # a section the override created is reported at the override, not the file
            origins[tuple(keys[: depth + 1])] = (named, None)
        elif not isinstance(child, dict):
            where = ".".join(keys[: depth + 1])
            raise StillError(f"bad {named}: '{where}' is not a section")
        node = child
    node[keys[-1]] = value
    key_path = tuple(keys)
    for existing in [k for k in origins if k[: len(key_path)] == key_path]:
        origins.pop(existing)
    origins[key_path] = (named, None)
    if isinstance(value, list):
        for index in range(len(value)):
            origins[key_path + (index,)] = (named, None)


_OPENERS = {"[": ("list", "]"), "{": ("mapping", "}"), '"': ("quoted string", '"')}
_OPENERS["'"] = ("quoted string", "'")


def _override_value(dotted: str, raw_value: str, named: str) -> Any:
    """The YAML value of an override. A value that opens a list, mapping or quote is YAML the
    user meant; one that is broken is an error, not a silent string. Anything else that YAML
    cannot read (`a: b: c`) is taken as the plain string."""
    text = raw_value.strip()
    try:
        value = yaml.safe_load(raw_value) if text else ""
    except yaml.YAMLError as exc:
        if text[:1] not in _OPENERS:
            return raw_value
        what, closer = _OPENERS[text[0]]
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        unclosed = text.count(text[0]) > text.count(closer) if closer != text[0] else True
        detail = (
            f"the {what} opened with {text[0]} is not closed"
            if unclosed or "end of the stream" in str(exc)
            else problem
        )
        example = f"{dotted}={text}{closer}" if unclosed else f"{dotted}=[a, b]"
        raise StillError(
            f"bad {named}: the value is not valid YAML: {detail}",
            hint=f"e.g. {example}; quote the whole override for the shell",
        ) from None
    if isinstance(value, bool) and text.lower() not in ("true", "false"):
        # YAML 1.1 reads on/off/yes/no as booleans; `name=off` means the name. A bool field
        # still gets a bool: pydantic reads "off"/"yes" as one.
        value = text
    return value


# --------------------------------------------------------------------------- public API
def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, merge, override and validate a recipe. Raises `StillError` on any user mistake."""
    recipe_path = Path(path)
    if not recipe_path.exists():
        raise StillError(f"recipe file not found: {path}")
    data, origins = _load_chain(recipe_path, ())
    return _validate(data, origins, recipe_path, overrides)


def load_inline(
    data: dict, origins: dict[KeyPath, Origin], path: str | Path, overrides: list[str] = ()
) -> Recipe:
    """A recipe written inside another file (a pipeline's `inline:` stage): its paths are
    relative to that file, its key lines are that file's."""
    path = Path(path).resolve()
    merged, merged_origins = _extend(copy.deepcopy(data), dict(origins), path, (path,))
    return _validate(merged, merged_origins, path, overrides)


def _validate(data: dict, origins: dict[KeyPath, Origin], recipe_path: Path, overrides) -> Recipe:
    for override in overrides:
        apply_override(data, origins, override)
    kind = data.get("kind")
    cls = RECIPE_KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        at = where(origins, ("kind",), str(recipe_path))
        close = difflib.get_close_matches(str(kind), RECIPE_KINDS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        valid = " | ".join(RECIPE_KINDS)
        if kind is None:
            raise StillError(f"{at}: missing required key 'kind' ({valid})")
        raise StillError(f"{at}: kind must be one of {valid}, got '{kind}'{hint}")
    try:
        recipe = cls.model_validate(data)
    except ValidationError as exc:
        raise one_line_error(exc, cls, origins, str(recipe_path)) from None
    refuse_ignored(recipe, origins, str(recipe_path))
    recipe._source = str(recipe_path.resolve())
    recipe._origins = origins
    return recipe


def to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML (what a run dir stores and what `still validate` prints)."""
    # load() refuses key-shaped values; one built in code is still never written out in full
    dumped = redact_value(recipe.model_dump(mode="json", exclude_none=True, by_alias=True))
    data = {"kind": dumped.pop("kind"), **dumped}
    header = f"# Resolved from {recipe._source}\n" if getattr(recipe, "_source", None) else ""
    return header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def recipe_hash(recipe: Recipe) -> str:
    payload = json.dumps(recipe.model_dump(mode="json"), sort_keys=True).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


def dotted_keys() -> list[str]:
    """Every settable key of every recipe kind, dotted (`train.max_steps`, `distill.beta`)."""
    found: set[str] = set()

    def walk(section, prefix: str) -> None:
        for name, field in section.model_fields.items():
            dotted = f"{prefix}{field.alias or name}"
            inner = section_type(field.annotation)
            if inner is None:
                found.add(dotted)
            else:
                walk(inner, dotted + ".")

    for cls in RECIPE_KINDS.values():
        walk(cls, "")
    return sorted(found)


def json_schema() -> dict:
    """One JSON schema covering every recipe kind (for editors and `still schema`)."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "still recipe",
        "oneOf": [cls.model_json_schema() for cls in RECIPE_KINDS.values()],
    }
