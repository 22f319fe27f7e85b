"""Uncertainty routing inside online PbRL: ``PebbleConfig(selector="routing")``.

Each feedback round draws ``candidate_factor × n`` candidate pairs. The core
:class:`~mmalign.core.query.UncertaintyRouter` scores them with the reward ensemble (member-mean label entropy),
sends the ``n`` most uncertain to the teacher (the costly labeller; every pair sent counts against
``label_budget``, answered or skipped, so the budget is spent exactly) and lets the ensemble itself
(:class:`~mmalign.core.teachers.RewardModelTeacher`, hard labels) answer the rest where it is confident (entropy at
most that of ``P = routing_confidence``; it abstains on the others). The confident ensemble labels are
pseudo-labels in the sense of SURF (Park et al. 2022, arXiv 2203.10050): they join the teacher labels for *this
round's* refit only, are redrawn every round, and never count as queries.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = ["build_router", "route_round"]


def build_router(state: Any) -> Any:
    """The router of a :class:`~mmalign.robotics.pebble.FeedbackState`: ensemble cheap, teacher costly."""
    from mmalign.core.query import UncertaintyRouter
    from mmalign.core.teachers import RewardModelTeacher, binary_entropy

    conf = state.cfg.routing_confidence
    cheap = RewardModelTeacher(state.ensemble, hard=True)
    # confidence 1 = the ensemble never labels: an entropy threshold below 0 makes it abstain everywhere
    limit = float(binary_entropy(torch.tensor(conf, dtype=torch.float64))) if conf < 1.0 else -1.0
    return UncertaintyRouter(cheap, state.teacher, budget=state.cfg.label_budget, strategy="uncertainty",
                             uncertainty="entropy", cheap_max_uncertainty=limit)


def route_round(state: Any, segs: Any, num: int) -> tuple[np.ndarray, np.ndarray, Any, dict[str, float]]:
    """Route one round of ``num`` costly queries; returns the costly pairs ``i, j``, the router's result and metrics.

    The round's pseudo-labels are stored in ``state.pseudo`` (replacing the previous round's) and tallied in
    ``state.pseudo_total`` / ``pseudo_agree`` / ``pseudo_decisive`` (agreement with the true-return order, for the
    report only).
    """
    if state.router is None:
        state.router = build_router(state)
    router = state.router
    # pairs showing one window twice (maximal entropy: the router would spend a costly query on them) are dropped
    first, second = state._candidates(segs, num)
    router.max_costly_per_call = num
    spent = router.spent
    out = router(
        segs.true_rewards[first], segs.true_rewards[second], rng=state.teacher_rng,
        obs_first=state._norm(segs.obs[first]), obs_second=state._norm(segs.obs[second]),
        act_first=segs.act[first], act_second=segs.act[second],
    )
    if router.spent - spent != num:
        raise RuntimeError(f"router spent {router.spent - spent} costly queries, expected {num}")
    costly = out.costly.cpu().numpy()
    ok = out.answered.cpu().numpy()
    y = out.labels.cpu().numpy()
    # Before the first fit the ensemble is random: its "confident" labels would be noise, so none are kept.
    cheap = ~costly & ok & (state.rounds > 0)
    ci, cj = first[cheap], second[cheap]
    state.pseudo = {"obs1": segs.obs[ci], "act1": segs.act[ci], "obs2": segs.obs[cj], "act2": segs.act[cj],
                    "y": y[cheap].astype(np.float32)}
    tr = segs.true_rewards
    agree = ((y[cheap] > 0.5) == (tr[ci].sum(1) > tr[cj].sum(1)))[y[cheap] != 0.5]
    state.pseudo_total += int(cheap.sum())
    state.pseudo_agree += int(agree.sum())
    state.pseudo_decisive += int(agree.size)
    metrics = dict(out.metrics)
    metrics["routing/pseudo_labels"] = float(cheap.sum())
    metrics["routing/pseudo_agreement_with_true_return"] = float(agree.mean()) if agree.size else math.nan
    idx = np.nonzero(costly)[0]
    return first[idx], second[idx], out, metrics
