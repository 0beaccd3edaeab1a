"""Settings that would take no effect are errors: a recipe either means what it says or fails.

Each rule names a key the user wrote (pydantic's `model_fields_set`, so defaults never
trigger it) and the setting that makes it inert. `recipe.load` calls `refuse_ignored` after
validation, with the key lines, so the error points at the inert key. A key inherited through
`extends:` is not refused: a base recipe serves several children (the quickstart's hard-label
baseline sets kd_weight: 0 over a KD recipe's temperature), and only the keys this file or an
override writes are the user's statement about this run.
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


RULES: tuple[Rule, ...] = (
    Rule(
        "",
        "lora",
        lambda r: getattr(r, "method", None) == "full",
        "method is full, which trains every weight and uses no adapter",
        "set method: lora, or remove lora:",
    ),
    Rule(
        "distill",
        "beta",
        lambda r: r.distill.loss != "jsd",
        "only loss: jsd uses beta",
        "set distill.loss: jsd, or remove beta",
    ),
    Rule(
        "distill",
        "alpha",
        lambda r: r.distill.loss != "skew_kl",
        "only loss: skew_kl uses alpha",
        "set distill.loss: skew_kl, or remove alpha",
    ),
    Rule(
        "distill",
        "temperature",
        lambda r: r.distill.kd_weight == 0,
        "kd_weight is 0, so no KD term is computed",
        "give kd_weight a weight above 0, or remove temperature",
    ),
    *(
        Rule(
            "distill",
            key,
            lambda r: r.distill.teacher_cache is None,
            "no distill.teacher_cache is set, so nothing is cached",
            f"set distill.teacher_cache: DIR (and run `still cache`), or remove {key}",
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
        )
        for key in ("on_policy_temperature", "on_policy_max_new_tokens")
    ),
    Rule(
        "distill",
        "teacher_chat_template",
        lambda r: r.distill.cross_tokenizer == "off",
        "only cross-tokenizer KD renders with the teacher's template (cross_tokenizer is off)",
        "set distill.cross_tokenizer: auto, or remove teacher_chat_template",
    ),
    Rule(
        "distill",
        "cross_tokenizer",
        lambda r: r.distill.cross_tokenizer in ("uld", "gold") and r.student.init is not None,
        "a student carved from the teacher shares its tokenizer (same-tokenizer KD is used)",
        "remove cross_tokenizer, or name a student.ref with another tokenizer",
    ),
    Rule(
        "student.init",
        "keep_ratio",
        lambda r: r.student.init.keep_layers is not None,
        "keep_layers is given and decides which layers stay",
        "give keep_layers or keep_ratio, not both",
    ),
    Rule(
        "student.init",
        "calibration_samples",
        lambda r: r.student.init.strategy != "importance" or r.student.init.keep_layers,
        "only strategy: importance without keep_layers scores layers on calibration data",
        "set strategy: importance, or remove calibration_samples",
    ),
)


def _section(recipe, dotted: str):
    node = recipe
    for part in filter(None, dotted.split(".")):
        node = getattr(node, part, None)
        if node is None:
            return None
    return node


def refuse_ignored(recipe, origins: dict[KeyPath, Origin], default: str) -> None:
    """One StillError line at the first key the recipe sets that would take no effect."""
    for rule in RULES:
        section = _section(recipe, rule.section)
        if section is None or rule.key not in getattr(section, "model_fields_set", ()):
            continue
        if not rule.inert(recipe):
            continue
        dotted = f"{rule.section}.{rule.key}" if rule.section else rule.key
        loc = tuple(filter(None, rule.section.split("."))) + (rule.key,)
        origin = origins.get(loc)
        if (
            origin
            and origin[1] is not None
            and Path(origin[0]).resolve() != Path(default).resolve()
        ):
            continue  # inherited from a base recipe
        raise StillError(
            f"{where(origins, loc, default)}: {dotted} would be ignored: {rule.why}",
            hint=rule.fix,
        )
