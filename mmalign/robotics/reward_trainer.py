"""The reward side of online preference-based RL: a reward ensemble, its input statistics and its refits.

:class:`RewardTrainer` owns a :class:`~mmalign.core.reward_models.RewardEnsemble` and everything the loop does to
it: input standardisation frozen at the first feedback round, Bradley–Terry refits on the labels so far
(:func:`mmalign.robotics.reward_io.fit_ensemble`), optional reward standardisation over the replay buffer, and the
per-step reward the agent sees (:meth:`RewardTrainer.reward_fn`). It knows nothing about budgets, teachers or SB3.

Observations reach the ensemble flattened for vector models (``obs [*lead, obs_dim]``) and as they are for pixel
models (``obs [*lead, C, H, W]``, :class:`~mmalign.core.reward_models.CNNRewardModel`); actions are already features
(env units for Box actions, one-hot for Discrete ones, see :mod:`mmalign.robotics.wrappers`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = ["RewardTrainer"]


class RewardTrainer:
    """Fits a reward ensemble to preference labels and serves its per-step reward.

    Args:
        ensemble: the reward ensemble (its members' ``obs_ndim`` says vector or pixel observations).
        device: where the ensemble lives and is fitted.
        normalize_obs: standardise vector observations with per-dimension stats frozen at the first round.
        normalize_act: fit the members' own input standardisation (``MLPRewardModel(input_norm=True)``) at the first
            round, with the action block weighted by ``act_weight`` (``None`` = ``sqrt(obs_dim / act_dim)``).
        reward_norm: hand out each member's reward standardised over the buffer (:meth:`fit_reward_norm`).
        label_smoothing: fit ``y (1 − e) + e / 2`` instead of ``y``.
        epochs, batch_size, lr: Bradley–Terry refit (warm start) after every round.
        seed: round ``k``'s refit shuffles with ``seed + k``.
        obs_key: dict observations: the entry the reward model sees (dicts passed in are reduced to it).
    """

    def __init__(self, ensemble: Any, *, device: torch.device | str = "cpu", normalize_obs: bool = True,
                 normalize_act: bool = False, act_weight: float | None = None, reward_norm: bool = False,
                 label_smoothing: float = 0.0, epochs: int = 50, batch_size: int = 64, lr: float = 3e-4,
                 seed: int = 0, obs_key: str | None = None) -> None:
        self.obs_key = obs_key or None
        self.device = torch.device(device)
        self.ensemble = ensemble.to(self.device)
        first = ensemble._models()[0]
        self.pixels = first.obs_ndim > 1
        self.obs_dim = int(getattr(first, "obs_dim", 0))
        self.act_dim = int(first.act_dim)
        if normalize_act and (self.pixels or not getattr(first, "input_norm", False)):
            raise ValueError("normalize_act needs vector reward models built with input_norm=True")
        self.normalize_obs = normalize_obs and not self.pixels
        self.normalize_act = normalize_act
        self.act_weight = act_weight or (math.sqrt(self.obs_dim / self.act_dim) if self.act_dim else 1.0)
        self.reward_norm = reward_norm
        self.label_smoothing = label_smoothing
        self.epochs, self.batch_size, self.lr, self.seed = epochs, batch_size, lr, seed
        # Reward-model input standardisation (small-scale features such as Reacher's fingertip-target vector are
        # otherwise hard to learn from a few hundred labels); frozen at the first round so the reward stays fixed
        # between refits.
        self.obs_mean = np.zeros(max(self.obs_dim, 1), np.float32)
        self.obs_std = np.ones(max(self.obs_dim, 1), np.float32)

    def norm(self, obs: np.ndarray) -> np.ndarray:
        """Observations as the ensemble sees them (the ``obs_key`` entry of a dict; standardised vectors; pixels
        unchanged)."""
        if isinstance(obs, dict):
            obs = obs[self.obs_key]
        if self.pixels:
            return np.asarray(obs)
        return (np.asarray(obs, np.float32) - self.obs_mean) / self.obs_std

    def _tensors(self, obs: np.ndarray, act: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        o = torch.as_tensor(self.norm(obs), device=self.device)
        if not self.pixels:
            o = o.to(torch.float32)
        return o, torch.as_tensor(act, dtype=torch.float32, device=self.device)

    def _steps_ndim(self) -> int:
        return 3 if self.pixels else 1

    @torch.no_grad()
    def member_rewards(self, obs: np.ndarray, act: np.ndarray, normalize: bool = False) -> torch.Tensor:
        """Per-member per-step rewards ``[K, *lead]`` for ``obs [*lead, *obs_shape]``, ``act [*lead, act_dim]``.

        ``normalize`` applies each member's stored reward standardisation (:meth:`fit_reward_norm`).
        """
        o, a = self._tensors(obs, act)
        if o.dim() == self._steps_ndim() + 1:  # single steps: a length-1 time axis for the [N, H] reward-model API
            return self.ensemble.step_rewards(o[:, None], a[:, None], normalize=normalize)[..., 0]
        return self.ensemble.step_rewards(o, a, normalize=normalize)

    def reward_fn(self, obs: np.ndarray, act: np.ndarray) -> np.ndarray:
        """Mean ensemble reward for a batch of single steps (the learned reward the agent sees)."""
        return self.member_rewards(obs, act, normalize=self.reward_norm).mean(0).cpu().numpy()

    @torch.no_grad()
    def fit_reward_norm(self, obs: np.ndarray, act: np.ndarray) -> None:
        """Standardise every member's per-step reward over ``obs [M, ...]``, ``act [M, act_dim]`` (the buffer).

        A tanh ensemble fitted to confident labels has an arbitrary scale and offset (Bradley–Terry only fixes
        differences of segment returns); SAC's entropy temperature is tuned against the reward scale, so the scale
        is fixed to 1 here (B-Pref / PEBBLE leave it unnormalised).
        """
        o, a = self._tensors(obs, act)
        self.ensemble.fit_normalization(o[:, None], a[:, None])

    def fit_input_stats(self, obs: np.ndarray, act: np.ndarray) -> None:
        """Freeze the input standardisation on the first round's segments ``obs [N, H, ...]``, ``act [N, H, A]``."""
        if self.normalize_obs:
            flat = obs.reshape(-1, obs.shape[-1])
            self.obs_mean = flat.mean(0).astype(np.float32)
            self.obs_std = np.maximum(flat.std(0), 1e-3).astype(np.float32)
        if self.normalize_act:
            o, a = self._tensors(obs, act)
            for member in self.ensemble._models():
                member.fit_input_normalization(o, a, act_weight=self.act_weight)

    def fit(self, pairs: dict[str, np.ndarray], round_index: int) -> dict[str, float]:
        """Refit (warm start) on ``pairs`` (``obs1, act1, obs2, act2 [n, H, ...]``, ``y [n]``); ``{}`` if empty."""
        from mmalign.robotics import reward_io

        eps = self.label_smoothing
        train = dict(pairs)
        train["y"] = (train["y"] * (1.0 - eps) + 0.5 * eps).astype(np.float32)
        data = {k: torch.as_tensor(self.norm(v) if k.startswith("obs") else v, device=self.device)
                for k, v in train.items()}
        if not len(data["y"]):  # a skipping teacher may leave a round without any label: keep the ensemble as it is
            return {}
        return reward_io.fit_ensemble(
            self.ensemble, data["obs1"], data["act1"], data["obs2"], data["act2"], data["y"],
            epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, seed=self.seed + round_index,
        )

    def save_pretrained(self, folder: Any, **meta: Any) -> Any:
        """Write the ensemble with this trainer's observation standardisation as a reward-model folder
        (:func:`mmalign.core.reward_models.save_pretrained`; reload with ``RewardEnsemble.from_pretrained``)."""
        from mmalign.core.reward_models import save_pretrained

        norm = self.normalize_obs and not self.pixels
        return save_pretrained(self.ensemble, folder, obs_mean=self.obs_mean if norm else None,
                               obs_std=self.obs_std if norm else None, **meta)
