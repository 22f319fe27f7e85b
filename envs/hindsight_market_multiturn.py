"""``mmalign/HindsightMarketMultiTurn-v0``: the marketplace as a ``T``-turn conversation with delayed feedback.

Each turn the customer asks about one item (drawn at reset, uniformly, repeats allowed) and the seller answers with a
claim about it (``has`` / ``lacks`` / ``silent``); the customer's belief about an item is set by the seller's latest
claim about it (the prior while never asked or answered silently). After the last turn the customer buys (or not)
as in ``HindsightMarket-v0``, the recommendation in the last action counting as advice. Feedback arrives only then.

Hindsight horizon ``N`` (RLHS Lemma 1 / Theorem 1): after the purchase the customer uses the item for ``N``
consequence steps, and each step reveals whether it has the feature with probability ``reveal_prob``. The partial
and world-model hindsight channels judge the revealed truth if it showed within ``N`` steps and fall back to the
customer's foresight belief otherwise, so ``N = 0`` is foresight and the reveal probability ``1 - (1 - r)^N`` grows
geometrically to 1 with ``N``. Full hindsight and true utility reveal everything.

Action: ``MultiDiscrete([M + 1, 3])`` = (recommended item, ``M`` meaning none, read at the last turn only; claim
about the asked item). Observation: the one-step env's ``[one_hot(f*), status, prices]`` plus ``one_hot(asked
item)``, the fraction of turns done and the claims so far (one-hot per item, ``silent`` before any answer).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from mmalign.hindsight import market as mk

__all__ = ["HindsightMarketMultiTurnEnv"]


class HindsightMarketMultiTurnEnv(gym.Env):
    """``num_turns`` question/claim turns, then a purchase and one delayed rating from ``feedback``."""

    metadata = {"render_modes": []}

    def __init__(
        self,
        feedback: str = "foresight",
        num_turns: int = 3,
        hindsight_horizon: int = 1,
        reveal_prob: float = 0.5,
        render_mode: str | None = None,
        **market: Any,
    ) -> None:
        if render_mode is not None:
            raise ValueError(f"render_mode must be None (this env does not render), got {render_mode!r}")
        if feedback not in mk.CHANNELS:
            raise ValueError(f"feedback must be one of {list(mk.CHANNELS)}, got {feedback!r}")
        if not isinstance(num_turns, int) or num_turns < 1:
            raise ValueError(f"num_turns must be an integer >= 1, got {num_turns!r}")
        if not isinstance(hindsight_horizon, int) or hindsight_horizon < 0:
            raise ValueError(f"hindsight_horizon must be an integer >= 0, got {hindsight_horizon!r}")
        if not 0.0 <= reveal_prob <= 1.0:
            raise ValueError(f"reveal_prob must be in [0, 1], got {reveal_prob!r}")
        if "price_ranges" in market:
            market["price_ranges"] = tuple(tuple(r) for r in market["price_ranges"])
        self.params = mk.MarketParams(**market)
        self.feedback = feedback
        self.num_turns = num_turns
        self.hindsight_horizon = hindsight_horizon
        self.reveal_prob = reveal_prob
        self.render_mode = render_mode
        m, k = self.params.n_items, self.params.n_features
        dim = k + 2 * m + m + 1 + 3 * m
        high = np.ones(dim, dtype=np.float32)
        high[k + m : k + 2 * m] = max(r[1] for r in self.params.price_ranges)
        self.observation_space = spaces.Box(0.0, high, shape=(dim,), dtype=np.float32)
        self.action_space = spaces.MultiDiscrete([m + 1, 3])
        self._scen: mk.Scenarios | None = None
        self._asked = np.zeros(0, dtype=np.int64)
        self._claims = np.zeros(m, dtype=np.int64)
        self._turn = 0

    def _obs(self) -> np.ndarray:
        assert self._scen is not None
        m = self.params.n_items
        asked = np.zeros(m, dtype=np.float32)
        if self._turn < self.num_turns:
            asked[self._asked[self._turn]] = 1.0
        claims = np.eye(3, dtype=np.float32)[self._claims].reshape(-1)
        return np.concatenate(
            [
                mk.seller_observation(self._scen, self.params)[0],
                asked,
                np.array([self._turn / self.num_turns], dtype=np.float32),
                claims,
            ]
        )

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._scen = mk.sample_scenarios(self.np_random, 1, self.params)
        self._asked = self.np_random.integers(0, self.params.n_items, size=self.num_turns)
        self._claims = np.full(self.params.n_items, mk.SILENT, dtype=np.int64)
        self._turn = 0
        return self._obs(), {"asked_item": int(self._asked[0])}

    def customer_view(self) -> dict[str, Any]:
        """The customer's information: requirement, prices and the conversation so far (never the status)."""
        if self._scen is None:
            raise RuntimeError("call reset() before customer_view()")
        view = mk.customer_view(self._scen)
        return {
            "feature": int(view["feature"][0]),
            "prices": view["prices"][0],
            "asked_items": self._asked[: self._turn].tolist(),
            "claims": self._claims.tolist(),
        }

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        if self._scen is None or self._turn >= self.num_turns:
            raise RuntimeError("call reset() before step() (the episode has ended)")
        action = np.asarray(action, dtype=np.int64).reshape(-1)
        if not self.action_space.contains(action):
            raise ValueError(f"action must lie in {self.action_space}, got {action.tolist()}")
        item = int(self._asked[self._turn])
        if action[1] != mk.SILENT:
            self._claims[item] = action[1]
        self._turn += 1
        if self._turn < self.num_turns:
            return self._obs(), 0.0, False, False, {"asked_item": int(self._asked[self._turn])}
        rec, claims = action[:1], self._claims[None, :].copy()
        out = mk.simulate(self.np_random, self._scen, rec, claims, self.params)
        # consequence steps: the bought item's feature shows up with probability reveal_prob per step
        revealed = bool((self.np_random.random(self.hindsight_horizon) < self.reveal_prob).any())
        batch_info = mk.episode_info(self._scen, rec, claims, out, self.params)
        info = {key: value[0].item() for key, value in batch_info.items()}
        if not revealed:
            # nothing observed within the horizon: partial / world-model hindsight fall back to the foresight belief
            info["hindsight_rating"] = info["foresight_rating"]
            info["world_model_rating"] = info["foresight_rating"]
        info["revealed"] = revealed
        channel = self.feedback
        if channel in ("partial_hindsight", "world_model_hindsight") and not revealed:
            channel = "foresight"
        score = mk.channel_scores(channel, self._scen, out, self.params)
        reward = float(score[0]) if channel == "true_utility" else float((mk.likert(score)[0] - 3) / 2.0)
        return self._obs(), reward, True, False, info
