"""``mmalign/HindsightMarket-v0``: the RLHS marketplace as a one-step gymnasium environment.

The seller (the agent) sees the customer's required feature, every item's hidden has/lacks status and the prices;
it recommends one item (or none) and makes one claim per item (``has`` / ``lacks`` / ``silent``). A simulated,
Boltzmann-rational customer who sees only prices and the claims decides what to buy. The reward is the Likert rating
(normalised to [-1, 1] as in RLHS's figures) that the chosen *feedback channel* gives; ``info`` carries every channel
and the true outcome, so one rollout serves foresight and hindsight studies alike. The math lives in
:mod:`mmalign.hindsight.market`; see ``docs/methods/rlhs.md``.

Action: ``MultiDiscrete([M + 1] + [3] * M)`` = (recommended item, ``M`` meaning none; claim per item:
0 = claims has, 1 = claims lacks, 2 = silent). Observation (seller's view): ``[one_hot(f*), status_1..M,
price_1..M]`` as float32. ``customer_view()`` is what the customer sees: requirement and prices, never the status.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from mmalign.hindsight import market as mk

__all__ = ["HindsightMarketEnv"]


class HindsightMarketEnv(gym.Env):
    """One-step marketplace; ``feedback`` picks the channel whose normalised rating is the reward.

    Args:
        feedback: one of ``foresight``, ``partial_hindsight``, ``full_hindsight``, ``world_model_hindsight``
            (the human channels, reward = (rating - 3) / 2) or ``true_utility`` (oracle reward).
        render_mode: ``None`` or ``"ansi"`` (the templated dialogue of the text form).
        **market: fields of :class:`mmalign.hindsight.market.MarketParams` (trust, rationality, prices, ...).
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 1}

    def __init__(self, feedback: str = "foresight", render_mode: str | None = None, **market: Any) -> None:
        if feedback not in mk.CHANNELS:
            raise ValueError(f"feedback must be one of {list(mk.CHANNELS)}, got {feedback!r}")
        if render_mode not in (None, "ansi"):
            raise ValueError(f"render_mode must be None or 'ansi', got {render_mode!r}")
        if "price_ranges" in market:
            market["price_ranges"] = tuple(tuple(r) for r in market["price_ranges"])
        self.params = mk.MarketParams(**market)
        self.feedback = feedback
        self.render_mode = render_mode
        m, k = self.params.n_items, self.params.n_features
        high = np.concatenate([np.ones(k + m), np.full(m, max(r[1] for r in self.params.price_ranges))])
        self.observation_space = spaces.Box(0.0, high.astype(np.float32), shape=(k + 2 * m,), dtype=np.float32)
        self.action_space = spaces.MultiDiscrete([m + 1] + [3] * m)
        self._scen: mk.Scenarios | None = None
        self._last: tuple[np.ndarray, np.ndarray, mk.Outcomes] | None = None

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._scen = mk.sample_scenarios(self.np_random, 1, self.params)
        self._last = None
        return mk.seller_observation(self._scen, self.params)[0], {}

    def customer_view(self) -> dict[str, Any]:
        """The customer's information before buying: required feature and prices (no hidden status)."""
        if self._scen is None:
            raise RuntimeError("call reset() before customer_view()")
        view = mk.customer_view(self._scen)
        return {"feature": int(view["feature"][0]), "prices": view["prices"][0]}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        if self._scen is None:
            raise RuntimeError("call reset() before step()")
        action = np.asarray(action, dtype=np.int64).reshape(-1)
        if not self.action_space.contains(action):
            raise ValueError(f"action must lie in {self.action_space}, got {action.tolist()}")
        rec, claims = action[:1], action[None, 1:]
        out = mk.simulate(self.np_random, self._scen, rec, claims, self.params)
        score = mk.channel_scores(self.feedback, self._scen, out, self.params)
        if self.feedback == "true_utility":
            reward = float(score[0])
        else:
            reward = float((mk.likert(score)[0] - 3) / 2.0)
        batch_info = mk.episode_info(self._scen, rec, claims, out, self.params)
        info = {key: value[0].item() for key, value in batch_info.items()}
        info["customer_beliefs"] = out.beliefs[0]
        self._last = (rec, claims, out)
        obs = mk.seller_observation(self._scen, self.params)[0]
        return obs, reward, True, False, info

    def render(self) -> str | None:
        if self.render_mode != "ansi" or self._scen is None:
            return None
        from mmalign.hindsight.text import render_dialogue

        rec, claims = (self._last[0], self._last[1]) if self._last else (None, None)
        if rec is None or claims is None:
            return render_dialogue(self._scen, 0, None, None)
        return render_dialogue(self._scen, 0, int(rec[0]), claims[0])
