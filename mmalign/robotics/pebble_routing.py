"""Uncertainty routing inside online PbRL: ``PebbleConfig(selector="routing")``, :class:`RoutingSelector`.

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

__all__ = ["RoutingSelector"]


class RoutingSelector:
    """Query selection by uncertainty routing (teacher for uncertain pairs, ensemble pseudo-labels for confident).

    Args:
        label_budget: the router's total costly budget (the loop's ``label_budget``).
        confidence: the ensemble pseudo-labels a candidate when its member-mean label entropy is at most that of
            ``P = confidence`` (1 = never).
        candidate_factor: candidate pairs per costly query.
    """

    def __init__(self, label_budget: int, confidence: float = 0.9, candidate_factor: int = 4) -> None:
        from mmalign.robotics.feedback import PairSelector

        if not 0.5 < confidence <= 1.0:
            raise ValueError(f"routing confidence must be in (0.5, 1], got {confidence}")
        self.label_budget, self.confidence = label_budget, confidence
        self.pairs = PairSelector("uniform", candidate_factor)  # candidate drawing only
        self.router: Any = None  # the core UncertaintyRouter, built on first use (it needs the ensemble and teacher)
        self.pseudo: dict[str, np.ndarray] = {}  # this round's confident ensemble labels
        self.pseudo_total = self.pseudo_agree = self.pseudo_decisive = 0

    def build_router(self, ensemble: Any, teacher: Any) -> Any:
        """The core router: ``ensemble`` cheap (hard labels), ``teacher`` costly."""
        from mmalign.core.query import UncertaintyRouter
        from mmalign.core.teachers import RewardModelTeacher, binary_entropy

        cheap = RewardModelTeacher(ensemble, hard=True)
        # confidence 1 = the ensemble never labels: an entropy threshold below 0 makes it abstain everywhere
        conf = self.confidence
        limit = float(binary_entropy(torch.tensor(conf, dtype=torch.float64))) if conf < 1.0 else -1.0
        return UncertaintyRouter(cheap, teacher, budget=self.label_budget, strategy="uncertainty",
                                 uncertainty="entropy", cheap_max_uncertainty=limit)

    def route(self, feedback: Any, segs: Any, num: int) -> tuple[np.ndarray, np.ndarray, Any, dict[str, float]]:
        """Route one round of ``num`` costly queries of a :class:`~mmalign.robotics.feedback.PreferenceFeedback`;
        returns the costly pairs ``i, j``, the router's result and metrics.

        The round's pseudo-labels replace the previous round's in :attr:`pseudo`; :attr:`pseudo_total`,
        ``pseudo_agree`` and ``pseudo_decisive`` tally agreement with the true-return order (for the report only).
        """
        if self.router is None:
            self.router = self.build_router(feedback.ensemble, feedback.teacher)
        router = self.router
        trainer = feedback.trainer
        # pairs showing one window twice (maximal entropy: the router would spend a costly query on them) are dropped
        first, second = self.pairs.candidates(segs, num, feedback.rng)
        router.max_costly_per_call = num
        spent = router.spent
        out = router(
            segs.true_rewards[first], segs.true_rewards[second], rng=feedback.teacher_rng,
            obs_first=trainer.norm(segs.obs[first]), obs_second=trainer.norm(segs.obs[second]),
            act_first=segs.act[first], act_second=segs.act[second],
        )
        if router.spent - spent != num:
            raise RuntimeError(f"router spent {router.spent - spent} costly queries, expected {num}")
        costly = out.costly.cpu().numpy()
        ok = out.answered.cpu().numpy()
        y = out.labels.cpu().numpy()
        # Before the first fit the ensemble is random: its "confident" labels would be noise, so none are kept.
        cheap = ~costly & ok & (feedback.rounds > 0)
        ci, cj = first[cheap], second[cheap]
        self.pseudo = {"obs1": segs.obs[ci], "act1": segs.act[ci], "obs2": segs.obs[cj], "act2": segs.act[cj],
                       "y": y[cheap].astype(np.float32)}
        tr = segs.true_rewards
        agree = ((y[cheap] > 0.5) == (tr[ci].sum(1) > tr[cj].sum(1)))[y[cheap] != 0.5]
        self.pseudo_total += int(cheap.sum())
        self.pseudo_agree += int(agree.sum())
        self.pseudo_decisive += int(agree.size)
        metrics = dict(out.metrics)
        metrics["routing/pseudo_labels"] = float(cheap.sum())
        metrics["routing/pseudo_agreement_with_true_return"] = float(agree.mean()) if agree.size else math.nan
        idx = np.nonzero(costly)[0]
        return first[idx], second[idx], out, metrics

    def stats(self) -> dict[str, float]:
        """Routing totals for the label statistics (empty before the first round)."""
        if self.router is None:
            return {}
        return {
            "labels/costly_spent": float(self.router.spent),  # == labels/queries: the router's own count
            "labels/pseudo_total": float(self.pseudo_total),
            "labels/pseudo_agreement_with_true_return": (
                self.pseudo_agree / self.pseudo_decisive if self.pseudo_decisive else math.nan),
        }
