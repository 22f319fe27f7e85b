"""Teachers built on other teachers: a known-rate label flipper and the RLHS hindsight teacher."""

from __future__ import annotations

import math
from typing import Callable, Literal, Union

import torch
from torch import Tensor

from mmalign.core.teachers.base import SegmentPairBatch, Teacher, TeacherLabels, label_metrics, masked_sum, uniform
from mmalign.core.validation import check_all_finite, check_eps

__all__ = ["LabelFlipTeacher", "HindsightTeacher", "ConsequenceSimulator", "HINDSIGHT_MODES"]


class LabelFlipTeacher(Teacher):
    """Wraps any teacher and flips each answered label (``y → 1 − y``) with a known probability ``flip_rate``.

    This is the noise model robust DPO (Chowdhury et al. 2024) corrects for, and AlpacaFarm's training-time
    annotator noise (``p_label_flip = 0.25``). Ties stay 0.5; skipped pairs stay skipped.

    Examples:
        >>> import torch
        >>> from mmalign.core.teachers import LabelFlipTeacher, SimulatedHuman
        >>> flipping = LabelFlipTeacher(SimulatedHuman(), flip_rate=0.4)
        >>> labels = flipping(torch.ones(1000, 1), torch.zeros(1000, 1), rng=0).labels  # the oracle says 1 every time
        >>> round(1.0 - labels.mean().item(), 2)  # about 40% flipped
        0.4
    """

    def __init__(self, base: Teacher, flip_rate: float) -> None:
        if not isinstance(base, Teacher):
            raise ValueError(f"base must be a Teacher, got {type(base).__name__}")
        check_eps(flip_rate, "flip_rate")
        self.base = base
        self.flip_rate = float(flip_rate)

    @property
    def stochastic(self) -> bool:
        return self.flip_rate > 0 or self.base.stochastic

    def _label(self, batch: SegmentPairBatch, rng: torch.Generator | None) -> TeacherLabels:
        out = self.base.label_batch(batch, rng=rng)
        if self.flip_rate == 0:
            return out
        assert rng is not None
        flipped = (uniform(len(out), rng, out.labels.device) < self.flip_rate) & out.answered
        labels = torch.where(flipped, 1.0 - out.labels, out.labels)
        base_p = out.probs if out.probs is not None else out.labels
        probs = (1.0 - self.flip_rate) * base_p + self.flip_rate * (1.0 - base_p)
        metrics = {k: v for k, v in out.metrics.items() if k.startswith("teacher/") and "label" not in k}
        metrics.update(label_metrics(labels, probs, out.answered))
        n = int(out.answered.sum())
        metrics["teacher/flip_rate"] = float(flipped.sum()) / n if n else math.nan
        return TeacherLabels(labels, out.answered, metrics, probs)


#: ``simulator(rewards [N, H], mask [N, H] | None, obs, act, *, horizon, reveal, rng)`` returns the realised
#: outcome utilities ``[N, T']`` (or ``(utilities, mask)``) of the segments it is given.
ConsequenceSimulator = Callable[..., Union[Tensor, "tuple[Tensor, Tensor]"]]
HINDSIGHT_MODES = ("immediate", "partial", "full")


class HindsightTeacher(Teacher):
    """RLHS (Liang et al. 2025): roll each outcome forward with a consequence simulator, then judge the outcome.

    Modes:
        ``immediate`` (foresight, the RLHF baseline): the judge sees the segment rewards as given (the evaluator's
        predicted utility at interaction time); the simulator is not called.
        ``partial``: the simulator reveals the consequences of each segment's own outcome for ``horizon`` steps
        (``reveal="partial"``); RLHS's default.
        ``full``: the simulator rolls to the end (``horizon=None``) and may reveal hidden information about the
        alternatives too (``reveal="full"``, RLHS's oracle hindsight).

    The judge (any reward-based teacher, e.g. a :class:`SimulatedHuman`) labels the realised utilities; with
    ``include_segment_rewards`` the segment's own rewards are prepended (control tasks, where the segment's
    reward is real); without it (the RLHS marketplace) the predicted utility is replaced by the realised one.
    """

    def __init__(
        self,
        judge: Teacher,
        simulator: ConsequenceSimulator,
        mode: Literal["immediate", "partial", "full"] = "partial",
        horizon: int | None = None,
        include_segment_rewards: bool = False,
    ) -> None:
        if not isinstance(judge, Teacher):
            raise ValueError(f"judge must be a Teacher, got {type(judge).__name__}")
        if not callable(simulator):
            raise ValueError(f"simulator must be callable, got {type(simulator).__name__}")
        if mode not in HINDSIGHT_MODES:
            raise ValueError(f"mode must be one of {list(HINDSIGHT_MODES)}, got {mode!r}")
        if mode == "partial" and (not isinstance(horizon, int) or isinstance(horizon, bool) or horizon < 1):
            raise ValueError(f"horizon must be an int >= 1 for partial hindsight, got {horizon!r}")
        self.judge, self.simulator, self.mode = judge, simulator, mode
        self.horizon = horizon if mode == "partial" else None
        self.include_segment_rewards = bool(include_segment_rewards)

    @property
    def stochastic(self) -> bool:
        # The simulator may sample outcomes, so it always receives a generator.
        return self.mode != "immediate" or self.judge.stochastic

    def _rollout(self, batch: SegmentPairBatch, side: str, rng: torch.Generator | None) -> tuple[Tensor, Tensor]:
        rewards, mask = getattr(batch, f"rewards_{side}"), getattr(batch, f"mask_{side}")
        out = self.simulator(
            rewards, mask, getattr(batch, f"obs_{side}"), getattr(batch, f"act_{side}"),
            horizon=self.horizon, reveal=self.mode, rng=rng,
        )
        future, fmask = out if isinstance(out, tuple) else (out, None)
        if not isinstance(future, Tensor) or future.dim() != 2 or future.shape[0] != rewards.shape[0]:
            got = tuple(future.shape) if isinstance(future, Tensor) else type(future).__name__
            raise ValueError(f"simulator must return a [N={rewards.shape[0]}, T] tensor for {side}, got {got}")
        check_all_finite({f"simulator output ({side})": future})
        future = future.to(device=rewards.device, dtype=rewards.dtype)
        fmask = torch.ones_like(future, dtype=torch.bool) if fmask is None else fmask.to(future.device, torch.bool)
        if not self.include_segment_rewards:
            return future, fmask
        seg_mask = torch.ones_like(rewards, dtype=torch.bool) if mask is None else mask
        return torch.cat([rewards, future], 1), torch.cat([seg_mask, fmask], 1)

    def _label(self, batch: SegmentPairBatch, rng: torch.Generator | None) -> TeacherLabels:
        if self.mode == "immediate":
            out = self.judge.label_batch(batch, rng=rng)
            return TeacherLabels(out.labels, out.answered, {**out.metrics, "teacher/hindsight_reversal_rate": 0.0},
                                 out.probs)
        u1, m1 = self._rollout(batch, "first", rng)
        u2, m2 = self._rollout(batch, "second", rng)
        width = max(u1.shape[1], u2.shape[1])
        u1, m1, u2, m2 = (torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in (u1, m1, u2, m2))
        judged = SegmentPairBatch(u1, u2, m1, m2)
        out = self.judge.label_batch(judged, rng=rng)
        before = torch.sign(masked_sum(batch.rewards_first, batch.mask_first)
                            - masked_sum(batch.rewards_second, batch.mask_second))
        after = torch.sign(masked_sum(u1, m1) - masked_sum(u2, m2))
        n = int(out.answered.sum())
        reversed_ = ((before * after) < 0) & out.answered
        metrics = {**out.metrics, "teacher/hindsight_reversal_rate": float(reversed_.sum()) / n if n else math.nan}
        return TeacherLabels(out.labels, out.answered, metrics, out.probs)
