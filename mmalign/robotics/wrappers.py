"""Reward swapping for SB3 vectorised envs, and the action features a reward model sees.

:class:`RewardVecEnvWrapper` wraps any SB3 ``VecEnv``: each step it hands out ``reward_fn(obs_before, action)``
instead of the env's reward and keeps the env's own reward in ``info["true_reward"]`` (teachers and evaluation read
it; the agent never does). ``reward_fn=None`` passes the true reward through. The reward function can be swapped at
any time (``wrapper.reward_fn = ...``), which is how the feedback callback moves from a pre-training reward to the
learned one.

Action features (:func:`action_features`): Box actions in env units, clipped to the box (what the env applied);
Discrete actions one-hot. :func:`action_dim` is the matching feature size.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
from gymnasium import spaces
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper

__all__ = ["RewardVecEnvWrapper", "action_features", "action_dim", "check_action_space", "find_reward_wrapper"]

RewardFn = Callable[[Any, np.ndarray], np.ndarray]


def check_action_space(space: Any, where: str = "env") -> None:
    """Refuse anything but Box and Discrete action spaces (the reward model's action features)."""
    if not isinstance(space, (spaces.Box, spaces.Discrete)):
        raise ValueError(f"{where} must have a Box or Discrete action space for preference-based RL, got {space}")


def action_dim(space: Any) -> int:
    """Size of the action features: ``prod(shape)`` for Box, ``n`` (one-hot) for Discrete."""
    check_action_space(space)
    if isinstance(space, spaces.Discrete):
        return int(space.n)
    return int(np.prod(space.shape))


def action_features(space: Any, actions: np.ndarray) -> np.ndarray:
    """Reward-model action input ``[*lead, action_dim(space)]`` for env actions ``actions [*lead, ...]``.

    Box: clipped to the box and flattened per step. Discrete: one-hot of the integer action (SB3 buffers store
    discrete actions with a trailing axis of size 1, ``[T, n_envs, 1]``; it is dropped when ``ndim >= 2``).
    """
    if isinstance(space, spaces.Discrete):
        a = np.asarray(actions)
        if a.ndim >= 2 and a.shape[-1] == 1:  # SB3 buffers: [T, n_envs, 1]; env actions: [n_envs]
            a = a[..., 0]
        idx = a.astype(np.int64) - int(space.start)
        if idx.size and (idx.min() < 0 or idx.max() >= space.n):
            raise ValueError(f"discrete actions must lie in [{space.start}, {space.start + space.n}), got "
                             f"{int(a.min())}..{int(a.max())}")
        return np.eye(int(space.n), dtype=np.float32)[idx]
    clipped = np.clip(actions, space.low, space.high)
    lead = clipped.shape[: clipped.ndim - len(space.shape)]
    return clipped.reshape(*lead, -1)


class RewardVecEnvWrapper(VecEnvWrapper):
    """Replace a ``VecEnv``'s reward with ``reward_fn(obs_before_step, action_features)``.

    Args:
        venv: any SB3 ``VecEnv`` (``DummyVecEnv``, ``SubprocVecEnv``, frame-stacked ...).
        reward_fn: ``(obs [n_envs, ...], act [n_envs, A]) -> [n_envs]`` rewards, or ``None`` (true reward).

    ``info["true_reward"]`` always holds the env's own reward. Observations passed to ``reward_fn`` are those the
    agent acted on (before the step), exactly as stored in SB3's buffers.
    """

    def __init__(self, venv: VecEnv, reward_fn: RewardFn | None = None) -> None:
        check_action_space(venv.action_space, "venv")
        super().__init__(venv)
        self.reward_fn = reward_fn
        self._obs: Any = None
        self._act: np.ndarray | None = None

    def reset(self) -> Any:
        self._obs = self.venv.reset()
        return self._obs

    def step_async(self, actions: np.ndarray) -> None:
        self._act = action_features(self.action_space, np.asarray(actions))
        self.venv.step_async(actions)

    def step_wait(self) -> Any:
        obs, rew, dones, infos = self.venv.step_wait()
        for info, r in zip(infos, rew):
            info["true_reward"] = float(r)
        if self.reward_fn is not None:
            if self._obs is None or self._act is None:
                raise RuntimeError("RewardVecEnvWrapper: reset() must be called before step()")
            rew = np.asarray(self.reward_fn(self._obs, self._act), dtype=np.float32).reshape(rew.shape)
        self._obs = obs
        return obs, rew, dones, infos


def find_reward_wrapper(venv: Any) -> Any:
    """The :class:`RewardVecEnvWrapper` in ``venv``'s chain of ``.venv`` wrappers, or ``None``."""
    while venv is not None:
        if isinstance(venv, RewardVecEnvWrapper):
            return venv
        venv = getattr(venv, "venv", None)
    return None
