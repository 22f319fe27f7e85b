"""One feedback round of online preference-based RL, as parts: budget, query selection, teacher, labels, reward.

- :class:`FeedbackSchedule`: when rounds happen and how many queries each asks, within a total label budget;
- :class:`PairSelector`: random candidate pairs from the sampled segments, then a selector from
  ``mmalign.registry.QUERY_SELECTORS`` keeps the most informative (``uniform``, ``disagreement``, ``entropy``);
  :class:`~mmalign.robotics.pebble_routing.RoutingSelector` also lets the ensemble pseudo-label confident pairs;
- a teacher: any :class:`~mmalign.core.teachers.Teacher` (simulated humans, a labelling app's ``human`` teacher);
- :class:`LabelStore`: every answered pair so far (skipped queries count against the budget but are never trained
  on) and the label statistics of the report;
- :class:`~mmalign.robotics.reward_trainer.RewardTrainer`: the reward ensemble and its refits.

:class:`PreferenceFeedback` wires them: ``feedback_round(segments)`` asks one round of queries about pairs of the
given segments (:mod:`mmalign.robotics.segments`) and refits the reward. The SB3 side is
:class:`mmalign.robotics.callbacks.PreferenceFeedbackCallback`.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

from mmalign.robotics.reward_trainer import RewardTrainer
from mmalign.robotics.segments import Segments, random_pairs

__all__ = ["FeedbackSchedule", "PairSelector", "LabelStore", "PreferenceFeedback"]

_PAIR_KEYS = ("obs1", "act1", "obs2", "act2", "y")


class FeedbackSchedule:
    """``initial_labels`` queries at env step ``first_feedback``, then ``labels_per_round`` every
    ``feedback_every`` steps, until ``label_budget`` queries were asked (the last round is cut to the budget)."""

    def __init__(self, label_budget: int, initial_labels: int, labels_per_round: int, *, first_feedback: int = 1000,
                 feedback_every: int = 1000) -> None:
        for name, value in (("label_budget", label_budget), ("initial_labels", initial_labels),
                            ("labels_per_round", labels_per_round), ("feedback_every", feedback_every)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if initial_labels > label_budget:
            raise ValueError(f"label_budget={label_budget} is smaller than the first query batch "
                             f"(initial_labels={initial_labels}); raise label_budget or lower initial_labels")
        if first_feedback < 0:
            raise ValueError(f"first_feedback must be >= 0, got {first_feedback}")
        self.label_budget, self.initial_labels, self.labels_per_round = label_budget, initial_labels, labels_per_round
        self.first_feedback, self.feedback_every = first_feedback, feedback_every
        self.queries_used = 0
        self.rounds = 0

    @property
    def budget_left(self) -> int:
        return self.label_budget - self.queries_used

    def round_size(self) -> int:
        """Queries the next round asks (0 once the budget is spent)."""
        want = self.initial_labels if self.rounds == 0 else self.labels_per_round
        return max(0, min(want, self.budget_left))

    def spend(self, num: int) -> None:
        self.queries_used += num
        self.rounds += 1


class PairSelector:
    """Draw ``candidate_factor × num`` random candidate pairs, keep ``num`` by a registered query selector."""

    def __init__(self, name: str = "disagreement", candidate_factor: int = 4) -> None:
        from mmalign.core import query  # noqa: F401  (registers the selectors)
        from mmalign.registry import QUERY_SELECTORS

        if name not in QUERY_SELECTORS or name == "routing":
            known = [n for n in QUERY_SELECTORS.names() if n != "routing"]
            raise ValueError(f"selector must be one of {known} (or use RoutingSelector), got {name!r}")
        if candidate_factor < 1:
            raise ValueError(f"candidate_factor must be >= 1, got {candidate_factor}")
        self.name, self.candidate_factor = name, candidate_factor

    def candidates(self, segs: Segments, num: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``candidate_factor * num`` random candidate pairs, less those showing one window twice.

        Segments are drawn with replacement, so a pair can show one window twice: a guaranteed tie whose logit is 0
        for every member, i.e. maximal entropy, which the entropy selector and the router would pick first. Such
        pairs are dropped (unless fewer than ``num`` candidates would remain).
        """
        first, second = random_pairs(len(segs), num * self.candidate_factor, rng)
        axes = tuple(range(1, segs.obs.ndim))
        same = ((segs.obs[first] == segs.obs[second]).all(axis=axes)
                & (segs.act[first] == segs.act[second]).all(axis=(1, 2)))
        if (~same).sum() >= num:
            first, second = first[~same], second[~same]
        return first, second

    def select(self, segs: Segments, num: int, rng: np.random.Generator,
               trainer: RewardTrainer) -> tuple[np.ndarray, np.ndarray]:
        """Choose ``num`` query pairs among the random candidate pairs of :meth:`candidates`."""
        from mmalign.robotics.reward_io import select_pairs

        first, second = self.candidates(segs, num, rng)
        if self.candidate_factor == 1 or self.name == "uniform":
            keep = rng.choice(len(first), size=num, replace=False)
        else:
            ret = trainer.member_rewards(segs.obs, segs.act).sum(-1)  # [K, N] segment returns per member
            keep = select_pairs(self.name, ret[:, first], ret[:, second], num, seed=int(rng.integers(2**31)))
        return first[keep], second[keep]


class LabelStore:
    """Answered pairs ``(obs, act)`` of both sides with labels ``P(first ≻ second)``, and their true returns."""

    def __init__(self) -> None:
        self.pairs: dict[str, list[np.ndarray]] = {k: [] for k in _PAIR_KEYS}
        self.true_returns: list[np.ndarray] = []  # [n, 2] true segment returns of answered pairs (for the report)

    def add(self, segs: Segments, i: np.ndarray, j: np.ndarray, answered: np.ndarray, labels: np.ndarray) -> None:
        self.pairs["obs1"].append(segs.obs[i][answered])
        self.pairs["act1"].append(segs.act[i][answered])
        self.pairs["obs2"].append(segs.obs[j][answered])
        self.pairs["act2"].append(segs.act[j][answered])
        self.pairs["y"].append(labels[answered].astype(np.float32))
        raw = segs.true_rewards
        self.true_returns.append(np.stack([raw[i][answered].sum(1), raw[j][answered].sum(1)], 1))

    def training_pairs(self, extra: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Every stored pair (plus ``extra`` pairs, e.g. this round's pseudo-labels) as arrays."""
        return {k: np.concatenate(v + ([extra[k]] if extra else [])) for k, v in self.pairs.items()}

    def stats(self, queries_used: int, rounds: int) -> dict[str, float]:
        """Totals: queries, answered, ties, teacher agreement with the true-return order."""
        y = np.concatenate(self.pairs["y"]) if self.pairs["y"] else np.zeros(0)
        tr = np.concatenate(self.true_returns) if self.true_returns else np.zeros((0, 2))
        decisive = (y != 0.5) & (tr[:, 0] != tr[:, 1])
        agree = ((y > 0.5) == (tr[:, 0] > tr[:, 1]))[decisive]
        return {
            "labels/queries": float(queries_used),
            "labels/answered": float(len(y)),
            "labels/skipped": float(queries_used - len(y)),
            "labels/ties": float((y == 0.5).sum()),
            "labels/first_preferred": float((y > 0.5).sum()),
            "labels/agreement_with_true_return": float(agree.mean()) if agree.size else math.nan,
            "labels/rounds": float(rounds),
        }


class PreferenceFeedback:
    """Budget, selector, teacher, labels and reward trainer, one feedback round at a time.

    Args:
        schedule: the label budget and round sizes.
        selector: a :class:`PairSelector` or :class:`~mmalign.robotics.pebble_routing.RoutingSelector`.
        teacher: any :class:`~mmalign.core.teachers.Teacher`.
        trainer: the :class:`~mmalign.robotics.reward_trainer.RewardTrainer`.
        seed: seeds the numpy generator of segment sampling and query selection (``seed + 7919``) and the teacher's
            torch generator (``seed + 104729``).
        teacher_shift_rewards: skip/equal teachers measure returns from the poorest candidate segment's
            (``calibrate(reference="min")``).
    """

    def __init__(self, schedule: FeedbackSchedule, selector: Any, teacher: Any, trainer: RewardTrainer, *,
                 seed: int = 0, teacher_shift_rewards: bool = True) -> None:
        self.schedule, self.selector, self.teacher, self.trainer = schedule, selector, teacher, trainer
        self.teacher_shift_rewards = teacher_shift_rewards
        self.rng = np.random.default_rng(seed + 7919)
        self.teacher_rng = torch.Generator().manual_seed(seed + 104729)
        self.labels = LabelStore()
        self.history: list[dict[str, float]] = []

    # the loop's view of its parts
    @property
    def ensemble(self) -> Any:
        return self.trainer.ensemble

    @property
    def rounds(self) -> int:
        return self.schedule.rounds

    @property
    def queries_used(self) -> int:
        return self.schedule.queries_used

    def round_size(self) -> int:
        return self.schedule.round_size()

    def reward_fn(self, obs: np.ndarray, act: np.ndarray) -> np.ndarray:
        """The learned per-step reward the agent sees (:meth:`RewardTrainer.reward_fn`)."""
        return self.trainer.reward_fn(obs, act)

    def feedback_round(self, segs: Segments) -> dict[str, float]:
        """Ask ``round_size()`` queries about pairs from ``segs``, refit the ensemble; returns round metrics."""
        num = self.round_size()
        if num == 0:
            return {}
        t0, c0 = time.perf_counter(), time.process_time()
        if self.rounds == 0:
            self.trainer.fit_input_stats(segs.obs, segs.act)
        raw = segs.true_rewards
        if getattr(self.teacher, "eps_skip", 0) > 0 or getattr(self.teacher, "eps_equal", 0) > 0:
            # thresholds measured from the poorest candidate segment's return (invariant to a constant reward offset)
            self.teacher.calibrate(raw, reference="min" if self.teacher_shift_rewards else "zero")
        extra: dict[str, float] = {}
        pseudo: dict[str, np.ndarray] = {}
        if hasattr(self.selector, "route"):
            i, j, routed, extra = self.selector.route(self, segs, num)
            costly = routed.costly.cpu()
            ok = routed.answered.cpu()[costly].numpy()
            y = routed.labels.cpu()[costly].numpy()
            pseudo = self.selector.pseudo
            # label statistics of the costly (teacher) labels only, like the other selectors report
            teacher_metrics = {"teacher/answered_fraction": float(ok.mean()) if ok.size else math.nan}
        else:
            i, j = self.selector.select(segs, num, self.rng, self.trainer)
            states = {} if segs.qpos is None or segs.qvel is None else {  # recorded for a teacher that draws them
                "qpos_first": segs.qpos[i], "qpos_second": segs.qpos[j],
                "qvel_first": segs.qvel[i], "qvel_second": segs.qvel[j]}
            out = self.teacher(
                raw[i], raw[j], obs_first=segs.obs[i], obs_second=segs.obs[j],
                act_first=segs.act[i], act_second=segs.act[j], rng=self.teacher_rng, **states,
            )
            ok = out.answered.cpu().numpy()
            y = out.labels.cpu().numpy()
            teacher_metrics = {k: float(v) for k, v in out.metrics.items()}
        self.schedule.spend(num)
        self.labels.add(segs, i, j, ok, y)
        train = self.labels.training_pairs(pseudo)
        fit = self.trainer.fit(train, self.rounds)
        metrics = dict(teacher_metrics)
        metrics.update(extra)
        metrics.update(fit)
        metrics.update({"feedback/queries_used": float(self.queries_used), "feedback/round": float(self.rounds),
                        "feedback/labels_train": float(len(train["y"])),
                        "time/feedback_s": time.perf_counter() - t0,
                        "time/feedback_cpu_s": time.process_time() - c0})
        self.history.append(metrics)
        return metrics

    def label_stats(self) -> dict[str, float]:
        """Totals over all rounds: queries, answered, ties, teacher agreement (and routing's pseudo-labels)."""
        out = self.labels.stats(self.queries_used, self.rounds)
        if hasattr(self.selector, "stats"):
            out.update(self.selector.stats())
        return out
