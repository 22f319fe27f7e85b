"""A batch of labelled segment pairs as torch tensors (what reward-model training consumes)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor

from mmalign.core.validation import check_labels

__all__ = ["SegmentPairs"]


@dataclass
class SegmentPairs:
    """``N`` labelled pairs of ``H``-step segments.

    obs_first, obs_second: ``[N, H, *obs_shape]``; act_first, act_second: ``[N, H, act_dim]`` or ``None``;
    labels: ``[N]`` ``P(first ≻ second)`` in ``[0, 1]`` (skipped pairs must be removed first, see
    :meth:`from_teacher`); mask_first, mask_second: ``[N, H]`` bool or ``None``.
    """

    obs_first: Tensor
    obs_second: Tensor
    labels: Tensor
    act_first: Tensor | None = None
    act_second: Tensor | None = None
    mask_first: Tensor | None = None
    mask_second: Tensor | None = None

    def __post_init__(self) -> None:
        n = self.labels.shape[0] if isinstance(self.labels, Tensor) and self.labels.dim() == 1 else None
        if n is None:
            raise ValueError(f"labels must be a 1-D tensor, got {self.labels!r}")
        check_labels("labels", self.labels)
        lead = tuple(self.obs_first.shape[:2])
        if len(lead) != 2 or lead[0] != n:
            raise ValueError(f"obs_first must be [N={n}, H, ...], got shape {tuple(self.obs_first.shape)}")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "labels" or value is None:
                continue
            if not isinstance(value, Tensor) or tuple(value.shape[:2]) != lead:
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"{f.name} must be a tensor with leading shape {lead}, got {got}")
        if (self.act_first is None) != (self.act_second is None):
            raise ValueError("act_first and act_second must both be given or both be None")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @classmethod
    def from_teacher(
        cls,
        out: Any,
        obs_first: Tensor,
        obs_second: Tensor,
        act_first: Tensor | None = None,
        act_second: Tensor | None = None,
        mask_first: Tensor | None = None,
        mask_second: Tensor | None = None,
    ) -> "SegmentPairs":
        """Keep the pairs a teacher answered (``out`` is a ``TeacherLabels``); skipped pairs are dropped."""
        keep = out.answered.to(torch.bool)
        pairs = cls(obs_first, obs_second, torch.zeros(len(keep)), act_first, act_second, mask_first, mask_second)
        pairs = pairs.subset(keep)
        pairs.labels = out.labels[keep.to(out.labels.device)].to(torch.float32).to(obs_first.device)
        check_labels("labels", pairs.labels)
        return pairs

    def subset(self, index: Tensor) -> "SegmentPairs":
        """Rows ``index`` (long or bool tensor) of every field."""
        taken = {f.name: _take(getattr(self, f.name), index) for f in fields(self)}
        return replace(self, **taken)  # type: ignore[arg-type]

    def to(self, device: torch.device | str) -> "SegmentPairs":
        moved = {f.name: _move(getattr(self, f.name), device) for f in fields(self)}
        return replace(self, **moved)  # type: ignore[arg-type]

    def split(self, val_fraction: float, generator: torch.Generator) -> tuple["SegmentPairs", "SegmentPairs"]:
        """Random (train, validation) split with ``round(val_fraction·N)`` validation pairs (at least 1 each)."""
        if not 0.0 < val_fraction < 1.0 or len(self) < 2:
            raise ValueError(f"val_fraction must be in (0, 1) with N >= 2, got {val_fraction} and N={len(self)}")
        perm = torch.randperm(len(self), generator=generator)
        n_val = min(max(1, round(val_fraction * len(self))), len(self) - 1)
        return self.subset(perm[n_val:]), self.subset(perm[:n_val])


def _take(value: Tensor | None, index: Tensor) -> Tensor | None:
    return None if value is None else value[index.to(value.device)]


def _move(value: Tensor | None, device: torch.device | str) -> Tensor | None:
    return None if value is None else value.to(device)
