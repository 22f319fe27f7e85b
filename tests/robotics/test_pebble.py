"""Online PbRL: bad input fails before training, budgets are exact, relabelling rewrites the replay buffer."""

import math

import numpy as np
import pytest
import torch

from mmalign.robotics.pebble import (FeedbackState, PebbleConfig, _entropy_reward_fn, check_setup, knn_entropy_bonus,
                                     train_agent)
from mmalign.robotics.reward_io import build_ensemble, fit_ensemble
from mmalign.robotics.segments import Segments

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
    with pytest.raises(ValueError, match="ensemble_size must be >= 2 for selector='disagreement'"):
        PebbleConfig(selector="disagreement", ensemble_size=1)
    PebbleConfig(selector="entropy", ensemble_size=1)  # a single member's entropy is still a ranking


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


def test_every_stored_reward_is_the_final_models(sac_run):
    """The transition in flight at a feedback round (stored by SB3 after on_step) is relabelled too."""
    cfg, res = sac_run
    model, state = res["model"], res["state"]
    assert state.rounds >= 2
    buf = model.replay_buffer
    size = buf.pos
    act = model.policy.unscale_action(buf.actions[:size, 0]).astype(np.float32)
    current = state.reward_fn(buf.observations[:size, 0].astype(np.float32), act)
    np.testing.assert_allclose(buf.rewards[:size, 0], current, rtol=1e-5, atol=1e-6)


def test_refits_train_on_every_answered_label(sac_run):
    _, res = sac_run
    for row in res["feedback_history"]:
        assert row["train/num_pairs"] == row["feedback/labels_train"]  # nothing held out (PEBBLE)
        assert row["train/num_val_pairs"] == 0.0 and "eval/pref_accuracy" not in row


def test_fit_ensemble_holds_out_only_when_asked():
    g = torch.Generator().manual_seed(0)
    o1, o2 = torch.randn(100, 5, 4, generator=g), torch.randn(100, 5, 4, generator=g)
    a1, a2 = torch.randn(100, 5, 2, generator=g), torch.randn(100, 5, 2, generator=g)
    y = (torch.rand(100, generator=g) > 0.5).float()
    every = fit_ensemble(build_ensemble(4, 2, 3, 16, seed=0), o1, a1, o2, a2, y, epochs=1, batch_size=16, lr=1e-3,
                         seed=0)
    assert every["train/num_pairs"] == 100.0 and every["train/num_val_pairs"] == 0.0
    assert "eval/pref_accuracy" not in every
    held = fit_ensemble(build_ensemble(4, 2, 3, 16, seed=0), o1, a1, o2, a2, y, epochs=1, batch_size=16, lr=1e-3,
                        seed=0, val_fraction=0.1)
    assert held["train/num_pairs"] == 90.0 and held["train/num_val_pairs"] == 10.0
    assert "eval/pref_accuracy" in held


@pytest.mark.parametrize("selector", ["entropy", "uniform"])
def test_selectors_never_ask_about_one_window_twice(selector):
    """Segments are drawn with replacement; a pair showing one window twice is a guaranteed tie."""
    rng = np.random.default_rng(0)
    windows = rng.integers(0, 10, 40)  # 40 segments cut from 10 distinct windows
    obs, act = rng.normal(size=(10, 5, 4)).astype(np.float32), rng.uniform(-1, 1, (10, 5, 2)).astype(np.float32)
    segs = Segments(obs[windows], act[windows], rng.normal(size=(40, 5)).astype(np.float32))
    cfg = PebbleConfig(env_id="Reacher-v5", selector=selector, label_budget=64, initial_labels=10, rm_batch_size=8,
                       segment_length=5, device="cpu")
    state = FeedbackState(cfg, 4, 2, torch.device("cpu"))
    for _ in range(10):
        i, j = state.selector.select(segs, 10, state.rng, state.trainer)
        assert len(i) == 10 and (windows[i] != windows[j]).all()


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


def test_knn_entropy_bonus_is_the_kth_neighbour():
    ref = torch.arange(1.0, 11.0)[:, None]  # distances 1..10 from the origin
    origin = torch.zeros(1, 1)
    assert float(knn_entropy_bonus(origin, ref)) == pytest.approx(math.log1p(5.0))  # k = 5: the 5th neighbour
    with_self = torch.cat([origin, ref])  # the state itself at distance 0 does not count as a neighbour
    assert float(knn_entropy_bonus(origin, with_self, self_in_reference=True)) == pytest.approx(math.log1p(5.0))
    assert float(knn_entropy_bonus(origin, ref[:3])) == pytest.approx(math.log1p(3.0))  # fewer than k: the farthest


def test_pretraining_reward_is_the_kth_neighbour_among_earlier_states():
    cfg = PebbleConfig(**{**TINY, "unsup_steps": 80})
    fn = _entropy_reward_fn(cfg, torch.device("cpu"))
    line = torch.arange(1.0, 11.0)[:, None].numpy()
    first = fn(line, np.zeros((10, 2)))  # nothing seen yet: the batch itself is the reference, self excluded
    assert first[0] == pytest.approx(math.log1p(5.0))  # from 1: others at 1..9, the 5th is 5
    second = fn(np.zeros((1, 1), np.float32), np.zeros((1, 2)))  # reference = the 10 earlier states
    assert second[0] == pytest.approx(math.log1p(5.0))


@pytest.mark.parametrize("algo", ["sac", "ppo"])
def test_no_feedback_round_once_training_has_ended(algo):
    """A round due at the last env step (SAC) or after the last rollout (PPO) is not asked: nothing would learn from
    its labels (issue: total_steps=3000 initial_labels=100 labels_per_round=50 label_budget=200 spent 200)."""
    torch.set_num_threads(1)
    extra = dict(ppo_n_steps=100, batch_size=50) if algo == "ppo" else {}
    cfg = PebbleConfig(**{**TINY, "total_steps": 300, "first_feedback": 100, "feedback_every": 100, "label_budget": 16,
                          "initial_labels": 8, "labels_per_round": 4, "eval_every": 300, **extra}, algo=algo)
    res = train_agent(cfg)
    assert res["labels"]["labels/queries"] == 12  # rounds at 100 and 200; the one due at 300 is skipped
    assert res["state"].rounds == 2 and res["state"].schedule.budget_left == 4
