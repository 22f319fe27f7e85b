"""P-IQL (reward from preferences, then IQL): the expectile and AWR losses, the reward fit, the whole baseline."""

import numpy as np
import pytest
import torch

from mmalign.robotics.cpl import CPLConfig, train_policy
from mmalign.robotics.piql import IQLCritics, awr_loss, expectile_loss, fit_preference_reward
from mmalign.robotics.segments import Segments

# ------------------------------------------------------------------------------------------------ expectile loss


def test_expectile_loss_hand_computed():
    # u = target - pred = [1, -2]: under-estimate weighted τ = 0.7, over-estimate 1 − τ = 0.3 -> [0.7, 1.2]
    pred, target = torch.tensor([0.0, 0.5]), torch.tensor([1.0, -1.5])
    per = expectile_loss(pred, target, 0.7, reduction="none")
    assert torch.allclose(per, torch.tensor([0.7, 1.2]))
    assert torch.isclose(expectile_loss(pred, target, 0.7), torch.tensor(0.95))
    assert torch.isclose(expectile_loss(pred, target, 0.7, reduction="sum"), torch.tensor(1.9))
    # τ = 0.5 is half the squared error
    assert torch.isclose(expectile_loss(pred, target, 0.5), 0.5 * ((target - pred) ** 2).mean())


def test_expectile_loss_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p, t: expectile_loss(p, t, 0.8), (pred, target))


@pytest.mark.parametrize("tau", [0.3, 0.5, 0.7, 0.9])
def test_expectile_loss_minimiser_is_the_expectile(tau):
    """Minimising over a scalar v gives the τ-expectile: above the mean for τ > 0.5, below it for τ < 0.5.

    For y = (0, 1) and v in (0, 1) the first-order condition τ (1 − v) = (1 − τ) v gives v = τ.
    """
    y = torch.tensor([0.0, 1.0], dtype=torch.float64)
    v = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([v], lr=0.5)
    for _ in range(300):
        loss = expectile_loss(v.expand(2), y, tau)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert v.item() == pytest.approx(tau, abs=1e-6)


def test_expectile_loss_direction_high_tau_pulls_towards_large_targets():
    """At the mean of the targets the gradient pushes pred up for τ > 0.5 and down for τ < 0.5."""
    y = torch.tensor([0.0, 0.0, 0.0, 10.0], dtype=torch.float64)
    for tau, sign in ((0.7, -1.0), (0.3, 1.0), (0.5, 0.0)):
        v = torch.full((4,), float(y.mean()), dtype=torch.float64, requires_grad=True)
        expectile_loss(v, y, tau).backward()
        assert np.sign(round(float(v.grad.sum()), 12)) == sign  # descent moves v by −grad


def test_expectile_loss_refuses_bad_input():
    with pytest.raises(ValueError, match="expectile"):
        expectile_loss(torch.zeros(2), torch.zeros(2), 1.0)
    with pytest.raises(ValueError, match="pred.*target|same shape|shape"):
        expectile_loss(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="reduction"):
        expectile_loss(torch.zeros(2), torch.zeros(2), reduction="max")


# ------------------------------------------------------------------------------------------------ AWR loss


def test_awr_loss_hand_computed_and_capped():
    lp, adv = torch.tensor([-1.0, -2.0, -1.0]), torch.tensor([0.0, 0.5, 10.0])
    per = awr_loss(lp, adv, beta=0.5, max_weight=20.0, reduction="none")
    # weights exp(0) = 1, exp(1) = e, exp(20) capped at 20
    assert torch.allclose(per, torch.tensor([1.0, 2.0 * np.e, 20.0]))
    with pytest.raises(ValueError, match="beta"):
        awr_loss(lp, adv, beta=0.0)


def test_awr_loss_gradcheck_float64_and_no_gradient_into_the_advantage():
    g = torch.Generator().manual_seed(1)
    lp = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    adv = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: awr_loss(x, adv, beta=0.7), (lp,))
    awr_loss(lp, adv, beta=0.7).backward()
    assert adv.grad is None


def test_awr_moves_the_policy_towards_the_better_action():
    """Two data actions at one state, the second with the higher advantage: the AWR optimum leans towards it."""
    mu = torch.zeros(1, requires_grad=True)
    acts, adv = torch.tensor([-1.0, 1.0]), torch.tensor([0.0, 1.0])
    opt = torch.optim.SGD([mu], lr=0.1)
    for _ in range(200):
        loss = awr_loss(-(mu - acts) ** 2, adv, beta=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    # weighted mean of the actions: (−1 · 1 + 1 · e) / (1 + e)
    assert mu.item() == pytest.approx((np.e - 1) / (np.e + 1), abs=1e-4)


# ------------------------------------------------------------------------------------------------ end to end

OBS, ACT = 3, 2


def _target(obs: np.ndarray) -> np.ndarray:
    return 0.6 * np.tanh(obs[..., :ACT])


def _toy_data(n: int = 160, h: int = 5, seed: int = 0) -> dict:
    """Uniform-random actions; true reward −‖a − f(s)‖²; labels = order of the true segment returns."""
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(n, h, OBS)).astype(np.float32)
    act = rng.uniform(-1, 1, (n, h, ACT)).astype(np.float32)
    rew = -((act - _target(obs)) ** 2).sum(-1).astype(np.float32)
    segs = Segments(obs, act, rew)
    i, j = rng.integers(n, size=4 * n), rng.integers(n, size=4 * n)
    keep = i != j
    i, j = i[keep], j[keep]
    labels = torch.as_tensor((segs.returns()[i] > segs.returns()[j]).astype(np.float32))
    return {"segments": segs, "first": i, "second": j, "labels": labels}


TOY = dict(hidden=32, batch_size=16, lr=3e-3, bc_steps=300, piql_steps=300, piql_reward_epochs=15,
           piql_reward_hidden=32, piql_lr=3e-3)


def test_preference_reward_ranks_the_preferred_segments():
    data = _toy_data()
    trainer, metrics = fit_preference_reward(CPLConfig(**TOY), data)
    assert metrics["train/pref_accuracy"] > 0.8
    test = _toy_data(seed=1)["segments"]
    r = trainer.reward_fn(test.obs.reshape(-1, OBS), test.act.reshape(-1, ACT))
    assert abs(r.mean()) < 0.3 and 0.5 < r.std() < 1.5  # standardised over the data's steps
    assert np.corrcoef(r, test.true_rewards.reshape(-1))[0, 1] > 0.7


def test_piql_beats_bc_on_mixed_quality_actions():
    """BC on uniform actions learns a ≈ 0; P-IQL reads the labels and moves towards the rewarded f(s)."""
    data = _toy_data()
    cfg = CPLConfig(**TOY)
    low, high = -np.ones(ACT, np.float32), np.ones(ACT, np.float32)
    piql, log = train_policy("piql", cfg, data, OBS, ACT, low, high)
    bc, _ = train_policy("bc", cfg, data, OBS, ACT, low, high)
    obs = np.random.default_rng(2).normal(size=(500, OBS)).astype(np.float32)
    with torch.no_grad():
        err = {k: float(((m(torch.as_tensor(obs)).numpy() - _target(obs)) ** 2).sum(-1).mean())
               for k, m in (("piql", piql), ("bc", bc))}
    assert err["piql"] < 0.6 * err["bc"], err
    assert log[0]["reward/pref_accuracy"] > 0.8 and np.isfinite(log[-1]["train/q_loss"])


def test_critic_targets_follow_polyak():
    crit = IQLCritics(OBS, ACT, 8, np.zeros(OBS), np.ones(OBS), torch.ones(ACT))
    with torch.no_grad():
        for p in crit.q.parameters():
            p.add_(1.0)
    before = [p.clone() for p in crit.q_target.parameters()]
    crit.update_targets(0.25)
    for b, p, pt in zip(before, crit.q.parameters(), crit.q_target.parameters()):
        assert torch.allclose(pt, 0.75 * b + 0.25 * p)
    assert crit.qs(torch.zeros(4, OBS), torch.zeros(4, ACT)).shape == (2, 4)


def test_config_checks_the_piql_fields():
    assert CPLConfig(methods=("cpl", "piql")).methods == ("cpl", "piql")
    with pytest.raises(ValueError, match="piql_expectile"):
        CPLConfig(piql_expectile=1.0)
    with pytest.raises(ValueError, match="piql_beta"):
        CPLConfig(piql_beta=0.0)
    with pytest.raises(ValueError, match="piql_discount"):
        CPLConfig(piql_discount=1.0)
    with pytest.raises(ValueError, match="piql_steps"):
        CPLConfig(piql_steps=0)


def test_cpl_job_runs_piql_end_to_end(tmp_path):
    """``mmalign robotics cpl methods=[piql]``: a tiny oracle, data, P-IQL, evaluation, results files."""
    import json

    from mmalign.robotics.cpl import run

    cfg = CPLConfig(oracle_steps=150, episodes_per_level=2, noise_levels=(0.3,), random_episodes=2, segment_length=10,
                    pairs_per_segment=3, value_samples=4, hidden=16, batch_size=8, eval_episodes=1, methods=("piql",),
                    piql_steps=20, piql_reward_epochs=2, piql_reward_hidden=8)
    summary = run(cfg, tmp_path)
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    piql = next(r for r in rows if r["method"] == "P-IQL")
    assert np.isfinite(piql["true_return"]) and piql["train_cpu_s"] > 0
    assert summary["eval/true_return_P-IQL"] == piql["true_return"]
    assert "P-IQL" in (tmp_path / "results.md").read_text()
