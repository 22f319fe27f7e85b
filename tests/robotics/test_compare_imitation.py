"""scripts/compare_imitation.py: mmalign-side config overrides, the CPU-time breakdown and the summary tables."""

from __future__ import annotations

import json

import numpy as np
import pytest


@pytest.fixture(scope="module")
def cmp(load_script):
    return load_script("compare_imitation")


def test_config_defaults_and_overrides(cmp):
    base = cmp.mmalign_config(20000, 400, 3, "ppo", [])
    assert (base.env_id, base.total_steps, base.label_budget, base.seed, base.teacher) == (
        "Reacher-v5", 20000, 400, 3, "oracle")
    assert (base.n_envs, base.ppo_n_steps, base.batch_size, base.initial_labels, base.labels_per_round) == (
        1, 1024, 64, 100, 75)
    cfg = cmp.mmalign_config(20000, 400, 3, "ppo", ["n_envs=8", "ppo_n_steps=128", "rm_epochs=10"])
    assert (cfg.n_envs, cfg.ppo_n_steps, cfg.rm_epochs, cfg.label_budget) == (8, 128, 10, 400)


@pytest.mark.parametrize("override", ["label_budget=800", "total_steps=40000", "teacher=mistake", "seed=1"])
def test_fixed_fields_cannot_be_overridden(cmp, override):
    with pytest.raises(ValueError, match="may not change"):
        cmp.mmalign_config(20000, 400, 0, "ppo", [override])


def test_bad_override_is_rejected_by_the_config(cmp):
    with pytest.raises(ValueError, match="n_envs"):
        cmp.mmalign_config(20000, 400, 0, "ppo", ["n_envs=0"])
    with pytest.raises(ValueError, match="unknown field"):
        cmp.mmalign_config(20000, 400, 0, "ppo", ["no_such_field=1"])


def test_cpu_breakdown_times_calls_and_restores_methods(cmp):
    from stable_baselines3 import PPO

    from mmalign.robotics import pebble, reward_io
    from mmalign.robotics.feedback import PreferenceFeedback

    originals = (PPO.__dict__["train"], reward_io.fit_ensemble, PreferenceFeedback.__dict__["feedback_round"],
                 PreferenceFeedback.__dict__["reward_fn"])
    cfg = cmp.mmalign_config(20000, 400, 0, "ppo", ["ensemble_size=2", "device=cpu"])
    state = pebble.FeedbackState(cfg, obs_dim=10, act_dim=2, device=pebble.resolve_device("cpu"))
    rng = np.random.default_rng(0)
    obs, act = rng.normal(size=(4096, 10)).astype(np.float32), rng.normal(size=(4096, 2)).astype(np.float32)
    with cmp.cpu_breakdown() as raw:
        assert PreferenceFeedback.__dict__["reward_fn"] is not originals[3]
        for _ in range(20):
            r = state.reward_fn(obs, act)
    assert r.shape == (4096,)
    assert raw["reward_inference"] > 0 and raw["ppo_update"] == raw["reward_fit"] == raw["feedback"] == 0.0
    assert originals == (PPO.__dict__["train"], reward_io.fit_ensemble,
                         PreferenceFeedback.__dict__["feedback_round"], PreferenceFeedback.__dict__["reward_fn"])
    parts = cmp.split_cpu(10.0, {"ppo_update": 3.0, "reward_fit": 2.0, "feedback": 2.5, "reward_inference": 1.5})
    assert parts == {"cpu_ppo_update_s": 3.0, "cpu_reward_fit_s": 2.0, "cpu_feedback_other_s": 0.5,
                     "cpu_reward_inference_s": 1.5, "cpu_rollout_other_s": 3.0}
    assert sum(parts.values()) == pytest.approx(10.0)


def test_summarize_tables_pair_mmalign_with_imitation_on_the_plan_seeds(cmp, tmp_path):
    from mmalign.robotics.protocol import seed_plan

    common = {"steps": 20000, "labels": 400, "std": 1.0, "wall_s": 100.0}
    rows = [
        {"impl": "imitation 1.0.1 (x)", "seed": 10, "true_return": -30.0, "cpu_s": 60.0},
        {"impl": "imitation 1.0.1 (x)", "seed": 11, "true_return": -20.0, "cpu_s": 50.0},
        {"impl": "imitation 1.0.1 (x)", "seed": 3, "true_return": -99.0, "cpu_s": 1.0},  # a development seed: left out
        {"impl": "mmalign (fast)", "seed": 10, "true_return": -12.0, "cpu_s": 20.0, "cpu_ppo_update_s": 5.0,
         "cpu_reward_fit_s": 4.0, "cpu_feedback_other_s": 1.0, "cpu_reward_inference_s": 2.0,
         "cpu_rollout_other_s": 8.0},
        {"impl": "mmalign (fast)", "seed": 11, "true_return": -10.0, "cpu_s": 25.0},
    ]
    for k, r in enumerate(rows):
        (tmp_path / f"result_{k}.json").write_text(json.dumps({**common, **r}))
    text = cmp.summarize(tmp_path, seed_plan(range(10), [10, 11], sized_down="unit test"))
    assert "reporting seeds [10, 11] (n=2)" in text and "| 3 |" not in text
    # mean -25, half-width t_{0.975,1} * 5 = 63.53; paired: +18 and +10 -> +14.00 ± 50.82; CPU ratios 3.0, 2.0
    assert "| imitation 1.0.1 (x) | 10, 11 | -25.00 ± 63.53 (n=2) | 100 ± 0 (n=2) | 55 ± 64 (n=2) | - | - |" in text
    assert "| mmalign (fast) | 10, 11 | -11.00 ± 12.71 (n=2) |" in text
    assert "| +14.00 ± 50.82 (n=2, 2/2 seeds > 0) | 2.50 ± 6.35 (n=2) |" in text
    assert "| mmalign (fast) | 10 | 5.0 | 4.0 | 1.0 | 2.0 | 8.0 | 20.0 |" in text
    assert (tmp_path / "summary.md").read_text() == text


def test_summarize_does_not_average_runs_of_different_budgets(cmp, tmp_path):
    """Regression: the mean row grouped by implementation only, so a run at another step/label budget left in the
    same folder was averaged in; now each (implementation, steps, labels) has its own row."""
    from mmalign.robotics.protocol import seed_plan

    common = {"impl": "imitation", "std": 1.0, "wall_s": 100.0, "cpu_s": 50.0, "labels": 400}
    runs = [{"seed": 0, "steps": 20000, "true_return": -30.0}, {"seed": 1, "steps": 20000, "true_return": -20.0},
            {"seed": 2, "steps": 5000, "true_return": -40.0}]
    for k, r in enumerate(runs):
        (tmp_path / f"result_{k}.json").write_text(json.dumps({**common, **r}))
    text = cmp.summarize(tmp_path, seed_plan([0, 1, 2], []))
    assert "development run on seeds [0, 1, 2]" in text
    assert "| imitation (20000 steps, 400 labels) | 0, 1 | -25.00 ± 63.53 (n=2) |" in text
    assert "| imitation (5000 steps, 400 labels) | 2 | -40.00 (n=1) |" in text


def test_seed_check_refuses_overlap_before_any_work(cmp, tmp_path, monkeypatch):
    import sys

    out = tmp_path / "o"
    monkeypatch.setattr(sys, "argv", ["compare_imitation.py", "--check-seeds", "--report-seeds", "9", "10", "11", "12",
                                      "13", "--out", str(out)])
    with pytest.raises(SystemExit):
        cmp.main()
    assert not out.exists()
