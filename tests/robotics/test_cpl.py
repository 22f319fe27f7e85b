"""Offline CPL: regret labels from an oracle critic, dense vs sparse pairs, CPL/BC/%BC training end to end."""

import numpy as np
import pytest
import torch

from mmalign.robotics.cpl import CPLConfig, DeterministicActor, build_dataset, oracle_advantage_fn, train_policy

TINY = dict(env_id="Reacher-v5", oracle_steps=300, episodes_per_level=2, noise_levels=(0.0, 1.0), random_episodes=2,
            segment_length=10, pairs_per_segment=3, value_samples=4, hidden=16, bc_steps=20, cpl_steps=20,
            batch_size=8, eval_episodes=1)


@pytest.fixture(scope="module")
def oracle():
    from stable_baselines3 import SAC
    import gymnasium

    torch.set_num_threads(1)
    model = SAC("MlpPolicy", gymnasium.make("Reacher-v5"), learning_starts=100, batch_size=32, seed=0,
                policy_kwargs=dict(net_arch=[16, 16]), device="cpu")
    model.learn(200)
    return model


def test_config_errors():
    with pytest.raises(ValueError, match="bias"):
        CPLConfig(bias=0.0)
    with pytest.raises(ValueError, match="random_episodes.*-5"):
        CPLConfig(random_episodes=-5)
    with pytest.raises(ValueError, match="cpl_steps.*-1"):
        CPLConfig(cpl_steps=-1)
    with pytest.raises(ValueError, match="methods"):
        CPLConfig(methods=("cpl", "dpo"))
    with pytest.raises(ValueError, match="density"):
        CPLConfig(density="medium")
    with pytest.raises(ValueError, match="action_bias"):
        CPLConfig(noise_levels=(0.0, 0.3), action_bias=(0.5,))
    with pytest.raises(ValueError, match="action_bias"):
        CPLConfig(noise_levels=(0.0,), action_bias=(3.0,))


def test_action_bias_offsets_the_behaviour_actions(oracle):
    """A biased level's actions are the oracle's plus the offset (no noise), clipped to the box."""
    base = dict(TINY, noise_levels=(0.0, 0.0), random_episodes=0)
    plain = build_dataset(CPLConfig(**base), oracle)
    biased = build_dataset(CPLConfig(**base, action_bias=(0.0, 0.5)), oracle)
    n = len(plain["segments"]) // 2  # first half of the segments: level 0 (identical), second half: level 1
    np.testing.assert_allclose(biased["segments"].act[:n], plain["segments"].act[:n])
    obs = biased["segments"].obs[n:].reshape(-1, 10)
    expected = np.clip(oracle.predict(obs, deterministic=True)[0] + 0.5, -1.0, 1.0)
    np.testing.assert_allclose(biased["segments"].act[n:].reshape(-1, 2), expected, atol=1e-5)


def test_advantage_is_zero_mean_under_the_policy(oracle):
    adv = oracle_advantage_fn(oracle, value_samples=256, seed=0)
    obs = torch.randn(3, 4, 10)
    with torch.no_grad():
        policy_actions = torch.stack([torch.as_tensor(oracle.policy.actor(obs.reshape(-1, 10), deterministic=False))
                                      for _ in range(64)])  # [64, 12, 2] stochastic policy actions
    a = adv(obs.repeat(64, 1, 1), policy_actions.reshape(64 * 3, 4, 2))
    assert a.shape == (64 * 3, 4)
    assert abs(float(a.mean())) < 0.2 * float(a.abs().mean()) + 1e-3  # E_{a~π}[A(s, a)] ≈ 0


@pytest.mark.parametrize("density", ["dense", "sparse"])
def test_dataset_pairs(oracle, density):
    cfg = CPLConfig(**TINY, density=density)
    data = build_dataset(cfg, oracle)
    n = len(data["segments"])
    i, j = data["first"], data["second"]
    assert np.all(i != j)
    if density == "dense":
        assert len(i) == n * cfg.pairs_per_segment
    else:  # disjoint: each segment in at most one pair
        assert len(i) == n // 2 and len(set(i.tolist()) | set(j.tolist())) == 2 * len(i)
    y = data["labels"]
    assert torch.all((y == 0) | (y == 0.5) | (y == 1))
    assert len(data["pbc_obs"]) > 0


def test_cpl_bc_pbc_train_and_cpl_moves_policy(oracle):
    cfg = CPLConfig(**TINY)
    data = build_dataset(cfg, oracle)
    low, high = -np.ones(2, np.float32), np.ones(2, np.float32)
    actors = {m: train_policy(m, cfg, data, 10, 2, low, high) for m in ("cpl", "bc", "pbc")}
    obs = torch.as_tensor(data["segments"].obs[:5, 0])
    with torch.no_grad():
        diff = (actors["cpl"][0](obs) - actors["bc"][0](obs)).abs().max()
    assert diff > 1e-4  # same seed and BC pre-training; CPL steps changed the actor
    # ... which without CPL steps is exactly the BC actor (so the difference above is CPL's doing)
    no_cpl, _ = train_policy("cpl", CPLConfig(**{**TINY, "cpl_steps": 0}), data, 10, 2, low, high)
    bc = actors["bc"][0].state_dict()
    assert all(torch.equal(v, bc[k]) for k, v in no_cpl.state_dict().items())
    # the CPL phase is logged every 500 steps: 20 steps log nothing, 500 log one row with the preference accuracy
    assert actors["cpl"][1] == []
    _, log = train_policy("cpl", CPLConfig(**{**TINY, "cpl_steps": 500}), data, 10, 2, low, high)
    assert [row["step"] for row in log] == [TINY["bc_steps"] + 500.0]
    assert 0.0 <= log[0]["train/pref_accuracy"] <= 1.0 and np.isfinite(log[0]["train/loss"])


def test_actor_log_prob_peaks_at_mean():
    actor = DeterministicActor(3, 2, 8, -np.ones(2), np.ones(2))
    obs = torch.randn(4, 3)
    mu = actor(obs).detach()
    assert torch.allclose(actor.log_prob(obs, mu), torch.zeros(4), atol=1e-6)
    assert torch.all(actor.log_prob(obs, mu + 0.1) < 0)


def test_train_policy_leaves_the_callers_global_rng_alone():
    """The actor's seeded init must not reseed torch's global RNG (it did: torch.manual_seed in train_policy)."""
    from mmalign.robotics.segments import Segments

    rng = np.random.default_rng(0)
    segs = Segments(rng.normal(size=(6, 4, 3)).astype(np.float32), rng.uniform(-1, 1, (6, 4, 2)).astype(np.float32),
                    np.zeros((6, 4), np.float32))
    cfg = CPLConfig(**dict(TINY, bc_steps=1, lr=1e-12))  # one Adam step of 1e-12: the init, up to 1e-12
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    actor, _ = train_policy("bc", cfg, {"segments": segs}, 3, 2, -np.ones(2), np.ones(2))
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(cfg.seed)  # the init is still the one a global seed gives
    ref = DeterministicActor(3, 2, cfg.hidden, -np.ones(2), np.ones(2))
    for p, q in zip(actor.parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-9)
