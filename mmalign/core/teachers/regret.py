"""Regret teacher (Knox et al. 2022/2024): prefers the segment with the larger summed optimal advantage.

``P(σ¹ ≻ σ²) = σ(β (Σ_t γ^t A*(s¹_t, a¹_t) − Σ_t γ^t A*(s²_t, a²_t)))`` — logistic in negated regret, because
``regret(σ) = V*(s_0) − (Σ_t r_t + V*(s_H)) = −Σ_t A*(s_t, a_t)`` under deterministic transitions. ``β = ∞`` gives
CPL's deterministic oracle labels (jhejna/cpl ``add_pref_labels.py``: hard ``1[score₁ > score₂]``, 0.5 on ties).
All B-Pref knobs (mistake, skip, equal, myopic) apply on top, to the advantage sums.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from mmalign.core.teachers.base import SegmentPairBatch
from mmalign.core.teachers.bpref import SimulatedHuman
from mmalign.core.validation import check_all_finite, check_range

__all__ = ["RegretTeacher", "AdvantageFn"]

#: ``advantage_fn(obs [N, H, ...], act [N, H, ...]) -> A*(s_t, a_t) [N, H]`` (torch tensors in and out).
AdvantageFn = Callable[[Tensor, Tensor], Tensor]


class RegretTeacher(SimulatedHuman):
    """Knox et al.'s regret preference model given an optimal-advantage function on ``(obs, act)``.

    Args:
        advantage_fn: ``A*(obs, act)`` returning ``[N, H]``; called once per side, without gradients.
        discount: ``γ`` of ``Σ_t γ^t A*`` in ``(0, 1]`` (CPL's code uses 1).
        beta, gamma, eps_mistake, eps_skip, eps_equal, sample, return_scale, return_reference: as
            :class:`SimulatedHuman` (``return_scale`` is then the mean summed advantage of a segment; optimal
            advantages are ``≤ 0``, so skip/equal need ``calibrate(..., reference="min")``).
    """

    def __init__(self, advantage_fn: AdvantageFn, discount: float = 1.0, beta: float = math.inf, **kwargs: object):
        if not callable(advantage_fn):
            raise ValueError(f"advantage_fn must be callable, got {type(advantage_fn).__name__}")
        check_range("discount", discount, 0.0, 1.0, low_open=True)
        super().__init__(beta=beta, **kwargs)  # type: ignore[arg-type]
        self.advantage_fn = advantage_fn
        self.discount = float(discount)

    def utilities(self, batch: SegmentPairBatch) -> tuple[Tensor, Tensor]:
        """Discounted optimal advantages ``γ^t A*(s_t, a_t)`` of both segments, ``[N, H]`` each."""
        out = []
        for side in ("first", "second"):
            obs, act = getattr(batch, f"obs_{side}"), getattr(batch, f"act_{side}")
            if obs is None or act is None:
                raise ValueError(f"obs_{side} and act_{side} are required by RegretTeacher, got None")
            with torch.no_grad():
                adv = self.advantage_fn(obs, act)
            ref = getattr(batch, f"rewards_{side}")  # the sides may differ in length H
            if not isinstance(adv, Tensor) or tuple(adv.shape) != tuple(ref.shape):
                shape = tuple(adv.shape) if isinstance(adv, Tensor) else type(adv).__name__
                raise ValueError(f"advantage_fn must return a tensor of shape {tuple(ref.shape)}, got {shape}")
            check_all_finite({f"advantage_fn(obs_{side}, act_{side})": adv})
            adv = adv.to(device=ref.device, dtype=torch.promote_types(adv.dtype, torch.float32))
            if self.discount != 1.0:
                adv = adv * self.discount ** torch.arange(adv.shape[1], device=adv.device, dtype=adv.dtype)
            out.append(adv)
        return out[0], out[1]
