"""Rendered trajectories and simulated-human preference triplets on the PushAvoid tasks (RAPL/PEARL data).

A scripted pusher with randomised style produces diverse behaviour: it pushes the puck via a random lateral
waypoint (which may drag the effector through the forbidden zone), at a random speed, with random action noise, and
may stop early; a fraction of episodes are smoothed random actions. Each rollout records the rendered frames, the
planar positions (effector, puck) and the privileged true reward, which only the simulated human sees.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

__all__ = ["Trajectories", "check_push_avoid_env", "collect_trajectories", "make_triplets", "label_triplets"]


@dataclass
class Trajectories:
    """A batch of equal-length rollouts. Shapes: frames ``(N, T, H, W, 3)`` uint8 (or ``None``), positions
    ``(N, T, 4)`` (effector xy, puck xy), true_rewards ``(N, T)``, task_rewards ``(N, T)``; optional for offline
    policy learning: state observations ``(N, T, D)`` seen *before* action ``t`` and the actions ``(N, T, 2)``
    (positions and rewards are those *after* action ``t``)."""

    frames: np.ndarray | None
    positions: np.ndarray
    true_rewards: np.ndarray
    task_rewards: np.ndarray
    observations: np.ndarray | None = None
    actions: np.ndarray | None = None

    @property
    def true_returns(self) -> np.ndarray:
        return self.true_rewards.sum(axis=1)

    def __len__(self) -> int:
        return len(self.positions)

    def subset(self, idx: np.ndarray) -> "Trajectories":
        pick = lambda a: None if a is None else a[idx]  # noqa: E731
        return Trajectories(pick(self.frames), self.positions[idx], self.true_rewards[idx], self.task_rewards[idx],
                            pick(self.observations), pick(self.actions))


def _scripted_actions(env: object, rng: np.random.Generator, steps: int):  # noqa: ANN202
    """Generator of actions of one randomised scripted episode (reads the env's privileged positions)."""
    u = env.unwrapped  # type: ignore[attr-defined]
    lay = u.layout
    goal = np.asarray(lay.goal)
    start = u.puck_pos
    path = goal - start
    perp = np.array([-path[1], path[0]]) / (np.linalg.norm(path) + 1e-9)
    waypoint = start + 0.5 * path + rng.uniform(-0.3, 0.3) * perp
    speed, noise = rng.uniform(0.3, 1.0), rng.uniform(0.0, 0.6)
    stop = int(rng.integers(steps // 3, steps + 1))
    random_episode = rng.random() < 0.15
    smooth = np.zeros(2)
    passed_waypoint = False
    for t in range(steps):
        if random_episode:
            smooth = 0.7 * smooth + 0.3 * rng.uniform(-1, 1, size=2)
            yield smooth.astype(np.float32)
            continue
        if t >= stop:
            yield np.zeros(2, dtype=np.float32)
            continue
        puck, eff = u.puck_pos, u.effector_pos
        passed_waypoint = passed_waypoint or np.linalg.norm(puck - waypoint) < 0.08
        target = goal if passed_waypoint else waypoint
        direction = (target - puck) / (np.linalg.norm(target - puck) + 1e-9)
        behind = puck - direction * 0.1
        to_behind = behind - eff
        if np.linalg.norm(to_behind) > 0.04:
            vel = speed * to_behind / np.linalg.norm(to_behind)
        else:
            vel = speed * direction + 2.0 * to_behind
        action = u.effector_velocity_to_action(vel) + noise * rng.standard_normal(2)
        yield np.clip(action, -1, 1).astype(np.float32)


def check_push_avoid_env(field: str, env_id: str) -> None:
    """Refuse an ``env_id`` that is not one of the registered PushAvoid tasks (the only ones the scripted rollouts,
    renderer and zone features know), naming the config field and the allowed ids."""
    import gymnasium as gym

    import mmalign.envs  # noqa: F401  (registers the ids)

    allowed = sorted(k for k in gym.registry if str(gym.spec(k).entry_point).startswith("mmalign.envs.push_avoid"))
    if env_id not in allowed:
        raise ValueError(f"{field} must be a PushAvoid task, one of {allowed}, got {env_id!r}")


def collect_trajectories(
    env_id: str, n: int, seed: int, steps: int = 30, render: bool = True, image_size: int = 64
) -> Trajectories:
    """Roll out ``n`` scripted episodes of ``steps`` steps on ``env_id``; frames are rendered after every step."""
    if n < 1 or steps < 1:
        raise ValueError(f"n and steps must be >= 1, got n={n}, steps={steps}")
    os.environ.setdefault("MUJOCO_GL", "egl")
    import gymnasium as gym

    import mmalign.envs  # noqa: F401  (registers the ids)

    env = gym.make(env_id, episode_steps=steps, image_size=image_size, render_mode="rgb_array" if render else None)
    rng = np.random.default_rng(seed)
    frames = np.zeros((n, steps, image_size, image_size, 3), dtype=np.uint8) if render else None
    positions = np.zeros((n, steps, 4), dtype=np.float32)
    true_r = np.zeros((n, steps), dtype=np.float32)
    task_r = np.zeros((n, steps), dtype=np.float32)
    obs_all = np.zeros((n, steps) + env.observation_space.shape, dtype=np.float32)
    actions = np.zeros((n, steps, 2), dtype=np.float32)
    for i in range(n):
        obs, _ = env.reset(seed=int(rng.integers(2**31)))
        u = env.unwrapped
        for t, action in enumerate(_scripted_actions(env, rng, steps)):
            obs_all[i, t], actions[i, t] = obs, action
            obs, reward, _, _, info = env.step(action)
            positions[i, t] = np.concatenate([u.effector_pos, u.puck_pos])
            true_r[i, t], task_r[i, t] = info["true_reward"], reward
            if frames is not None:
                frames[i, t] = env.render()
    env.close()
    return Trajectories(frames, positions, true_r, task_r, obs_all, actions)


def make_triplets(returns: np.ndarray, n: int, rng: np.random.Generator, anchor_pool: int = 6) -> np.ndarray:
    """Sample ``n`` (anchor, first, second) index triplets; anchors come from the ``anchor_pool`` best trajectories
    (RAPL's anchor is a most-preferred video), candidates uniformly from the rest."""
    order = np.argsort(-returns)
    anchors, rest = order[:anchor_pool], order[anchor_pool:]
    if len(rest) < 2:
        raise ValueError(f"need at least anchor_pool + 2 trajectories, got {len(returns)}")
    a = rng.choice(anchors, size=n)
    pairs = np.stack([rng.choice(rest, size=2, replace=False) for _ in range(n)])
    return np.concatenate([a[:, None], pairs], axis=1)


def label_triplets(
    returns: np.ndarray, triplets: np.ndarray, rng: np.random.Generator, beta: float = float("inf")
) -> np.ndarray:
    """Simulated human: ``P(first ≻ second)`` from privileged true returns (Boltzmann with rationality ``beta``;
    ``inf`` = always the better one, exact ties 0.5). Returns float labels ``(n,)``; sampled labels are hard 0/1."""
    diff = returns[triplets[:, 1]] - returns[triplets[:, 2]]
    if np.isinf(beta):
        return np.where(diff > 0, 1.0, np.where(diff < 0, 0.0, 0.5)).astype(np.float32)
    p = 1.0 / (1.0 + np.exp(-beta * diff))
    return (rng.random(len(p)) < p).astype(np.float32)
