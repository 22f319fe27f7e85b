"""Every registered ``mmalign/*`` gymnasium id (from every domain) passes gymnasium's ``check_env``."""

import warnings

import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env

import mmalign.envs  # noqa: F401  (registers the ids)

ENV_IDS = sorted(k for k in gym.registry if k.startswith("mmalign/"))


def test_some_ids_are_registered():
    assert "mmalign/LearnedReward-v0" in ENV_IDS


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_check_env(env_id):
    env = gym.make(env_id)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            check_env(env.unwrapped)
    finally:
        env.close()
