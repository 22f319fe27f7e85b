"""Reward-model ensembles: K members, member-wise returns, mean/std, disagreement and conservative aggregation.

Aggregation modes (Coste et al. 2023, "Reward Model Ensembles Help Mitigate Overoptimization"): ``mean``;
``min`` (worst-case, WCO); ``mean_minus_std`` (``mean − λ·std``) and ``mean_minus_var`` (uncertainty-weighted,
UWO, ``mean − λ·var``). Disagreement for active querying is the std across members of ``P(first ≻ second)``
(PEBBLE / B-Pref ``feed_type=1``).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from mmalign.core.reward_models.artifact import SavePretrainedMixin
from mmalign.core.reward_models.nets import RewardModel
from mmalign.core.rng import seeded_global_rng

__all__ = ["RewardEnsemble", "aggregate", "AGGREGATIONS"]

AGGREGATIONS = ("mean", "min", "mean_minus_std", "mean_minus_var")


def aggregate(values: Tensor, mode: str = "mean", coef: float = 1.0) -> Tensor:
    """Combine member values ``[K, ...]`` into ``[...]`` with one of :data:`AGGREGATIONS` (``coef`` = λ)."""
    if mode not in AGGREGATIONS:
        raise ValueError(f"mode must be one of {list(AGGREGATIONS)}, got {mode!r}")
    if values.dim() < 1 or values.shape[0] < 1:
        raise ValueError(f"values must have a leading member dim K >= 1, got shape {tuple(values.shape)}")
    if mode == "mean":
        return values.mean(0)
    if mode == "min":
        return values.min(0).values
    spread = values.std(0, unbiased=False)
    return values.mean(0) - coef * (spread if mode == "mean_minus_std" else spread**2)


class RewardEnsemble(nn.Module, SavePretrainedMixin):
    """``K`` reward models with the same input signature; every method returns a leading member dim ``K``.

    Examples:
        >>> import torch
        >>> from mmalign.core.reward_models import MLPRewardModel, RewardEnsemble
        >>> ensemble = RewardEnsemble.build(lambda: MLPRewardModel(obs_dim=3, hidden=(8,)), size=3, seed=0)
        >>> ensemble.segment_returns(torch.zeros(4, 5, 3)).shape  # [K members, N segments]
        torch.Size([3, 4])
    """

    def __init__(self, members: Sequence[RewardModel]) -> None:
        super().__init__()
        if len(members) < 1 or not all(isinstance(m, RewardModel) for m in members):
            raise ValueError(f"members must be a non-empty sequence of RewardModel, got {members!r}")
        self.members = nn.ModuleList(members)

    @classmethod
    def build(cls, factory: Callable[[], RewardModel], size: int, seed: int) -> "RewardEnsemble":
        """``size`` members from ``factory()``, each initialised under seed ``seed + k`` (reproducible)."""
        if int(size) < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        members = []
        for k in range(int(size)):
            with seeded_global_rng(int(seed) + k):
                members.append(factory())
        return cls(members)

    def __len__(self) -> int:
        return len(self.members)

    def _models(self) -> list[RewardModel]:
        """The members, typed (``nn.ModuleList`` iterates as plain modules)."""
        return [m for m in self.members if isinstance(m, RewardModel)]

    @property
    def act_dim(self) -> int:
        return self._models()[0].act_dim

    def step_rewards(self, obs: Tensor, act: Tensor | None = None, *, normalize: bool = False) -> Tensor:
        """``[K, N, H]`` per-step rewards of every member."""
        return torch.stack([m.step_rewards(obs, act, normalize=normalize) for m in self._models()])

    forward = step_rewards

    def segment_returns(
        self, obs: Tensor, act: Tensor | None = None, mask: Tensor | None = None, *, normalize: bool = False
    ) -> Tensor:
        """``[K, N]`` segment returns of every member."""
        return torch.stack([m.segment_returns(obs, act, mask, normalize=normalize) for m in self._models()])

    def pair_logits(
        self,
        obs_first: Tensor,
        obs_second: Tensor,
        act_first: Tensor | None = None,
        act_second: Tensor | None = None,
        mask_first: Tensor | None = None,
        mask_second: Tensor | None = None,
    ) -> Tensor:
        """``[K, N]`` member logits ``R̂ₖ(σ¹) − R̂ₖ(σ²)`` of ``P(first ≻ second)``."""
        return self.segment_returns(obs_first, act_first, mask_first) - self.segment_returns(
            obs_second, act_second, mask_second
        )

    def mean_std(self, obs: Tensor, act: Tensor | None = None, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Mean and (population) std across members of the segment returns, each ``[N]``."""
        r = self.segment_returns(obs, act, mask)
        return r.mean(0), r.std(0, unbiased=False)

    def aggregate_rewards(
        self, obs: Tensor, act: Tensor | None = None, mode: str = "mean", coef: float = 1.0, normalize: bool = False
    ) -> Tensor:
        """Per-step rewards combined across members (e.g. for relabelling a replay buffer)."""
        return aggregate(self.step_rewards(obs, act, normalize=normalize), mode, coef)

    def fit_normalization(self, obs: Tensor, act: Tensor | None = None, mask: Tensor | None = None) -> None:
        """Fit each member's reward normalisation on the same data."""
        for m in self._models():
            m.fit_normalization(obs, act, mask)

    @staticmethod
    def disagreement(member_logits: Tensor) -> Tensor:
        """Std across members of ``σ(logit)`` = ``P(first ≻ second)``: ``[K, N] -> [N]``."""
        return torch.sigmoid(member_logits).std(0, unbiased=False)
