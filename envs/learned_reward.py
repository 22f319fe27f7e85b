"""LearnedReward-v0: any gymnasium env whose reward is replaced by a learned reward ensemble checkpoint.

``gymnasium.make("mmalign/LearnedReward-v0", env_id="Reacher-v5", reward_checkpoint="run/reward_model.safetensors")``
wraps ``env_id`` and returns, at each step, the ensemble-mean reward ``r̂(o_t, a_t)`` of the observation *before*
the action (standardised with the checkpoint's stored mean/std) and the (clipped) action — the same input the reward was trained on in
:mod:`mmalign.robotics.pebble`. Each member's reward is standardised with its stored reward statistics
(``PebbleConfig(reward_norm=True)``; mean 0 / std 1, i.e. unchanged, when they were never fitted), so the env hands
out the reward the agent was trained on. The env's own reward is kept in ``info["true_reward"]`` for evaluation.

Checkpoints are written by :func:`mmalign.robotics.reward_io.save_reward_model`; one trained for a different
observation or action size is refused at construction with a ``ValueError``. Without a checkpoint the reward model
is a freshly initialised ensemble (seeded by ``reward_seed``): only for tests and ``check_env``.
"""

from __future__ import annotations

from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np


class LearnedRewardEnv(gym.Env):
    """Wrap ``env_id`` and swap its reward for a learned one (see the module docstring).

    A ``gym.Env`` holding the base env (not a ``gym.Wrapper``), so that ``unwrapped`` is this env and
    ``check_env(gym.make(...).unwrapped)`` checks the learned-reward env itself. Only ``rgb_array`` rendering is
    offered (offscreen; a window makes no sense for a reward-swapped env).
    """

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(
        self,
        env_id: str = "Reacher-v5",
        reward_checkpoint: str | None = None,
        reward_seed: int = 0,
        render_mode: str | None = None,
        **env_kwargs: Any,
    ) -> None:
        import torch

        from mmalign.robotics.reward_io import build_ensemble, load_reward_model

        if env_id not in gym.registry:
            raise ValueError(f"env_id {env_id!r} is not a registered gymnasium id")
        if env_id.startswith("mmalign/LearnedReward"):
            raise ValueError(f"env_id must be a base task, not another learned-reward env, got {env_id!r}")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        env = gym.make(env_id, render_mode=render_mode, **env_kwargs)
        if not isinstance(env.action_space, gym.spaces.Box) or not isinstance(env.observation_space, gym.spaces.Box):
            raise ValueError(f"env_id must have Box observation and action spaces, got {env.observation_space}, "
                             f"{env.action_space}")
        self.env = env
        self.observation_space = env.observation_space
        self.action_space = env.action_space
        self.metadata = {"render_modes": ["rgb_array"], "render_fps": env.metadata.get("render_fps")}
        self.render_mode = render_mode
        self.spec_env_id = env_id
        obs_dim = int(np.prod(env.observation_space.shape))
        act_dim = int(np.prod(env.action_space.shape))
        if reward_checkpoint is None:
            self.ensemble = build_ensemble(obs_dim, act_dim, size=3, hidden=64, seed=reward_seed)
            self.reward_meta: dict[str, Any] = {"env_id": env_id, "untrained": True,
                                                "obs_mean": torch.zeros(obs_dim), "obs_std": torch.ones(obs_dim)}
        else:
            self.ensemble, self.reward_meta = load_reward_model(reward_checkpoint, obs_dim=obs_dim, act_dim=act_dim)
        self.ensemble.eval()
        self._torch = torch
        self._obs: np.ndarray | None = None

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        super().reset(seed=seed)
        obs, info = self.env.reset(seed=seed, options=options)
        self._obs = np.asarray(obs, dtype=np.float32)
        return obs, info

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        if self._obs is None:
            raise RuntimeError("call reset() before step()")
        space = self.env.action_space
        act = np.clip(np.asarray(action, dtype=np.float32), space.low, space.high)
        torch = self._torch
        with torch.no_grad():
            o = torch.as_tensor(self._obs.reshape(1, 1, -1))
            o = (o - self.reward_meta["obs_mean"]) / self.reward_meta["obs_std"]
            a = torch.as_tensor(act.reshape(1, 1, -1))
            # each member's stored reward standardisation (PebbleConfig.reward_norm; identity when never fitted)
            reward = float(self.ensemble.step_rewards(o, a, normalize=True).mean())
        obs, true_reward, terminated, truncated, info = self.env.step(action)
        info = dict(info)
        info["true_reward"] = float(true_reward)
        self._obs = np.asarray(obs, dtype=np.float32)
        return obs, reward, terminated, truncated, info

    def render(self) -> Any:
        return self.env.render()

    def close(self) -> None:
        self.env.close()
