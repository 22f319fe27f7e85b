"""Diffusion-DPO and MaPO: values, β convention, MaPO margin sign, gradcheck, direction, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmalign.core.losses import diffusion_dpo_loss, mapo_loss, mapo_score

D64 = torch.float64


def _errs(n: int = 5, seed: int = 0, requires_grad: bool = False) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(0.1 + 0.05 * torch.rand(n, generator=g, dtype=D64)).requires_grad_(requires_grad) for _ in range(4)]


def test_diffusion_dpo_hand_computed_and_beta_convention() -> None:
    lw, ll, rw, rl = (torch.tensor([v], dtype=D64) for v in (0.10, 0.12, 0.11, 0.11))
    # inside = -(beta/2)((0.10 - 0.12) - 0) = 0.01 * beta / 2 * 2 ... with beta 100: -50 * -0.02 = 1
    loss, m = diffusion_dpo_loss(lw, ll, rw, rl, beta=100.0)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.0)))
    assert m["rewards/margin"] == pytest.approx(1.0)
    assert m["train/pref_accuracy"] == 1.0
    assert m["diffusion/model_err_chosen"] == pytest.approx(0.10)
    # diffusers SD1.5 script: -logsigmoid(beta_d * (ref_diff - model_diff)) with beta_d = beta / 2
    beta_d = 50.0
    diffusers = -F.logsigmoid(beta_d * ((rw - rl) - (lw - ll)))
    torch.testing.assert_close(loss, diffusers.mean())


def test_diffusion_dpo_reference_equal_policy_is_log2() -> None:
    lw, ll, _, _ = _errs()
    loss, _ = diffusion_dpo_loss(lw, ll, lw, ll)
    assert loss.item() == pytest.approx(math.log(2.0))


def test_pref_accuracy_ties_earn_half_as_in_every_loss() -> None:
    """Suite convention (docs/methods/losses.md): a tie earns ½ — unlike the official ``implicit_acc`` (ties 0)."""
    lw, ll, _, _ = _errs()
    _, m = diffusion_dpo_loss(lw, ll, lw, ll)  # policy = reference (initialisation): every argument is 0
    assert m["train/pref_accuracy"] == 0.5
    _, m = mapo_loss(lw, lw)  # equal errors: every margin is 0
    assert m["train/pref_accuracy"] == 0.5
    lw = torch.tensor([0.1, 0.2, 0.3, 0.1], dtype=D64)
    ll = torch.tensor([0.2, 0.1, 0.3, 0.3], dtype=D64)  # chosen lower, higher, tie, lower
    ref = torch.full((4,), 0.2, dtype=D64)
    _, m = diffusion_dpo_loss(lw, ll, ref, ref, beta=10.0)
    assert m["train/pref_accuracy"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    _, m = mapo_loss(lw, ll)
    assert m["train/pref_accuracy"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)


def test_mapo_score_properties() -> None:
    x = torch.tensor([0.0, 1e-6, 1e-3, 0.1, 1.0, 10.0], dtype=D64)
    s = mapo_score(x, c=1.0)
    exact = torch.where(x == 0, torch.ones_like(x), x / torch.expm1(x))
    torch.testing.assert_close(s, exact)
    assert bool((s[1:] < s[:-1]).all()) and s[0].item() == 1.0
    z = torch.zeros(3, dtype=D64, requires_grad=True)
    (g,) = torch.autograd.grad(mapo_score(z, c=0.5).sum(), z)
    torch.testing.assert_close(g, torch.full((3,), -0.25, dtype=D64))  # d/dl [1 - c l / 2] = -c/2, no NaN at 0


def test_mapo_hand_computed_official_formula() -> None:
    lw = torch.tensor([0.2, 0.4], dtype=D64)
    ll = torch.tensor([0.3, 0.1], dtype=D64)

    def s(v: float) -> float:
        return 0.5 * v / math.expm1(0.5 * v)

    ratios = [-math.log1p(math.exp(-1000 * (s(a) - s(b)))) for a, b in ((0.2, 0.3), (0.4, 0.1))]
    expected = (0.2 + 0.4) / 2 - 0.1 * sum(ratios) / 2
    loss, m = mapo_loss(lw, ll)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert m["mapo/win_score"] == pytest.approx((s(0.2) + s(0.4)) / 2)
    assert m["mapo/or_loss"] == pytest.approx(-0.1 * sum(ratios) / 2)  # official "OR loss" includes beta_mapo
    assert m["train/pref_accuracy"] == 0.5


def test_mapo_margin_sign() -> None:
    """The margin s(l_w) - s(l_l) is positive exactly when the chosen error is lower (unlike diffusers' ORPO)."""
    lw = torch.tensor([0.1, 0.3], dtype=D64)
    ll = torch.tensor([0.3, 0.1], dtype=D64)
    _, m = mapo_loss(lw, ll, reduction="none")
    assert m["rewards/margin"] == 0.0  # symmetric pairs: margins +x and -x
    _, m_good = mapo_loss(lw[:1], ll[:1])
    _, m_bad = mapo_loss(lw[1:], ll[1:])
    assert m_good["rewards/margin"] > 0 > m_bad["rewards/margin"]
    # The margin term alone (no SFT term) prefers the lower chosen error.
    only_margin = lambda a, b: mapo_loss(a, b, margin_weight=1.0)[0] - a.mean()  # noqa: E731
    assert only_margin(lw[:1], ll[:1]) < only_margin(lw[1:], ll[1:])


def test_mapo_limits() -> None:
    lw, ll, _, _ = _errs()
    loss, _ = mapo_loss(lw, ll, margin_weight=0.0)
    torch.testing.assert_close(loss, lw.mean())
    loss, _ = mapo_loss(lw, lw)
    assert loss.item() == pytest.approx(lw.mean().item() + 0.1 * math.log(2.0))


@pytest.mark.parametrize("which", ["dpo", "mapo"])
def test_gradcheck_and_direction(which: str) -> None:
    errs = _errs(requires_grad=True)
    if which == "dpo":
        fn = lambda *e: diffusion_dpo_loss(*e, beta=50.0)[0]  # noqa: E731
        args = errs
    else:
        fn = lambda *e: mapo_loss(*e, temperature=10.0)[0]  # noqa: E731
        args = errs[:2]
    assert torch.autograd.gradcheck(fn, args)
    base = [a.detach() for a in args]
    lowered = [base[0] - 0.01] + base[1:]
    raised_rejected = [base[0], base[1] + 0.01] + base[2:]
    assert fn(*lowered) < fn(*base)
    assert fn(*raised_rejected) < fn(*base)


def test_bad_input() -> None:
    e = _errs(n=4)
    with pytest.raises(ValueError, match="ref_err_rejected.*shape"):
        diffusion_dpo_loss(e[0], e[1], e[2], e[3][:2])
    with pytest.raises(ValueError, match="beta must be a finite number > 0, got 0"):
        diffusion_dpo_loss(*e, beta=0)
    bad = e[0].clone()
    bad[1] = float("nan")
    with pytest.raises(ValueError, match="model_err_chosen.*finite"):
        mapo_loss(bad, e[1])
    with pytest.raises(ValueError, match="model_err_rejected.*shape"):
        mapo_loss(e[0], e[1][:3])
    for kw in ({"c": 0.0}, {"temperature": -1.0}, {"margin_weight": -0.1}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            mapo_loss(e[0], e[1], **kw)


def test_mapo_exact_zero_error_has_finite_gradient() -> None:
    lw = torch.tensor([0.0, 0.2], dtype=D64, requires_grad=True)
    ll = torch.tensor([0.1, 0.0], dtype=D64, requires_grad=True)
    loss, m = mapo_loss(lw, ll, temperature=10.0)
    loss.backward()
    assert math.isfinite(loss.item()) and m["mapo/win_score"] == pytest.approx((1.0 + 0.1 / math.expm1(0.1)) / 2)
    assert bool(torch.isfinite(lw.grad).all()) and bool(torch.isfinite(ll.grad).all())
    lw2 = torch.tensor([1e-300, 0.2], dtype=D64, requires_grad=True)
    ll2 = torch.tensor([0.1, 1e-300], dtype=D64, requires_grad=True)
    mapo_loss(lw2, ll2, temperature=10.0)[0].backward()
    torch.testing.assert_close(lw.grad, lw2.grad)


@pytest.mark.parametrize("dtype", [torch.float32, D64])
def test_mapo_large_error_has_finite_gradient(dtype: torch.dtype) -> None:
    """Regression: x / expm1(x) overflowed for large c·l (inf/inf), giving NaN gradients with a finite loss."""
    lw = torch.tensor([0.3, 200.0], dtype=dtype, requires_grad=True)
    ll = torch.tensor([0.5, 1500.0], dtype=dtype, requires_grad=True)
    loss, m = mapo_loss(lw, ll)
    loss.backward()

    def s(v: float) -> float:
        return 0.5 * v / math.expm1(0.5 * v)

    # second pair: s(100) ≈ 3.7e-42 and s(750) ≈ 0, so its margin term is log σ(0) = −log 2
    expected = (0.3 + 200.0) / 2 - 0.1 * (-math.log1p(math.exp(-1000 * (s(0.3) - s(0.5)))) - math.log(2.0)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["mapo/lose_score"] == pytest.approx(s(0.5) / 2, rel=1e-6)
    assert bool(torch.isfinite(lw.grad).all()) and bool(torch.isfinite(ll.grad).all())
    # saturated pair: only the SFT term moves l_w (d mean / d l_w = 1/2); s'(≥100) ≈ 0 for the margin
    assert lw.grad[1].item() == pytest.approx(0.5, abs=1e-12)
    assert ll.grad[1].item() == pytest.approx(0.0, abs=1e-12)
    # the guarded score agrees with the plain quotient where that is finite, for both signs of x
    x = torch.tensor([-800.0, -30.0, -1.0, 1e-3, 0.7, 30.0, 700.0], dtype=D64)
    torch.testing.assert_close(mapo_score(x, c=1.0), x / torch.expm1(x))
    big = torch.tensor([1e4], dtype=dtype, requires_grad=True)
    (g,) = torch.autograd.grad(mapo_score(big).sum(), big)
    assert mapo_score(big.detach()).item() == 0.0 and g.item() == 0.0
