"""Helpers shared by the core losses: one input check per call, and metrics computed only when read.

The logged metrics (batch means of per-pair rows: implicit rewards, accuracy, …) are a :class:`LossMetrics`: a
read-only mapping holding the detached per-pair tensors that computes every value with one reduction and one host
read on first access. Code that discards the metrics (``loss, _ = ...``: reward-model fits, inner loops) never
pays for them; a trainer that logs them pays once per call.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from mmalign.core.validation import check_all_finite, check_labels, check_ndim, check_same_shape

__all__ = ["check_loss_inputs", "fused_means", "LossMetrics", "expected_pair_metrics", "pair_rows"]


def check_loss_inputs(
    tensors: Mapping[str, Tensor], *, ndim: int | None = 1, labels: Tensor | None = None,
    positive: Mapping[str, Tensor] | None = None,
) -> None:
    """Validate the tensors of one loss call; raises ``ValueError`` naming the first bad argument.

    ``tensors`` (``{argument name: tensor}``) share one shape with ``ndim`` dimensions (any when ``None``) and are
    finite; ``labels``, if given, hold ``P(first ≻ second)`` in ``[0, 1]``; each tensor of ``positive`` (token
    counts) is finite and > 0.
    """
    first_name, first = next(iter(tensors.items()))
    if ndim is not None:
        check_ndim(first_name, first, ndim)
    check_same_shape(tensors)
    if labels is not None:
        check_labels("labels", labels)
    for name, count in (positive or {}).items():
        if count.numel() and not bool(((count > 0) & torch.isfinite(count)).all()):
            raise ValueError(f"{name} must be finite and > 0 everywhere (token counts), got min "
                             f"{float(count.min())}, max {float(count.max())}")
    check_all_finite(tensors)


def fused_means(rows: Sequence[Tensor], extra: Tensor | None = None) -> list[float]:
    """Batch means of equally sized 1-D per-pair ``rows``, followed by the values of the 1-D tensor ``extra``, read
    back to the host at once (one stack, one sum, one synchronisation)."""
    stacked = torch.stack([r.detach() for r in rows])
    # bf16/fp16 inputs: accumulate in float32, or the metrics of a 4k batch lose most of their digits.
    sums = stacked.sum(dim=1) if stacked.element_size() >= 4 else stacked.sum(dim=1, dtype=torch.float32)
    if extra is not None:
        sums = torch.cat([sums, extra.detach().to(sums.dtype)])
    values: list[float] = sums.tolist()
    n, k = rows[0].numel(), len(rows)
    return [v / n if n else math.nan for v in values[:k]] + values[k:]


class LossMetrics(Mapping[str, float]):
    """Read-only ``{name: float}`` of one loss call, computed on first read from detached per-pair tensors.

    ``compute(*tensors)`` returns the metrics dict and must only close over Python numbers; the tensors (or
    ``None`` for absent optional ones) are held as given and passed in detached, under ``no_grad``, on first read.
    Until then the metrics keep those tensors alive; afterwards only the floats. Reading the metrics after one of
    the held tensors was modified in place (e.g. an input that is a parameter, after ``optimizer.step()``) raises
    instead of returning values of the modified tensor.
    """

    __slots__ = ("_compute", "_tensors", "_versions", "_values")

    def __init__(self, compute: Callable[..., dict[str, float]], *tensors: Tensor | None) -> None:
        self._compute = compute
        self._tensors = tensors
        self._versions = [None if t is None else t._version for t in tensors]
        self._values: dict[str, float] | None = None

    def _materialise(self) -> dict[str, float]:
        if self._values is None:
            if any(t is not None and t._version != v for t, v in zip(self._tensors, self._versions, strict=True)):
                raise RuntimeError(
                    "loss metrics read after a tensor they depend on was modified in place (e.g. an input that is a "
                    "parameter, after optimizer.step()); read the metrics before modifying the loss inputs")
            with torch.no_grad():
                self._values = self._compute(*(None if t is None else t.detach() for t in self._tensors))
            self._tensors = ()  # release the per-pair tensors once the values are cached
        return self._values

    def __getitem__(self, key: str) -> float:
        return self._materialise()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._materialise())

    def __len__(self) -> int:
        return len(self._materialise())

    def __repr__(self) -> str:
        return f"LossMetrics({self._materialise()!r})"

    def to_dict(self) -> dict[str, float]:
        """A plain ``dict`` copy (for JSON)."""
        return dict(self._materialise())


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
