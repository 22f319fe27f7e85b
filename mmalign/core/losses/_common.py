"""Helpers shared by the core losses: shape checks, and one fused reduction that yields both the batch-mean
metrics and the finiteness check of the inputs.

Why fused: on a batch of a few thousand pairs a loss is a handful of element-wise kernels, so separate validation
and logging reductions (and their host syncs) would cost more than the loss. Each loss stacks the per-pair rows it
logs (log-ratios, scores, …), which are computed from *every* input, takes one sum over the batch and reads it
back with a single sync. A sum of finite values can only be non-finite by overflow (|sum| > 3e38 in float32, far
outside log-probabilities and errors), so a non-finite mean means some input holds NaN/inf; only then are the
inputs inspected one by one to name the culprit in the ``ValueError`` (after an overflow they are all finite and
nothing is raised). The check therefore runs after the first element-wise intermediate and before the loss
expression and its backward.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import Tensor

from mmalign.core.validation import check_all_finite, check_labels, check_ndim, check_same_shape

__all__ = [
    "check_paired", "check_shapes", "fused_means", "ensure_finite", "check_label_bounds", "label_bounds",
    "expected_pair_metrics",
]


def check_shapes(tensors: Mapping[str, Tensor], ndim: int | None = 1) -> None:
    """Tensors of one pairwise loss share one shape (with ``ndim`` dimensions unless ``None``)."""
    first_name, first = next(iter(tensors.items()))
    if ndim is not None:
        check_ndim(first_name, first, ndim)
    check_same_shape(tensors)


def check_paired(tensors: Mapping[str, Tensor], ndim: int | None = 1) -> None:
    """:func:`check_shapes` plus an explicit finiteness check (for code off the hot path)."""
    check_shapes(tensors, ndim)
    check_all_finite(tensors)


def fused_means(rows: Sequence[Tensor], extra: Sequence[Tensor] = ()) -> list[float]:
    """Batch means of equally sized 1-D per-pair ``rows``, followed by the 0-dim tensors ``extra``, read back to the
    host with one synchronisation (one stack, one sum; the division happens in Python)."""
    sums = torch.stack([r.detach() for r in rows]).sum(dim=1)
    if extra:
        sums = torch.cat([sums, torch.stack([e.detach().to(sums.dtype) for e in extra])])
    values: list[float] = sums.tolist()
    n, k = rows[0].numel(), len(rows)
    return [v / n if n else math.nan for v in values[:k]] + values[k:]


def ensure_finite(values: Sequence[float], inputs: Mapping[str, Tensor]) -> None:
    """Raise naming the offending input if any of ``values`` (means computed from all ``inputs``) is not finite."""
    if not all(math.isfinite(v) for v in values):
        check_all_finite(inputs)


def label_bounds(labels: Tensor) -> list[Tensor]:
    """``[min, max]`` of the labels as 0-dim tensors, to ride along in :func:`fused_means` (``extra``)."""
    if labels.numel() == 0:
        zero = labels.new_zeros(())
        return [zero, zero]
    lo, hi = torch.aminmax(labels.detach())
    return [lo, hi]


def check_label_bounds(name: str, labels: Tensor, lo: float, hi: float) -> None:
    """Raise the standard labels error unless ``0 <= lo <= hi <= 1`` (NaN fails every comparison)."""
    if not (0.0 <= lo <= hi <= 1.0):
        check_labels(name, labels)


def expected_pair_metrics(stats: Sequence[float], soft: bool) -> tuple[float, float, float]:
    """``(chosen, rejected, accuracy)`` from the means of ``[s_1, s_2, sign(s_1 − s_2)]`` (no labels: first is
    chosen) or ``[s_1, s_2, (2p−1)(s_1 − s_2), (2p−1) sign(s_1 − s_2)]`` (labels ``p``).

    With labels, every metric is the expectation over a label drawn from ``p``: chosen = ``p s_1 + (1−p) s_2``,
    accuracy = ``P(label agrees with sign(s_1 − s_2))``; for hard labels these are the usual values and a tie (label
    or scores) earns 1/2.
    """
    if not soft:
        return stats[0], stats[1], 0.5 + 0.5 * stats[2]
    centre, half_margin = 0.5 * (stats[0] + stats[1]), 0.5 * stats[2]
    return centre + half_margin, centre - half_margin, 0.5 + 0.5 * stats[3]
