"""B-Pref simulated humans (Lee et al. 2021): one ``SimulatedHuman`` with every knob, plus the six named presets.

Label process for a pair with per-step utilities ``u¹, u²`` (true rewards for the partial-return model), following
B-Pref's ``get_label`` order (rll-research/BPref @ f3ece2e, ``reward_model.py``):

1. returns ``R^i = Σ_t u^i_t`` over valid steps;
2. **skip**: the pair is skipped iff ``max(R¹, R²) ≤ δ_skip`` (B-Pref keeps only pairs with ``max > δ_skip``; its
   code applies the test only when ``δ_skip > 0``, here it is applied whenever ``eps_skip > 0``, see below);
3. **equal**: the pair is a tie (label 0.5) iff ``|R¹ − R²| < δ_equal``;
4. **myopic** score ``S^i = Σ_t γ^{k_t} u^i_t`` with ``k_t`` = number of valid steps after ``t`` (later steps weigh
   more; ``γ = 1`` gives ``R^i``);
5. **rational** (``β = ∞``): ``p = 1[S¹ > S²]`` (0.5 on an exact tie); **stochastic** (``β < ∞``):
   ``p = σ(β (S¹ − S²))`` (Boltzmann / Bradley–Terry), label ``~ Bernoulli(p)`` (or ``p`` itself if ``sample=False``);
6. **mistake**: each label is flipped (``y → 1 − y``) with probability ``ε``.

Thresholds are adaptive as in B-Pref: ``δ_skip = eps_skip · m`` and ``δ_equal = eps_equal · m`` where ``m`` is the
mean return of a segment, set explicitly with :meth:`SimulatedHuman.set_return_scale` or from data with
:meth:`SimulatedHuman.calibrate`. (B-Pref's training script multiplies ``eps`` in twice after its first feedback
round, giving ``eps²``; we do not.)

**Return reference** ``b`` (default 0 = B-Pref's thresholds). B-Pref's thresholds assume non-negative rewards (DMC
and MetaWorld rewards lie in [0, 1]); with all-negative rewards (MuJoCo control costs) ``m < 0``, the equal teacher
never ties (as in B-Pref) and the skip teacher here skips every pair with ``max(R¹, R²) ≤ eps_skip · m`` — nearly
all of them — whereas B-Pref's code, which tests only a positive ``δ_skip``, then skips none. Neither is a useful skip
teacher; use a reference. With a reference, returns are measured from ``b``: a pair is
skipped iff ``max(R¹, R²) − b ≤ eps_skip · (m − b)`` and tied iff ``|R¹ − R²| < eps_equal · (m − b)``.
``calibrate(..., reference="min")`` sets ``b`` to the poorest calibration segment's return, which makes both
decisions invariant to adding any constant to every step reward (segments of equal length). Oracle, stochastic,
myopic and mistake labels never depend on ``b``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from mmalign.core.teachers.base import (
    ArrayLike,
    SegmentPairBatch,
    Teacher,
    TeacherLabels,
    _check_finite_rows,
    _mask,
    _to_float_tensor,
    label_metrics,
    masked_sum,
    uniform,
)
from mmalign.core.validation import check_range

__all__ = ["SimulatedHuman", "BPREF_PRESETS", "bpref_teacher", "segment_return_scale"]

#: B-Pref README teachers, exactly (beta = inf is B-Pref's "beta = -1", perfectly rational).
BPREF_PRESETS: dict[str, dict[str, float]] = {
    "oracle": {},
    "stochastic": {"beta": 1.0},
    "mistake": {"eps_mistake": 0.1},
    "skip": {"eps_skip": 0.1},
    "myopic": {"gamma": 0.9},
    "equal": {"eps_equal": 0.1},
}


def segment_return_scale(mean_episode_return: float, segment_length: int, episode_length: int) -> float:
    """B-Pref's margin: mean episode return rescaled to one segment, ``R̄_ep · H / T_ep``."""
    check_range("mean_episode_return", mean_episode_return, -math.inf, math.inf, low_open=True, high_open=True)
    if segment_length <= 0 or episode_length <= 0:
        raise ValueError(f"segment_length and episode_length must be > 0, got {segment_length}, {episode_length}")
    return float(mean_episode_return) * segment_length / episode_length


class SimulatedHuman(Teacher):
    """B-Pref teacher with all five irrationality knobs; presets via :meth:`preset` (composable, e.g. myopic+mistake).

    Args:
        beta: rationality (inverse temperature); ``math.inf`` = perfectly rational (oracle). Must be > 0.
        gamma: myopic weight in ``(0, 1]``; step ``t`` weighs ``γ^(steps after t)``.
        eps_mistake: probability of flipping each label, in ``[0, 1]`` (B-Pref's Mistake teacher uses 0.1).
        eps_skip: skip threshold as a fraction of the segment return scale, ``>= 0``.
        eps_equal: tie threshold as a fraction of the segment return scale, ``>= 0``.
        sample: with finite ``beta``, draw hard 0/1 labels (B-Pref) or return ``σ(β ΔS)`` as a soft label.
        return_scale: mean segment return ``m`` for the adaptive thresholds (needed iff ``eps_skip`` or
            ``eps_equal`` > 0); can be set later by :meth:`set_return_scale` / :meth:`calibrate`.
        return_reference: the return ``b`` thresholds are measured from (0 = B-Pref); must be finite and (when non-zero)
            ``≤ return_scale`` once both are set.

    Examples:
        >>> import torch
        >>> from mmalign.core.teachers import SimulatedHuman
        >>> rewards_first = torch.tensor([[1.0, 1.0], [0.0, 0.0]])  # 2 pairs of 2-step segments
        >>> rewards_second = torch.tensor([[0.0, 0.0], [0.5, 0.0]])
        >>> out = SimulatedHuman()(rewards_first, rewards_second)  # the oracle: the larger true return wins
        >>> out.labels.tolist(), out.answered.tolist()
        ([1.0, 0.0], [True, True])
        >>> mistaken = SimulatedHuman.preset('mistake', eps_mistake=1.0)  # flips every label
        >>> mistaken(rewards_first, rewards_second, rng=0).labels.tolist()
        [0.0, 1.0]
    """

    def __init__(
        self,
        beta: float = math.inf,
        gamma: float = 1.0,
        eps_mistake: float = 0.0,
        eps_skip: float = 0.0,
        eps_equal: float = 0.0,
        sample: bool = True,
        return_scale: float | None = None,
        return_reference: float = 0.0,
    ) -> None:
        if not (isinstance(beta, (int, float)) and beta > 0 and beta == beta):
            raise ValueError(f"beta must be > 0 (math.inf for a perfectly rational teacher), got {beta!r}")
        check_range("gamma", gamma, 0.0, 1.0, low_open=True)
        check_range("eps_mistake", eps_mistake, 0.0, 1.0)
        check_range("eps_skip", eps_skip, 0.0, math.inf, high_open=True)
        check_range("eps_equal", eps_equal, 0.0, math.inf, high_open=True)
        self.beta = float(beta)
        self.gamma = float(gamma)
        self.eps_mistake = float(eps_mistake)
        self.eps_skip = float(eps_skip)
        self.eps_equal = float(eps_equal)
        self.sample = bool(sample)
        self.return_scale: float | None = None
        self.return_reference = 0.0
        if return_scale is not None:
            self.set_return_scale(return_scale, reference=return_reference)
        else:
            self.set_return_scale(None, reference=return_reference)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "SimulatedHuman":
        """A B-Pref named teacher (``oracle, stochastic, mistake, skip, myopic, equal``) with optional overrides."""
        if name not in BPREF_PRESETS:
            raise ValueError(f"name must be one of {sorted(BPREF_PRESETS)}, got {name!r}")
        return cls(**{**BPREF_PRESETS[name], **overrides})

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(beta={self.beta}, gamma={self.gamma}, eps_mistake={self.eps_mistake}, "
            f"eps_skip={self.eps_skip}, eps_equal={self.eps_equal}, sample={self.sample}, "
            f"return_scale={self.return_scale}, return_reference={self.return_reference})"
        )

    # ------------------------------------------------------------------------------------------ thresholds

    def set_return_scale(self, mean_segment_return: float | None, *, reference: float = 0.0) -> None:
        """Set ``m`` (mean return of one segment) and the reference ``b``: thresholds become ``b + eps_skip·(m − b)``
        (on ``max(R¹, R²)``) and ``eps_equal·(m − b)`` (on ``|R¹ − R²|``). ``m=None`` clears the scale."""
        check_range("reference", reference, -math.inf, math.inf, low_open=True, high_open=True)
        if mean_segment_return is not None:
            check_range("mean_segment_return", mean_segment_return, -math.inf, math.inf, low_open=True,
                        high_open=True)
            # b = 0 is B-Pref's threshold rule, kept even where it degenerates (m < 0); an explicit b must lie below m
            if reference != 0.0 and reference > mean_segment_return:
                raise ValueError(
                    f"reference must be <= mean_segment_return={mean_segment_return} (returns are measured from it), "
                    f"got {reference}"
                )
        self.return_scale = None if mean_segment_return is None else float(mean_segment_return)
        self.return_reference = float(reference)

    def calibrate(self, rewards: ArrayLike, mask: ArrayLike | None = None, *, reference: str | float = "zero") -> float:
        """Set ``m`` to the mean segment return of ``rewards`` ``[N, H]`` (e.g. the replay buffer); returns it.

        ``reference``: ``"zero"`` (B-Pref: thresholds from return 0), ``"min"`` (from the poorest segment's return in
        ``rewards``; use it when rewards can be negative) or a number.
        """
        r = _to_float_tensor("rewards", rewards)
        if r.dim() != 2 or r.shape[0] == 0:
            raise ValueError(f"rewards must be a non-empty 2-D [N, H] array, got shape {tuple(r.shape)}")
        if not (isinstance(reference, (int, float)) and not isinstance(reference, bool)) and reference not in (
            "zero", "min"
        ):
            raise ValueError(f"reference must be 'zero', 'min' or a number, got {reference!r}")
        _check_finite_rows("rewards", r)
        returns = masked_sum(r, _mask("mask", mask, r), None)
        m = float(returns.mean())
        if reference == "zero":
            b = 0.0
        elif reference == "min":
            b = float(returns.min())
        else:
            b = float(reference)  # type: ignore[arg-type]
        self.set_return_scale(m, reference=b)
        return m

    def _threshold(self, eps: float, which: str) -> float:
        if eps == 0.0:
            return -math.inf
        if self.return_scale is None:
            raise ValueError(
                f"return_scale is None but eps_{which}={eps} needs it: call set_return_scale() or calibrate() first"
            )
        return eps * (self.return_scale - self.return_reference)

    @property
    def skip_threshold(self) -> float:
        """``δ_skip`` on ``max(R¹, R²)``: ``b + eps_skip·(m − b)`` (``-inf`` when skipping is off)."""
        return self.return_reference + self._threshold(self.eps_skip, "skip")

    @property
    def equal_threshold(self) -> float:
        """``δ_equal`` on ``|R¹ − R²|``: ``eps_equal·(m − b)`` (``-inf`` when ties are off)."""
        return self._threshold(self.eps_equal, "equal")

    # ------------------------------------------------------------------------------------------ labelling

    @property
    def stochastic(self) -> bool:
        return self.eps_mistake > 0 or (math.isfinite(self.beta) and self.sample)

    def utilities(self, batch: SegmentPairBatch) -> tuple[Tensor, Tensor]:
        """Per-step utilities ``[N, H]`` the teacher judges: the true rewards (partial-return model)."""
        return batch.rewards_first, batch.rewards_second

    def _myopic_sum(self, u: Tensor, mask: Tensor | None) -> Tensor:
        if self.gamma == 1.0:
            return masked_sum(u, mask)
        h = u.shape[1]
        if mask is None:
            w = self.gamma ** torch.arange(h - 1, -1, -1, device=u.device, dtype=torch.float64)
            return (u @ w.to(u.dtype)).to(torch.float64)
        after = mask.flip(1).cumsum(1).flip(1) - mask.to(torch.long)  # valid steps strictly after t
        return masked_sum(u, mask, self.gamma ** after.to(u.dtype))

    def _label(self, batch: SegmentPairBatch, rng: torch.Generator | None) -> TeacherLabels:
        u1, u2 = self.utilities(batch)
        r1, r2 = masked_sum(u1, batch.mask_first), masked_sum(u2, batch.mask_second)
        skip_t, equal_t = self.skip_threshold, self.equal_threshold
        answered = torch.maximum(r1, r2) > skip_t
        equal = (r1 - r2).abs() < equal_t
        if self.gamma == 1.0:
            s1, s2 = r1, r2
        else:
            s1, s2 = self._myopic_sum(u1, batch.mask_first), self._myopic_sum(u2, batch.mask_second)
        diff = s1 - s2
        if math.isinf(self.beta):
            probs = (torch.sign(diff) + 1.0) * 0.5
            labels = probs.clone()
        else:
            probs = torch.sigmoid(self.beta * diff)
            if self.sample:
                assert rng is not None
                labels = (uniform(len(probs), rng, probs.device).to(probs.dtype) < probs).to(probs.dtype)
            else:
                labels = probs.clone()
        flipped = torch.zeros_like(answered)
        if self.eps_mistake > 0:
            assert rng is not None
            flipped = uniform(len(labels), rng, labels.device) < self.eps_mistake
            labels = torch.where(flipped, 1.0 - labels, labels)
            probs = (1.0 - self.eps_mistake) * probs + self.eps_mistake * (1.0 - probs)
        labels = labels.masked_fill(equal, 0.5)
        probs = probs.masked_fill(equal, 0.5)
        labels = labels.masked_fill(~answered, math.nan).to(torch.float32)
        probs = probs.masked_fill(~answered, math.nan).to(torch.float32)
        metrics = label_metrics(labels, probs, answered)
        informative = answered & ~equal
        n_inf = int(informative.sum())
        metrics["teacher/equal_rate"] = float((answered & equal).sum()) / max(int(answered.sum()), 1)
        metrics["teacher/mistake_rate"] = float((flipped & informative).sum()) / n_inf if n_inf else math.nan
        return TeacherLabels(labels, answered, metrics, probs)


def bpref_teacher(name: str = "oracle", **overrides: Any) -> SimulatedHuman:
    """Build a B-Pref teacher by preset name (``oracle, stochastic, mistake, skip, myopic, equal``).

    Examples:
        >>> import torch
        >>> from mmalign.core.teachers import bpref_teacher
        >>> teacher = bpref_teacher('oracle')
        >>> teacher(torch.tensor([[2.0]]), torch.tensor([[1.0]])).labels.tolist()
        [1.0]
    """
    return SimulatedHuman.preset(name, **overrides)
