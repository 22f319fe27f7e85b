"""Query selection (which pairs to ask about) and uncertainty routing (who answers them).

Selectors share one signature, ``selector(member_logits [K, M], num_queries, rng=None) -> indices [num_queries]``,
where ``member_logits[k, j] = R̂ₖ(σ¹ⱼ) − R̂ₖ(σ²ⱼ)`` for ``M`` candidate pairs (PEBBLE draws ``M = large_batch ×
num_queries`` candidates, then keeps the top ``num_queries``; see :func:`select_pairs`):

- ``uniform``: uniformly at random without replacement (ignores the logits; B-Pref ``feed_type=0``);
- ``disagreement``: largest std across members of ``P(first ≻ second)`` (B-Pref ``feed_type=1``);
- ``entropy``: largest member-mean binary entropy of ``P(first ≻ second)`` (B-Pref ``feed_type=2``,
  ``get_entropy``: the entropy is taken per member, then averaged).

:class:`UncertaintyRouter` sends only the pairs a cheap labeller (a reward model) is unsure about to a costly
teacher, under a total budget of costly queries, and labels the rest with the cheap labeller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from torch import Tensor

from mmalign.core.reward_models import RewardEnsemble, RewardModel
from mmalign.core.teachers import RewardModelTeacher, SegmentPairBatch, Teacher, binary_entropy
from mmalign.core.teachers.base import as_generator
from mmalign.registry import QUERY_SELECTORS

__all__ = [
    "uniform_selection",
    "disagreement_selection",
    "entropy_selection",
    "sample_candidate_pairs",
    "select_pairs",
    "UncertaintyRouter",
    "RoutingResult",
    "pair_uncertainty",
]

Selector = Callable[..., Tensor]


def _check(member_logits: Tensor, num_queries: int) -> None:
    if not isinstance(member_logits, Tensor) or member_logits.dim() != 2:
        got = tuple(member_logits.shape) if isinstance(member_logits, Tensor) else type(member_logits).__name__
        raise ValueError(f"member_logits must be a [K, M] tensor, got {got}")
    m = member_logits.shape[1]
    if not isinstance(num_queries, int) or isinstance(num_queries, bool) or not 0 <= num_queries <= m:
        raise ValueError(f"num_queries must be an int in [0, M={m}], got {num_queries!r}")


def pair_uncertainty(member_logits: Tensor, kind: str = "entropy") -> Tensor:
    """Per-pair uncertainty ``[M]``: ``entropy`` (member-mean binary entropy) or ``disagreement`` (member std)."""
    probs = torch.sigmoid(member_logits.to(torch.float64))
    if kind == "entropy":
        return binary_entropy(probs).mean(0)
    if kind == "disagreement":
        return probs.std(0, unbiased=False)
    raise ValueError(f"kind must be 'entropy' or 'disagreement', got {kind!r}")


def uniform_selection(member_logits: Tensor, num_queries: int, rng: torch.Generator | int | None = None) -> Tensor:
    """``num_queries`` distinct candidates uniformly at random (needs ``rng``)."""
    _check(member_logits, num_queries)
    gen = as_generator(rng, needed=True, who="uniform selection")
    return torch.randperm(member_logits.shape[1], generator=gen)[:num_queries].to(member_logits.device)


def disagreement_selection(member_logits: Tensor, num_queries: int, rng: Any = None) -> Tensor:
    """The ``num_queries`` candidates with the largest ensemble std of ``P(first ≻ second)`` (needs K >= 2 members)."""
    _check(member_logits, num_queries)
    if member_logits.shape[0] < 2 and num_queries > 0:
        # one member has zero std everywhere: top-k would return an arbitrary order, not a selection
        raise ValueError(f"disagreement selection needs an ensemble of K >= 2 members, got K={member_logits.shape[0]}")
    return torch.topk(pair_uncertainty(member_logits, "disagreement"), num_queries).indices


def entropy_selection(member_logits: Tensor, num_queries: int, rng: Any = None) -> Tensor:
    """The ``num_queries`` candidates with the largest member-mean entropy of ``P(first ≻ second)``."""
    _check(member_logits, num_queries)
    return torch.topk(pair_uncertainty(member_logits, "entropy"), num_queries).indices


QUERY_SELECTORS.register("uniform", uniform_selection)
QUERY_SELECTORS.register("disagreement", disagreement_selection)
QUERY_SELECTORS.register("entropy", entropy_selection)


def sample_candidate_pairs(num_segments: int, num_pairs: int, rng: torch.Generator | int) -> Tensor:
    """``[num_pairs, 2]`` segment indices, each pair of two distinct segments, drawn uniformly with replacement."""
    if num_segments < 2 or num_pairs < 0:
        raise ValueError(f"need num_segments >= 2 and num_pairs >= 0, got {num_segments}, {num_pairs}")
    gen = as_generator(rng, needed=True, who="candidate sampling")
    first = torch.randint(num_segments, (num_pairs,), generator=gen)
    second = (first + torch.randint(1, num_segments, (num_pairs,), generator=gen)) % num_segments
    return torch.stack([first, second], 1)


def select_pairs(
    model: RewardModel | RewardEnsemble,
    obs: Tensor,
    num_queries: int,
    *,
    selector: str = "disagreement",
    large_batch: int = 10,
    act: Tensor | None = None,
    mask: Tensor | None = None,
    rng: torch.Generator | int,
) -> Tensor:
    """PEBBLE query step: draw ``large_batch × num_queries`` candidate pairs from ``S`` segments
    (``obs [S, H, ...]``), score them with ``model`` and keep ``num_queries`` by ``selector``; returns ``[Q, 2]``."""
    if large_batch < 1:
        raise ValueError(f"large_batch must be >= 1, got {large_batch}")
    gen = as_generator(rng, needed=True, who="select_pairs")
    assert gen is not None
    cand = sample_candidate_pairs(obs.shape[0], large_batch * num_queries, gen)
    if selector == "uniform":
        return cand[uniform_selection(torch.empty(0, len(cand)), num_queries, gen).cpu()]
    device = next(model.parameters()).device
    with torch.no_grad():
        ret = model.segment_returns(obs.to(device), None if act is None else act.to(device),
                                    None if mask is None else mask.to(device))
    ret = ret if ret.dim() == 2 else ret.unsqueeze(0)
    logits = ret[:, cand[:, 0].to(device)] - ret[:, cand[:, 1].to(device)]
    return cand[QUERY_SELECTORS.get(selector)(logits, num_queries, gen).cpu()]


@dataclass(frozen=True)
class RoutingResult:
    """labels/answered as in ``TeacherLabels``; ``costly [N]`` bool marks pairs the costly teacher was asked."""

    labels: Tensor
    answered: Tensor
    costly: Tensor
    metrics: dict[str, float]


class UncertaintyRouter:
    """Cheap labeller answers confident pairs; the most uncertain go to a costly teacher, within a total budget.

    Args:
        cheap: a :class:`RewardModelTeacher` (its ensemble logits give the uncertainty).
        costly: any teacher (a person, a strong judge, a simulated human).
        budget: total costly queries over the router's lifetime; :attr:`spent` counts every pair sent to the
            costly teacher, including pairs it then skips (the question was asked).
        strategy: ``uncertainty`` (top-uncertainty pairs) or ``random`` (the baseline: random pairs, same count).
        uncertainty: ``entropy`` or ``disagreement`` (needs ensemble members), see :func:`pair_uncertainty`.
        threshold: only pairs with uncertainty ``>= threshold`` may go to the costly teacher (``None`` = any).
        max_costly_per_call: cap per call (``None`` = up to the remaining budget).
        cheap_max_uncertainty: the cheap labeller abstains (pair left unanswered) where uncertainty ``>=`` this
            and the costly teacher was not asked (``None`` = the cheap labeller answers every remaining pair).
    """

    def __init__(
        self,
        cheap: RewardModelTeacher,
        costly: Teacher,
        budget: int,
        strategy: Literal["uncertainty", "random"] = "uncertainty",
        uncertainty: str = "entropy",
        threshold: float | None = None,
        max_costly_per_call: int | None = None,
        cheap_max_uncertainty: float | None = None,
    ) -> None:
        if not isinstance(cheap, RewardModelTeacher) or not isinstance(costly, Teacher):
            raise ValueError(f"cheap must be a RewardModelTeacher and costly a Teacher, got "
                             f"{type(cheap).__name__}, {type(costly).__name__}")
        if not isinstance(budget, int) or budget < 0:
            raise ValueError(f"budget must be an int >= 0, got {budget!r}")
        if strategy not in ("uncertainty", "random"):
            raise ValueError(f"strategy must be 'uncertainty' or 'random', got {strategy!r}")
        pair_uncertainty(torch.zeros(1, 1), uncertainty)  # validates the name
        if max_costly_per_call is not None and max_costly_per_call < 0:
            raise ValueError(f"max_costly_per_call must be >= 0 or None, got {max_costly_per_call}")
        self.cheap, self.costly, self.budget = cheap, costly, budget
        self.strategy, self.uncertainty, self.threshold = strategy, uncertainty, threshold
        self.max_costly_per_call = max_costly_per_call
        self.cheap_max_uncertainty = cheap_max_uncertainty
        self.spent = 0

    @property
    def remaining(self) -> int:
        return self.budget - self.spent

    def __call__(
        self, rewards_first: Any, rewards_second: Any, *, rng: torch.Generator | int, **arrays: Any
    ) -> RoutingResult:
        """Route and label ``N`` pairs (same arguments as a teacher call; ``obs_*`` are needed by the cheap model)."""
        gen = as_generator(rng, needed=True, who="UncertaintyRouter")
        assert gen is not None
        batch = SegmentPairBatch.build(rewards_first, rewards_second, **arrays)
        cheap_out = self.cheap.label_batch(batch, rng=gen)
        assert self.cheap.last_member_logits is not None
        u = pair_uncertainty(self.cheap.last_member_logits, self.uncertainty).cpu()
        n = batch.num_pairs
        eligible = torch.ones(n, dtype=torch.bool) if self.threshold is None else u >= self.threshold
        cap = n if self.max_costly_per_call is None else self.max_costly_per_call
        k = min(self.remaining, int(eligible.sum()), cap)
        pool = torch.nonzero(eligible).squeeze(1)
        if self.strategy == "uncertainty":
            chosen = pool[torch.topk(u[pool], k).indices]
        else:
            chosen = pool[torch.randperm(len(pool), generator=gen)[:k]]
        costly = torch.zeros(n, dtype=torch.bool)
        costly[chosen] = True
        labels, answered = cheap_out.labels.clone(), cheap_out.answered.clone()
        if self.cheap_max_uncertainty is not None:
            abstain = (u >= self.cheap_max_uncertainty).to(answered.device)
            answered &= ~abstain
            labels = labels.masked_fill(abstain, float("nan"))
        if k:
            costly_out = self.costly.label_batch(batch.subset(chosen), rng=gen)
            labels[chosen.to(labels.device)] = costly_out.labels.to(labels.device, labels.dtype)
            answered[chosen.to(answered.device)] = costly_out.answered.to(answered.device)
        self.spent += k
        metrics = {
            "routing/costly_queries": float(k),
            "routing/costly_spent_total": float(self.spent),
            "routing/budget_remaining": float(self.remaining),
            "routing/cheap_fraction": float((answered.cpu() & ~costly).sum()) / n if n else math.nan,
            "routing/unanswered_fraction": float((~answered).sum()) / n if n else math.nan,
            "routing/uncertainty_costly": float(u[costly].mean()) if k else math.nan,
            "routing/uncertainty_cheap": float(u[~costly].mean()) if k < n else math.nan,
        }
        return RoutingResult(labels, answered, costly, metrics)


# Routing is not a drop-in selector (it also labels the confident pairs), but configs and `mmalign list` name it here.
QUERY_SELECTORS.register(
    "routing", UncertaintyRouter,
    summary="uncertainty routing: a cheap labeller answers confident pairs, uncertain ones go to a costly teacher "
            "under a budget",
)
