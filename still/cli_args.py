"""What the command line says when its arguments are wrong: one `still: error:` line with a hint.

argparse would print its usage and exit from inside the parser; `Parser.error` raises the one
`StillError` instead, so the CLI prints it like every other user mistake. A missing recipe says
a recipe is required, and a `--flag` the verb does not have points at the recipe key it most
likely meant (`--max_steps 5` -> `train.max_steps=5`).
"""

from __future__ import annotations

import argparse
import difflib
import re

from still.errors import StillError

RECIPE_USAGE = "RECIPE.yaml [key=value ...]"
# what users of other kits type for a verb (the recipe's kind says what `run` does)
VERB_SYNONYMS = {
    "train": "run",
    "finetune": "run",
    "distill": "run",
    "sft": "run",
    "fit": "run",
    "evaluate": "eval",
    "score": "eval",
    "export": "publish",
    "push": "publish",
    "upload": "publish",
}


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are `StillError`s (exit 2, one line)."""

    def error(self, message: str):
        choice = re.match(r"argument (\S+): invalid choice: '(.*)' \(choose from (.*)\)$", message)
        if choice:
            what, given, allowed = choice.groups()
            options = re.findall(r"'([^']*)'", allowed)
            close = [VERB_SYNONYMS[given]] if given in VERB_SYNONYMS and what == "VERB" else []
            close = close or difflib.get_close_matches(given, options, n=1)
            noun = "verb" if what == "VERB" else f"choice for {what}"
            hint = f"did you mean '{close[0]}'?" if close else f"one of: {', '.join(options)}"
            raise StillError(f"{_prefix(self.prog)}unknown {noun} '{given}'", hint=hint)
        raise StillError(f"{_prefix(self.prog)}{message}", hint=f"usage: {usage(self)}")


def _prefix(prog: str) -> str:
    """`still run: ` for a verb's parser; nothing for the top level (the line says still:)."""
    return "" if prog == "still" else f"{prog}: "


def usage(parser: argparse.ArgumentParser) -> str:
    return " ".join(parser.format_usage().split()).removeprefix("usage: ")


def require_verb(args, parser: argparse.ArgumentParser, verbs: list[str]) -> None:
    if getattr(args, "verb", None) is None:
        raise StillError(
            "a verb is required",
            hint=f"usage: still VERB ...; verbs: {', '.join(verbs)}; `still VERB -h` for help",
        )


def require_recipe(args, needs_recipe: bool) -> None:
    if needs_recipe and getattr(args, "recipe", None) is None:
        raise StillError(
            f"still {args.verb}: a recipe path is required",
            hint=f"usage: still {args.verb} {RECIPE_USAGE}",
        )


def refuse_extras(verb: str, verb_parser, extras: list[str], argv: list[str], keys) -> None:
    """One line about the first argument the verb did not take. `keys` is every dotted recipe
    key (when the verb takes overrides), for the `--flag` that should have been `key=value`."""
    if not extras:
        return
    extra = extras[0]
    if not extra.startswith("-") or extra in ("-", "--"):
        raise StillError(
            f"still {verb}: unexpected argument '{extra}'",
            hint=f"usage: {usage(verb_parser)}",
        )
    name, _, value = extra.lstrip("-").partition("=")
    if not value:
        position = argv.index(extra) if extra in argv else -1
        following = argv[position + 1] if 0 <= position < len(argv) - 1 else ""
        value = following if following and not following.startswith("-") else "VALUE"
    flags = [o for action in verb_parser._actions for o in action.option_strings]
    hint = _override_hint(name.replace("-", "_"), value, keys) if keys is not None else None
    if hint is None:
        close = difflib.get_close_matches(f"--{name}", flags, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else f"flags of still {verb}: {' '.join(flags)}"
    raise StillError(f"still {verb}: unknown flag --{name}", hint=hint)


def _override_hint(key: str, value: str, keys: list[str]) -> str | None:
    """`write train.max_steps=5` for the one recipe key of that name; "did you mean" for several
    or for a close name; None when nothing in the recipe resembles it."""
    from still.yaml_errors import KNOWN_SYNONYMS

    leaf_of = {dotted: dotted.rsplit(".", 1)[-1] for dotted in keys}
    leaf = KNOWN_SYNONYMS.get(key.lower(), key)
    # flags users bring are mostly Trainer arguments: a train.* key of that name comes first
    exact = sorted(
        (dotted for dotted, name in leaf_of.items() if name == leaf),
        key=lambda dotted: (not dotted.startswith("train."), dotted),
    )
    if len(exact) == 1 or exact[:1] and exact[0].startswith("train."):
        others = f" (other keys of that name: {', '.join(exact[1:])})" if exact[1:] else ""
        return f"recipe keys are set as key=value: write {exact[0]}={value}{others}"
    if not exact:
        close = difflib.get_close_matches(leaf, set(leaf_of.values()), n=1, cutoff=0.75)
        exact = sorted(dotted for dotted, name in leaf_of.items() if close and name == close[0])
    if not exact:
        return None
    choices = " or ".join(f"{dotted}={value}" for dotted in exact[:4])
    return f"recipe keys are set as key=value: did you mean {choices}?"
