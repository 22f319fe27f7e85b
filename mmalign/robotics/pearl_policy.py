"""PEARL's target-task policies: offline advantage-weighted regression on unlabelled rollouts, online PPO, and
their evaluation by true return (used by :func:`mmalign.robotics.pearl.run`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from mmalign.robotics.pearl import PearlConfig

__all__ = ["awr_policy"]


def _evaluate_policy(cfg: PearlConfig, act: Any) -> tuple[float, float]:
    """Mean true return of ``act(obs) -> action`` over deterministic target episodes, and the fraction of episodes
    in which the puck moved (> 5 cm): a policy that never touches the puck scores about -12."""
    import gymnasium as gym

    import mmalign.envs  # noqa: F401

    env = gym.make(cfg.target_env_id, episode_steps=cfg.steps)
    total, moved = [], []
    for ep in range(cfg.policy_eval_episodes):
        obs, _ = env.reset(seed=50_000 + ep)
        puck0 = env.unwrapped.puck_pos
        ret, done = 0.0, False
        while not done:
            obs, _, term, trunc, info = env.step(act(obs))
            ret += info["true_reward"]
            done = term or trunc
        total.append(ret)
        moved.append(float(np.linalg.norm(env.unwrapped.puck_pos - puck0) > 0.05))
    env.close()
    return float(np.mean(total)), float(np.mean(moved))


def _mlp(in_dim: int, out_dim: int, hidden: int = 256) -> Any:
    from torch import nn

    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, out_dim))


def awr_policy(
    observations: np.ndarray, actions: np.ndarray, rewards: np.ndarray | None, steps: int, beta: float, seed: int,
    gamma: float = 0.99, hidden: int = 256,
) -> Any:
    """Offline advantage-weighted regression (Peng et al. 2019) on fixed rollouts; returns ``act(obs) -> action``.

    ``observations (N, T, D)`` before each action, ``actions (N, T, A)`` in [-1, 1], per-step ``rewards (N, T)``
    (``None`` = plain behaviour cloning). Monte-Carlo returns-to-go ``G_t``; a value net ``V(s_t, t/T)`` fitted by
    regression; advantages ``G_t - V`` standardised to unit std; the tanh policy minimises the squared action error
    weighted by ``min(exp(A / beta), 20)``. The policy never leaves the data's support during training, so a learned
    reward cannot be exploited off-distribution (the failure of online PPO here, docs/methods/pearl.md); PEARL's
    paper extracts its policy offline too (IQL, whose policy step is this weighted regression).
    """
    import torch

    from mmalign.core.rng import seeded_global_rng

    n, t_len, _ = observations.shape
    for name, arr in (("actions", actions), ("rewards", rewards)):
        if arr is not None and arr.shape[:2] != (n, t_len):
            raise ValueError(f"{name} must have leading shape {(n, t_len)}, got {arr.shape}")
    gen = torch.Generator().manual_seed(seed)
    obs = torch.as_tensor(observations.reshape(n * t_len, -1), dtype=torch.float32)
    mean, std = obs.mean(0), obs.std(0).clamp_min(1e-3)  # constant entries (goal, zone) are left near zero
    x = (obs - mean) / std
    act = torch.as_tensor(actions.reshape(n * t_len, -1), dtype=torch.float32)
    batch = min(256, len(x))
    weights = torch.ones(len(x))
    # Seeded inits without reseeding the caller's global RNG; same draws, in the same order (value net first), as
    # seeding it: nothing between the two constructions draws from the global RNG.
    with seeded_global_rng(seed):
        value = _mlp(x.shape[1] + 1, 1, hidden) if rewards is not None else None
        policy = _mlp(x.shape[1], act.shape[1], hidden)
    if value is not None:  # built exactly when rewards are given
        ret = np.zeros_like(rewards, dtype=np.float64)
        acc = np.zeros(n)
        for t in reversed(range(t_len)):  # returns-to-go, vectorised over rollouts
            acc = rewards[:, t] + gamma * acc
            ret[:, t] = acc
        g = torch.as_tensor(ret.reshape(-1), dtype=torch.float32)
        time_in = torch.as_tensor(np.tile(np.arange(t_len) / t_len, n)[:, None], dtype=torch.float32)
        xv = torch.cat([x, time_in], dim=1)  # finite horizon: the value depends on the time left
        opt = torch.optim.Adam(value.parameters(), lr=1e-3)
        for _ in range(steps):
            idx = torch.randint(len(x), (batch,), generator=gen)
            loss = (value(xv[idx]).squeeze(-1) - g[idx]).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            adv = g - value(xv).squeeze(-1)
        weights = torch.exp(adv / (beta * adv.std().clamp_min(1e-6))).clamp(max=20.0)
    opt = torch.optim.Adam(policy.parameters(), lr=1e-3)
    for _ in range(steps):
        idx = torch.randint(len(x), (batch,), generator=gen)
        loss = (weights[idx] * (torch.tanh(policy(x[idx])) - act[idx]).pow(2).sum(-1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    def act_fn(o: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.tanh(policy((torch.as_tensor(o, dtype=torch.float32) - mean) / std)).numpy()

    return act_fn


def _offline_return(cfg: PearlConfig, data: Any, net: Any | None, stats: tuple[float, float] | None,
                    true_reward: bool = False) -> tuple[float, float]:
    """AWR on the unlabelled target rollouts relabelled by ``net`` (standardised by ``stats``), the true reward,
    or nothing (``net is None`` and not ``true_reward``: behaviour cloning); evaluated with the true reward."""
    import torch

    rewards = None
    if true_reward:
        rewards = data.true_rewards
    elif net is not None and stats is not None:
        with torch.no_grad():
            rewards = ((net(torch.as_tensor(data.positions, dtype=torch.float32))[0] - stats[0]) / stats[1]).numpy()
    act = awr_policy(data.observations, data.actions, rewards, cfg.offline_policy_steps, cfg.awr_beta, cfg.seed)
    return _evaluate_policy(cfg, act)


def _ppo_return(cfg: PearlConfig, net: Any | None, stats: tuple[float, float] | None) -> tuple[float, float]:
    """Online PPO on the target task with the standardised learned reward (``None`` = the true reward)."""
    import gymnasium as gym
    import torch
    from stable_baselines3 import PPO

    import mmalign.envs  # noqa: F401

    mu, sd = stats if stats is not None else (0.0, 1.0)

    class LearnedReward(gym.Wrapper):
        def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
            obs, r, term, trunc, info = self.env.step(action)
            if net is None:
                return obs, float(info["true_reward"]), term, trunc, info
            u = self.env.unwrapped
            x = torch.as_tensor(np.concatenate([u.effector_pos, u.puck_pos]), dtype=torch.float32)
            with torch.no_grad():
                return obs, (float(net(x[None])[0][0]) - mu) / sd, term, trunc, info

    env = LearnedReward(gym.make(cfg.target_env_id, episode_steps=cfg.steps))
    model = PPO("MlpPolicy", env, n_steps=256, batch_size=64, seed=cfg.seed, verbose=0, device="cpu")
    model.learn(total_timesteps=cfg.policy_timesteps)
    return _evaluate_policy(cfg, lambda o: model.predict(o, deterministic=True)[0])
