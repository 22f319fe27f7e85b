"""The PbRL loop as parts: wrapper + callback beside SB3's EvalCallback, any env (discrete, image, module:Id), any
algorithm, registry-driven teachers, reward models saved and reused, bad input refused before training."""

import json
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # pbrl_test_envs, also importable by name from the CLI

import pbrl_test_envs  # noqa: E402,F401  (registers the test envs)

from mmalign.cli import run_job  # noqa: E402
from mmalign.config import load_config  # noqa: E402
from mmalign.registry import TEACHERS  # noqa: E402
from mmalign.robotics.pebble import PebbleConfig, check_setup, train_agent  # noqa: E402

SMALL = dict(total_steps=300, learning_starts=50, first_feedback=100, feedback_every=100, label_budget=16,
             initial_labels=8, labels_per_round=4, rm_batch_size=8, rm_epochs=2, eval_every=300, eval_episodes=1,
             batch_size=16, segment_length=10, candidate_factor=2, net_width=16, rm_hidden=16, device="cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_wrapper_and_callback_in_a_callback_list_with_eval_callback(tmp_path):
    from stable_baselines3 import SAC
    from stable_baselines3.common.callbacks import CallbackList, EvalCallback
    from stable_baselines3.common.env_util import make_vec_env

    from mmalign.robotics.callbacks import PreferenceFeedbackCallback
    from mmalign.robotics.feedback import FeedbackSchedule, PairSelector, PreferenceFeedback
    from mmalign.robotics.loop import default_reward_trainer
    from mmalign.robotics.segments import SegmentSampler
    from mmalign.robotics.wrappers import RewardVecEnvWrapper

    inner = make_vec_env("Pendulum-v1", n_envs=1, seed=0)
    trainer = default_reward_trainer(inner, ensemble_size=2, model_kwargs={"hidden": (16, 16)}, epochs=2,
                                     batch_size=8)
    feedback = PreferenceFeedback(FeedbackSchedule(12, 6, 3, first_feedback=60, feedback_every=60),
                                  PairSelector("disagreement", 2), TEACHERS.get("oracle")(), trainer, seed=0)
    venv = RewardVecEnvWrapper(inner, feedback.reward_fn)
    model = SAC("MlpPolicy", venv, learning_starts=50, batch_size=16, policy_kwargs={"net_arch": [16, 16]}, seed=0,
                device="cpu", buffer_size=1000)
    evaluator = EvalCallback(make_vec_env("Pendulum-v1", n_envs=1, seed=1), eval_freq=90, n_eval_episodes=1,
                             log_path=str(tmp_path), verbose=0)
    fb = PreferenceFeedbackCallback(feedback, SegmentSampler(10), candidate_factor=2)
    model.learn(200, callback=CallbackList([fb, evaluator]))
    assert feedback.queries_used == 12 and feedback.rounds == 3  # 6 + 3 + 3 at steps 60, 120, 180
    assert evaluator.evaluations_timesteps == [90, 180]  # EvalCallback ran beside it (true Pendulum reward)
    buf = model.replay_buffer
    act = model.policy.unscale_action(buf.actions[:buf.pos])
    np.testing.assert_allclose(buf.rewards[:buf.pos], feedback.reward_fn(buf.observations[:buf.pos], act),
                               rtol=1e-5, atol=1e-6)  # the replay buffer holds the final learned reward
    assert fb.true_rewards[:buf.pos].min() < -0.1  # the true Pendulum reward was kept beside it


def test_preference_loop_on_cartpole_with_a_users_own_dqn_model(tmp_path):
    from stable_baselines3 import DQN
    from stable_baselines3.common.env_util import make_vec_env

    import mmalign.envs  # noqa: F401  (registers mmalign/LearnedReward-v0)
    from mmalign.core.reward_models import RewardEnsemble
    from mmalign.robotics.loop import PreferenceLoop, default_reward_trainer

    model = DQN("MlpPolicy", make_vec_env("CartPole-v1", n_envs=1, seed=0), learning_starts=50, batch_size=16,
                policy_kwargs={"net_arch": [16]}, seed=0, device="cpu")
    reward = default_reward_trainer(model.get_env(), ensemble_size=2, model_kwargs={"hidden": (16, 16)}, epochs=2,
                                    batch_size=8)
    loop = PreferenceLoop(model, TEACHERS.get("mistake")(eps_mistake=0.2), reward=reward, label_budget=16,
                          initial_labels=8,
                          labels_per_round=4, first_feedback=100, feedback_every=100, segment_length=8,
                          candidate_factor=2)
    loop.learn(350)
    assert loop.feedback.queries_used == 16 and loop.feedback.teacher.eps_mistake == 0.2
    assert loop.feedback.ensemble.act_dim == 2  # one-hot of CartPole's two actions
    folder = loop.save_reward_model(tmp_path / "rm", env_id="CartPole-v1")
    again = RewardEnsemble.from_pretrained(folder)
    for (k, a), (k2, b) in zip(loop.feedback.ensemble.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a.cpu(), b), k  # bitwise
    env = gym.make("mmalign/LearnedReward-v0", env_id="CartPole-v1", reward_model=str(folder))
    obs, _ = env.reset(seed=0)
    _, r, _, _, info = env.step(1)
    want = loop.feedback.reward_fn(obs[None], np.eye(2, dtype=np.float32)[[1]])[0]
    assert r == pytest.approx(float(want), abs=1e-6) and info["true_reward"] == 1.0


def test_image_env_from_module_id_through_the_cli_with_frame_stacking(tmp_path):
    out = tmp_path / "run"
    summary = run_job("robotics.pebble", None, [
        "env_id=pbrl_test_envs:PbrlBrightSpot-v0", "algo=ppo", "reward_model=cnn", "reward_model.channels=[8,8]",
        "reward_model.hidden=[16]", "frame_stack=2", "normalize_act=false", "rm_action_squares=false",
        "total_steps=192", "ppo_n_steps=64", "batch_size=32", "first_feedback=64", "feedback_every=64",
        "label_budget=16", "initial_labels=8", "labels_per_round=4", "rm_batch_size=8", "rm_epochs=1",
        "segment_length=5", "candidate_factor=2", "eval_every=192", "eval_episodes=1", "teacher=stochastic",
        "teacher.beta=5", "device=cpu"], output_dir=str(out))
    assert summary["labels/queries"] == 12  # 8 + 4 after the rollouts ending at 64, 128 (192 ends training)
    config = json.loads((out / "reward_model" / "config.json").read_text())
    assert config["members"][0]["name"] == "cnn" and config["members"][0]["kwargs"]["in_channels"] == 6
    saved = (out / "config.yaml").read_text()
    assert "beta: 5" in saved and "name: stochastic" in saved


@pytest.mark.parametrize("key, model", [("image", "cnn"), ("position", "mlp")])
def test_dict_observations_reward_one_entry(key, model):
    kw = {"reward_model": {"name": "cnn", "channels": [8, 8], "hidden": [16]}} if model == "cnn" else {}
    cfg = PebbleConfig(**{**SMALL, "env_id": "pbrl_test_envs:PbrlBrightSpotDict-v0", "algo": "ppo", "obs_key": key,
                          "total_steps": 128, "ppo_n_steps": 64, "batch_size": 32, "first_feedback": 64,
                          "feedback_every": 64, "label_budget": 8, "initial_labels": 8, "segment_length": 5,
                          "eval_every": 128, **kw})
    res = train_agent(cfg)
    assert res["labels"]["labels/queries"] == 8
    assert type(res["model"].policy).__name__ == "MultiInputActorCriticPolicy"
    trainer = res["state"].trainer
    assert trainer.pixels == (key == "image") and trainer.obs_key == key
    with pytest.raises(ValueError, match=r"obs_key naming the entry the reward model sees, one of \['image'"):
        check_setup(PebbleConfig(**{**SMALL, "env_id": "pbrl_test_envs:PbrlBrightSpotDict-v0", "algo": "ppo"}))


def test_teacher_overrides_come_from_the_registry():
    cfg = load_config(PebbleConfig, None, ["teacher=mistake", "teacher.eps_mistake=0.2"])
    assert cfg.teacher == {"name": "mistake", "eps_mistake": 0.2}
    from mmalign.robotics.pebble import build_teacher

    teacher = build_teacher(cfg.teacher)
    assert teacher.eps_mistake == 0.2 and teacher.beta == float("inf")
    assert build_teacher("myopic").gamma == 0.9  # the B-Pref preset as registered, no copied list
    # a teacher that wraps another names it like any other teacher
    cfg = load_config(PebbleConfig, None, ["teacher=label_flip", "teacher.base=oracle", "teacher.flip_rate=0.2"])
    flipping = build_teacher(cfg.teacher)
    assert flipping.flip_rate == 0.2 and type(flipping.base) is type(build_teacher("oracle"))
    assert build_teacher({"name": "label_flip", "base": {"name": "mistake", "eps_mistake": 0.1},
                          "flip_rate": 0.1}).base.eps_mistake == 0.1
    with pytest.raises(ValueError, match="teacher 'clairvoyant'"):
        build_teacher({"name": "label_flip", "base": "clairvoyant", "flip_rate": 0.2})
    with pytest.raises(ValueError, match=r"teacher.eps_mistak is not a field of teacher 'mistake'"):
        load_config(PebbleConfig, None, ["teacher=mistake", "teacher.eps_mistak=0.2"])
    with pytest.raises(ValueError, match=r"teacher must be a registered teacher, one of \[.*'oracle'"):
        PebbleConfig(teacher="clairvoyant")
    # any registered teacher plugs in with its own fields, e.g. the labelling app's human teacher
    cfg = load_config(PebbleConfig, None, ["teacher=human", "teacher.env_id=Reacher-v5", "teacher.timeout=60"])
    assert type(build_teacher(cfg.teacher)).__name__ == "HumanTeacher"
    with pytest.raises(ValueError, match="teacher.eps_mistake is not a field of teacher 'human'"):
        load_config(PebbleConfig, None, ["teacher=human", "teacher.eps_mistake=0.1"])
    with pytest.raises(ValueError, match="reward_model must be a registered reward model"):
        PebbleConfig(reward_model="transformer")
    with pytest.raises(ValueError, match="selector"):
        PebbleConfig(selector="most_fun")
    with pytest.raises(ValueError, match="algo"):
        PebbleConfig(algo="ddpg_plus")


@pytest.mark.parametrize("overrides, message", [
    (dict(env_id="pbrl_test_envs:PbrlMultiButton-v0"), "Box or Discrete action space"),
    (dict(env_id="pbrl_test_envs:PbrlNoReward-v0", segment_length=5), "has_true_reward"),
    (dict(env_id="no_such_module_xyz:Thing-v0"), "cannot import module 'no_such_module_xyz'"),
    (dict(env_id="CartPole-v1", algo="sac"), "needs a Box action space"),
    (dict(env_id="Pendulum-v1", algo="dqn"), "needs a Discrete action space"),
    (dict(env_id="pbrl_test_envs:PbrlBrightSpot-v0", segment_length=5, algo="ppo"), "reward_model=cnn"),
])
def test_bad_setups_fail_before_training(overrides, message, monkeypatch):
    import stable_baselines3

    def refuse(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(stable_baselines3.common.base_class.BaseAlgorithm, "learn", refuse)
    cfg = PebbleConfig(**{**SMALL, **overrides})
    with pytest.raises(ValueError, match=message):
        check_setup(cfg)
    with pytest.raises(ValueError, match=message):
        train_agent(cfg)


def test_budget_smaller_than_the_first_batch_is_refused():
    from mmalign.robotics.feedback import FeedbackSchedule

    with pytest.raises(ValueError, match="smaller than the first query batch"):
        PebbleConfig(label_budget=64, initial_labels=100, rm_batch_size=8)
    with pytest.raises(ValueError, match="smaller than the first query batch"):
        FeedbackSchedule(label_budget=10, initial_labels=20, labels_per_round=5)


def test_a_teacher_without_true_reward_runs_on_an_env_without_one():
    from mmalign.robotics.loop import check_teacher_env, make_venv

    venv = make_venv("pbrl_test_envs:PbrlNoReward-v0")
    with pytest.raises(ValueError, match="has_true_reward"):
        check_teacher_env(TEACHERS.get("oracle")(), venv)

    class Labeller:  # e.g. the labelling app's human teacher
        needs_true_reward = False

    check_teacher_env(Labeller(), venv)


@pytest.mark.slow  # starting the worker processes takes most of its ~30 s
def test_subprocess_envs_collect_for_the_loop():
    cfg = PebbleConfig(**{**SMALL, "n_envs": 2, "vec_env": "subproc", "total_steps": 200, "eval_every": 200,
                          "label_budget": 8, "initial_labels": 8})
    res = train_agent(cfg)
    assert res["labels"]["labels/queries"] == 8
    assert type(res["model"].get_env().venv).__name__ == "SubprocVecEnv"
    res["model"].get_env().close()
