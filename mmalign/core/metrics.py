"""Evaluation metrics for preference models: accuracy (ties half credit), calibration error, return correlations.

Torch only (no scipy): numpy inputs are converted. All functions accept an optional boolean ``mask`` selecting
the pairs/items to score (e.g. ``TeacherLabels.answered``) and return a Python float.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mmalign.core.validation import check_labels, check_positive

__all__ = ["preference_accuracy", "preference_credit", "expected_calibration_error", "pearson", "spearman", "rankdata"]


def _vec(name: str, value: Any) -> Tensor:
    t = value if isinstance(value, Tensor) else torch.as_tensor(np.asarray(value))
    t = t.detach().to(torch.float64)
    if t.dim() != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        bad = t[~torch.isfinite(t)][:3].tolist()
        raise ValueError(f"{name} must be finite, got values such as {bad}")
    return t


def _select(mask: Any, *tensors: Tensor) -> tuple[Tensor, ...]:
    if mask is None:
        return tensors
    m = mask if isinstance(mask, Tensor) else torch.as_tensor(np.asarray(mask))
    if m.dtype != torch.bool or tuple(m.shape) != tuple(tensors[0].shape):
        expected = tuple(tensors[0].shape)
        raise ValueError(f"mask must be a bool array of shape {expected}, got {m.dtype} {tuple(m.shape)}")
    m = m.to(tensors[0].device)
    return tuple(t[m] for t in tensors)


def _pair_inputs(name: str, pred: Any, labels: Any, mask: Any) -> tuple[Tensor, Tensor]:
    # NaN labels at skipped pairs are allowed when the mask removes them, so select before validating.
    p_raw = pred if isinstance(pred, Tensor) else torch.as_tensor(np.asarray(pred))
    y_raw = labels if isinstance(labels, Tensor) else torch.as_tensor(np.asarray(labels))
    if p_raw.dim() != 1 or tuple(y_raw.shape) != tuple(p_raw.shape):
        got = f"{tuple(p_raw.shape)} and {tuple(y_raw.shape)}"
        raise ValueError(f"{name} and labels must be 1-D of equal shape, got {got}")
    p_raw, y_raw = _select(mask, p_raw.detach().cpu(), y_raw.detach().cpu())
    p, y = _vec(name, p_raw), _vec("labels", y_raw)
    check_labels("labels", y)
    return p, y


def preference_accuracy(logits: Any, labels: Any, mask: Any = None) -> float:
    """Fraction of pairs whose predicted direction matches the label; a tie on either side earns half credit.

    ``logits`` ``[N]``: predicted ``r̂₁ − r̂₂`` (or any score whose sign is the predicted preference; pass
    ``probs − 0.5`` for probabilities). ``labels`` ``[N]``: ``P(first ≻ second)``. Credit per pair is 1 when
    ``sign(logit) == sign(label − 0.5)`` (so a predicted tie on a tie scores 1), 0.5 when exactly one side is a tie,
    0 otherwise. Returns NaN for an empty selection.
    """
    s, y = _pair_inputs("logits", logits, labels, mask)
    if s.numel() == 0:
        return math.nan
    return float(preference_credit(s, y).mean())


def preference_credit(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-pair credit of :func:`preference_accuracy` (1, 0.5 or 0), unvalidated, on the inputs' device."""
    a, b = torch.sign(logits.detach()), torch.sign(labels.detach().to(logits.dtype) - 0.5)
    half = torch.full_like(a, 0.5).masked_fill_((a != 0) & (b != 0), 0.0)
    return torch.where(a == b, torch.ones_like(a), half)


def expected_calibration_error(probs: Any, labels: Any, mask: Any = None, num_bins: int = 15) -> float:
    """ECE of predicted ``P(first ≻ second)``: ``Σ_b (n_b/N)·|mean(p̂_b) − mean(y_b)|`` over equal-width bins.

    Binned on the probability of the *first* item (a reliability diagram of the binary event), which is symmetric
    under swapping the pair; soft labels count as their expectation. Bins are ``[0, 1/B), ..., [(B−1)/B, 1]``.
    """
    check_positive("num_bins", num_bins)
    p, y = _pair_inputs("probs", probs, labels, mask)
    check_labels("probs", p)
    if p.numel() == 0:
        return math.nan
    idx = (p * num_bins).long().clamp_(0, num_bins - 1)
    count = torch.bincount(idx, minlength=num_bins).to(torch.float64)
    sum_p = torch.bincount(idx, weights=p, minlength=num_bins)
    sum_y = torch.bincount(idx, weights=y, minlength=num_bins)
    return float((sum_p - sum_y).abs().sum() / p.numel())


def rankdata(x: Tensor) -> Tensor:
    """Ranks 1..N of a 1-D tensor with ties given their average rank (scipy's ``rankdata(method="average")``)."""
    n = x.numel()
    order = torch.argsort(x, stable=True)
    sorted_x = x[order]
    # Group equal values: a new group starts wherever the sorted value changes.
    new_group = torch.ones(n, dtype=torch.bool, device=x.device)
    new_group[1:] = sorted_x[1:] != sorted_x[:-1]
    group = torch.cumsum(new_group.long(), 0) - 1
    positions = torch.arange(1, n + 1, dtype=torch.float64, device=x.device)
    num_groups = int(group[-1]) + 1 if n else 0
    total = torch.zeros(num_groups, dtype=torch.float64, device=x.device).index_add_(0, group, positions)
    size = torch.bincount(group, minlength=num_groups).to(torch.float64)
    ranks = torch.empty(n, dtype=torch.float64, device=x.device)
    ranks[order] = (total / size)[group]
    return ranks


def _xy(x: Any, y: Any, mask: Any) -> tuple[Tensor, Tensor]:
    # Select before validating, so that NaN at masked-out items (e.g. skipped pairs) is allowed.
    a_raw = x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
    b_raw = y if isinstance(y, Tensor) else torch.as_tensor(np.asarray(y))
    if tuple(a_raw.shape) != tuple(b_raw.shape):
        raise ValueError(f"x and y must have equal shape, got {tuple(a_raw.shape)} and {tuple(b_raw.shape)}")
    a_raw, b_raw = _select(mask, a_raw.detach().cpu(), b_raw.detach().cpu())
    return _vec("x", a_raw), _vec("y", b_raw)


def pearson(x: Any, y: Any, mask: Any = None) -> float:
    """Pearson correlation between e.g. learned and true returns ``[N]``; NaN if either side is constant."""
    a, b = _xy(x, y, mask)
    if a.numel() < 2 or bool(a.min() == a.max()) or bool(b.min() == b.max()):
        # constant side: tested exactly, since rounding in ``a - a.mean()`` leaves ~1e-17 residues, not zeros
        return math.nan
    a, b = a - a.mean(), b - b.mean()
    denom = float(a.norm() * b.norm())
    return float((a * b).sum()) / denom if denom > 0 else math.nan


def spearman(x: Any, y: Any, mask: Any = None) -> float:
    """Spearman rank correlation (Pearson on average-tie ranks); NaN if either side is constant."""
    a, b = _xy(x, y, mask)
    return pearson(rankdata(a), rankdata(b))
