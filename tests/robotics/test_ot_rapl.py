"""Batched OT plans (POT's batch solver) / OT similarity / OT reward: agreement with ot.sinkhorn, known answers,
gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmalign.robotics.ot import cosine_cost, nearest_demo_reward, ot_dense_reward, ot_plan, ot_similarity


def _traj(t: int = 12, d: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t, d, generator=g, dtype=torch.float64)


def test_cosine_cost_hand_computed() -> None:
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    y = torch.tensor([[[3.0, 0.0], [-1.0, 0.0]]])
    expected = torch.tensor([[[0.0, 2.0], [1.0, 1.0]]])
    assert torch.allclose(cosine_cost(x, y), expected)


def test_sinkhorn_matches_pot_and_marginals() -> None:
    ot = pytest.importorskip("ot")
    cost = cosine_cost(_traj(10)[None], _traj(7, seed=1)[None])
    plan = ot_plan(cost, reg=0.1, num_iters=500)[0]
    ref = ot.sinkhorn(np.full(10, 0.1), np.full(7, 1 / 7), cost[0].numpy(), 0.1, method="sinkhorn_log",
                      numItermax=5000, stopThr=1e-13)
    assert np.abs(plan.numpy() - ref).max() < 1e-7
    assert torch.allclose(plan.sum(0), torch.full((7,), 1 / 7, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(plan.sum(1), torch.full((10,), 0.1, dtype=torch.float64), atol=1e-6)


def test_sinkhorn_large_reg_gives_independent_coupling() -> None:
    cost = cosine_cost(_traj(5)[None], _traj(4, seed=2)[None])
    plan = ot_plan(cost, reg=1e6, num_iters=5)
    assert torch.allclose(plan, torch.full_like(plan, 1 / 20), atol=1e-6)


def test_identical_trajectory_is_most_similar_and_time_shift_is_close() -> None:
    # A smooth embedding path (frames change slowly, as in a video), a copy delayed by one frame (first frame
    # repeated), and unrelated random trajectories.
    t = torch.arange(20, dtype=torch.float64)[:, None]
    base = torch.cat([torch.cos(0.15 * t + k) for k in range(8)] + [torch.sin(0.15 * t + k) for k in range(8)], 1)
    shifted = torch.cat([base[:1], base[:-1]])
    others = torch.stack([_traj(20, 16, seed=s) for s in range(1, 6)])
    cands = torch.cat([base[None], shifted[None], others])
    sims = ot_similarity(cands, base[None].expand(len(cands), -1, -1), reg=0.01, num_iters=300)
    assert sims[0] > -0.01  # identical: plan = identity / T, zero cost
    assert sims[0] >= sims.max() - 1e-9  # minimal cost among all candidates
    assert sims[1] > -0.03  # delayed copy: nearly as cheap
    assert (sims[2:] < sims[1] - 0.3).all()


def test_dense_reward_sums_to_similarity_and_nearest_demo() -> None:
    x, demos = _traj(9)[None].expand(3, -1, -1), torch.stack([_traj(9, seed=s) for s in (5, 0, 6)])
    dense = ot_dense_reward(x, demos, reg=0.05, num_iters=200)
    assert torch.allclose(dense.sum(1), ot_similarity(x, demos, reg=0.05, num_iters=200))
    rewards, idx = nearest_demo_reward(_traj(9)[None], demos, reg=0.05, num_iters=200)
    assert idx.tolist() == [1] and rewards.shape == (1, 9)
    assert torch.allclose(rewards[0], dense[1])


def test_gradients_flow_through_sinkhorn_to_encoder() -> None:
    from mmalign.robotics.encoders import build_encoder

    torch.manual_seed(0)
    enc = build_encoder("tiny_cnn", embed_dim=8, image_size=32)
    frames = torch.randint(0, 255, (3, 6, 32, 32, 3), dtype=torch.uint8)
    z = enc(frames)
    sim = ot_similarity(z[1:], z[:1].expand(2, -1, -1), reg=0.1, num_iters=30)
    (sim[0] - sim[1]).backward()
    grads = [p.grad for p in enc.parameters()]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_sinkhorn_gradcheck_float64() -> None:
    cost = (torch.rand(2, 4, 3, dtype=torch.float64) * 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda c: (ot_plan(c, 0.5, num_iters=20) * c).sum(), (cost,))


def test_numpy_scalar_reg_is_accepted() -> None:
    cost = torch.rand(1, 3, 4, dtype=torch.float64)
    assert torch.equal(ot_plan(cost, reg=np.float32(0.5)), ot_plan(cost, reg=float(np.float32(0.5))))


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="reg"):
        ot_plan(torch.rand(1, 3, 3), reg=0.0)
    with pytest.raises(ValueError, match="cost"):
        ot_plan(torch.rand(3, 3), reg=0.1)
    with pytest.raises(ValueError, match="feature size"):
        cosine_cost(torch.rand(2, 3), torch.rand(2, 4))
