"""Marketplace feedback on top of the core RLHS :class:`~mmalign.core.teachers.HindsightTeacher`.

The market supplies the *consequence simulator* the core teacher calls: given what happened at interaction time
(the seller's observation, its action and the customer's purchase, packed into the teacher's ``obs`` / ``act``
tensors) it rolls the consequences forward and returns the customer's utility estimate after seeing them:

* ``reveal="partial"`` (partial hindsight): over ``horizon`` consequence steps the bought item's feature shows up
  with probability ``reveal_prob`` per step; if it showed, the bought item's status is known (the truth, or the
  world model's sample of it, correct with probability ``world_model_accuracy``), the other items stay beliefs;
* ``reveal="full"`` (full / oracle hindsight): every status revealed (true, or world-model sampled), score = utility
  minus regret and lie penalties (:func:`mmalign.hindsight.market.channel_scores`).

Foresight is the teacher's ``immediate`` mode: the judge compares the predicted utilities passed as ``rewards``.
The judge is a core :class:`~mmalign.core.teachers.SimulatedHuman` (``beta = inf`` = rational, ties 0.5) and pairwise
flip noise is the core :class:`~mmalign.core.teachers.LabelFlipTeacher`. Ratings 1..5 of the same channels come
from :func:`mmalign.hindsight.market.likert` of the same scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from mmalign.core.teachers import HindsightTeacher, LabelFlipTeacher, SimulatedHuman, Teacher, TeacherLabels
from mmalign.hindsight import market as mk

__all__ = ["FEEDBACK_CHANNELS", "Interaction", "MarketConsequenceSimulator", "market_teacher", "label_pairs"]

#: the human feedback channels of the experiment (``true_utility`` is an oracle, not a channel)
FEEDBACK_CHANNELS = ("foresight", "partial_hindsight", "full_hindsight", "world_model_hindsight")


@dataclass
class Interaction:
    """One side of a batch of pairs: scenarios, the seller's action and what the customer did."""

    scen: mk.Scenarios
    recommend: np.ndarray  # (n,)
    claims: np.ndarray  # (n, M)
    outcome: mk.Outcomes

    def packed(self, params: mk.MarketParams) -> tuple[Tensor, Tensor, Tensor]:
        """``(rewards [n, 1] = foresight score, obs [n, 1, D], act [n, 1, M + 2])`` for the core teacher."""
        fore = mk.channel_scores("foresight", self.scen, self.outcome, params)
        obs = mk.seller_observation(self.scen, params)
        act = np.concatenate([self.recommend[:, None], self.claims, self.outcome.purchase[:, None]], axis=1)
        return (
            torch.as_tensor(fore, dtype=torch.float64)[:, None],
            torch.as_tensor(obs, dtype=torch.float64)[:, None, :],
            torch.as_tensor(act, dtype=torch.long)[:, None, :],
        )


class MarketConsequenceSimulator:
    """The core teacher's ``simulator(rewards, mask, obs, act, *, horizon, reveal, rng)`` for the market."""

    def __init__(self, params: mk.MarketParams, *, world_model: bool = False, reveal_prob: float = 1.0) -> None:
        if not 0.0 < reveal_prob <= 1.0:
            raise ValueError(f"reveal_prob must be in (0, 1], got {reveal_prob!r}")
        self.params = params
        self.world_model = bool(world_model)
        self.reveal_prob = float(reveal_prob)

    def _unpack(self, obs: Tensor, act: Tensor) -> tuple[mk.Scenarios, np.ndarray, np.ndarray, np.ndarray]:
        k, m = self.params.n_features, self.params.n_items
        o = obs[:, 0].detach().cpu().numpy().astype(np.float64)
        a = act[:, 0].detach().cpu().numpy().astype(np.int64)
        scen = mk.Scenarios(o[:, :k].argmax(axis=1), np.rint(o[:, k : k + m]).astype(np.int64), o[:, k + m : k + 2 * m])
        return scen, a[:, 0], a[:, 1 : 1 + m], a[:, 1 + m]

    def __call__(
        self,
        rewards: Tensor,
        mask: Tensor | None,
        obs: Tensor | None,
        act: Tensor | None,
        *,
        horizon: int | None,
        reveal: str,
        rng: torch.Generator | None,
    ) -> Tensor:
        if obs is None or act is None:
            raise ValueError("the market simulator needs obs and act (pack them with Interaction.packed)")
        if rng is None:
            raise ValueError("rng must be a torch.Generator for the market simulator, got None")
        scen, rec, claims, purchase = self._unpack(obs, act)
        n, m = len(scen), self.params.n_items
        utilities = mk.option_utilities(scen, self.params)
        rows = np.arange(n)
        true_u = utilities[rows, purchase]
        lies = ((claims == mk.CLAIM_HAS) & (scen.status == 0)) | ((claims == mk.CLAIM_LACKS) & (scen.status == 1))
        flip = torch.rand((n, m), generator=rng, dtype=torch.float64).numpy() >= self.params.world_model_accuracy
        world = np.where(flip, 1 - scen.status, scen.status) if self.world_model else scen.status
        beliefs = mk.beliefs_from_claims(claims, self.params)
        out = mk.Outcomes(
            beliefs, np.zeros((n, m + 1)), purchase, true_u, utilities.max(axis=1) - true_u, world, lies.sum(axis=1)
        )
        if reveal == "full":
            if self.world_model:
                # everything "revealed" by the world model: judge utility and regret under its sampled statuses
                wscen = mk.Scenarios(scen.feature, world, scen.prices)
                wu = mk.option_utilities(wscen, self.params)
                wl = ((claims == mk.CLAIM_HAS) & (world == 0)) | ((claims == mk.CLAIM_LACKS) & (world == 1))
                out = mk.Outcomes(beliefs, out.choice_probs, purchase, wu[rows, purchase],
                                  wu.max(axis=1) - wu[rows, purchase], world, wl.sum(axis=1))
            score = mk.channel_scores("full_hindsight", scen, out, self.params)
        else:
            steps = 1 if horizon is None else int(horizon)
            shown = torch.rand((n, steps), generator=rng, dtype=torch.float64).numpy() < self.reveal_prob
            channel = "world_model_hindsight" if self.world_model else "partial_hindsight"
            hind = mk.channel_scores(channel, scen, out, self.params)
            fore = mk.channel_scores("foresight", scen, out, self.params)
            score = np.where(shown.any(axis=1), hind, fore)
        return torch.as_tensor(score, dtype=rewards.dtype, device=rewards.device)[:, None]


def market_teacher(
    channel: str,
    params: mk.MarketParams,
    *,
    judge_beta: float = math.inf,
    flip_rate: float = 0.0,
    horizon: int = 1,
    reveal_prob: float = 1.0,
    world_model_reveal: str = "partial",
) -> Teacher:
    """The pairwise teacher of one feedback channel: core ``HindsightTeacher`` + market simulator (+ label flips)."""
    if channel not in FEEDBACK_CHANNELS:
        raise ValueError(f"channel must be one of {list(FEEDBACK_CHANNELS)}, got {channel!r}")
    if world_model_reveal not in ("partial", "full"):
        raise ValueError(f"world_model_reveal must be 'partial' or 'full', got {world_model_reveal!r}")
    judge = SimulatedHuman(beta=judge_beta)
    sim = MarketConsequenceSimulator(params, world_model=channel == "world_model_hindsight", reveal_prob=reveal_prob)
    modes: dict[str, Literal["immediate", "partial", "full"]] = {
        "foresight": "immediate", "partial_hindsight": "partial", "full_hindsight": "full",
        "world_model_hindsight": "full" if world_model_reveal == "full" else "partial",
    }
    mode = modes[channel]
    teacher: Teacher = HindsightTeacher(judge, sim, mode=mode, horizon=horizon if mode == "partial" else None)
    if flip_rate > 0:
        teacher = LabelFlipTeacher(teacher, flip_rate)
    return teacher


def label_pairs(
    teacher: Teacher, first: Interaction, second: Interaction, params: mk.MarketParams, rng: torch.Generator
) -> TeacherLabels:
    """Label ``P(first ≻ second)`` for pairs of interactions on the same scenarios."""
    if len(first.scen) != len(second.scen):
        raise ValueError(f"first and second must hold equally many pairs, got {len(first.scen)} and {len(second.scen)}")
    r1, o1, a1 = first.packed(params)
    r2, o2, a2 = second.packed(params)
    return teacher(r1, r2, obs_first=o1, obs_second=o2, act_first=a1, act_second=a2, rng=rng)
