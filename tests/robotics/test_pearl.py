"""PEARL: GW label transfer (known permutation, normalisation, masking), batched GW, pipeline smoke run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmalign.robotics.pearl import (
    PearlConfig, awr_policy, distance_matrix, gw_plan, gw_plans_batched, pair_label_matrix, run, trajectory_features,
    transfer_labels,
)


def _task_copy(n: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6))
    perm = rng.permutation(n)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))  # the target task lives in a rotated feature space
    return x, (x @ q)[perm], perm


@pytest.mark.parametrize("solver", ["exact", "entropic"])
def test_gw_recovers_known_permutation_and_transfers_labels(solver: str) -> None:
    x, y, perm = _task_copy()
    n = len(x)
    plan = gw_plan(distance_matrix(x), distance_matrix(y), solver=solver, epsilon=1e-3)
    # target j is source perm[j]
    assert plan.argmax(dim=0).tolist() == perm.tolist()
    returns = np.random.default_rng(1).normal(size=n)
    i, k = np.triu_indices(n, 1)
    pairs = np.stack([i, k], 1)
    labels = (returns[i] > returns[k]).astype(float)
    z_s, w_s = pair_label_matrix(n, pairs, labels)
    z_t, valid = transfer_labels(plan, z_s, w_s)
    truth = (returns[perm][:, None] > returns[perm][None, :]).astype(float)
    off = ~np.eye(n, dtype=bool)
    assert valid.numpy()[off].all()
    assert np.abs(z_t.numpy() - truth)[off].max() < (1e-6 if solver == "exact" else 0.05)


def test_transfer_normalises_by_target_marginals() -> None:
    # the reviewer's example: identity plan diag(1/3) must give the source label 1, not 1/9
    plan = torch.eye(3, dtype=torch.float64) / 3
    z_s, w_s = pair_label_matrix(3, np.array([[0, 1], [1, 2]]), np.array([1.0, 0.25]))
    z_t, valid = transfer_labels(plan, z_s, w_s)
    assert z_t[0, 1] == pytest.approx(1.0) and z_t[1, 0] == pytest.approx(0.0)
    assert z_t[1, 2] == pytest.approx(0.25) and z_t[2, 1] == pytest.approx(0.75)
    assert not valid[0, 2] and z_t[0, 2] == 0.5  # unlabelled source pair: masked, not invented
    # a uniform plan averages all labelled source pairs
    z_u, _ = transfer_labels(torch.full((3, 3), 1 / 9, dtype=torch.float64), z_s, w_s)
    assert z_u[0, 1] == pytest.approx((1.0 + 0.0 + 0.25 + 0.75) / 4)
    assert (z_u >= 0).all() and (z_u <= 1).all()


def test_batched_gw_matches_per_problem_permutations() -> None:
    problems = [_task_copy(8, seed=s) for s in range(3)]
    cs = torch.stack([distance_matrix(x) for x, _, _ in problems])
    ct = torch.stack([distance_matrix(y) for _, y, _ in problems])
    plans = gw_plans_batched(cs, ct, epsilon=1e-3)
    assert plans.shape == (3, 8, 8)
    for b, (_, _, perm) in enumerate(problems):
        assert plans[b].argmax(dim=0).tolist() == perm.tolist()


def test_landmark_features_are_rotation_invariant() -> None:
    from mmalign.envs.push_avoid_v0 import LAYOUTS

    pos = np.random.default_rng(0).uniform(-0.5, 0.5, size=(4, 6, 4))
    rot = np.stack([pos[..., 1], -pos[..., 0], pos[..., 3], -pos[..., 2]], -1)
    a = trajectory_features(pos, 2, LAYOUTS["up"])
    b = trajectory_features(rot, 2, LAYOUTS["right"])
    assert np.allclose(a, b)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="gw_solver"):
        PearlConfig(gw_solver="sliced")
    with pytest.raises(ValueError, match="n_source"):
        PearlConfig(n_source=0)


def test_awr_prefers_the_rewarded_action_and_bc_averages() -> None:
    # two behaviours in the data, +0.5 and -0.5 on the first action dimension; only +0.5 is rewarded
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(40, 5, 3)).astype(np.float32)
    sign = np.where(rng.random((40, 1, 1)) < 0.5, 1.0, -1.0)
    actions = np.concatenate([0.5 * sign * np.ones((40, 5, 1)), np.zeros((40, 5, 1))], -1).astype(np.float32)
    rewards = (sign[..., 0] > 0).astype(np.float32) * np.ones((40, 5), dtype=np.float32)
    probe = rng.normal(size=(50, 3)).astype(np.float32)
    awr = awr_policy(obs, actions, rewards, steps=300, beta=0.3, seed=0, hidden=32)
    bc = awr_policy(obs, actions, None, steps=300, beta=0.3, seed=0, hidden=32)
    assert awr(probe)[:, 0].mean() > 0.3
    assert abs(bc(probe)[:, 0].mean()) < 0.2
    with pytest.raises(ValueError, match="rewards"):
        awr_policy(obs, actions, rewards[:, :4], steps=1, beta=1.0, seed=0)


def _smoke(tmp_path, policy_timesteps: int, solver: str) -> dict:
    cfg = PearlConfig(n_source=24, n_target=24, n_eval=16, steps=10, num_source_prefs=100, num_target_pairs=60,
                      reward_steps=20, batch_size=16, policy_timesteps=policy_timesteps, gw_solver=solver,
                      offline_policy_steps=10, offline_rollouts=4, policy_eval_episodes=2)
    out = run(cfg, tmp_path)
    for name in ("pearl", "true_labels", "no_transfer", "true_reward", "bc"):
        assert np.isfinite(out[f"offline/true_return_{name}"])
        assert 0.0 <= out[f"offline/puck_moved_{name}"] <= 1.0
    assert 0.0 <= out["pearl/label_accuracy"] <= 1.0
    assert 0.0 < out["pearl/label_valid_fraction"] <= 1.0
    for name in ("pearl", "pearl_bt", "true_labels", "no_transfer"):
        assert -1.0 <= out[f"reward/spearman_{name}"] <= 1.0
    assert json.loads((tmp_path / "metrics.json").read_text()) == out
    return out


@pytest.mark.parametrize("solver", ["entropic", "batched"])
def test_pearl_pipeline_smoke(tmp_path, solver: str) -> None:
    _smoke(tmp_path, policy_timesteps=0, solver=solver)


@pytest.mark.slow
def test_pearl_pipeline_with_policies_smoke(tmp_path) -> None:
    out = _smoke(tmp_path, policy_timesteps=128, solver="exact")
    for name in ("pearl", "true_labels", "no_transfer", "true_reward"):
        assert np.isfinite(out[f"policy/true_return_{name}"])


def test_reward_and_awr_training_leave_the_callers_global_rng_alone() -> None:
    """Seeded inits must not reseed torch's global RNG (they did: torch.manual_seed inside the functions), and the
    initial networks are the ones a global seed gives (value net drawn first, then the policy)."""
    from mmalign.robotics.pearl import _mlp, train_reward

    rng = np.random.default_rng(0)
    obs = rng.normal(size=(4, 3, 2)).astype(np.float32)
    actions = rng.uniform(-0.5, 0.5, size=(4, 3, 2)).astype(np.float32)
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    train_reward(obs, np.array([[0, 1], [2, 3]]), np.array([1.0, 0.0]),
                 PearlConfig(reward_steps=2, batch_size=2), gaussian=True, seed=0)
    act = awr_policy(obs, actions, np.ones((4, 3), np.float32), steps=0, beta=1.0, seed=5, hidden=8)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(5)
    _mlp(3, 1, 8)  # the value net (2 obs dims + time)
    policy = _mlp(2, 2, 8)
    o = obs.reshape(-1, 2)
    x = (torch.as_tensor(o) - torch.as_tensor(o).mean(0)) / torch.as_tensor(o).std(0).clamp_min(1e-3)
    with torch.no_grad():
        np.testing.assert_allclose(act(o), torch.tanh(policy(x)).numpy(), atol=1e-6)


def test_label_flip_noise() -> None:
    from mmalign.robotics.pearl import _flip

    labels = np.array([1.0, 0.0, 0.5] * 2000)
    assert _flip(labels, 0.0, np.random.default_rng(0)) is labels
    noisy = _flip(labels, 0.3, np.random.default_rng(0))
    changed = noisy != labels
    assert 0.27 < changed[labels != 0.5].mean() < 0.33  # flips at the rate
    assert (noisy[labels == 0.5] == 0.5).all() and set(np.unique(noisy)) == {0.0, 0.5, 1.0}
    with pytest.raises(ValueError, match="label_flip"):
        PearlConfig(label_flip=0.5)


def test_label_flip_run_adds_noise_only_to_labels(tmp_path) -> None:
    cfg = dict(n_source=16, n_target=16, n_eval=10, steps=8, num_source_prefs=60, num_target_pairs=40,
               reward_steps=5, batch_size=8)
    clean = run(PearlConfig(**cfg), tmp_path / "clean")
    noisy = run(PearlConfig(label_flip=0.3, **cfg), tmp_path / "noisy")
    assert clean["pearl/label_valid_fraction"] == noisy["pearl/label_valid_fraction"]  # same data and pairs
    assert clean["reward/spearman_task_reward"] == noisy["reward/spearman_task_reward"]
    assert "reward/spearman_true_labels_bt" in noisy
