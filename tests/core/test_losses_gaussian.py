"""PEARL-style Gaussian robust BT loss: explicit RNG, reparameterisation, KL prior, uncertainty, limits."""

from __future__ import annotations

import math

import pytest
import torch

from mmalign.core.losses import bradley_terry_loss, gaussian_bt_loss, gaussian_pair_uncertainty

D64 = torch.float64


def _inputs(b: int = 3, t: int = 4, seed: int = 0, requires_grad: bool = False) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for scale in (1.0, 0.3, 1.0, 0.3):
        out.append((scale * torch.randn(b, t, generator=g, dtype=D64)).requires_grad_(requires_grad))
    return out


def test_hand_computed_with_explicit_noise() -> None:
    mu1, mu2 = torch.tensor([[1.0, 0.5]], dtype=D64), torch.tensor([[0.0, 0.2]], dtype=D64)
    ls1, ls2 = torch.log(torch.tensor([[0.5, 1.0]], dtype=D64)), torch.log(torch.tensor([[2.0, 1.0]], dtype=D64))
    noise = torch.tensor([[[[1.0, -1.0]], [[0.5, 0.0]]]], dtype=D64)  # [K=1, 2, B=1, T=2]
    # R1 = 1.5 + 0.5 - 1 = 1.0, R2 = 0.2 + 1.0 = 1.2 -> BCE(-0.2, 1) = log(1 + e^0.2)
    kl_steps = [math.log(1 / s) + s * s / 2 - 0.5 for s in (0.5, 1.0, 2.0, 1.0)]
    loss, m = gaussian_bt_loss(mu1, ls1, mu2, ls2, noise=noise, prior_std=1.0, kl_coef=0.3)
    assert loss.item() == pytest.approx(math.log1p(math.exp(0.2)) + 0.3 * sum(kl_steps) / 4)
    assert m["uncertainty/pair_std"] == pytest.approx(math.sqrt(0.25 + 1 + 4 + 1))
    assert m["train/kl"] == pytest.approx(sum(kl_steps) / 4)
    assert m["rewards/margin"] == pytest.approx(1.3)


def test_generator_reproducible_and_required() -> None:
    x = _inputs()
    a = gaussian_bt_loss(*x, generator=torch.Generator().manual_seed(5), num_samples=4)[0]
    b = gaussian_bt_loss(*x, generator=torch.Generator().manual_seed(5), num_samples=4)[0]
    c = gaussian_bt_loss(*x, generator=torch.Generator().manual_seed(6), num_samples=4)[0]
    assert a.item() == b.item() != c.item()
    with pytest.raises(ValueError, match="generator must be a torch.Generator"):
        gaussian_bt_loss(*x)


def test_zero_variance_limit_is_bt_on_mean_returns() -> None:
    mu1, _, mu2, _ = _inputs(b=6, t=5)
    tiny = torch.full_like(mu1, -40.0)
    labels = torch.tensor([1.0, 0.0, 0.5, 0.3, 1.0, 0.9], dtype=D64)
    loss, _ = gaussian_bt_loss(mu1, tiny, mu2, tiny, labels, generator=torch.Generator().manual_seed(0),
                               kl_coef=0.0, reduction="none")
    bt, _ = bradley_terry_loss(mu1.sum(-1), mu2.sum(-1), labels, reduction="none")
    torch.testing.assert_close(loss, bt)


def test_kl_zero_at_prior_and_pulls_variance() -> None:
    mu1, _, mu2, _ = _inputs()
    at_prior = torch.full_like(mu1, math.log(0.7))
    _, m = gaussian_bt_loss(mu1, at_prior, mu2, at_prior, generator=torch.Generator(), prior_std=0.7)
    assert abs(m["train/kl"]) < 1e-12
    log_std = torch.full_like(mu1, -3.0, requires_grad=True)
    zeros_noise = torch.zeros(1, 2, *mu1.shape, dtype=D64)
    loss, _ = gaussian_bt_loss(mu1, log_std, mu2, log_std, noise=zeros_noise, kl_coef=1.0)
    (g,) = torch.autograd.grad(loss, log_std)
    assert bool((g < 0).all())  # gradient descent raises a collapsed std towards the prior


def test_masks_and_uncertainty() -> None:
    mu1, ls1, mu2, ls2 = _inputs(b=2, t=4)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    _, m = gaussian_bt_loss(mu1, ls1, mu2, ls2, generator=torch.Generator(), mask_first=mask)
    expected = ((2 * ls1).exp() * mask).sum(-1) + (2 * ls2).exp().sum(-1)
    assert m["uncertainty/pair_std"] == pytest.approx(expected.sqrt().mean().item())
    torch.testing.assert_close(gaussian_pair_uncertainty(ls1, ls2, mask, None), expected.sqrt())


def test_gradcheck_and_direction() -> None:
    x = _inputs(requires_grad=True)
    noise = torch.randn(2, 2, 3, 4, generator=torch.Generator().manual_seed(1), dtype=D64)
    labels = torch.tensor([1.0, 0.2, 0.5], dtype=D64)
    assert torch.autograd.gradcheck(
        lambda *t: gaussian_bt_loss(*t, labels, noise=noise, kl_coef=0.5, prior_std=0.5)[0], x)
    d = [t.detach() for t in x]
    base = gaussian_bt_loss(*d, noise=noise)[0]
    assert gaussian_bt_loss(d[0] + 0.1, *d[1:], noise=noise)[0] < base


def test_bad_input() -> None:
    x = _inputs()
    g = torch.Generator()
    with pytest.raises(ValueError, match="log_std_second.*shape"):
        gaussian_bt_loss(x[0], x[1], x[2], x[3][:, :2], generator=g)
    with pytest.raises(ValueError, match="noise must have shape"):
        gaussian_bt_loss(*x, noise=torch.zeros(1, 3, 4))
    with pytest.raises(ValueError, match="prior_std"):
        gaussian_bt_loss(*x, generator=g, prior_std=0.0)
    with pytest.raises(ValueError, match="num_samples"):
        gaussian_bt_loss(*x, generator=g, num_samples=0)
    with pytest.raises(ValueError, match=r"labels.*\[0, 1\]"):
        gaussian_bt_loss(*x, torch.tensor([0.0, 1.0, 3.0], dtype=D64), generator=g)
    bad = x[1].clone()
    bad[0, 0] = float("-inf")
    with pytest.raises(ValueError, match="log_std_first.*finite"):
        gaussian_bt_loss(x[0], bad, x[2], x[3], generator=g)
