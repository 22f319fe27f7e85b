"""Input checks shared by the core losses, teachers and reward models.

Every check raises ``ValueError`` naming the argument, the offending value and what was expected, before any work
starts. Tensor checks are written to be cheap on large batches: :func:`check_all_finite` reduces all tensors to one
scalar sum (a sum is finite exactly when every summand is finite) and only looks at tensors one by one to name the
culprit when that sum is not finite. The one ``.item()`` it needs is a single host synchronisation per call.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

# The scalar checks are the config module's (torch-free, so configs validate without importing torch): one
# implementation, one wording of the errors.
from mmalign.config import check_choice, check_nonnegative, check_positive, check_range

__all__ = [
    "REDUCTIONS",
    "check_tensor",
    "check_ndim",
    "check_finite",
    "check_all_finite",
    "check_same_shape",
    "check_shape",
    "check_labels",
    "check_mask",
    "check_positive",
    "check_nonnegative",
    "check_range",
    "check_beta",
    "check_eps",
    "check_reduction",
    "reduce_loss",
]

REDUCTIONS = ("mean", "sum", "none")


def _fail(name: str, value: Any, expected: str) -> None:
    raise ValueError(f"{name} must be {expected}, got {_describe(value)}")


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return repr(value)


def check_beta(value: float, name: str = "beta") -> None:
    """Inverse temperature / KL coefficient: finite and > 0."""
    check_positive(name, value)


def check_eps(value: float, name: str = "eps") -> None:
    """Label-flip rate or smoothing: in ``[0, 0.5)`` (at 0.5 the labels carry no information)."""
    check_range(name, value, 0.0, 0.5, high_open=True)


def check_reduction(reduction: str, name: str = "reduction") -> None:
    """``reduction`` is one of :data:`REDUCTIONS`."""
    check_choice(name, reduction, REDUCTIONS)


# --------------------------------------------------------------------------------------------------- tensors


def check_tensor(name: str, value: Any, *, floating: bool = True) -> None:
    """``value`` is a ``torch.Tensor`` (of floating dtype unless ``floating=False``)."""
    if not isinstance(value, Tensor):
        _fail(name, value, "a torch.Tensor")
    if floating and not value.is_floating_point():
        _fail(name, value, "a floating-point tensor")


def check_ndim(name: str, value: Tensor, ndim: int) -> None:
    """``value`` is a tensor with exactly ``ndim`` dimensions."""
    check_tensor(name, value, floating=False)
    if value.dim() != ndim:
        _fail(name, value, f"a {ndim}-D tensor")


def check_shape(name: str, value: Tensor, shape: Sequence[int]) -> None:
    """``value`` has exactly ``shape``."""
    check_tensor(name, value, floating=False)
    if tuple(value.shape) != tuple(shape):
        _fail(name, value, f"a tensor of shape {tuple(shape)}")


def check_same_shape(tensors: Mapping[str, Tensor]) -> None:
    """All tensors in ``{argument name: tensor}`` share the shape of the first one."""
    items = list(tensors.items())
    if not items:
        return
    first_name, first = items[0]
    check_tensor(first_name, first, floating=False)
    for name, value in items[1:]:
        check_tensor(name, value, floating=False)
        if value.shape != first.shape:
            _fail(name, value, f"the same shape as {first_name} {tuple(first.shape)}")


def check_finite(name: str, value: Tensor) -> None:
    """Every element of ``value`` is finite (no NaN, no ±inf)."""
    check_tensor(name, value, floating=False)
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        bad = value[~torch.isfinite(value)].flatten()[:3].tolist()
        _fail(name, value, f"finite everywhere (found non-finite values such as {bad})")


def check_all_finite(tensors: Mapping[str, Tensor]) -> None:
    """Every element of every tensor is finite; one fused reduction in the common (all finite) case."""
    floats = [t for t in tensors.values() if isinstance(t, Tensor) and t.is_floating_point()]
    if not floats:
        return
    with torch.no_grad():
        total = floats[0].detach().sum(dtype=torch.float64)
        for t in floats[1:]:
            total = total + t.detach().sum(dtype=torch.float64)
        if math.isfinite(float(total)):
            return
    # The sum can only be non-finite if some element is (float64 accumulation does not overflow for float32
    # inputs); find and name the culprit.
    for name, value in tensors.items():
        check_finite(name, value)


def check_labels(name: str, labels: Tensor) -> None:
    """Preference labels ``P(first ≻ second)``: a floating tensor with every value in ``[0, 1]``."""
    check_tensor(name, labels)
    if labels.numel() == 0:
        return
    labels = labels.detach()
    lo, hi = float(labels.min()), float(labels.max())
    if not 0.0 <= lo <= hi <= 1.0:  # NaN fails every comparison
        bad = labels[~((labels >= 0) & (labels <= 1))].flatten()[:3].tolist()
        _fail(name, labels, f"P(first preferred) with every value in [0, 1] (found {bad})")


def check_mask(name: str, mask: Tensor, shape: Sequence[int]) -> None:
    """A validity mask: boolean (or 0/1) tensor of ``shape``."""
    check_shape(name, mask, shape)
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            _fail(name, mask, "a boolean tensor or one holding only 0 and 1")


# --------------------------------------------------------------------------------------------------- reduction


def reduce_loss(per_example: Tensor, reduction: str, weight: Tensor | None = None) -> Tensor:
    """Reduce per-example losses: ``"mean"``, ``"sum"`` or ``"none"``.

    With ``weight`` (e.g. a 0/1 mask of non-skipped pairs), ``"mean"`` is ``sum(w·l) / max(sum(w), 1)`` and
    ``"none"`` returns ``w·l``.
    """
    if weight is not None:
        per_example = per_example * weight.to(per_example.dtype)
    if reduction == "none":
        return per_example
    if reduction == "sum":
        return per_example.sum()
    if weight is None:
        return per_example.mean()
    return per_example.sum() / weight.to(per_example.dtype).sum().clamp_min(1.0)
