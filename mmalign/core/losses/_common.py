"""Helpers shared by the core losses: shape checks, one cheap finiteness/label check per call, and metrics that
are computed only when read.

Cost model. On a batch of a few thousand pairs a loss is a handful of element-wise kernels (~5 µs each on a CPU
core), so every extra kernel or host sync is visible next to it. Each loss therefore spends, before its loss
expression, exactly one reduction and one host read on validation: the sum of an intermediate that depends on
*every* tensor input (NaN/inf propagate through sums and differences, so the sum is finite iff all inputs are,
up to overflow; a reduced loss that is non-finite wherever its inputs are serves as is). Inputs with a range
(soft labels in [0, 1], token counts > 0) add one ``aminmax`` each, whose values ride along in the same read on
CUDA. Only when that
sum is not finite are the inputs inspected one by one to name the culprit (after a mere overflow they are all
finite and nothing is raised).

The logged metrics (batch means of per-pair rows: implicit rewards, accuracy, …) are a :class:`LossMetrics`:
a read-only mapping holding the detached per-pair tensors and computing every value with one fused reduction
and one sync on first read. Code that discards the metrics (``loss, _ = ...``: reward-model fits, inner loops)
never pays for them; a trainer that logs them pays once per call. Reading the metrics after one of the held
tensors was modified in place (e.g. an input that is a parameter, after ``optimizer.step()``) raises instead of
returning values of the modified tensor.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from mmalign.core.validation import check_all_finite, check_labels, check_ndim, check_same_shape

__all__ = [
    "check_paired", "check_shapes", "fused_means", "check_inputs_finite", "LossMetrics",
    "expected_pair_metrics", "pair_rows",
]


def check_shapes(tensors: Mapping[str, Tensor], ndim: int | None = 1) -> None:
    """Tensors of one pairwise loss share one shape (with ``ndim`` dimensions unless ``None``)."""
    # Fast path for valid calls (this runs on every loss call); the checks below name the culprit otherwise.
    values = iter(tensors.values())
    first = next(values)
    if isinstance(first, Tensor) and (ndim is None or first.dim() == ndim):
        shape = first.shape
        if all(isinstance(t, Tensor) and t.shape == shape for t in values):
            return
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


def read_scalars(scalars: Sequence[Tensor]) -> list[float]:
    """Host values of 0-d tensors: one stack and one synchronisation on an accelerator; plain reads on the CPU,
    where a read costs no synchronisation and the stack would be one more kernel."""
    if scalars[0].device.type == "cpu":
        return [float(x) for x in scalars]
    return torch.stack([x.to(scalars[0].dtype) for x in scalars]).tolist()


def _check_positive(name: str, low: float, high: float) -> None:
    if not 0 < low <= high < math.inf:
        raise ValueError(f"{name} must be finite and > 0 everywhere (token counts), got min {low}, max {high}")


def check_inputs_finite(
    witness: Tensor, inputs: Mapping[str, Tensor], labels: Tensor | None = None, *, label_name: str = "labels",
    positive: Mapping[str, Tensor] | None = None,
) -> None:
    """Validate a call with at most one reduction per checked tensor and one host read.

    ``witness`` is a tensor computed from every entry of ``inputs`` (e.g. Δ = ρ_w − ρ_l) whose sum is finite iff all
    inputs are (barring overflow, e.g. an fp16 sum above 65504, which the per-input fallback tolerates); a 0-d
    witness is used as is (e.g. a BCE-with-logits loss already reduced over the batch, which is non-finite for any
    non-finite logit). ``labels``, if given, must lie in ``[0, 1]``; each tensor of ``positive`` (e.g. token
    counts) must be finite and > 0. On CUDA their min and max are read back together with the witness (one
    synchronisation); elsewhere each is read directly. Raises ``ValueError`` naming the offending argument.
    """
    if not witness.is_cuda:  # off CUDA a read costs no synchronisation: read each scalar, no stack kernel
        # One aminmax per ranged input (measured cheaper in a training step than min + max, or clamp + equal).
        if labels is not None and labels.numel():
            lo, hi = torch.aminmax(_plain(labels))
            if not 0.0 <= float(lo) <= float(hi) <= 1.0:  # NaN fails every comparison
                check_labels(label_name, labels)
        for name, t in (positive or {}).items():
            if t.numel():
                lo, hi = torch.aminmax(_plain(t))
                _check_positive(name, float(lo), float(hi))
        plain = _plain(witness)
        if not math.isfinite((plain.sum() if plain.dim() else plain).item()):
            check_all_finite(inputs)
        return
    _check_inputs_one_read(witness.detach(), inputs, labels, label_name, positive)


def _plain(t: Tensor) -> Tensor:
    """``t`` without autograd history (a detach only when needed: each op counts on a small batch)."""
    return t.detach() if t.requires_grad else t


def _check_inputs_one_read(witness: Tensor, inputs: Mapping[str, Tensor], labels: Tensor | None, label_name: str,
                           positive: Mapping[str, Tensor] | None) -> None:
    """:func:`check_inputs_finite` with every scalar stacked and read back at once (one CUDA synchronisation)."""
    scalars = [witness.sum() if witness.dim() else witness]
    has_labels = labels is not None and labels.numel() > 0
    if has_labels:
        assert labels is not None
        scalars += list(torch.aminmax(labels.detach()))
    checked = {name: t for name, t in (positive or {}).items() if t.numel()}
    for t in checked.values():
        scalars += list(torch.aminmax(t.detach()))
    values = read_scalars(scalars)
    if has_labels and not 0.0 <= values[1] <= values[2] <= 1.0:  # NaN fails every comparison
        assert labels is not None
        check_labels(label_name, labels)
    rest = values[3 if has_labels else 1:]
    for k, name in enumerate(checked):
        _check_positive(name, rest[2 * k], rest[2 * k + 1])
    if not math.isfinite(values[0]):
        check_all_finite(inputs)


class LossMetrics(Mapping[str, float]):
    """Read-only ``{name: float}`` of one loss call, computed on first read from detached per-pair tensors.

    ``compute(*tensors)`` returns the metrics dict and must only close over Python numbers; the tensors (or
    ``None`` for absent optional ones) are held as given and passed in detached, under ``no_grad``, on first read.
    Until then the metrics keep those tensors (and, like the loss, their autograd nodes) alive; afterwards only
    the floats. Detaching at construction would cost about as much as one more element-wise kernel per tensor.
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
