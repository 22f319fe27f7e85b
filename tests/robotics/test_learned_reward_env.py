"""mmalign/LearnedReward-v0: checkpoint round trip, reward = ensemble mean, wrong-space checkpoints refused."""

from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import mmalign.envs  # noqa: F401
from mmalign.robotics.reward_io import build_ensemble, load_reward_model, save_reward_model


@pytest.fixture()
def checkpoint(tmp_path):
    ens = build_ensemble(10, 2, size=2, hidden=8, seed=3)  # Reacher-v5: 10-d obs, 2-d action
    return save_reward_model(ens, tmp_path / "rm.safetensors", "Reacher-v5", 10, 2), ens


def test_round_trip_and_reward_is_ensemble_mean(checkpoint):
    path, ens = checkpoint
    loaded, meta = load_reward_model(path, obs_dim=10, act_dim=2)
    assert meta["env_id"] == "Reacher-v5" and meta["size"] == 2
    env = gym.make("mmalign/LearnedReward-v0", env_id="Reacher-v5", reward_checkpoint=str(path))
    obs, _ = env.reset(seed=0)
    action = np.array([0.3, -0.2], np.float32)
    _, reward, _, _, info = env.step(action)
    with torch.no_grad():
        want = ens.step_rewards(torch.as_tensor(obs, dtype=torch.float32)[None, None],
                                torch.as_tensor(action)[None, None]).mean()
    assert reward == pytest.approx(float(want), abs=1e-6)
    assert "true_reward" in info and info["true_reward"] != reward
    env.close()


def test_round_trip_keeps_input_normalisation_and_action_squares(tmp_path):
    """PEBBLE's headline config (normalize_act, rm_action_squares) saves members with extra buffers and inputs."""
    ens = build_ensemble(10, 2, size=2, hidden=8, seed=3, input_norm=True, action_squares=True)
    g = torch.Generator().manual_seed(0)
    obs, act = 3.0 + 2.0 * torch.randn(64, 10, generator=g), 0.5 * torch.randn(64, 2, generator=g)
    for member in ens.members:
        member.fit_input_normalization(obs, act, act_weight=2.0)
    path = save_reward_model(ens, tmp_path / "rm.safetensors", "Reacher-v5", 10, 2)
    loaded, meta = load_reward_model(path, obs_dim=10, act_dim=2)
    assert meta["input_norm"] and meta["action_squares"]
    with torch.no_grad():
        want = ens.step_rewards(obs[:, None], act[:, None])
        got = loaded.step_rewards(obs[:, None], act[:, None])
    torch.testing.assert_close(got, want)
    env = gym.make("mmalign/LearnedReward-v0", env_id="Reacher-v5", reward_checkpoint=str(path))
    env.reset(seed=0)
    env.step(np.zeros(2, np.float32))
    env.close()


def test_reward_applies_the_stored_reward_normalisation(tmp_path):
    """PebbleConfig(reward_norm=True) trains the agent on standardised member rewards; the env must hand out those."""
    ens = build_ensemble(10, 2, size=3, hidden=16, seed=0)
    g = torch.Generator().manual_seed(0)
    ens.fit_normalization(torch.randn(500, 1, 10, generator=g), 0.1 * torch.randn(500, 1, 2, generator=g))
    assert any(float(m.reward_std) != 1.0 for m in ens.members)
    path = save_reward_model(ens, tmp_path / "rm.safetensors", "Reacher-v5", 10, 2)
    env = gym.make("mmalign/LearnedReward-v0", env_id="Reacher-v5", reward_checkpoint=str(path))
    obs, _ = env.reset(seed=0)
    action = np.array([0.05, -0.05], np.float32)
    _, reward, _, _, _ = env.step(action)
    x, u = torch.as_tensor(obs, dtype=torch.float32)[None, None], torch.as_tensor(action)[None, None]
    with torch.no_grad():
        want = float(ens.step_rewards(x, u, normalize=True).mean())
        raw = float(ens.step_rewards(x, u).mean())
    assert reward == pytest.approx(want, abs=1e-5) and abs(want - raw) > 1e-3
    env.close()


def test_checkpoint_for_other_observation_space_is_refused(checkpoint):
    path, _ = checkpoint
    with pytest.raises(ValueError, match="obs_dim=10"):
        gym.make("mmalign/LearnedReward-v0", env_id="InvertedPendulum-v5", reward_checkpoint=str(path))


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="not a registered gymnasium id"):
        gym.make("mmalign/LearnedReward-v0", env_id="NoSuchEnv-v9")
    from safetensors.torch import save_file

    (tmp_path / "x.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="x.safetensors is not a readable safetensors reward checkpoint"):
        load_reward_model(tmp_path / "x.safetensors")  # not a safetensors file at all
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))  # a safetensors file, not a reward model
    with pytest.raises(ValueError, match="must have format 'mmalign.robotics.reward_ensemble.v1', got None"):
        load_reward_model(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError):
        load_reward_model(tmp_path / "missing.safetensors")


def test_bad_render_mode_is_refused_before_the_base_env_is_made(monkeypatch):
    from mmalign.envs.learned_reward import LearnedRewardEnv

    def made(*args, **kwargs):
        raise AssertionError("the base env was built before render_mode was checked")

    monkeypatch.setattr(gym, "make", made)
    with pytest.raises(ValueError, match="render_mode must be None or 'rgb_array', got 'human'"):
        LearnedRewardEnv(env_id="Reacher-v5", render_mode="human")


def test_truncated_checkpoint_names_the_file(checkpoint, tmp_path):
    path, _ = checkpoint
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 16])  # header intact, tensor bytes missing
    with pytest.raises(ValueError, match="cut.safetensors"):
        load_reward_model(cut)


def test_frame_stacked_pixel_model_sees_what_vec_frame_stack_gave_it(tmp_path, monkeypatch):
    """A CNN reward model trained with frame_stack=2 (6 input channels on 3-channel frames) drives the wrapper, which
    stacks frames exactly as SB3's VecFrameStack (zeros before an episode's first frame, newest last)."""
    from stable_baselines3.common.vec_env import DummyVecEnv, VecFrameStack

    from mmalign.core.reward_models import CNNRewardModel, RewardEnsemble
    from mmalign.envs.learned_reward import LearnedRewardWrapper

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    from pbrl_test_envs import BrightSpotEnv

    torch.manual_seed(0)
    ensemble = RewardEnsemble([CNNRewardModel(in_channels=6, image_size=36, act_dim=2, channels=(4, 8), hidden=(8,))
                               for _ in range(2)])
    ensemble.save_pretrained(tmp_path / "rm")
    env = LearnedRewardWrapper(BrightSpotEnv(), tmp_path / "rm")
    venv = VecFrameStack(DummyVecEnv([BrightSpotEnv]), 2, channels_order="last")
    venv.seed(3)
    stacked = venv.reset()
    env.reset(seed=3)
    actions = [1, 1, 0, 1, 0]
    for a in actions:
        want = ensemble.step_rewards(torch.as_tensor(np.transpose(stacked[0], (2, 0, 1)))[None, None],
                                     torch.as_tensor(np.eye(2, dtype=np.float32)[a])[None, None], normalize=True)
        _, reward, *_ = env.step(a)
        assert reward == pytest.approx(float(want.detach().mean()), abs=1e-6)
        stacked, *_ = venv.step(np.array([a]))
    with pytest.raises(ValueError, match="reward model expects observations"):
        LearnedRewardWrapper(BrightSpotEnv(size=32), tmp_path / "rm")
