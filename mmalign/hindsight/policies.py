"""Small seller policies and the three trainers of the experiment: DPO, a Bradley–Terry reward model, and PPO.

The seller's action (recommendation, one claim per item) is a factorised softmax: ``log π(a|x) = log π(rec|x) +
Σ_i log π(claim_i|x)``, like a language model's per-token log-probabilities summed over a response. The policy's
logits are the reference's plus an MLP whose last layer starts at zero, so training starts exactly at the reference
(the DPO/PPO anchor). These loops are a few hundred steps of a ~10k-parameter MLP on in-memory tensors, so they are
written out here instead of going through the accelerate trainer (whose per-step overhead would dominate).
The losses are the cores' (:mod:`mmalign.core.losses`), looked up by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmalign.core.losses import bradley_terry_loss
from mmalign.hindsight import market as mk
from mmalign.registry import LOSSES

__all__ = [
    "ReferenceSeller",
    "SellerPolicy",
    "ActionRewardModel",
    "action_features",
    "sample_actions",
    "train_dpo",
    "train_reward_model",
    "train_ppo",
    "PPOSettings",
    "log_prob",
    "entropy",
    "to_tensor_actions",
]


class ReferenceSeller(nn.Module):
    """The fixed reference (the "SFT" seller): mostly truthful claims, uniform recommendation.

    Per item: the true claim with probability ``truthful``, silence with ``silent``, the false claim otherwise.
    """

    def __init__(self, params: mk.MarketParams, truthful: float = 0.6, silent: float = 0.3) -> None:
        super().__init__()
        if not (0 < truthful and 0 < silent and truthful + silent < 1):
            raise ValueError(f"truthful and silent must be > 0 with sum < 1, got {truthful!r} and {silent!r}")
        self.k, self.m = params.n_features, params.n_items
        false = 1.0 - truthful - silent
        # rows: status lacks / has; columns: claim has, claim lacks, silent
        table = torch.log(torch.tensor([[false, truthful, silent], [truthful, false, silent]]))
        self.claim_table: Tensor
        self.register_buffer("claim_table", table)

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        status = obs[:, self.k : self.k + self.m].round().long()
        rec = torch.zeros(obs.shape[0], self.m + 1, dtype=obs.dtype, device=obs.device)
        return rec, self.claim_table[status].to(obs.dtype)


class SellerPolicy(nn.Module):
    """Reference logits plus a zero-initialised MLP correction: ``(rec_logits [B, M+1], claim_logits [B, M, 3])``."""

    def __init__(self, reference: ReferenceSeller, obs_dim: int, hidden: int = 64) -> None:
        super().__init__()
        self.reference = reference
        self.m = reference.m
        self.body = nn.Sequential(nn.Linear(obs_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, self.m + 1 + 3 * self.m)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        ref_rec, ref_claims = self.reference(obs)
        out = self.head(self.body(obs))
        rec = ref_rec + out[:, : self.m + 1]
        claims = ref_claims + out[:, self.m + 1 :].reshape(-1, self.m, 3)
        return rec, claims


def log_prob(model: nn.Module, obs: Tensor, rec: Tensor, claims: Tensor) -> Tensor:
    """``log π(rec, claims | obs)``, shape ``[B]`` (sum of the factor log-probabilities)."""
    rec_logits, claim_logits = model(obs)
    lp = F.log_softmax(rec_logits, -1).gather(1, rec[:, None]).squeeze(1)
    lp_claims = F.log_softmax(claim_logits, -1).gather(2, claims[:, :, None]).squeeze(2)
    return lp + lp_claims.sum(1)


def entropy(model: nn.Module, obs: Tensor) -> Tensor:
    """Entropy of the factorised action distribution, shape ``[B]``."""
    rec_logits, claim_logits = model(obs)
    ent = lambda z: -(F.softmax(z, -1) * F.log_softmax(z, -1)).sum(-1)  # noqa: E731
    return ent(rec_logits) + ent(claim_logits).sum(-1)


@torch.no_grad()
def sample_actions(model: nn.Module, obs: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Sample ``(rec [B], claims [B, M])`` with the Gumbel-max trick from an explicit generator."""
    rec_logits, claim_logits = model(obs)

    def gumbel_argmax(z: Tensor) -> Tensor:
        u = torch.rand(z.shape, generator=gen, dtype=z.dtype).clamp_(1e-12, 1 - 1e-12)
        return (z - torch.log(-torch.log(u))).argmax(-1)

    return gumbel_argmax(rec_logits), gumbel_argmax(claim_logits)


def action_features(obs: Tensor, rec: Tensor, claims: Tensor, m: int) -> Tensor:
    """``[obs, one_hot(rec), one_hot(claims).flatten()]`` for the reward model, shape ``[B, D + (M+1) + 3M]``."""
    return torch.cat(
        [obs, F.one_hot(rec, m + 1).to(obs.dtype), F.one_hot(claims, 3).to(obs.dtype).flatten(1)], dim=1
    )


class ActionRewardModel(nn.Module):
    """Scalar reward ``r(x, a)`` of a seller action (MLP on :func:`action_features`)."""

    def __init__(self, in_dim: int, m: int, hidden: int = 64) -> None:
        super().__init__()
        self.m = m
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                 nn.Linear(hidden, 1))

    def forward(self, obs: Tensor, rec: Tensor, claims: Tensor) -> Tensor:
        return self.net(action_features(obs, rec, claims, self.m)).squeeze(-1)


def _batches(n: int, batch_size: int, steps: int, gen: torch.Generator):  # type: ignore[no-untyped-def]
    for _ in range(steps):
        yield torch.randint(0, n, (min(batch_size, n),), generator=gen)


def train_dpo(
    policy: SellerPolicy,
    obs: Tensor,
    chosen: tuple[Tensor, Tensor],
    rejected: tuple[Tensor, Tensor],
    *,
    loss_name: str = "dpo",
    beta: float = 0.1,
    eps: float = 0.0,
    steps: int = 300,
    batch_size: int = 256,
    lr: float = 3e-3,
    gen: torch.Generator,
) -> list[float]:
    """DPO-family training on (obs, chosen, rejected) with the core loss ``LOSSES[loss_name]``; returns losses."""
    loss_fn = LOSSES.get(loss_name)
    kwargs = {"beta": beta} if loss_name in ("dpo", "ipo") else {"beta": beta, "eps": eps}
    with torch.no_grad():
        ref_w = log_prob(policy.reference, obs, *chosen)
        ref_l = log_prob(policy.reference, obs, *rejected)
    trainable = [p for n, p in policy.named_parameters() if not n.startswith("reference")]
    opt = torch.optim.Adam(trainable, lr=lr, foreach=True)
    history = []
    for idx in _batches(len(obs), batch_size, steps, gen):
        pw = log_prob(policy, obs[idx], chosen[0][idx], chosen[1][idx])
        pl = log_prob(policy, obs[idx], rejected[0][idx], rejected[1][idx])
        loss, _ = loss_fn(pw, pl, ref_w[idx], ref_l[idx], **kwargs)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
    return history


def train_reward_model(
    rm: ActionRewardModel,
    obs: Tensor,
    first: tuple[Tensor, Tensor],
    second: tuple[Tensor, Tensor],
    labels: Tensor,
    answered: Tensor,
    *,
    steps: int = 300,
    batch_size: int = 256,
    lr: float = 3e-3,
    gen: torch.Generator,
) -> list[float]:
    """Bradley–Terry reward model on labelled pairs (core ``bradley_terry_loss``; skipped pairs masked)."""
    opt = torch.optim.Adam(rm.parameters(), lr=lr, foreach=True)
    safe_labels = torch.where(answered, labels, torch.full_like(labels, 0.5))
    history = []
    for idx in _batches(len(obs), batch_size, steps, gen):
        r1 = rm(obs[idx], first[0][idx], first[1][idx])
        r2 = rm(obs[idx], second[0][idx], second[1][idx])
        loss, _ = bradley_terry_loss(r1, r2, safe_labels[idx].to(r1.dtype), mask=answered[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
    return history


@dataclass
class PPOSettings:
    """Compact PPO for the one-step seller bandit (no GAE needed: every episode is one step)."""

    iterations: int = 60
    batch_size: int = 512
    epochs: int = 4
    minibatch_size: int = 512
    clip: float = 0.2
    kl_coef: float = 0.1
    ent_coef: float = 0.0
    lr: float = 3e-3


def train_ppo(
    policy: SellerPolicy,
    reward_fn: Callable[[Tensor, Tensor, Tensor], Tensor],
    sample_obs: Callable[[int], Tensor],
    settings: PPOSettings,
    *,
    gen: torch.Generator,
) -> list[float]:
    """PPO-clip (Schulman et al. 2017) with the RLHF per-sample KL penalty ``kl_coef·(log π − log π_ref)``.

    ``reward_fn(obs, rec, claims) -> [B]`` is the learned reward; ``sample_obs(n)`` draws fresh contexts.
    Returns the mean shaped reward per iteration.
    """
    params = [p for n, p in policy.named_parameters() if not n.startswith("reference")]
    opt = torch.optim.Adam(params, lr=settings.lr, foreach=True)
    history = []
    for _ in range(settings.iterations):
        obs = sample_obs(settings.batch_size)
        rec, claims = sample_actions(policy, obs, gen)
        with torch.no_grad():
            old_lp = log_prob(policy, obs, rec, claims)
            ref_lp = log_prob(policy.reference, obs, rec, claims)
            shaped = reward_fn(obs, rec, claims) - settings.kl_coef * (old_lp - ref_lp)
            adv = (shaped - shaped.mean()) / (shaped.std() + 1e-8)
        history.append(float(shaped.mean()))
        for _ in range(settings.epochs):
            perm = torch.randperm(len(obs), generator=gen)
            for start in range(0, len(obs), settings.minibatch_size):
                idx = perm[start : start + settings.minibatch_size]
                ratio = torch.exp(log_prob(policy, obs[idx], rec[idx], claims[idx]) - old_lp[idx])
                surrogate = torch.minimum(
                    ratio * adv[idx], ratio.clamp(1 - settings.clip, 1 + settings.clip) * adv[idx]
                )
                loss = -surrogate.mean()
                if settings.ent_coef:
                    loss = loss - settings.ent_coef * entropy(policy, obs[idx]).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
    return history


def to_tensor_actions(recommend: np.ndarray, claims: np.ndarray) -> tuple[Tensor, Tensor]:
    """NumPy actions to ``(rec [B] long, claims [B, M] long)``."""
    return torch.as_tensor(recommend, dtype=torch.long), torch.as_tensor(claims, dtype=torch.long)
