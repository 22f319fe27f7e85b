"""The seed protocol of the robotics benchmarks: disjoint development and reporting seeds, 95% t-intervals.

Every robotics benchmark script (``scripts/bench_{rapl,pearl,pbrl,cpl}*.py``) takes ``--dev-seeds`` (the seeds on
which settings were chosen) and ``--report-seeds`` (the seeds of the reported table) through :func:`add_seed_args`;
:func:`seed_plan` refuses a reported table whose seeds overlap the development seeds, or that has fewer than
``min_report`` seeds unless the run is declared sized down. Spreads are always a mean with a two-sided 95% Student-t
interval over seeds (:func:`mean_ci`, sample standard deviation, ``n - 1`` degrees of freedom); arms that share
seeds are compared by the interval of their per-seed differences (:func:`paired_diff`). The written protocol is
docs/benchmarks/robotics_protocol.md.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from mmalign.stats import t_interval

__all__ = ["SeedPlan", "add_seed_args", "seed_plan", "mean_ci", "fmt_ci", "PairedDiff", "paired_diff",
           "MIN_REPORT_SEEDS"]

MIN_REPORT_SEEDS = 5


@dataclass(frozen=True)
class SeedPlan:
    """Seeds of one benchmark run. ``report`` empty = a development run (its numbers inform choices and are not a
    reported table); ``sized_down`` = why a reported table has fewer seeds than the protocol asks ('' = it has not).
    """

    dev: tuple[int, ...]
    report: tuple[int, ...]
    sized_down: str = ""

    @property
    def reporting(self) -> bool:
        return bool(self.report)

    @property
    def seeds(self) -> tuple[int, ...]:
        """The seeds to run: the reporting seeds of a reported table, else the development seeds."""
        return self.report if self.report else self.dev

    def describe(self) -> str:
        """One line for a benchmark page: which seeds were used for what."""
        if not self.reporting:
            return f"development run on seeds {list(self.dev)} (not a reported table)"
        text = (f"reporting seeds {list(self.report)} (n={len(self.report)}), disjoint from the development seeds "
                f"{list(self.dev)}")
        if self.sized_down:
            text += f"; sized down to fewer than {MIN_REPORT_SEEDS} reporting seeds: {self.sized_down}"
        return text


def add_seed_args(parser: argparse.ArgumentParser, dev_default: Sequence[int] = (0, 1),
                  report_default: Sequence[int] = ()) -> None:
    """Add ``--dev-seeds``, ``--report-seeds`` and ``--sized-down`` to a benchmark script's parser."""
    parser.add_argument("--dev-seeds", type=int, nargs="*", default=list(dev_default),
                        help="seeds on which settings were chosen (development); run when no --report-seeds are given")
    parser.add_argument("--report-seeds", type=int, nargs="*", default=list(report_default),
                        help=f"seeds of the reported table: disjoint from --dev-seeds, at least {MIN_REPORT_SEEDS} "
                             "unless --sized-down says why not")
    parser.add_argument("--sized-down", default="",
                        help=f"reason a reported table has fewer than {MIN_REPORT_SEEDS} reporting seeds (printed "
                             "with the table)")


def _check_seeds(flag: str, seeds: Sequence[int]) -> tuple[int, ...]:
    seeds = tuple(int(s) for s in seeds)
    if any(s < 0 for s in seeds):
        raise ValueError(f"{flag} must be non-negative integers, got {list(seeds)}")
    dup = sorted({s for s in seeds if seeds.count(s) > 1})
    if dup:
        raise ValueError(f"{flag} lists seed(s) {dup} more than once: {list(seeds)}")
    return seeds


def seed_plan(dev: Sequence[int], report: Sequence[int], sized_down: str = "",
              min_report: int = MIN_REPORT_SEEDS) -> SeedPlan:
    """Check and build a :class:`SeedPlan`; raises ``ValueError`` naming the flag at fault.

    A reported table (``report`` non-empty) must not share a seed with ``dev`` and needs ``min_report`` seeds unless
    ``sized_down`` gives the reason it has fewer. With ``report`` empty, ``dev`` must be non-empty.
    """
    dev_t, rep_t = _check_seeds("--dev-seeds", dev), _check_seeds("--report-seeds", report)
    if not rep_t:
        if not dev_t:
            raise ValueError("give --report-seeds (a reported table) or --dev-seeds (a development run); both are empty")
        return SeedPlan(dev_t, (), "")
    overlap = sorted(set(dev_t) & set(rep_t))
    if overlap:
        raise ValueError(f"--report-seeds {list(rep_t)} overlap --dev-seeds {list(dev_t)} on {overlap}: a reported "
                         "table must use seeds never used to choose a setting")
    if len(rep_t) < min_report and not sized_down.strip():
        raise ValueError(f"--report-seeds has {len(rep_t)} seed(s) {list(rep_t)}; the protocol asks for at least "
                         f"{min_report}: add seeds, or pass --sized-down '<why>' to print the smaller table as sized down")
    return SeedPlan(dev_t, rep_t, sized_down.strip() if len(rep_t) < min_report else "")


def seed_plan_from_args(args: argparse.Namespace, min_report: int = MIN_REPORT_SEEDS) -> SeedPlan:
    """:func:`seed_plan` of the flags added by :func:`add_seed_args`."""
    return seed_plan(args.dev_seeds, args.report_seeds, args.sized_down, min_report)


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, int]:
    """Mean and half-width of the two-sided Student-t interval of the mean: ``t_{(1+level)/2, n-1} * s / sqrt(n)``
    with ``s`` the sample standard deviation (ddof 1). Returns ``(mean, half_width, n)``; the half-width is ``nan``
    for ``n < 2``, and ``(nan, nan, 0)`` for no values. NaN values are refused (a failed run must not vanish)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    x = np.asarray(list(values), dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"values must be a flat sequence of numbers, got shape {x.shape}")
    if np.isnan(x).any():
        raise ValueError(f"values hold NaN at index {np.flatnonzero(np.isnan(x)).tolist()}: {x.tolist()}")
    if len(x) == 0:
        return math.nan, math.nan, 0
    mean, half = t_interval(x, level)
    return mean, half, len(x)


def fmt_ci(values: Sequence[float], fmt: str = "+.2f") -> str:
    """``"+0.78 ± 0.05 (n=5)"``: mean ± 95% t half-width (:func:`mean_ci`); ``"not run"`` for no values."""
    mean, half, n = mean_ci(values)
    if n == 0:
        return "not run"
    width = fmt.lstrip("+")
    return f"{mean:{fmt}} ± {half:{width}} (n={n})" if n > 1 else f"{mean:{fmt}} (n=1)"


@dataclass(frozen=True)
class PairedDiff:
    """Per-seed differences ``a - b`` on the seeds both arms ran, with their mean and 95% t half-width."""

    seeds: tuple[int, ...]
    diffs: tuple[float, ...]
    mean: float
    half_width: float

    @property
    def wins(self) -> int:
        """Seeds with ``a > b``."""
        return sum(d > 0 for d in self.diffs)

    @property
    def verdict(self) -> str:
        """``'a > b'`` / ``'a < b'`` when the 95% interval excludes 0, else ``'no difference shown'``."""
        if len(self.diffs) < 2 or math.isnan(self.half_width):
            return "too few seeds"
        if self.mean - self.half_width > 0:
            return "a > b"
        if self.mean + self.half_width < 0:
            return "a < b"
        return "no difference shown"

    def __str__(self) -> str:
        if not self.diffs:
            return "no common seeds"
        return (f"{self.mean:+.2f} ± {self.half_width:.2f} (n={len(self.diffs)}, {self.wins}/{len(self.diffs)} "
                "seeds > 0)")


def paired_diff(a: Mapping[int, float], b: Mapping[int, float]) -> PairedDiff:
    """Paired difference ``a[s] - b[s]`` over the seeds ``s`` present in both (sorted); see :class:`PairedDiff`."""
    seeds = tuple(sorted(set(a) & set(b)))
    d = [float(a[s]) - float(b[s]) for s in seeds]
    mean, half, _ = mean_ci(d)
    return PairedDiff(seeds, tuple(d), mean, half)
