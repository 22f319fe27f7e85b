"""Testbed statistics against hand-computed values: t-interval, paired t-test, Holm, balanced accuracy, verdicts."""

from __future__ import annotations

import math

import pytest

from mmalign.vision_lm import stats


def test_mean_ci_hand_computed():
    mean, half = stats.mean_ci([1.0, 2.0, 3.0, 4.0])
    # s = sqrt(5/3), t_{0.975, 3} = 3.182446
    assert mean == 2.5
    assert half == pytest.approx(3.182446 * math.sqrt(5 / 3) / 2, rel=1e-6)
    m1, h1 = stats.mean_ci([0.7])
    assert m1 == 0.7 and math.isnan(h1)
    with pytest.raises(ValueError, match="finite"):
        stats.mean_ci([1.0, float("nan")])


def test_paired_test_closed_form_df2():
    # d = (1, 2, 3): mean 2, s = 1, t = 2 sqrt(3); Student t with 2 df: sf(t) = (1 - t / sqrt(t^2 + 2)) / 2
    res = stats.paired_test([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    t = 2 * math.sqrt(3)
    assert res["diff"] == 2.0 and res["t"] == pytest.approx(t)
    assert res["p"] == pytest.approx(1 - t / math.sqrt(t * t + 2), rel=1e-9)
    assert stats.paired_test([1.0, 1.0], [1.0, 1.0])["p"] == 1.0
    assert stats.paired_test([2.0, 2.0], [1.0, 1.0])["p"] == 0.0
    with pytest.raises(ValueError, match="pair up"):
        stats.paired_test([1.0, 2.0], [1.0])


def test_holm_known_pvalues():
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4*0.005, 3*0.01, 2*0.03, max(1*0.04, 0.06)
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    out = stats.holm([0.01, float("nan"), 0.02])  # nan is not a hypothesis: m = 2
    assert out[0] == pytest.approx(0.02) and math.isnan(out[1]) and out[2] == pytest.approx(0.02)
    with pytest.raises(ValueError, match="probabilities"):
        stats.holm([1.2])


def test_binary_metrics_hand_computed():
    m = stats.binary_metrics([True, True, True, False], [True, False, False, False])
    assert m["balanced_acc"] == pytest.approx((1.0 + 1 / 3) / 2)
    assert m["yes_ratio"] == 0.75 and m["precision"] == pytest.approx(1 / 3) and m["f1"] == pytest.approx(0.5)
    # a constant answer is at chance whatever the class balance
    assert stats.binary_metrics([True] * 4, [True, False, False, False])["balanced_acc"] == 0.5
    with pytest.raises(ValueError, match="both yes and no"):
        stats.binary_metrics([True, False], [True, True])


def test_verdict_rule():
    assert stats.verdict(0.05, 0.01, 0.5) == "better"
    assert stats.verdict(0.05, 0.01, 0.3) == "yes-ratio shift"  # significant gain but the yes-ratio left 0.4-0.6
    assert stats.verdict(0.05, 0.2, 0.5) == "no difference"
    assert stats.verdict(-0.05, 0.01, 0.5) == "worse"
    assert stats.verdict(0.05, float("nan"), 0.5) == "no difference"
