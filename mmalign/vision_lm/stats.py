"""Statistics of the hallucination testbed: t-intervals, paired tests against DPO with Holm's correction, binary
answer metrics, and the yes-ratio rule.

Seeds are the unit of replication: every number is a mean over seeds with a 95% Student-t interval, and a method is
compared with DPO by the per-seed paired difference (same scenes, same base model), tested with a two-sided paired
t-test whose p-values are Holm-corrected over the whole family of comparisons read together.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from mmalign.stats import t_interval
from mmalign.vision_lm.pope import pope_metrics

__all__ = ["mean_ci", "paired_test", "holm", "binary_metrics", "YES_RATIO_BAND", "verdict"]

YES_RATIO_BAND = (0.4, 0.6)  # a method whose yes-ratio leaves this band does not count as better


def _values(name: str, values: Sequence[float]) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0 or not np.isfinite(v).all():
        raise ValueError(f"{name} must be a non-empty 1-D sequence of finite numbers, got {values!r}")
    return v


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """``(mean, half-width)`` of the two-sided Student-t interval ``mean ± t_{(1+level)/2, n-1} s / sqrt(n)``.

    One value has no interval: the half-width is ``nan``.
    """
    v = _values("values", values)
    return t_interval(v, level)


def paired_test(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Two-sided paired t-test of ``a - b`` (one value per seed): mean difference, its 95% half-width, t, p.

    All-equal differences give ``p = 1`` when they are zero and ``p = 0`` otherwise (a constant non-zero shift).
    """
    from scipy.stats import t

    x, y = _values("a", a), _values("b", b)
    if x.shape != y.shape:
        raise ValueError(f"a and b must pair up (one value per seed each), got {x.size} and {y.size} values")
    d = x - y
    mean, half = mean_ci(d)
    if d.size < 2:
        return {"diff": mean, "half_width": half, "t": float("nan"), "p": float("nan"), "n": float(d.size)}
    sd = d.std(ddof=1)
    if sd == 0:
        stat = 0.0 if mean == 0 else math.copysign(math.inf, mean)
        return {"diff": mean, "half_width": 0.0, "t": stat, "p": 1.0 if mean == 0 else 0.0, "n": float(d.size)}
    stat = mean / (sd / math.sqrt(d.size))
    return {"diff": mean, "half_width": half, "t": float(stat), "p": float(2 * t.sf(abs(stat), d.size - 1)),
            "n": float(d.size)}


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order.

    Sorted ascending, ``p_(i)`` becomes ``max_{j <= i} min(1, (m - j + 1) p_(j))`` (1-based ``j``); rejecting the
    hypotheses whose adjusted p is below alpha controls the family-wise error rate at alpha. ``nan`` stays ``nan``
    and does not count towards ``m``.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    if p.ndim != 1 or ((p < 0) | (p > 1)).any():
        raise ValueError(f"pvalues must be a 1-D sequence of probabilities, got {pvalues!r}")
    out = np.full(p.shape, np.nan)
    idx = np.flatnonzero(~np.isnan(p))
    order = idx[np.argsort(p[idx], kind="stable")]
    m, running = len(order), 0.0
    for j, k in enumerate(order):
        running = max(running, min(1.0, (m - j) * p[k]))
        out[k] = running
    return out.tolist()


def binary_metrics(predicted_yes: Sequence[bool], truth: Sequence[bool]) -> dict[str, float]:
    """POPE's accuracy, precision, recall, F1 and yes-ratio plus balanced accuracy (mean of the per-class recalls;
    a constant answer scores 0.5 whatever the class balance)."""
    p, t = np.asarray(predicted_yes, dtype=bool), np.asarray(truth, dtype=bool)
    out = pope_metrics(p, t)
    if t.all() or not t.any():
        raise ValueError("balanced accuracy needs both yes and no questions in truth")
    out["balanced_acc"] = 0.5 * (float(p[t].mean()) + float((~p[~t]).mean()))
    return out


def verdict(diff: float, p_holm: float, yes_ratio: float, alpha: float = 0.05) -> str:
    """A method's verdict against DPO on the primary metric (higher is better).

    ``better`` needs a Holm-significant positive paired difference *and* a mean yes-ratio inside
    :data:`YES_RATIO_BAND`; a significant gain with the yes-ratio outside the band is ``yes-ratio shift`` (it does
    not count as better); a significant loss is ``worse``; otherwise ``no difference`` (at this power).
    """
    if math.isnan(p_holm) or p_holm >= alpha:
        return "no difference"
    if diff < 0:
        return "worse"
    lo, hi = YES_RATIO_BAND
    return "better" if lo <= yes_ratio <= hi else "yes-ratio shift"
