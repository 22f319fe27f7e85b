"""The one Student-t interval of a mean that every benchmark reports (``mean ± half-width``, 95% by default).

Each domain's benchmark helpers (:mod:`mmalign.vision_lm.stats`, :mod:`mmalign.robotics.protocol`) validate their
inputs their own way and compute the interval here.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["t_interval"]


def t_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """``(mean, half-width)`` of the two-sided Student-t interval ``mean ± t_{(1+level)/2, n-1} s / sqrt(n)`` of a
    non-empty 1-D array, ``s`` the sample standard deviation (ddof 1). One value has no interval: half-width ``nan``.

    Examples:
        >>> mean, half = t_interval(np.array([1.0, 2.0, 3.0]))
        >>> round(mean, 3), round(half, 3)  # t_{0.975, 2} = 4.303, s = 1
        (2.0, 2.484)
    """
    from scipy.stats import t

    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    if values.size < 2:
        return float(values.mean()), math.nan
    return float(values.mean()), float(t.ppf((1 + level) / 2, values.size - 1) * values.std(ddof=1)
                                       / math.sqrt(values.size))
