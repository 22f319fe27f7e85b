"""LearnedReward-v0 and :class:`LearnedRewardWrapper`: any gymnasium env with its reward replaced by a learned one.

``LearnedRewardWrapper(env, "run/reward_model")`` wraps any env (Box or Discrete actions, vector or channels-last
image observations) with a reward-model folder written by ``save_pretrained`` (``PreferenceLoop.save_reward_model``,
``RewardTrainer.save_pretrained``, ``RewardEnsemble.save_pretrained``); any agent then trains on the learned reward.
``gymnasium.make("mmalign/LearnedReward-v0", env_id="Reacher-v5", reward_model="run/reward_model")`` is the same as
a registered env.

With ``reward_checkpoint="run/reward_model.safetensors"`` (the single-file checkpoint of
:func:`mmalign.robotics.reward_io.save_reward_model`) the same wrapper runs on that ensemble. Either way the reward
of a step is the member mean of each member's standardised reward (stored statistics, ``PebbleConfig(reward_norm=
True)``; identity when never fitted) on the observation *before* the action (standardised with the stored
mean/std) and the action features: the input the reward was trained on. The env's own reward is kept in
``info["true_reward"]``. A reward model for other observation or action sizes is refused at construction with a
``ValueError``; without any, the reward model is a freshly initialised ensemble (seeded by ``reward_seed``): only
for tests and ``check_env``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np


class LearnedRewardWrapper(gym.Wrapper):
    """Hand out ``r̂(o_t, a_t)`` of a saved reward model; the env's own reward goes to ``info["true_reward"]``.

    Args:
        env: any gymnasium env with Box or Discrete actions.
        reward_model: a folder written by ``save_pretrained``, or an already loaded model
            (``RewardEnsemble.from_pretrained``).

    The reward is the member mean of each member's standardised reward (stored reward statistics; identity when
    never fitted), on the observation *before* the action (standardised with the folder's ``obs_mean``/``obs_std``)
    and the action features (Box: clipped, Discrete: one-hot). A pixel model whose input channels are k times the
    env's (trained with ``frame_stack=k``) sees the last k frames stacked as SB3's ``VecFrameStack`` stacks them. A
    model whose input sizes differ from the env's is refused at construction.
    """

    def __init__(self, env: gym.Env, reward_model: Any) -> None:
        import torch

        from mmalign.core.reward_models import RewardEnsemble, load_pretrained
        from mmalign.robotics.wrappers import action_dim, check_action_space

        super().__init__(env)
        check_action_space(env.action_space, "env")
        if isinstance(reward_model, (str, Path)):
            model, extras = load_pretrained(reward_model)
        else:
            model, extras = reward_model, getattr(reward_model, "pretrained_extras", {})
        self.model = model.eval()
        self.obs_mean, self.obs_std = extras.get("obs_mean"), extras.get("obs_std")
        members = model._models() if isinstance(model, RewardEnsemble) else [model]
        first = members[0]
        shape = env.observation_space.shape or ()
        self._pixels = first.obs_ndim == 3
        self._stack = 1  # frames per reward-model input (a model trained with PebbleConfig.frame_stack = k > 1)
        if self._pixels:
            want = (first.in_channels, first.image_size, first.image_size)
            channels_last = len(shape) == 3 and shape[0] == shape[1] == first.image_size
            if channels_last and shape[2] != first.in_channels and first.in_channels % shape[2] == 0:
                # channels-last frames stacked along the channels as SB3's VecFrameStack does (newest last)
                self._stack = first.in_channels // shape[2]
                shape = (shape[0], shape[1], first.in_channels)
            self._transpose = len(shape) == 3 and tuple(shape) != want and (shape[2], shape[0], shape[1]) == want
            got = (shape[2], shape[0], shape[1]) if self._transpose else tuple(shape)
        else:
            want, got, self._transpose = (first.obs_dim,), (int(np.prod(shape)),), False
        if tuple(got) != tuple(want) or first.act_dim != action_dim(env.action_space):
            raise ValueError(f"reward model expects observations {want} and {first.act_dim} action features, but the "
                             f"env has {tuple(shape)} and {action_dim(env.action_space)}")
        self._torch = torch
        self._obs: Any = None
        self._frames: Any = None

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        obs, info = self.env.reset(seed=seed, options=options)
        self._frames = None
        self._obs = self._stacked(obs)
        return obs, info

    def _stacked(self, obs: Any) -> Any:
        """The reward model's view of ``obs``: with frame stacking, the last k frames along the channels, zeros
        before an episode's first frame (SB3's ``VecFrameStack`` on a reset)."""
        if self._stack == 1:
            return obs
        obs = np.asarray(obs)
        c = obs.shape[-1]
        if self._frames is None:
            self._frames = np.zeros((*obs.shape[:-1], c * self._stack), obs.dtype)
        self._frames = np.roll(self._frames, -c, axis=-1)
        self._frames[..., -c:] = obs
        return self._frames.copy()

    def learned_reward(self, obs: Any, action: Any) -> float:
        """The learned reward of one step (observation before the action)."""
        from mmalign.robotics.wrappers import action_features

        torch = self._torch
        with torch.no_grad():
            o = np.asarray(obs)
            if self._pixels:
                o = torch.as_tensor(np.transpose(o, (2, 0, 1)) if self._transpose else o)[None, None]
            else:
                o = torch.as_tensor(o.astype(np.float32).reshape(1, 1, -1))
                if self.obs_mean is not None:
                    o = (o - self.obs_mean) / self.obs_std
            a = torch.as_tensor(action_features(self.env.action_space, np.asarray(action))
                                .astype(np.float32).reshape(1, 1, -1))
            r = self.model.step_rewards(o, a, normalize=True)
            return float(r.mean())

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        if self._obs is None:
            raise RuntimeError("call reset() before step()")
        reward = self.learned_reward(self._obs, action)
        obs, true_reward, terminated, truncated, info = self.env.step(action)
        info = dict(info)
        info["true_reward"] = float(true_reward)
        self._obs = self._stacked(obs)
        return obs, reward, terminated, truncated, info


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
        reward_model: str | None = None,
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
        if reward_model is not None and reward_checkpoint is not None:
            raise ValueError("give reward_model (a save_pretrained folder) or reward_checkpoint (a file), not both")
        env = gym.make(env_id, render_mode=render_mode, **env_kwargs)
        if reward_checkpoint is not None or reward_model is None:
            if not isinstance(env.action_space, gym.spaces.Box) or not isinstance(env.observation_space,
                                                                                   gym.spaces.Box):
                raise ValueError(f"env_id must have Box observation and action spaces for a reward_checkpoint, got "
                                 f"{env.observation_space}, {env.action_space}")
        self.env = env
        self.observation_space = env.observation_space
        self.action_space = env.action_space
        self.metadata = {"render_modes": ["rgb_array"], "render_fps": env.metadata.get("render_fps")}
        self.render_mode = render_mode
        self.spec_env_id = env_id
        if reward_model is not None:
            self._reward = LearnedRewardWrapper(env, reward_model)
            self.ensemble = self._reward.model
            self.reward_meta: dict[str, Any] = {"env_id": env_id, "obs_mean": self._reward.obs_mean,
                                                "obs_std": self._reward.obs_std}
        else:
            obs_dim = int(np.prod(env.observation_space.shape))
            act_dim = int(np.prod(env.action_space.shape))
            if reward_checkpoint is None:
                self.ensemble = build_ensemble(obs_dim, act_dim, size=3, hidden=64, seed=reward_seed)
                self.reward_meta = {"env_id": env_id, "untrained": True, "obs_mean": torch.zeros(obs_dim),
                                    "obs_std": torch.ones(obs_dim)}
            else:
                self.ensemble, self.reward_meta = load_reward_model(reward_checkpoint, obs_dim=obs_dim,
                                                                    act_dim=act_dim)
            self.ensemble.pretrained_extras = {"obs_mean": self.reward_meta["obs_mean"],
                                               "obs_std": self.reward_meta["obs_std"]}
            self._reward = LearnedRewardWrapper(env, self.ensemble)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        super().reset(seed=seed)
        return self._reward.reset(seed=seed, options=options)

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        return self._reward.step(action)

    def render(self) -> Any:
        return self.env.render()

    def close(self) -> None:
        self.env.close()
