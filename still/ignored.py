"""Settings that would take no effect are errors: a recipe either means what it says or fails.

Each rule names a key the user wrote (pydantic's `model_fields_set`, so defaults never
trigger it) and the setting that makes it inert. `recipe.load` calls `refuse_ignored` after
validation, with the key lines, so the error points at the inert key.

A key is refused only where it was written at least as late as the setting that makes it inert
(defaults < an `extends:` base < this file < a CLI override). A base recipe or a file serves
variants: the quickstart's hard-label baseline sets `kd_weight: 0` over its base's temperature,
and `distill.kd_weight=0` on the command line does the same to the file's; neither can unset the
earlier key, so neither is refused. A key written next to, or after, what defeats it is.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from still.errors import StillError
from still.yaml_errors import KeyPath, Origin, where


class Rule(NamedTuple):
    section: str  # dotted path of the section that holds the key ("" = the recipe itself)
    key: str
    inert: Callable[[Any], bool]  # given the recipe: True when the key would be ignored
    why: str
    fix: str
    because: KeyPath  # the setting that makes the key inert


RULES: tuple[Rule, ...] = (
    Rule(
        "",
        "regression_tolerance",
        lambda r: not getattr(r, "regression_tasks", None),
        "no regression_tasks are listed, so nothing is checked for a drop",
        "list regression_tasks (task YAMLs or lm_eval:NAME), or remove regression_tolerance",
        ("regression_tasks",),
    ),
    Rule(
        "",
        "lora",
        lambda r: getattr(r, "method", None) == "full",
        "method is full, which trains every weight and uses no adapter",
        "set method: lora, or remove lora:",
        ("method",),
    ),
    Rule(
        "distill",
        "beta",
        lambda r: r.distill.loss != "jsd",
        "only loss: jsd uses beta",
        "set distill.loss: jsd, or remove beta",
        ("distill", "loss"),
    ),
    Rule(
        "distill",
        "alpha",
        lambda r: r.distill.loss != "skew_kl",
        "only loss: skew_kl uses alpha",
        "set distill.loss: skew_kl, or remove alpha",
        ("distill", "loss"),
    ),
    Rule(
        "distill",
        "temperature",
        lambda r: r.distill.kd_weight == 0,
        "kd_weight is 0, so no KD term is computed",
        "give kd_weight a weight above 0, or remove temperature",
        ("distill", "kd_weight"),
    ),
    *(
        Rule(
            "distill",
            key,
            lambda r: r.distill.teacher_cache is None,
            "no distill.teacher_cache is set, so nothing is cached",
            f"set distill.teacher_cache: DIR (and run `still cache`), or remove {key}",
            ("distill", "teacher_cache"),
        )
        for key in ("cache_top_k", "cache_dtype")
    ),
    *(
        Rule(
            "distill",
            key,
            lambda r: r.distill.on_policy_ratio == 0,
            "on_policy_ratio is 0, so the student samples nothing",
            f"set distill.on_policy_ratio above 0, or remove {key}",
            ("distill", "on_policy_ratio"),
        )
        for key in ("on_policy_temperature", "on_policy_max_new_tokens")
    ),
    Rule(
        "distill",
        "teacher_chat_template",
        lambda r: r.distill.cross_tokenizer == "off",
        "only cross-tokenizer KD renders with the teacher's template (cross_tokenizer is off)",
        "set distill.cross_tokenizer: auto, or remove teacher_chat_template",
        ("distill", "cross_tokenizer"),
    ),
    Rule(
        "distill",
        "cross_tokenizer",
        lambda r: r.distill.cross_tokenizer in ("uld", "gold") and r.student.init is not None,
        "a student carved from the teacher shares its tokenizer (same-tokenizer KD is used)",
        "remove cross_tokenizer, or name a student.ref with another tokenizer",
        ("student", "init"),
    ),
    Rule(
        "student.init",
        "keep_ratio",
        lambda r: r.student.init.keep_layers is not None,
        "keep_layers is given and decides which layers stay",
        "give keep_layers or keep_ratio, not both",
        ("student", "init", "keep_layers"),
    ),
    Rule(
        "student.init",
        "calibration_samples",
        lambda r: (
            r.student.init.prune == "depth"
            and (r.student.init.strategy != "importance" or r.student.init.keep_layers)
        ),
        "only width pruning and strategy: importance without keep_layers score on calibration data",
        "set strategy: importance or prune: width, or remove calibration_samples",
        ("student", "init", "strategy"),
    ),
    *(
        Rule(
            "student.init",
            key,
            lambda r: r.student.init.prune == "depth",
            "prune: depth drops layers only; size and width_axes are for width pruning",
            f"set prune: width (or both), or remove {key}",
            ("student", "init", "prune"),
        )
        for key in ("size", "width_axes")
    ),
    Rule(
        "student.init",
        "strategy",
        lambda r: r.student.init.prune == "width",
        "prune: width keeps every layer, so no layer strategy applies",
        "set prune: both with keep_ratio, or remove strategy",
        ("student", "init", "prune"),
    ),
)


def _section(recipe, dotted: str):
    node = recipe
    for part in filter(None, dotted.split(".")):
        node = getattr(node, part, None)
        if node is None:
            return None
    return node


def _rank(origin: Origin | None, top: Path) -> int:
    """How late a key was written: default 0 < extends base 1 < this file 2 < override 3."""
    if origin is None:
        return 0
    file, line = origin
    if line is None:
        return 3  # a CLI override
    return 2 if Path(file).resolve() == top else 1


def refuse_ignored(recipe, origins: dict[KeyPath, Origin], default: str) -> None:
    """One StillError line at the first key the recipe sets that would take no effect."""
    top = Path(default).resolve()
    for rule in RULES:
        section = _section(recipe, rule.section)
        if section is None or rule.key not in getattr(section, "model_fields_set", ()):
            continue
        if not rule.inert(recipe):
            continue
        loc = tuple(filter(None, rule.section.split("."))) + (rule.key,)
        if _rank(origins.get(loc), top) < _rank(origins.get(rule.because), top):
            continue  # a later file or override changed what it depends on
        dotted = f"{rule.section}.{rule.key}" if rule.section else rule.key
        raise StillError(
            f"{where(origins, loc, default)}: {dotted} would be ignored: {rule.why}",
            hint=rule.fix,
        )
