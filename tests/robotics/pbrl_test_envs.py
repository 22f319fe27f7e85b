"""Small envs for the PbRL tests, registered on import (so ``env_id=pbrl_test_envs:<Id>`` works from the CLI)."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces


class BrightSpotEnv(gym.Env):
    """Image observations (36x36x3 uint8): a bright square at a position the two discrete actions move; the true
    reward is minus the square's distance from the centre. 20-step episodes."""

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, size: int = 36) -> None:
        self.size = size
        self.observation_space = spaces.Box(0, 255, (size, size, 3), np.uint8)
        self.action_space = spaces.Discrete(2)
        self.pos = 0

    def _obs(self) -> np.ndarray:
        img = np.zeros((self.size, self.size, 3), np.uint8)
        x = int(np.clip(self.size // 2 + self.pos, 2, self.size - 3))
        img[self.size // 2 - 2:self.size // 2 + 2, x - 2:x + 2] = 255
        return img

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict]:
        super().reset(seed=seed)
        self.pos = int(self.np_random.integers(-10, 11))
        return self._obs(), {}

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        self.pos = int(np.clip(self.pos + (1 if int(action) == 1 else -1), -15, 15))
        return self._obs(), -abs(self.pos) / 15.0, False, False, {}


class BrightSpotDictEnv(BrightSpotEnv):
    """Dict observations: the image and the square's position as a vector."""

    def __init__(self, size: int = 36) -> None:
        super().__init__(size)
        self.observation_space = spaces.Dict({"image": spaces.Box(0, 255, (size, size, 3), np.uint8),
                                              "position": spaces.Box(-15.0, 15.0, (1,), np.float32)})

    def _obs(self) -> Any:
        return {"image": super()._obs(), "position": np.array([self.pos], np.float32)}


class NoRewardEnv(gym.Env):
    """A vector env that has no true reward (``metadata["has_true_reward"] = False``): only humans can label it."""

    metadata: dict[str, Any] = {"render_modes": [], "has_true_reward": False}
    observation_space = spaces.Box(-1.0, 1.0, (3,), np.float32)
    action_space = spaces.Box(-1.0, 1.0, (1,), np.float32)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict]:
        super().reset(seed=seed)
        return np.zeros(3, np.float32), {}

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        return np.zeros(3, np.float32), 0.0, False, False, {}


class MultiButtonEnv(NoRewardEnv):
    """MultiDiscrete actions: neither Box nor Discrete."""

    metadata: dict[str, Any] = {"render_modes": []}
    action_space = spaces.MultiDiscrete([2, 3])


for _id, _cls in (("PbrlBrightSpot-v0", BrightSpotEnv), ("PbrlBrightSpotDict-v0", BrightSpotDictEnv),
                  ("PbrlNoReward-v0", NoRewardEnv),
                  ("PbrlMultiButton-v0", MultiButtonEnv)):
    if _id not in gym.registry:
        gym.register(_id, entry_point=_cls, max_episode_steps=20)
