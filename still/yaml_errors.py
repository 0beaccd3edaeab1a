"""YAML with line numbers, and a pydantic error as one line: `file:line: message (hint)`.

Recipes and eval task files both go through here. `parse_yaml` gives the data and the node
tree; `key_lines` maps every key path in the tree to its (file, line); `one_line_error` turns
the first pydantic error into `file:line: unknown key 'lerning_rate' in train (did you mean
'lr'?)`, counting the rest as `(+N more)`.
"""

from __future__ import annotations

import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from still.errors import StillError

# Where a value came from: (file, 1-based line) or a description such as "override 'a.b=1'".
Origin = tuple[str, int | None]
KeyPath = tuple[str | int, ...]

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
def read_yaml_text(path: Path, what: str) -> str:
    """The text of a YAML file (a recipe, a task file), or one line saying why it cannot be."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StillError(f"{what} file not found: {path}") from None
    except IsADirectoryError:
        raise StillError(f"{path}: is a directory, not a {what} YAML file") from None
    except OSError as exc:
        raise StillError(f"cannot read {what} {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise StillError(
            f"{path}: not UTF-8 text (byte {exc.start}); a {what} file is YAML",
            hint="save it as UTF-8",
        ) from None


def parse_yaml(text: str, path: Path | str) -> tuple[yaml.Node | None, object]:
    """(node tree for line numbers, data). A syntax error, or a key given twice in one
    mapping (YAML would silently keep the last), is one StillError line at its file:line."""
    try:
        loader = yaml.SafeLoader(text)
    except yaml.YAMLError as exc:  # the reader refuses a control character before parsing
        line = text.count("\n", 0, getattr(exc, "position", 0)) + 1
        raise StillError(f"{path}:{line}: invalid YAML: {_reader_problem(exc)}") from None
    try:
        node = loader.get_single_node()
        if node is not None:
            _refuse_duplicate_keys(node, path, ())
        return node, loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or _reader_problem(exc)
        raise StillError(f"{where}: invalid YAML: {problem}") from None
    finally:
        loader.dispose()


def _reader_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's reader error as a phrase: which character, at which position."""
    if isinstance(exc, yaml.reader.ReaderError):
        code = exc.character if isinstance(exc.character, int) else ord(exc.character)
        return (
            f"character U+{code:04X} is not allowed "
            "(YAML text may not hold control characters; is this the right file?)"
        )
    return str(exc).splitlines()[0]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [value for _, value in node.value]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def _refuse_duplicate_keys(node: yaml.Node, path: Path | str, ancestors: tuple[int, ...]) -> None:
    if id(node) in ancestors:  # an alias inside its own anchor: already being checked
        return
    if isinstance(node, yaml.MappingNode):
        first_line: dict[tuple[str, str], int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            line = key_node.start_mark.line + 1
            identity = (key_node.tag, key_node.value)
            if identity in first_line:
                raise StillError(
                    f"{path}:{line}: duplicate key '{key_node.value}' "
                    f"(first at line {first_line[identity]})"
                )
            first_line[identity] = line
    for child in _children(node):
        _refuse_duplicate_keys(child, path, (*ancestors, id(node)))


def key_lines(node: yaml.Node | None, file: str) -> dict[KeyPath, Origin]:
    """{key path: (file, line)} for every mapping key and list item under `node`."""
    origins: dict[KeyPath, Origin] = {}
    _collect_lines(node, (), file, origins, ())
    return origins


def _collect_lines(
    node, prefix: KeyPath, file: str, origins: dict[KeyPath, Origin], ancestors: tuple[int, ...]
) -> None:
    if node is None or id(node) in ancestors:
        return
    ancestors = (*ancestors, id(node))
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            origins[prefix + (key,)] = (file, key_node.start_mark.line + 1)
            _collect_lines(value_node, prefix + (key,), file, origins, ancestors)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            origins[prefix + (index,)] = (file, item.start_mark.line + 1)
            _collect_lines(item, prefix + (index,), file, origins, ancestors)


def where(origins: dict[KeyPath, Origin], loc: KeyPath, default: str) -> str:
    """`file:line` of the deepest key on `loc` that has an origin, else `default`."""
    for end in range(len(loc), 0, -1):
        origin = origins.get(tuple(loc[:end]))
        if origin:
            file, line = origin
            return f"{file}:{line}" if line else file
    return default


def quoted(value: Any) -> str:
    """A value as a message shows it: JSON, with non-ASCII text as itself (`"modèle"`, not
    `"mod\\u00e8le"`)."""
    return json.dumps(value, default=str, ensure_ascii=False)


# --------------------------------------------------------------------------- schema lookups
def section_type(annotation) -> type[BaseModel] | None:
    """The pydantic section inside an annotation (`X | None`, `list[X]`), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list, typing.Annotated):
        for arg in typing.get_args(annotation):
            found = section_type(arg)
            if found is not None:
                return found
    return None


def _annotation_at(model: type[BaseModel], loc: KeyPath) -> Any:
    """The type annotation of the field at `loc` (list indexes step into the item type)."""
    annotation: Any = model
    for part in loc:
        if isinstance(part, int):
            if typing.get_origin(annotation) is list:
                annotation = typing.get_args(annotation)[0]
            continue
        section = section_type(annotation)
        fields = section.model_fields if section is not None else {}
        field = fields.get(part) or next((f for f in fields.values() if f.alias == part), None)
        if field is None:
            return None
        annotation = field.annotation
    return annotation


def _literal_values(annotation) -> list[str]:
    if typing.get_origin(annotation) is typing.Literal:
        return [str(value) for value in typing.get_args(annotation)]
    return [value for arg in typing.get_args(annotation) for value in _literal_values(arg)]


def _suggest(key: str, names: list[str]) -> str | None:
    synonyms = {alias: ours for alias, ours in KNOWN_SYNONYMS.items() if ours in names}
    close = difflib.get_close_matches(key.lower(), [*names, *synonyms], n=1, cutoff=0.6)
    if not close:
        close = difflib.get_close_matches(key.lower(), names, n=1, cutoff=0.5)
    return synonyms.get(close[0], close[0]) if close else None


# --------------------------------------------------------------------------- the one line
def _describe(
    error: dict, model: type[BaseModel], whole: str, suggest_values: bool
) -> tuple[KeyPath, str, str | None]:
    """(key path, message, hint) for one pydantic error."""
    # pydantic names union branches in the path (`function-after[...]`, `literal['all-linear']`,
    # `list[str]`); users know only their keys.
    loc = tuple(
        p
        for p in error["loc"]
        if not (isinstance(p, str) and (p.startswith("function-") or "[" in p))
    )
    key = loc[-1] if loc else ""
    kind = error["type"]
    if kind == "extra_forbidden":
        section = ".".join(str(p) for p in loc[:-1]) or whole
        fields = getattr(section_type(_annotation_at(model, loc[:-1])), "model_fields", {})
        names = [f.alias or n for n, f in fields.items()]
        suggestion = _suggest(str(key), names)
        hint = f"did you mean '{suggestion}'?" if suggestion else f"valid keys: {', '.join(names)}"
        return loc, f"unknown key '{key}' in {section}", hint
    dotted = ".".join(str(p) for p in loc) or whole
    if kind == "missing":
        return loc, f"missing required key '{dotted}'", None
    got = error.get("input")
    # A validator's own sentence says what is wrong; pydantic's generic ones need the value.
    shown = kind != "value_error" and not isinstance(got, dict)
    got_text = f" (got {quoted(got)})" if shown else ""
    message = f"{dotted}: {error['msg'].removeprefix('Value error, ')}{got_text}"
    hint = None
    if kind == "literal_error" and suggest_values:
        allowed = _literal_values(_annotation_at(model, loc))
        close = difflib.get_close_matches(str(got), allowed, n=1)
        hint = f"did you mean '{close[0]}'?" if close else None
    return loc, message, hint


def one_line_error(
    exc: ValidationError,
    model: type[BaseModel],
    origins: dict[KeyPath, Origin],
    default: str,
    *,
    whole: str = "the recipe",
    anchor: KeyPath = (),
    suggest_values: bool = False,
) -> StillError:
    """The first error of `exc` as `file:line: message (+N more) (hint)`.

    `whole` names the top level ("the recipe", "task"); an error about the whole document is
    placed at `anchor`'s line. `suggest_values` adds "did you mean" for a mistyped Literal.
    """
    errors = exc.errors()
    loc, message, hint = _describe(errors[0], model, whole, suggest_values)
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return StillError(f"{where(origins, loc or anchor, default)}: {message}{more}", hint)
