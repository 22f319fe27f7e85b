"""A learned reward model (or ensemble) used as a teacher: the cheap labeller of uncertainty routing."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mmalign.core.reward_models import RewardEnsemble, RewardModel
from mmalign.core.teachers.base import SegmentPairBatch, Teacher, TeacherLabels, label_metrics, uniform
from mmalign.core.validation import check_positive

__all__ = ["RewardModelTeacher"]


class RewardModelTeacher(Teacher):
    """Labels pairs by a reward model's ``P(first ≻ second) = σ(β (R̂¹ − R̂²))`` on the given obs/actions.

    For an ensemble the probability is the member mean of ``σ(β Δₖ)``. ``sample=False`` (default) returns the soft
    probability; ``hard=True`` returns ``1[p > 0.5]`` (0.5 on ties); ``sample=True`` draws Bernoulli labels.
    ``member_logits`` from the last call are kept in :attr:`last_member_logits` (``[K, N]``) for routing.
    """

    needs_true_reward = False  # it reads observations and actions only

    def __init__(
        self, model: RewardModel | RewardEnsemble, beta: float = 1.0, sample: bool = False, hard: bool = False
    ) -> None:
        if not isinstance(model, (RewardModel, RewardEnsemble)):
            raise ValueError(f"model must be a RewardModel or RewardEnsemble, got {type(model).__name__}")
        check_positive("beta", beta)
        if sample and hard:
            raise ValueError("sample and hard are exclusive, got both True")
        self.model, self.beta, self.sample, self.hard = model, float(beta), bool(sample), bool(hard)
        self.last_member_logits: Tensor | None = None

    @property
    def stochastic(self) -> bool:
        return self.sample

    def member_logits(self, batch: SegmentPairBatch) -> Tensor:
        """``[K, N]`` logits ``β (R̂ₖ(σ¹) − R̂ₖ(σ²))`` on the model's device, without gradients."""
        if batch.obs_first is None or batch.obs_second is None:
            raise ValueError("obs_first and obs_second are required by RewardModelTeacher, got None")
        param = next(self.model.parameters())

        def _t(x: Tensor) -> Tensor:
            # Floating inputs take the model's dtype; integer pixels stay integer (the CNN scales uint8 itself).
            return x.to(param.device, param.dtype) if x.is_floating_point() else x.to(param.device)

        def _opt(x: Tensor | None) -> Tensor | None:
            return None if x is None else _t(x)

        with torch.no_grad():
            r1 = self.model.segment_returns(_t(batch.obs_first), _opt(batch.act_first), _opt(batch.mask_first))
            r2 = self.model.segment_returns(_t(batch.obs_second), _opt(batch.act_second), _opt(batch.mask_second))
        logits = self.beta * (r1 - r2)
        return logits if logits.dim() == 2 else logits.unsqueeze(0)

    def _label(self, batch: SegmentPairBatch, rng: torch.Generator | None) -> TeacherLabels:
        logits = self.member_logits(batch)
        self.last_member_logits = logits
        probs = torch.sigmoid(logits).mean(0).to(batch.rewards_first.device, torch.float32)
        if self.hard:
            labels = (torch.sign(probs - 0.5) + 1.0) * 0.5
        elif self.sample:
            assert rng is not None
            labels = (uniform(len(probs), rng, probs.device) < probs).to(torch.float32)
        else:
            labels = probs.clone()
        answered = torch.ones_like(probs, dtype=torch.bool)
        metrics = label_metrics(labels, probs, answered)
        metrics["teacher/member_disagreement"] = (
            float(torch.sigmoid(logits).std(0, unbiased=False).mean()) if logits.shape[0] > 1 else math.nan
        )
        return TeacherLabels(labels, answered, metrics, probs)
