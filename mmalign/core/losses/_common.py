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
    "expected_pair_metrics", "pair_rows",
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


def fused_means(rows: Sequence[Tensor], extra: Tensor | None = None) -> list[float]:
    """Batch means of equally sized 1-D per-pair ``rows``, followed by the values of the 1-D tensor ``extra``, read
    back to the host with one synchronisation (one stack, one sum; the division happens in Python)."""
    stacked = torch.stack([r.detach() for r in rows])
    # bf16/fp16 inputs: accumulate in float32, or the metrics of a 4k batch lose most of their digits.
    sums = stacked.sum(dim=1) if stacked.element_size() >= 4 else stacked.sum(dim=1, dtype=torch.float32)
    if extra is not None:
        sums = torch.cat([sums, extra.detach().to(sums.dtype)])
    values: list[float] = sums.tolist()
    n, k = rows[0].numel(), len(rows)
    return [v / n if n else math.nan for v in values[:k]] + values[k:]


def ensure_finite(values: Sequence[float], inputs: Mapping[str, Tensor]) -> None:
    """Raise naming the offending input if any of ``values`` (means computed from all ``inputs``) is not finite."""
    if not all(math.isfinite(v) for v in values):
        check_all_finite(inputs)


def label_bounds(labels: Tensor) -> Tensor:
    """``[min, max]`` of the labels, to ride along in :func:`fused_means` (``extra``)."""
    if labels.numel() == 0:
        return labels.new_zeros(2)
    return torch.stack(torch.aminmax(labels.detach()))


def check_label_bounds(name: str, labels: Tensor, lo: float, hi: float) -> None:
    """Raise the standard labels error unless ``0 <= lo <= hi <= 1`` (NaN fails every comparison)."""
    if not (0.0 <= lo <= hi <= 1.0):
        check_labels(name, labels)


def pair_rows(score_first: Tensor, score_second: Tensor, labels: Tensor | None) -> list[Tensor]:
    """Per-pair rows for :func:`expected_pair_metrics`: ``[s_1, s_2, sign(d)]`` without labels, plus
    ``[p·d, p·sign(d)]`` with labels ``p`` (``d = s_1 − s_2``)."""
    diff = score_first - score_second
    sign = diff.sign()
    if labels is None:
        return [score_first, score_second, sign]
    return [score_first, score_second, sign, labels * diff, labels * sign]


def expected_pair_metrics(stats: Sequence[float], soft: bool) -> tuple[float, float, float]:
    """``(chosen, rejected, accuracy)`` from the batch means of :func:`pair_rows`.

    With labels, every metric is the expectation over a label drawn from ``p``: chosen = mean ``p s_1 + (1−p) s_2``
    = mean ``s_2 + p d``, accuracy = ``P(label agrees with sign(d))`` = ``1/2 + mean(p sign d) − mean(sign d)/2``;
    for hard labels these are the usual values, and a tie (label or scores) earns 1/2.
    """
    if not soft:
        return stats[0], stats[1], 0.5 + 0.5 * stats[2]
    return stats[1] + stats[3], stats[0] - stats[3], 0.5 + stats[4] - 0.5 * stats[2]
