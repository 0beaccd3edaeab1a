"""Key-shaped values: recognise them in a recipe, refuse them, and redact them in all output.

A recipe names the environment variable that holds a key (`api_key_env: OPENAI_API_KEY`); the
key itself never belongs in a file that `validate` prints, a run dir stores and W&B uploads.
`find_secret` spots one by shape: a provider's prefix (`sk-`, `hf_`, `ghp_`, `AKIA`, ...) or a
long random-looking token. `redact` replaces every such token in a text, so a key that reaches a
message anyway (a server echoing it, a value built in code) is never shown in full.

What is not a key, on purpose: model references (`HuggingFaceTB/SmolLM2-135M-Instruct`), paths,
hex digests (sha256, git commits), UUIDs, W&B run ids, names of environment variables and
snake_case or kebab-case names, however long.
"""

from __future__ import annotations

import math
import re
from collections import Counter

REDACTED = "…(redacted)"

# Provider prefixes, each followed by the shape of what comes after it. The body must be long
# and random enough that a name such as `sk-learn-classifier` does not count.
_PREFIX = (
    r"(?<![A-Za-z0-9])"
    r"(?P<prefix>sk-ant-|sk-proj-|sk-svcacct-|sk-|hf_|ghp_|gho_|ghu_|ghs_|ghr_|github_pat_|"
    r"xox[abprs]-|glpat-|AIza|AKIA|ASIA|pk_live_|sk_live_|rk_live_|npm_|pypi-)"
)
_PREFIXED = re.compile(_PREFIX + r"(?P<body>[A-Za-z0-9_\-]{16,})")
_STARTS_PREFIXED = re.compile(_PREFIX)
# Any long run of token characters is looked at as a whole.
_TOKEN = re.compile(r"(?<![A-Za-z0-9_\-])[A-Za-z0-9_\-]{32,}")
_HEXISH = re.compile(r"[0-9a-fA-F\-]+")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _entropy(text: str) -> float:
    """Shannon entropy in bits per character."""
    counts = Counter(text)
    return -sum(n / len(text) * math.log2(n / len(text)) for n in counts.values())


def _random_looking(body: str, min_run: int) -> bool:
    """A run of >= `min_run` characters between separators that mixes letters and digits (or
    cases) the way generated keys do, and words do not."""
    for run in re.split(r"[_\-]", body):
        if len(run) < min_run:
            continue
        classes = sum(
            (
                any(c.islower() for c in run),
                any(c.isupper() for c in run),
                any(c.isdigit() for c in run),
            )
        )
        if classes >= 2 and _entropy(run) >= 3.0:
            return True
    return False


def _prefixed_match(match: re.Match) -> bool:
    prefix, body = match["prefix"], match["body"]
    if prefix in ("AKIA", "ASIA"):  # AWS access key ids: exactly 16 upper-case letters/digits
        return re.fullmatch(r"[A-Z0-9]{16}", body[:16]) is not None
    if prefix.startswith("xox"):  # Slack: digits-digits-...
        return re.match(r"\d{6,}-", body) is not None or _random_looking(body, 12)
    return _random_looking(body, 12)


def _generic_token(token: str) -> bool:
    """A long token of high entropy that is not a hex digest or a UUID."""
    if _HEXISH.fullmatch(token):
        return False
    if not (
        any(c.islower() for c in token)
        and any(c.isupper() for c in token)
        and any(c.isdigit() for c in token)
    ):
        return False
    # words joined by separators (a long run name) have far lower entropy per character than
    # generated keys, and short pieces
    return _entropy(token) >= 4.0 and _random_looking(token, 16)


def secret_spans(text: str) -> list[tuple[int, int, str]]:
    """[(start, end, shown prefix)] of every key-shaped token in `text`."""
    spans = [
        (m.start(), m.end(), m["prefix"]) for m in _PREFIXED.finditer(text) if _prefixed_match(m)
    ]
    for match in _TOKEN.finditer(text):
        overlaps = any(s < match.end() and match.start() < e for s, e, _ in spans)
        if not overlaps and _generic_token(match.group()):
            spans.append((match.start(), match.end(), ""))
    return sorted(spans)


def looks_like_secret(text: str) -> bool:
    return bool(secret_spans(text))


def redact(text: str) -> str:
    """`text` with every key-shaped token shown as its provider prefix and `…(redacted)`."""
    spans = secret_spans(text)
    for start, end, prefix in reversed(spans):
        text = text[:start] + prefix + REDACTED + text[end:]
    return text


def redact_value(value):
    """`redact` applied to every string inside a dict / list value (and its keys)."""
    if isinstance(value, dict):
        return {redact_value(k): redact_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_value(item) for item in value]
    return redact(value) if isinstance(value, str) else value


def secret_prefix(text: str) -> str | None:
    """The provider's key prefix `text` starts with (however short the rest), else None."""
    match = _STARTS_PREFIXED.match(text)
    return match["prefix"] if match else None


def is_env_name(text: str) -> bool:
    return _ENV_NAME.match(text) is not None


def find_secret(data, path: tuple = ()) -> tuple[tuple, str, bool] | None:
    """(key path, the value, whether it is a key) of the first string in `data` that is
    key-shaped, or that sits under a `*_env` key without being an environment variable's name.
    Keys are looked at too. None when there is none."""
    if isinstance(data, dict):
        for key, item in data.items():
            if isinstance(key, str) and looks_like_secret(key):
                return (*path, key), key, True
            if isinstance(key, str) and key.endswith("_env") and isinstance(item, str):
                if looks_like_secret(item) or not is_env_name(item):
                    return (*path, key), item, looks_like_secret(item)
            found = find_secret(item, (*path, key))
            if found:
                return found
    elif isinstance(data, list):
        for index, item in enumerate(data):
            found = find_secret(item, (*path, index))
            if found:
                return found
    elif isinstance(data, str) and looks_like_secret(data):
        return path, data, True
    return None
