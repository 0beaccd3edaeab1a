"""Scoring functions: pure, on plain strings and numbers, small enough to check by hand.

Per-question metrics (`exact_match`, `token_f1`, `rouge_l`, `regex_match`, `acc`, `acc_norm`)
return a float in [0, 1]; the harness averages them and `bootstrap_stderr` gives the error bar.
`paired_bootstrap_ci` compares two models on the same questions by resampling question
indices once for both, which is what makes small differences between checkpoints detectable
(independent error bars overlap long after a paired difference is clear).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_WORD = re.compile(r"[a-z0-9]+")

# Resampling this many questions per block keeps bootstrap memory flat for large tasks.
_BOOTSTRAP_BLOCK = 128


def normalize_text(
    text: str,
    *,
    lowercase: bool = True,
    strip_punctuation: bool = True,
    strip_articles: bool = True,
    whitespace: bool = True,
) -> str:
    """SQuAD's `normalize_answer`, with each step switchable."""
    if lowercase:
        text = text.lower()
    if strip_punctuation:
        text = text.translate(_PUNCTUATION)
    if strip_articles:
        text = _ARTICLES.sub(" ", text)
    if whitespace:
        text = " ".join(text.split())
    return text


def exact_match(
    prediction: str, reference: str, normalize: Mapping[str, bool] | None = None
) -> float:
    """1.0 if equal after `normalize_text(**normalize)`; `normalize=None` compares verbatim."""
    if normalize is not None:
        prediction = normalize_text(prediction, **normalize)
        reference = normalize_text(reference, **normalize)
    return float(prediction == reference)


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD F1: harmonic mean of precision and recall of the normalised word multiset."""
    predicted = normalize_text(prediction).split()
    gold = normalize_text(reference).split()
    if not predicted or not gold:
        return float(predicted == gold)  # both empty is a perfect answer, one empty is not
    overlap = sum((Counter(predicted) & Counter(gold)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(predicted), overlap / len(gold)
    return 2 * precision * recall / (precision + recall)


def _longest_common_subsequence(a: Sequence[str], b: Sequence[str]) -> int:
    previous = [0] * (len(b) + 1)
    for token_a in a:
        current = [0]
        for j, token_b in enumerate(b):
            current.append(
                previous[j] + 1 if token_a == token_b else max(previous[j + 1], current[j])
            )
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (beta 1) over lowercase alphanumeric tokens, as `rouge-score` tokenises."""
    predicted = _WORD.findall(prediction.lower())
    gold = _WORD.findall(reference.lower())
    if not predicted or not gold:
        return float(predicted == gold)
    lcs = _longest_common_subsequence(predicted, gold)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(predicted), lcs / len(gold)
    return 2 * precision * recall / (precision + recall)


def regex_match(
    prediction: str, reference: str, pattern: str, normalize: Mapping[str, bool] | None = None
) -> float:
    """Extract the answer with `pattern` (group 1 if it has groups), then `exact_match`."""
    found = re.search(pattern, prediction)
    if found is None:
        return 0.0
    extracted = found.group(1) if found.re.groups else found.group(0)
    return exact_match(extracted or "", reference, normalize)


def acc(logliks: Sequence[float], gold: int) -> float:
    """1.0 if the choice with the highest summed log-likelihood is the gold one.

    Ties go to the lowest index, as `np.argmax` does in lm-eval.
    """
    return float(int(np.argmax(np.asarray(logliks, dtype=np.float64))) == gold)


def acc_norm(logliks: Sequence[float], choices: Sequence[str], gold: int) -> float:
    """`acc` after dividing each log-likelihood by its choice's length in characters.

    Exactly lm-eval's definition: `ConfigurableTask.process_results` in lm_eval/api/task.py
    computes `completion_len = np.array([float(len(i)) for i in choices])` over the choice texts
    (without the target delimiter) and takes `np.argmax(lls / completion_len)`. An empty choice
    counts as length 1 here instead of dividing by zero.
    """
    lengths = np.array([float(max(len(choice), 1)) for choice in choices])
    return float(int(np.argmax(np.asarray(logliks, dtype=np.float64) / lengths)) == gold)


def _bootstrap_indices(n: int, n_boot: int, seed: int):
    """Yield blocks of resampled index rows; the same seed gives the same rows."""
    rng = np.random.default_rng(seed)
    for start in range(0, n_boot, _BOOTSTRAP_BLOCK):
        yield rng.integers(0, n, size=(min(_BOOTSTRAP_BLOCK, n_boot - start), n))


def bootstrap_stderr(
    values: Sequence[float],
    n_boot: int = 1000,
    seed: int = 0,
    weights: Sequence[float] | None = None,
) -> tuple[float, float]:
    """(mean, standard error of the mean) with the error from `n_boot` resamples.

    With `weights`, the mean is sum(w * v) / sum(w) (token-weighted loss, for example). For an
    unweighted mean the answer is close to std / sqrt(n). Fewer than two values: stderr 0.
    """
    values_array = np.asarray(values, dtype=np.float64)
    weights_array = (
        np.ones_like(values_array) if weights is None else np.asarray(weights, dtype=np.float64)
    )
    if values_array.size == 0:
        return math.nan, math.nan
    mean = float((weights_array * values_array).sum() / weights_array.sum())
    if values_array.size == 1:
        return mean, 0.0
    means = []
    for rows in _bootstrap_indices(values_array.size, n_boot, seed):
        sampled_weights = weights_array[rows]
        means.append(
            (sampled_weights * values_array[rows]).sum(axis=1) / sampled_weights.sum(axis=1)
        )
    return mean, float(np.concatenate(means).std(ddof=1))


def paired_bootstrap_ci(
    values_a: Sequence[float],
    values_b: Sequence[float],
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float, float]:
    """(mean of a - b, low, high): a percentile CI resampling the SAME questions for a and b.

    `values_a[i]` and `values_b[i]` must score the same question i. Pairing removes the
    between-question variance the two models share, so the interval is much narrower than
    two independent error bars when the models agree on which questions are hard.
    """
    a = np.asarray(values_a, dtype=np.float64)
    b = np.asarray(values_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values need equal lengths, got {a.size} and {b.size}")
    if a.size == 0:
        return math.nan, math.nan, math.nan
    differences = a - b
    blocks = _bootstrap_indices(a.size, n_boot, seed)
    means = np.concatenate([differences[rows].mean(axis=1) for rows in blocks])
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(differences.mean()), float(low), float(high)


PAIRED_BOOTSTRAP_SAMPLES = 1000


def paired_ci_by_question(values: dict, reference: dict) -> tuple[float, float, float]:
    """`paired_bootstrap_ci` of two models' per-question values, keyed by question id (both
    dicts hold the same ids), with the kit's draws and seed: (mean of values - reference, low,
    high)."""
    keys = sorted(values, key=str)
    return paired_bootstrap_ci(
        [values[k] for k in keys],
        [reference[k] for k in keys],
        PAIRED_BOOTSTRAP_SAMPLES,
        seed=0,
    )
