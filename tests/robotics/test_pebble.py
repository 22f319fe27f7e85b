"""Online PbRL: bad input fails before training, budgets are exact, relabelling rewrites the replay buffer."""

import numpy as np
import pytest
import torch

from mmalign.robotics.pebble import PebbleConfig, check_setup, knn_entropy_bonus, train_agent
from mmalign.robotics.reward_io import build_ensemble

TINY = dict(env_id="Reacher-v5", total_steps=260, learning_starts=60, first_feedback=100, feedback_every=50,
            label_budget=17, initial_labels=8, labels_per_round=6, rm_batch_size=8, rm_epochs=2, eval_every=130,
            eval_episodes=1, batch_size=16, segment_length=10, candidate_factor=2, net_width=16, rm_hidden=16,
            save_reward_model=False)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="label_budget"):
        PebbleConfig(label_budget=10, rm_batch_size=64)
    with pytest.raises(ValueError, match="initial_labels"):
        PebbleConfig(label_budget=100, initial_labels=200, rm_batch_size=8)
    with pytest.raises(ValueError, match="teacher"):
        PebbleConfig(teacher="clairvoyant")
    with pytest.raises(ValueError, match="unsup_steps"):
        PebbleConfig(unsup_steps=5000, first_feedback=1000)


def test_setup_errors_before_training():
    with pytest.raises(ValueError, match="not a registered gymnasium id"):
        check_setup(PebbleConfig(env_id="Reachr-v5"))
    with pytest.raises(ValueError, match="segment_length"):
        check_setup(PebbleConfig(env_id="Reacher-v5", segment_length=51))  # Reacher episodes have 50 steps
    with pytest.raises(ValueError, match="segment_length"):
        train_agent(PebbleConfig(env_id="Reacher-v5", segment_length=80))


@pytest.fixture(scope="module")
def sac_run():
    torch.set_num_threads(1)
    cfg = PebbleConfig(**TINY, selector="disagreement", teacher="mistake")
    return cfg, train_agent(cfg)


def test_sac_budget_is_exact_and_curve_logged(sac_run):
    cfg, res = sac_run
    labels = res["labels"]
    assert labels["labels/queries"] == 17  # 8 + 6 + 3: the last round is cut to the budget
    assert labels["labels/answered"] + labels["labels/skipped"] == 17
    assert res["state"].rounds == 3
    assert [r["step"] for r in res["curve"]] == [0, 130, 260]
    assert np.isfinite(res["final_true_return"])


def test_relabelling_rewrites_replay_buffer(sac_run):
    cfg, res = sac_run
    model, state = res["model"], res["state"]
    buf = model.replay_buffer
    rows = cfg.first_feedback - 1  # written before the first round, under the untrained ensemble
    obs = buf.observations[:rows, 0].astype(np.float32)
    act = model.policy.unscale_action(buf.actions[:rows, 0]).astype(np.float32)
    stored = buf.rewards[:rows, 0]
    current = state.reward_fn(obs, act)
    np.testing.assert_allclose(stored, current, rtol=1e-5, atol=1e-6)  # relabelled with the final ensemble
    init = build_ensemble(obs.shape[-1], act.shape[-1], cfg.ensemble_size, cfg.rm_hidden, seed=cfg.seed)
    with torch.no_grad():
        before = init.step_rewards(torch.as_tensor(obs)[:, None], torch.as_tensor(act)[:, None]).mean(0)[:, 0].numpy()
    assert np.abs(stored - before).max() > 1e-3  # ... so the stored rewards did change


def test_ppo_and_unsupervised_pretraining_run():
    torch.set_num_threads(1)
    cfg = PebbleConfig(**{**TINY, "total_steps": 192, "first_feedback": 64, "label_budget": 14, "initial_labels": 8,
                          "batch_size": 32}, algo="ppo", ppo_n_steps=64, selector="uniform")
    res = train_agent(cfg)
    assert res["labels"]["labels/queries"] == 14 and res["state"].rounds == 2
    cfg2 = PebbleConfig(**{**TINY, "total_steps": 160, "unsup_steps": 80}, selector="entropy")
    res2 = train_agent(cfg2)
    assert res2["labels"]["labels/queries"] > 0


def test_knn_entropy_bonus_grows_with_distance():
    ref = torch.zeros(10, 2)
    near, far = torch.tensor([[0.1, 0.0]]), torch.tensor([[3.0, 0.0]])
    assert knn_entropy_bonus(far, ref) > knn_entropy_bonus(near, ref) > 0
