"""The robotics benchmark seed protocol: disjoint seed sets, 95% t-intervals, paired differences."""

import argparse
import math

import pytest

from mmalign.robotics.protocol import (
    add_seed_args,
    fmt_ci,
    mean_ci,
    paired_diff,
    seed_plan,
    seed_plan_from_args,
)


def test_mean_ci_hand_computed():
    # [1..5]: mean 3, s = sqrt(2.5), s/sqrt(5) = 0.70711, t_{0.975, 4} = 2.77645 (table) -> 1.96324
    mean, half, n = mean_ci([1, 2, 3, 4, 5])
    assert (mean, n) == (3.0, 5)
    assert half == pytest.approx(2.77645 * math.sqrt(2.5) / math.sqrt(5), abs=1e-4)
    # two values: s/sqrt(2) = 0.1, t_{0.975, 1} = 12.7062
    mean, half, n = mean_ci([0.1, 0.3])
    assert mean == pytest.approx(0.2) and half == pytest.approx(1.27062, abs=1e-4)
    # 90% interval is narrower: t_{0.95, 4} = 2.13185
    assert mean_ci([1, 2, 3, 4, 5], level=0.90)[1] == pytest.approx(2.13185 * 0.707107, abs=1e-4)


def test_mean_ci_edge_cases_and_format():
    assert mean_ci([2.0])[0] == 2.0 and math.isnan(mean_ci([2.0])[1])
    assert mean_ci([])[2] == 0
    with pytest.raises(ValueError, match="NaN at index \\[1\\]"):
        mean_ci([1.0, float("nan")])
    assert fmt_ci([1, 2, 3, 4, 5]) == "+3.00 ± 1.96 (n=5)"
    assert fmt_ci([0.5], ".3f") == "0.500 (n=1)"
    assert fmt_ci([]) == "not run"


def test_overlapping_seed_sets_are_refused():
    with pytest.raises(ValueError, match=r"overlap --dev-seeds \[0, 1, 2\] on \[2\]"):
        seed_plan([0, 1, 2], [2, 3, 4, 5, 6])
    with pytest.raises(ValueError, match="more than once"):
        seed_plan([0], [3, 3, 4, 5, 6])
    with pytest.raises(ValueError, match="at least 5"):
        seed_plan([0, 1], [2, 3, 4])
    with pytest.raises(ValueError, match="both are empty"):
        seed_plan([], [])


def test_seed_plan_reporting_development_and_sized_down():
    rep = seed_plan([0, 1], [10, 11, 12, 13, 14])
    assert rep.reporting and rep.seeds == (10, 11, 12, 13, 14) and not rep.sized_down
    dev = seed_plan([0, 1], [])
    assert not dev.reporting and dev.seeds == (0, 1) and "development" in dev.describe()
    small = seed_plan([0], [5, 6, 7], sized_down="CPU time")
    assert small.sized_down == "CPU time" and "sized down" in small.describe()
    # the flags of a benchmark script
    ap = argparse.ArgumentParser()
    add_seed_args(ap)
    plan = seed_plan_from_args(ap.parse_args(["--dev-seeds", "0", "--report-seeds", "1", "2", "3", "4", "5"]))
    assert plan.report == (1, 2, 3, 4, 5)
    with pytest.raises(ValueError, match="overlap"):
        seed_plan_from_args(ap.parse_args(["--dev-seeds", "1", "--report-seeds", "1", "2", "3", "4", "5"]))


def test_paired_diff_uses_common_seeds_and_direction():
    a = {0: 0.9, 1: 0.8, 2: 0.85, 3: 0.7}
    b = {0: 0.5, 1: 0.6, 2: 0.55, 9: 0.0}
    d = paired_diff(a, b)
    assert d.seeds == (0, 1, 2) and d.diffs == pytest.approx((0.4, 0.2, 0.3))
    assert d.mean == pytest.approx(0.3) and d.wins == 3
    # s = 0.1, t_{0.975, 2} = 4.30265
    assert d.half_width == pytest.approx(4.30265 * 0.1 / math.sqrt(3), abs=1e-4)
    assert d.verdict == "a > b" and paired_diff(b, a).verdict == "a < b"
    assert paired_diff({0: 1.0, 1: 0.0}, {0: 0.0, 1: 1.0}).verdict == "no difference shown"
