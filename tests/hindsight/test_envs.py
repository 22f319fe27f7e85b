"""HindsightMarket-v0 and its multi-turn variant: check_env, seeding, visibility, info fields."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import mmalign.envs  # noqa: F401  (registers the ids)
from mmalign.hindsight import market as mk

IDS = ["mmalign/HindsightMarket-v0", "mmalign/HindsightMarketMultiTurn-v0"]
INFO_KEYS = {"true_utility", "foresight_rating", "hindsight_rating", "regret", "deception", "withholding", "purchase"}


@pytest.mark.parametrize("env_id", IDS)
def test_check_env(env_id: str) -> None:
    env = gym.make(env_id)
    check_env(env.unwrapped, skip_render_check=True)


def test_render_ansi_is_the_dialogue() -> None:
    env = gym.make("mmalign/HindsightMarket-v0", render_mode="ansi")
    env.reset(seed=0)
    env.step(np.array([3, 1, 1, 1]))
    text = env.render()
    assert text.startswith("customer : i need") and text.endswith("option c lacks the feature .")


def _episode(env_id: str, seed: int, actions: list) -> tuple:
    env = gym.make(env_id)
    obs, _ = env.reset(seed=seed)
    out = [obs]
    for a in actions:
        obs, reward, term, trunc, info = env.step(np.array(a))
        out += [obs, reward]
        if term:
            break
    return out, info


@pytest.mark.parametrize("env_id, actions", [(IDS[0], [[2, 0, 0, 0]]), (IDS[1], [[0, 0], [1, 2], [2, 0]])])
def test_seeding_is_deterministic(env_id: str, actions: list) -> None:
    a, info_a = _episode(env_id, 11, actions)
    b, info_b = _episode(env_id, 11, actions)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert {k: v for k, v in info_a.items() if k != "customer_beliefs"} == {
        k: v for k, v in info_b.items() if k != "customer_beliefs"}
    firsts = {tuple(_episode(env_id, s, actions)[0][0]) for s in range(5)}
    assert len(firsts) == 5


@pytest.mark.parametrize("env_id", IDS)
def test_hidden_status_only_in_seller_view(env_id: str) -> None:
    env = gym.make(env_id).unwrapped
    obs, _ = env.reset(seed=3)
    k, m = env.params.n_features, env.params.n_items
    np.testing.assert_array_equal(obs[k : k + m], env._scen.status[0])  # the seller sees the status
    view = env.customer_view()
    assert "status" not in view and set(view) >= {"feature", "prices"}
    np.testing.assert_allclose(view["prices"], env._scen.prices[0])


def test_info_fields_and_reward_channel() -> None:
    env = gym.make("mmalign/HindsightMarket-v0", feedback="partial_hindsight", trust=1.0, rationality=50.0)
    obs, _ = env.reset(seed=0)
    env.unwrapped._scen = mk.Scenarios(np.array([0]), np.array([[0, 0, 0]]), np.array([[0.9, 0.6, 0.3]]))
    _, reward, term, trunc, info = env.step(np.array([2, 1, 1, 0]))  # lie: the cheapest item "has" it
    assert INFO_KEYS <= set(info) and term and not trunc
    assert info["purchase"] == 2 and info["deception"] and info["true_utility"] == -1.0
    assert info["foresight_rating"] == 5 and info["hindsight_rating"] == 1 and reward == -1.0


def test_invalid_action_raises() -> None:
    env = gym.make("mmalign/HindsightMarket-v0").unwrapped
    env.reset(seed=0)
    with pytest.raises(ValueError, match="action"):
        env.step(np.array([5, 0, 0, 0]))
    with pytest.raises(ValueError, match="feedback"):
        gym.make("mmalign/HindsightMarket-v0", feedback="vibes")


def test_multiturn_horizon_zero_is_foresight_and_long_horizon_reveals() -> None:
    def run(horizon: int, seed: int) -> dict:
        env = gym.make("mmalign/HindsightMarketMultiTurn-v0", hindsight_horizon=horizon, reveal_prob=0.5)
        env.reset(seed=seed)
        for _ in range(3):
            _, _, term, _, info = env.step(np.array([2, 0]))
        assert term
        return info

    zero = [run(0, s) for s in range(40)]
    assert all(not i["revealed"] and i["hindsight_rating"] == i["foresight_rating"] for i in zero)
    long = [run(12, s) for s in range(40)]
    assert np.mean([i["revealed"] for i in long]) > 0.95
    assert INFO_KEYS <= set(long[0])


def test_multiturn_claims_update_beliefs() -> None:
    env = gym.make("mmalign/HindsightMarketMultiTurn-v0", num_turns=2).unwrapped
    _, info = env.reset(seed=5)
    first = info["asked_item"]
    _, reward, term, _, info = env.step(np.array([3, mk.CLAIM_HAS]))
    assert not term and reward == 0.0
    assert env.customer_view()["claims"][first] == mk.CLAIM_HAS
    assert "status" not in env.customer_view()


def test_multiturn_takes_render_mode_like_every_env() -> None:
    """gymnasium passes render_mode to the constructor; it must not fall into the market parameters."""
    from mmalign.envs.hindsight_market_multiturn import HindsightMarketMultiTurnEnv

    assert HindsightMarketMultiTurnEnv(render_mode=None).render_mode is None
    with pytest.raises(ValueError, match="render_mode must be None"), pytest.warns(UserWarning, match="render_mode"):
        gym.make("mmalign/HindsightMarketMultiTurn-v0", render_mode="ansi")
