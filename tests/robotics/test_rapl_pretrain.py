"""RAPL encoder pre-training: time-contrastive loss, batch sampler, cached pre-training, BT head on the encoder."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmalign.robotics.encoders import build_encoder
from mmalign.robotics.rapl import RaplConfig, run, train_bt_pixels
from mmalign.robotics.rapl_pretrain import (
    EncoderReward,
    base_encoder,
    pretrain_time_contrastive,
    sample_time_contrastive_batch,
    time_contrastive_loss,
)


def test_time_contrastive_loss_hand_computed():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    p = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    loss, m = time_contrastive_loss(a, p, temperature=1.0)
    # cosine logits = identity: each row -log(e / (e + 1)) = log(1 + e^-1)
    assert float(loss) == pytest.approx(math.log1p(math.exp(-1.0)), rel=1e-6)
    assert m["pretrain/accuracy"] == 1.0
    loss_t, _ = time_contrastive_loss(a, p, temperature=0.5)  # logits 2 * identity
    assert float(loss_t) == pytest.approx(math.log1p(math.exp(-2.0)), rel=1e-6)


def test_time_contrastive_loss_direction_and_gradcheck():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    matched, _ = time_contrastive_loss(a, a.clone(), 0.1)
    swapped, m = time_contrastive_loss(a, a.flip(0), 0.1)
    assert float(matched) < float(swapped) and m["pretrain/accuracy"] == 0.0
    # a gradient step moves the anchor towards its positive
    x = torch.tensor([[1.0, 0.2], [0.3, 1.0]], requires_grad=True)
    time_contrastive_loss(x, a, 0.5)[0].backward()
    assert x.grad[0, 1] > 0 and x.grad[1, 0] > 0  # descending shrinks the off-positive components
    g = torch.Generator().manual_seed(0)
    xa = torch.randn(4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    xp = torch.randn(4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u, v: time_contrastive_loss(u, v, 0.3)[0], (xa, xp))


def test_time_contrastive_loss_bad_inputs():
    with pytest.raises(ValueError, match="both be \\(B, D\\)"):
        time_contrastive_loss(torch.zeros(3, 2), torch.zeros(2, 2), 0.1)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        time_contrastive_loss(torch.zeros(1, 2), torch.zeros(1, 2), 0.1)
    with pytest.raises(ValueError, match="temperature"):
        time_contrastive_loss(torch.zeros(2, 2), torch.zeros(2, 2), 0.0)


def test_batch_pairs_are_close_in_time_and_anchors_far_apart():
    rng = np.random.default_rng(0)
    for _ in range(50):
        a, p = sample_time_contrastive_batch(num_rollouts=10, steps=12, batch=16, window=2, rng=rng)
        assert a.shape == p.shape == (16, 2)
        assert (a[:, 0] == p[:, 0]).all() and len(set(a[:8, 0])) == 8  # distinct rollouts, pair in one rollout
        gap = np.abs(a[:, 1] - p[:, 1])
        assert ((gap >= 1) & (gap <= 2)).all() and (p[:, 1] >= 0).all() and (p[:, 1] < 12).all()
        assert (a[8:, 1] - a[:8, 1] >= 5).all()  # the rollout's two anchors are hard negatives of each other
    with pytest.raises(ValueError, match="steps >= 2"):
        sample_time_contrastive_batch(4, 5, 8, 2, rng)


def _frames(n: int = 6, t: int = 8, size: int = 16) -> np.ndarray:
    """Rollouts of a bright square moving right at a per-rollout height: time is visible in the frames."""
    f = np.full((n, t, size, size, 3), 60, np.uint8)
    for i in range(n):
        for j in range(t):
            f[i, j, 2 * i % (size - 3) : 2 * i % (size - 3) + 3, 2 * j : 2 * j + 3] = 250
    return f


def test_pretraining_learns_time_and_is_cached(tmp_path):
    frames = _frames()
    torch.manual_seed(0)
    enc = build_encoder("tiny_cnn", embed_dim=8, image_size=16, embed_norm=True)
    log = pretrain_time_contrastive(enc, frames, 60, batch=12, window=1, temperature=0.2, lr=3e-3, seed=0)
    assert np.mean([r["pretrain/loss"] for r in log[-10:]]) < np.mean([r["pretrain/loss"] for r in log[:10]])
    cfg = RaplConfig(image_size=16, embed_dim=8, pretrain_steps=3, pretrain_batch=8, pretrain_window=1,
                     data_cache=str(tmp_path), seed=3)
    calls, metrics = [], {}
    first = base_encoder(cfg, lambda: calls.append(1) or frames, metrics)
    assert calls == [1] and "pretrain/train_s" in metrics and len(list(tmp_path.glob("tcpre_*.safetensors"))) == 1
    again = base_encoder(cfg, lambda: calls.append(1) or frames, {})
    assert calls == [1]  # loaded from the cache, no frames rendered
    assert all(torch.equal(x, y) for x, y in zip(first.state_dict().values(), again.state_dict().values()))
    scratch = base_encoder(RaplConfig(image_size=16, embed_dim=8, seed=3), lambda: calls.append(1) or frames, {})
    assert calls == [1] and not torch.equal(scratch.head.weight, first.head.weight)


def test_bt_on_the_encoder_learns_a_preference():
    frames = _frames(n=6, t=8)
    returns = np.arange(6.0)  # rollouts with the square lower in the frame are better
    trip = np.array([[5, i, j] for i in range(5) for j in range(5) if i != j])
    labels = (returns[trip[:, 1]] > returns[trip[:, 2]]).astype(np.float32)
    cfg = RaplConfig(image_size=16, embed_dim=8, frame_stride=1, train_length="steps", train_steps=60, batch_size=8)
    torch.manual_seed(0)
    model = train_bt_pixels(frames, trip, labels, cfg, model=EncoderReward(build_encoder(
        "tiny_cnn", embed_dim=8, image_size=16, embed_norm=True)))
    assert not model.training and not model.encoder.training
    with torch.no_grad():
        pred = model.segment_returns(torch.from_numpy(frames)).numpy()
    assert np.corrcoef(pred, returns)[0, 1] > 0.8


def test_pipeline_with_pretraining_and_bt_on_the_encoder(tmp_path):
    cfg = RaplConfig(n_train_traj=10, n_eval_traj=6, steps=6, image_size=32, num_prefs=8, anchor_pool=2,
                     train_length="steps", train_steps=2, batch_size=4, pretrain_steps=2, pretrain_batch=8,
                     pretrain_window=1, pretrain_cross_traj=3, bt_model="encoder", data_cache=str(tmp_path / "c"))
    out = run(cfg, tmp_path / "r")
    assert "pretrain/final_accuracy" in out
    for split in ("heldout", "cross"):
        assert all(np.isfinite(out[f"{split}/spearman_{k}"]) for k in ("rapl", "unaligned_ot", "bt_pixels"))
    with pytest.raises(ValueError, match="bt_model"):
        RaplConfig(bt_model="mlp")
    with pytest.raises(ValueError, match="pretrain_steps"):
        RaplConfig(pretrain_steps=-1)
