"""Preference IQL (P-IQL): a reward model fitted to the preference labels, then offline RL (IQL) on the same data.

The baseline the CPL paper (Hejna et al., ICLR 2024, arXiv 2310.13639, Sec. 5) compares CPL with: instead of
reading the policy off the labels directly, (1) fit a Bradley–Terry reward ensemble to the labelled segment pairs
(:class:`mmalign.robotics.reward_trainer.RewardTrainer`, the package's BT core, with the PbRL loop's input fix:
standardised and squared actions, reward standardised over the data), (2) relabel every transition of the offline
segments with that reward, and (3) run Implicit Q-Learning (Kostrikov, Nair, Levine, ICLR 2022, arXiv 2110.06169):

- value: ``V(s) ← argmin E[L_τ(min_i Q̄_i(s, a) − V(s))]``, :func:`expectile_loss` (τ = ``piql_expectile``);
- critics: ``Q_i(s, a) ← r̂(s, a) + γ V(s')`` (squared error, twin critics, Polyak targets ``Q̄``);
- policy: advantage-weighted regression, :func:`awr_loss` with ``A = min_i Q̄_i(s, a) − V(s)``.

IQL never queries an action outside the data, which is why the CPL paper uses it as the offline-RL baseline. The
policy is :class:`mmalign.robotics.cpl.DeterministicActor` (the network CPL and BC train), so P-IQL and CPL differ
only in how the labels reach the policy. Transitions are the ``H − 1`` within-segment steps ``(s_t, a_t, s_{t+1})``
of every segment: segments never cross an episode end, so no transition is terminal. Settings are ``piql_*`` fields
of :class:`mmalign.robotics.cpl.CPLConfig`; the method is ``methods=[..., piql]`` of ``mmalign robotics cpl``.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from mmalign.core.validation import check_positive, check_range, check_reduction, check_same_shape, check_tensor
from mmalign.core.reward_models.nets import make_mlp
from mmalign.core.validation import reduce_loss

if TYPE_CHECKING:
    from mmalign.robotics.cpl import CPLConfig, DeterministicActor

__all__ = ["expectile_loss", "awr_loss", "fit_preference_reward", "IQLCritics", "train_piql"]


def expectile_loss(pred: Tensor, target: Tensor, expectile: float = 0.7, reduction: str = "mean") -> Tensor:
    r"""IQL's asymmetric squared loss (Kostrikov et al. 2022, Eq. 5), whose minimiser is the τ-expectile of ``target``.

    .. math::
        L_\tau(u) = |\tau - \mathbb{1}(u < 0)|\, u^2, \qquad u = \text{target} - \text{pred}

    With τ > 0.5 an under-estimate (``u > 0``) costs τ and an over-estimate 1 − τ, so ``pred`` settles above the
    mean of ``target``: IQL's ``V(s)`` approaches the best in-data action value as τ → 1, without evaluating any
    action outside the data. τ = 0.5 is half the squared error.

    Args:
        pred: ``[*]`` predictions (IQL: ``V(s)``; gradients flow into it). target: same shape (IQL: ``min_i Q̄_i(s,
            a)``; usually detached). expectile: τ in (0, 1). reduction: ``"mean" | "sum" | "none"``.

    Returns:
        the loss (a scalar, or ``[*]`` for ``reduction="none"``).

    Examples:
        >>> import torch
        >>> from mmalign.robotics.piql import expectile_loss
        >>> expectile_loss(torch.zeros(2), torch.tensor([1.0, -2.0]), expectile=0.7, reduction="none")
        tensor([0.7000, 1.2000])
    """
    check_tensor("pred", pred)
    check_tensor("target", target)
    check_same_shape({"pred": pred, "target": target})
    check_range("expectile", expectile, 0.0, 1.0, low_open=True, high_open=True)
    check_reduction(reduction)
    u = target - pred
    weight = torch.where(u < 0, 1.0 - expectile, expectile).to(u.dtype)
    return reduce_loss(weight * u.square(), reduction)


def awr_loss(log_prob: Tensor, advantage: Tensor, beta: float, max_weight: float = 100.0,
             reduction: str = "mean") -> Tensor:
    r"""Advantage-weighted regression (IQL's policy extraction, Kostrikov et al. 2022, Eq. 7).

    .. math::
        \ell = -\min\big(e^{A(s, a)/\beta},\; w_{\max}\big) \log \pi_\theta(a \mid s)

    The weight is computed without gradient (``advantage`` is detached), so the policy clones the data's actions in
    proportion to how much better than ``V(s)`` the critics rate them; ``max_weight`` caps the weight as IQL does.
    β → ∞ is plain behaviour cloning.

    Args:
        log_prob: ``[*]`` ``log π(a|s)`` of the data actions (gradients flow into it). advantage: same shape,
            ``A(s, a) = min_i Q̄_i(s, a) − V(s)``. beta: temperature β > 0 (IQL's inverse temperature is 1/β).
        max_weight: cap > 0 on the weight. reduction: ``"mean" | "sum" | "none"``.

    Examples:
        >>> import torch
        >>> from mmalign.robotics.piql import awr_loss
        >>> awr_loss(torch.tensor([-1.0, -1.0]), torch.tensor([0.0, 1.0]), beta=1.0, reduction="none")
        tensor([1.0000, 2.7183])
    """
    check_tensor("log_prob", log_prob)
    check_tensor("advantage", advantage)
    check_same_shape({"log_prob": log_prob, "advantage": advantage})
    check_positive("beta", beta)
    check_positive("max_weight", max_weight)
    check_reduction(reduction)
    weight = torch.exp(advantage.detach() / beta).clamp(max=max_weight).to(log_prob.dtype)
    return reduce_loss(-weight * log_prob, reduction)


def fit_preference_reward(cfg: "CPLConfig", data: dict[str, Any]) -> tuple[Any, dict[str, float]]:
    """A Bradley–Terry reward ensemble on the labelled pairs of :func:`mmalign.robotics.cpl.build_dataset`.

    Returns ``(trainer, metrics)``: ``trainer.reward_fn(obs [M, obs_dim], act [M, act_dim])`` is the mean member
    reward, standardised over all segment steps; metrics are the fit's final ``train/*`` values.
    """
    from mmalign.robotics.reward_io import build_ensemble
    from mmalign.robotics.reward_trainer import RewardTrainer

    segs = data["segments"]
    obs_dim, act_dim = segs.obs.shape[-1], segs.act.shape[-1]
    ensemble = build_ensemble(obs_dim, act_dim, cfg.piql_reward_ensemble, cfg.piql_reward_hidden, seed=cfg.seed,
                              input_norm=True, action_squares=True)
    trainer = RewardTrainer(ensemble, normalize_obs=True, normalize_act=True, reward_norm=True,
                            epochs=cfg.piql_reward_epochs, batch_size=cfg.batch_size, lr=cfg.piql_lr, seed=cfg.seed)
    trainer.fit_input_stats(segs.obs, segs.act)
    first, second = np.asarray(data["first"]), np.asarray(data["second"])
    pairs = {"obs1": segs.obs[first], "act1": segs.act[first], "obs2": segs.obs[second], "act2": segs.act[second],
             "y": np.asarray(data["labels"], dtype=np.float32)}
    metrics = trainer.fit(pairs, 0)
    trainer.fit_reward_norm(segs.obs.reshape(-1, obs_dim), segs.act.reshape(-1, act_dim))
    return trainer, metrics


class IQLCritics(nn.Module):
    """Twin ``Q_i(s, a)``, their Polyak-averaged targets ``Q̄_i`` and ``V(s)``, on standardised observations.

    Observations are standardised with the data's per-dimension mean and std (fixed at construction) and actions
    divided by the half range, so one learning rate suits every task.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, obs_mean: np.ndarray, obs_std: np.ndarray,
                 act_scale: Tensor) -> None:
        super().__init__()
        self.q = nn.ModuleList([make_mlp(obs_dim + act_dim, [hidden, hidden], 1, "relu") for _ in range(2)])
        self.q_target = copy.deepcopy(self.q).requires_grad_(False)
        self.v = make_mlp(obs_dim, [hidden, hidden], 1, "relu")
        self.register_buffer("obs_mean", torch.as_tensor(obs_mean, dtype=torch.float32))
        self.register_buffer("obs_std", torch.as_tensor(np.maximum(obs_std, 1e-3), dtype=torch.float32))
        self.register_buffer("act_scale", act_scale.detach().clone().float())

    def _s(self, obs: Tensor) -> Tensor:
        return (obs - self.obs_mean) / self.obs_std

    def qs(self, obs: Tensor, act: Tensor, target: bool = False) -> Tensor:
        """``[2, B]`` critic values (the targets ``Q̄_i`` with ``target=True``)."""
        x = torch.cat([self._s(obs), act / self.act_scale], dim=-1)
        return torch.stack([q(x).squeeze(-1) for q in (self.q_target if target else self.q)])

    def value(self, obs: Tensor) -> Tensor:
        """``[B]`` ``V(s)``."""
        return self.v(self._s(obs)).squeeze(-1)

    @torch.no_grad()
    def update_targets(self, tau: float) -> None:
        for p, pt in zip(self.q.parameters(), self.q_target.parameters()):
            pt.lerp_(p, tau)


def train_piql(cfg: "CPLConfig", data: dict[str, Any], obs_dim: int, act_dim: int, low: np.ndarray,
               high: np.ndarray) -> tuple["DeterministicActor", list[dict[str, float]]]:
    """P-IQL on the CPL dataset: the reward fit, then ``piql_steps`` IQL steps; returns the actor and a log.

    Each step draws ``batch_size`` segments and uses all their ``H − 1`` transitions, as CPL's BC steps use all
    ``H`` steps of ``batch_size`` segments.
    """
    from mmalign.core.rng import seeded_global_rng
    from mmalign.robotics.cpl import DeterministicActor

    trainer, rm_metrics = fit_preference_reward(cfg, data)
    segs = data["segments"]
    n, h = segs.obs.shape[:2]
    if h < 2:
        raise ValueError(f"P-IQL needs segments of at least 2 steps (one transition), got segment_length={h}")
    reward = trainer.reward_fn(segs.obs[:, :-1].reshape(-1, obs_dim), segs.act[:, :-1].reshape(-1, act_dim))
    obs = torch.as_tensor(segs.obs[:, :-1]).reshape(n, h - 1, obs_dim)
    nxt = torch.as_tensor(segs.obs[:, 1:]).reshape(n, h - 1, obs_dim)
    act = torch.as_tensor(segs.act[:, :-1]).reshape(n, h - 1, act_dim)
    rew = torch.as_tensor(reward, dtype=torch.float32).reshape(n, h - 1)
    flat = segs.obs.reshape(-1, obs_dim)
    with seeded_global_rng(cfg.seed):  # the same actor initialisation as CPL / BC of this seed
        actor = DeterministicActor(obs_dim, act_dim, cfg.hidden, low, high)
        critics = IQLCritics(obs_dim, act_dim, cfg.hidden, flat.mean(0), flat.std(0), actor.act_scale)
    opt_actor = torch.optim.Adam(actor.parameters(), lr=cfg.lr)
    opt_q = torch.optim.Adam(critics.q.parameters(), lr=cfg.piql_lr)
    opt_v = torch.optim.Adam(critics.v.parameters(), lr=cfg.piql_lr)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    log: list[dict[str, float]] = [{"step": 0.0, **{f"reward/{k.split('/')[-1]}": v for k, v in rm_metrics.items()}}]
    for step in range(cfg.piql_steps):
        b = torch.randint(n, (cfg.batch_size,), generator=gen)
        o, a, r, o2 = obs[b].reshape(-1, obs_dim), act[b].reshape(-1, act_dim), rew[b].reshape(-1), \
            nxt[b].reshape(-1, obs_dim)
        with torch.no_grad():
            q_min = critics.qs(o, a, target=True).min(0).values
        v = critics.value(o)
        v_loss = expectile_loss(v, q_min, cfg.piql_expectile)
        opt_v.zero_grad()
        v_loss.backward()
        opt_v.step()
        actor_loss = awr_loss(actor.log_prob(o, a), q_min - v.detach(), cfg.piql_beta)
        opt_actor.zero_grad()
        actor_loss.backward()
        opt_actor.step()
        with torch.no_grad():
            target = r + cfg.piql_discount * critics.value(o2)
        q_loss = (critics.qs(o, a) - target).square().mean()
        opt_q.zero_grad()
        q_loss.backward()
        opt_q.step()
        critics.update_targets(cfg.piql_tau)
        if (step + 1) % 500 == 0 or step + 1 == cfg.piql_steps:
            log.append({"step": float(step + 1), "train/v_loss": float(v_loss.detach()),
                        "train/q_loss": float(q_loss.detach()), "train/actor_loss": float(actor_loss.detach()),
                        "train/v_mean": float(v.detach().mean())})
    return actor, log
