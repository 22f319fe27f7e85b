"""The teacher interface: a batch of segment pairs in, ``TeacherLabels`` out.

Every teacher (simulated human, regret oracle, label-flip wrapper, hindsight simulator, learned reward model)
implements :class:`Teacher`. See :mod:`mmalign.core.teachers` for the contract other modules code against.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mmalign.core.validation import check_mask, check_shape

__all__ = [
    "TeacherLabels",
    "SegmentPairBatch",
    "Teacher",
    "as_generator",
    "binary_entropy",
    "from_bpref_labels",
    "label_metrics",
    "masked_sum",
    "uniform",
]

ArrayLike = Any  # numpy array or torch tensor


@dataclass(frozen=True)
class TeacherLabels:
    """What a teacher returns for ``N`` pairs.

    labels: ``[N]`` float32, ``P(first ≻ second)`` in ``[0, 1]`` (tie ``0.5``); value at skipped pairs is ``nan``.
    answered: ``[N]`` bool; ``False`` = the teacher skipped the pair (never silently labelled 0.5).
    metrics: ``teacher/*`` floats (label entropy, skip rate, ...), documented in docs/methods/teachers.md.
    probs: ``[N]`` float32, the teacher's own ``P(first ≻ second)`` before sampling (``nan`` where skipped).
    """

    labels: Tensor
    answered: Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    probs: Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class SegmentPairBatch:
    """Validated torch view of one call's inputs.

    ``H`` = steps per segment; masks are ``[N, H]`` bool or ``None`` (all steps valid).
    """

    rewards_first: Tensor
    rewards_second: Tensor
    mask_first: Tensor | None = None
    mask_second: Tensor | None = None
    obs_first: Tensor | None = None
    obs_second: Tensor | None = None
    act_first: Tensor | None = None
    act_second: Tensor | None = None
    qpos_first: Tensor | None = None  # [N, H, nq] MuJoCo states, for teachers that draw the segments (people)
    qpos_second: Tensor | None = None
    qvel_first: Tensor | None = None  # [N, H, nv]
    qvel_second: Tensor | None = None

    @property
    def num_pairs(self) -> int:
        return int(self.rewards_first.shape[0])

    def subset(self, index: Tensor) -> "SegmentPairBatch":
        """Rows ``index`` (long or bool tensor) of every field (e.g. the pairs routed to a costly teacher)."""
        def take(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[index.to(t.device)]

        return SegmentPairBatch(*(take(getattr(self, f)) for f in _FIELDS))  # type: ignore[arg-type]

    @classmethod
    def build(
        cls,
        rewards_first: ArrayLike,
        rewards_second: ArrayLike,
        mask_first: ArrayLike | None = None,
        mask_second: ArrayLike | None = None,
        obs_first: ArrayLike | None = None,
        obs_second: ArrayLike | None = None,
        act_first: ArrayLike | None = None,
        act_second: ArrayLike | None = None,
        qpos_first: ArrayLike | None = None,
        qpos_second: ArrayLike | None = None,
        qvel_first: ArrayLike | None = None,
        qvel_second: ArrayLike | None = None,
    ) -> "SegmentPairBatch":
        """Convert (zero-copy for numpy) and validate; raises ``ValueError`` naming the bad argument."""
        r1 = _to_float_tensor("rewards_first", rewards_first)
        r2 = _to_float_tensor("rewards_second", rewards_second)
        if r1.dim() != 2:
            raise ValueError(f"rewards_first must be a 2-D [N, H] array, got shape {tuple(r1.shape)}")
        if r2.shape[0] != r1.shape[0]:
            raise ValueError(
                f"rewards_second must have N={r1.shape[0]} rows like rewards_first, got shape {tuple(r2.shape)}"
            )
        if r2.dim() != 2:
            raise ValueError(f"rewards_second must be a 2-D [N, H] array, got shape {tuple(r2.shape)}")
        m1 = _mask("mask_first", mask_first, r1)
        m2 = _mask("mask_second", mask_second, r2)
        _check_finite_rows("rewards_first", r1)
        _check_finite_rows("rewards_second", r2)
        extras: dict[str, Tensor | None] = {}
        for name, value, ref in (
            ("obs_first", obs_first, r1),
            ("obs_second", obs_second, r2),
            ("act_first", act_first, r1),
            ("act_second", act_second, r2),
            ("qpos_first", qpos_first, r1),
            ("qpos_second", qpos_second, r2),
            ("qvel_first", qvel_first, r1),
            ("qvel_second", qvel_second, r2),
        ):
            if value is None:
                extras[name] = None
                continue
            t = value if isinstance(value, Tensor) else torch.as_tensor(np.asarray(value))
            if t.dim() < 2 or tuple(t.shape[:2]) != tuple(ref.shape):
                raise ValueError(f"{name} must have leading shape [N, H]={tuple(ref.shape)}, got {tuple(t.shape)}")
            if t.is_floating_point():
                _check_finite_rows(name, t.flatten(1))
            extras[name] = t
        return cls(r1, r2, m1, m2, **extras)  # type: ignore[arg-type]


_FIELDS = ("rewards_first", "rewards_second", "mask_first", "mask_second", "obs_first", "obs_second",
           "act_first", "act_second", "qpos_first", "qpos_second", "qvel_first", "qvel_second")


def _check_finite_rows(name: str, value: Tensor) -> None:
    """NaN/inf check at the cost of one float32 row sum (an elementwise ``isfinite`` is 20x slower on CPU)."""
    if value.numel() == 0 or bool(torch.isfinite(value.sum(dim=-1)).all()):
        return
    bad = value[~torch.isfinite(value)].flatten()[:3].tolist()
    what = f"non-finite values such as {bad}" if bad else "values whose sum overflows"
    raise ValueError(f"{name} must be finite everywhere, got a tensor of shape {tuple(value.shape)} with {what}")


def _to_float_tensor(name: str, value: ArrayLike) -> Tensor:
    if isinstance(value, Tensor):
        t = value
    else:
        try:
            t = torch.as_tensor(np.asarray(value))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name} must be a numeric array, got {type(value).__name__}") from exc
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{name} must hold real numbers, got dtype {t.dtype}")
    if not t.is_floating_point():
        t = t.to(torch.float32)
    return t


def _mask(name: str, value: ArrayLike | None, ref: Tensor) -> Tensor | None:
    if value is None:
        return None
    t = value if isinstance(value, Tensor) else torch.as_tensor(np.asarray(value))
    check_shape(name, t, tuple(ref.shape))
    check_mask(name, t, tuple(ref.shape))
    return t.to(device=ref.device, dtype=torch.bool)


def as_generator(rng: torch.Generator | int | None, *, needed: bool, who: str) -> torch.Generator | None:
    """Turn a seed into a CPU ``torch.Generator``; stochastic teachers refuse to run without one."""
    if rng is None:
        if needed:
            raise ValueError(f"rng must be a torch.Generator or an int seed for the stochastic {who}, got None")
        return None
    if isinstance(rng, torch.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return torch.Generator().manual_seed(int(rng))
    raise ValueError(f"rng must be a torch.Generator, an int seed or None, got {type(rng).__name__}")


def uniform(n: int, rng: torch.Generator, device: torch.device) -> Tensor:
    """``n`` uniforms in [0, 1) drawn from ``rng`` (on the generator's device) and moved to ``device``."""
    return torch.rand(n, generator=rng, device=rng.device).to(device)


def masked_sum(values: Tensor, mask: Tensor | None, weights: Tensor | None = None) -> Tensor:
    """Sum ``[N, H]`` per-step values over valid steps (optionally weighted per step), returned as float64.

    The sum itself runs in the input dtype: a float64-accumulated sum is ~25x slower on CPU, and 50-step float32
    sums lose nothing that matters for a preference.
    """
    if weights is not None:
        values = values * weights
    if mask is not None:
        values = values.masked_fill(~mask, 0.0)
    return values.sum(dim=1).to(torch.float64)


def from_bpref_labels(labels: ArrayLike) -> tuple[Tensor, Tensor]:
    """Convert B-Pref labels (``0`` = first preferred, ``1`` = second, ``-1`` = equal) to ``(P(first ≻ second),
    answered)``; B-Pref drops skipped queries, so every converted pair is answered."""
    y = torch.as_tensor(np.asarray(labels) if not isinstance(labels, Tensor) else labels).reshape(-1)
    if y.numel() and not bool(((y == 0) | (y == 1) | (y == -1)).all()):
        bad = y[~((y == 0) | (y == 1) | (y == -1))][:3].tolist()
        raise ValueError(f"labels must hold only B-Pref values 0, 1, -1, got values such as {bad}")
    out = torch.where(y == -1, 0.5, 1.0 - y.to(torch.float32)).to(torch.float32)
    return out, torch.ones_like(out, dtype=torch.bool)


def binary_entropy(p: Tensor) -> Tensor:
    """Entropy in nats of Bernoulli(p), 0 at p in {0, 1}."""
    p = p.to(torch.float64)
    return -(torch.special.xlogy(p, p) + torch.special.xlogy(1.0 - p, 1.0 - p))


def label_metrics(labels: Tensor, probs: Tensor, answered: Tensor) -> dict[str, float]:
    """The metrics every teacher logs (names fixed): entropy of its label distribution, skip rate, answer counts."""
    n = int(answered.numel())
    n_ans = int(answered.sum())
    out = {
        "teacher/num_queries": float(n),
        "teacher/num_answered": float(n_ans),
        "teacher/skip_rate": (n - n_ans) / n if n else 0.0,
    }
    if n_ans:
        p = probs[answered]
        y = labels[answered]
        out["teacher/label_entropy"] = float(binary_entropy(p).mean())
        out["teacher/label_mean"] = float(y.to(torch.float64).mean())
        out["teacher/tie_rate"] = float((y == 0.5).to(torch.float64).mean())
    else:
        out["teacher/label_entropy"] = math.nan
        out["teacher/label_mean"] = math.nan
        out["teacher/tie_rate"] = math.nan
    return out


class Teacher(ABC):
    """Base class: validates inputs once, then calls :meth:`_label` on a :class:`SegmentPairBatch`."""

    name: str = "teacher"
    #: Whether labels are computed from the true per-step rewards (simulated humans); a human labeller or a
    #: learned reward model does not, and can run on an env without a reward.
    needs_true_reward: bool = True
    #: Whether the teacher draws the segments from MuJoCo states (``qpos_*``/``qvel_*``): a run records them only
    #: for a teacher that asks.
    wants_states: bool = False

    def __call__(
        self,
        rewards_first: ArrayLike,
        rewards_second: ArrayLike,
        *,
        mask_first: ArrayLike | None = None,
        mask_second: ArrayLike | None = None,
        obs_first: ArrayLike | None = None,
        obs_second: ArrayLike | None = None,
        act_first: ArrayLike | None = None,
        act_second: ArrayLike | None = None,
        qpos_first: ArrayLike | None = None,
        qpos_second: ArrayLike | None = None,
        qvel_first: ArrayLike | None = None,
        qvel_second: ArrayLike | None = None,
        rng: torch.Generator | int | None = None,
    ) -> TeacherLabels:
        """Label ``N`` segment pairs; see the module docstring of :mod:`mmalign.core.teachers`."""
        batch = SegmentPairBatch.build(
            rewards_first, rewards_second, mask_first, mask_second, obs_first, obs_second, act_first, act_second,
            qpos_first, qpos_second, qvel_first, qvel_second,
        )
        return self.label_batch(batch, rng=rng)

    def label_batch(self, batch: SegmentPairBatch, *, rng: torch.Generator | int | None = None) -> TeacherLabels:
        """Label an already validated batch (wrappers call this to avoid validating twice)."""
        return self._label(batch, as_generator(rng, needed=self.stochastic, who=type(self).__name__))

    @property
    def stochastic(self) -> bool:
        """Whether labelling draws random numbers (then ``rng`` is required)."""
        return False

    @abstractmethod
    def _label(self, batch: SegmentPairBatch, rng: torch.Generator | None) -> TeacherLabels:
        """Label a validated batch; ``rng`` is a generator whenever :attr:`stochastic` is true."""
