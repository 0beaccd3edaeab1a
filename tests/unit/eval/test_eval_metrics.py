"""Metric functions on hand-checked cases, plus properties of the bootstrap estimates."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from eval.metrics import (
    acc,
    acc_norm,
    bootstrap_stderr,
    exact_match,
    normalize_text,
    paired_bootstrap_ci,
    regex_match,
    rouge_l,
    token_f1,
)

SQUAD = {"lowercase": True, "strip_punctuation": True, "strip_articles": True, "whitespace": True}
words = st.lists(
    st.sampled_from(["json", "dumps", "a", "the", "str", "obj", "to", "x1"]), max_size=8
)


def test_normalize_text_is_squad_normalisation():
    assert normalize_text("  The  Quick, brown FOX! ") == "quick brown fox"
    assert normalize_text("The Fox", strip_articles=False, lowercase=False) == "The Fox"


def test_exact_match_normalises_only_when_asked():
    assert exact_match("The JSON string.", "json string", SQUAD) == 1.0
    assert exact_match("The JSON string.", "json string") == 0.0
    assert exact_match("json string", "json string") == 1.0
    assert exact_match("Json", "json", {"lowercase": False}) == 0.0


def test_token_f1_by_hand():
    # prediction {cat, sat}, reference {cat, sat, down}: P = 1, R = 2/3, F1 = 0.8
    assert token_f1("The cat sat", "cat sat down") == pytest.approx(0.8)
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("", "cat") == 0.0
    # multiset overlap: one shared "a b" pair, not two
    assert token_f1("x x", "x y") == pytest.approx(0.5)


def test_rouge_l_by_hand():
    # LCS of [a b c d] and [a c d e] is [a c d]: P = R = 3/4
    assert rouge_l("a b c d", "a c d e") == pytest.approx(0.75)
    # LCS 2 of [x y z] and [y z]: P = 2/3, R = 1, F = 0.8
    assert rouge_l("X, y; z.", "y z") == pytest.approx(0.8)
    assert rouge_l("p q", "r s") == 0.0


def test_regex_match_extracts_group_then_matches():
    pattern = r"answer is (\w+)"
    assert regex_match("I think the answer is Paris.", "paris", pattern, SQUAD) == 1.0
    assert regex_match("I think the answer is Rome.", "paris", pattern, SQUAD) == 0.0
    assert regex_match("no answer here", "paris", pattern, SQUAD) == 0.0
    assert regex_match("value: 42", "42", r"\d+") == 1.0  # no group: the whole match


def test_acc_and_acc_norm_disagree_on_a_long_choice():
    # Choice 1 has the lower total log-likelihood but the higher one per character.
    choices = ["a", "abcdefgh"]
    logliks = [-2.0, -8.0]
    assert acc(logliks, gold=1) == 0.0
    assert acc_norm(logliks, choices, gold=1) == 1.0  # -8/8 = -1 > -2/1
    assert acc(logliks, gold=0) == 1.0 and acc_norm(logliks, choices, gold=0) == 0.0


def test_acc_ties_go_to_the_first_choice_like_numpy_argmax():
    assert acc([-1.0, -1.0], gold=0) == 1.0 and acc([-1.0, -1.0], gold=1) == 0.0


@given(words, words)
def test_text_metrics_are_bounded_and_symmetric_where_they_should_be(a, b):
    prediction, reference = " ".join(a), " ".join(b)
    for metric in (token_f1, rouge_l):
        value = metric(prediction, reference)
        assert 0.0 <= value <= 1.0
        assert value == pytest.approx(metric(reference, prediction))
        assert metric(prediction, prediction) == 1.0


def test_bootstrap_stderr_is_close_to_std_over_sqrt_n():
    values = np.random.default_rng(3).normal(0.5, 2.0, size=400)
    mean, stderr = bootstrap_stderr(values, n_boot=2000, seed=0)
    assert mean == pytest.approx(values.mean())
    assert stderr == pytest.approx(values.std(ddof=1) / math.sqrt(values.size), rel=0.1)


def test_bootstrap_is_deterministic_by_seed():
    values = [0, 1, 1, 0, 1, 0, 0, 1, 1, 1]
    assert bootstrap_stderr(values, seed=7) == bootstrap_stderr(values, seed=7)
    assert bootstrap_stderr(values, seed=7) != bootstrap_stderr(values, seed=8)
    assert paired_bootstrap_ci(values, values[::-1], seed=7) == paired_bootstrap_ci(
        values, values[::-1], seed=7
    )


def test_bootstrap_edge_cases_and_weights():
    assert bootstrap_stderr([0.3]) == (0.3, 0.0)
    assert all(math.isnan(x) for x in bootstrap_stderr([]))
    mean, _ = bootstrap_stderr([1.0, 4.0], weights=[3, 1])  # token-weighted: (3 + 4) / 4
    assert mean == pytest.approx(1.75)


def test_paired_ci_is_narrower_than_unpaired_for_correlated_scores():
    rng = np.random.default_rng(0)
    difficulty = rng.normal(0.0, 1.0, size=300)  # shared by both models: the questions
    model_a = difficulty + 0.10 + rng.normal(0, 0.1, size=300)
    model_b = difficulty + rng.normal(0, 0.1, size=300)
    mean, low, high = paired_bootstrap_ci(model_a, model_b, n_boot=1000, seed=0)
    assert mean == pytest.approx((model_a - model_b).mean())
    assert low < mean < high and low > 0  # the 0.10 gap is detected
    _, stderr_a = bootstrap_stderr(model_a, seed=1)
    _, stderr_b = bootstrap_stderr(model_b, seed=2)
    unpaired_width = 2 * 1.96 * math.hypot(stderr_a, stderr_b)
    assert (high - low) < unpaired_width / 5


def test_paired_ci_needs_the_same_questions():
    with pytest.raises(ValueError):
        paired_bootstrap_ci([1, 0, 1], [1, 0])
