"""DPO family: hand values, gradchecks, preference direction, limits, rDPO unbiasedness, flip-rate estimator."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmalign.core.losses import (
    conservative_dpo_loss, dpo_loss, estimate_flip_rate, ipo_loss, robust_dpo_loss,
)
from mmalign.registry import LOSSES

D64 = torch.float64


def _inputs(n: int = 5, seed: int = 0, requires_grad: bool = False) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(-10.0 + 3.0 * torch.randn(n, generator=g, dtype=D64)).requires_grad_(requires_grad) for _ in range(4)]


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_dpo_hand_computed() -> None:
    pc, pr, rc, rr = (torch.tensor([v], dtype=D64) for v in (-4.0, -9.0, -5.0, -7.0))
    # rho_w = 1, rho_l = -2, Delta = 3, beta = 0.5 -> -log sigma(1.5)
    loss, m = dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert loss.item() == pytest.approx(-_log_sigmoid(1.5), abs=1e-12)
    assert m["rewards/chosen"] == pytest.approx(0.5)
    assert m["rewards/rejected"] == pytest.approx(-1.0)
    assert m["rewards/margin"] == pytest.approx(1.5)
    assert m["train/pref_accuracy"] == 1.0
    assert all(isinstance(v, float) for v in m.values())


def test_ipo_cdpo_rdpo_hand_computed() -> None:
    pc, pr, rc, rr = (torch.tensor([v], dtype=D64) for v in (-4.0, -9.0, -5.0, -7.0))
    lw, ll = torch.tensor([2.0], dtype=D64), torch.tensor([1.0], dtype=D64)
    # per-token: 1/2 - (-2/1) = 2.5; beta = 0.25 -> target 2 -> (2.5 - 2)^2 = 0.25 (lengths ignored would give
    # the summed value 1, swapped lengths (1/1 - (-2/2) - 2)^2 = 0): float lengths take the inline path, integer
    # lengths the general one
    for n_w, n_l in ((lw, ll), (lw.long(), ll.long())):
        loss, _ = ipo_loss(pc, pr, rc, rr, beta=0.25, chosen_lengths=n_w, rejected_lengths=n_l)
        assert loss.item() == pytest.approx(0.25, abs=1e-12)
    loss, _ = ipo_loss(pc, pr, rc, rr, beta=0.25)  # summed: (3 - 2)^2
    assert loss.item() == pytest.approx(1.0)
    z = 0.5 * 3.0
    loss, _ = conservative_dpo_loss(pc, pr, rc, rr, beta=0.5, eps=0.2)
    assert loss.item() == pytest.approx(-0.8 * _log_sigmoid(z) - 0.2 * _log_sigmoid(-z))
    loss, _ = robust_dpo_loss(pc, pr, rc, rr, beta=0.5, eps=0.2)
    assert loss.item() == pytest.approx((-0.8 * _log_sigmoid(z) + 0.2 * _log_sigmoid(-z)) / 0.6)


@pytest.mark.parametrize("fn,kwargs", [
    (dpo_loss, {"beta": 0.3}),
    (ipo_loss, {"beta": 0.3}),
    (conservative_dpo_loss, {"beta": 0.3, "eps": 0.2}),
    (robust_dpo_loss, {"beta": 0.3, "eps": 0.2}),
])
def test_gradcheck_and_direction(fn, kwargs) -> None:
    inputs = _inputs(requires_grad=True)
    assert torch.autograd.gradcheck(lambda *x: fn(*x, **kwargs)[0], inputs)
    assert torch.autograd.gradcheck(lambda *x: fn(*x, reduction="sum", **kwargs)[0], inputs)
    # Raising the chosen log-ratio lowers the loss (start below IPO's target margin so IPO is also decreasing).
    pc, pr, rc, rr = (torch.tensor([v], dtype=D64) for v in (-5.0, -5.0, -5.0, -5.0))
    before = fn(pc, pr, rc, rr, **kwargs)[0]
    after = fn(pc + 0.5, pr, rc, rr, **kwargs)[0]
    assert after < before


def test_ipo_lengths_gradcheck() -> None:
    inputs = _inputs(requires_grad=True)
    lengths = torch.tensor([3.0, 5, 1, 7, 2], dtype=D64), torch.tensor([4.0, 2, 6, 1, 3], dtype=D64)
    assert torch.autograd.gradcheck(
        lambda *x: ipo_loss(*x, beta=0.2, chosen_lengths=lengths[0], rejected_lengths=lengths[1])[0], inputs)


def test_eps_zero_limits_equal_dpo() -> None:
    x = _inputs(n=64)
    ref = dpo_loss(*x, beta=0.2, reduction="none")[0]
    for fn in (conservative_dpo_loss, robust_dpo_loss):
        torch.testing.assert_close(fn(*x, beta=0.2, eps=0.0, reduction="none")[0], ref)
        near = fn(*x, beta=0.2, eps=1e-9, reduction="none")[0]
        torch.testing.assert_close(near, ref, atol=1e-7, rtol=0)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3, 0.45])
def test_robust_dpo_unbiased_under_flips(eps: float) -> None:
    """E over the flip of the observed label of rDPO == clean DPO, exactly (the two outcomes averaged)."""
    pc, pr, rc, rr = _inputs(n=32, seed=3)
    clean = dpo_loss(pc, pr, rc, rr, beta=0.7, reduction="none")[0]
    kept = robust_dpo_loss(pc, pr, rc, rr, beta=0.7, eps=eps, reduction="none")[0]
    flipped = robust_dpo_loss(pr, pc, rr, rc, beta=0.7, eps=eps, reduction="none")[0]  # observed order swapped
    torch.testing.assert_close((1 - eps) * kept + eps * flipped, clean)
    # cDPO is biased (its expectation differs from the clean loss) for eps > 0.
    if eps > 0:
        ck = conservative_dpo_loss(pc, pr, rc, rr, beta=0.7, eps=eps, reduction="none")[0]
        cf = conservative_dpo_loss(pr, pc, rr, rc, beta=0.7, eps=eps, reduction="none")[0]
        assert not torch.allclose((1 - eps) * ck + eps * cf, clean)


def test_cdpo_finite_optimum() -> None:
    eps, beta = 0.1, 0.5
    delta = torch.tensor([math.log((1 - eps) / eps) / beta], dtype=D64, requires_grad=True)
    zero = torch.zeros(1, dtype=D64)
    loss, _ = conservative_dpo_loss(delta, zero, zero, zero, beta=beta, eps=eps)
    (grad,) = torch.autograd.grad(loss, delta)
    assert abs(grad.item()) < 1e-12


def test_reductions_and_registry() -> None:
    x = _inputs(n=8)
    per = dpo_loss(*x, reduction="none")[0]
    assert per.shape == (8,)
    torch.testing.assert_close(dpo_loss(*x, reduction="sum")[0], per.sum())
    torch.testing.assert_close(dpo_loss(*x)[0], per.mean())
    for name, fn in [("dpo", dpo_loss), ("ipo", ipo_loss), ("cdpo", conservative_dpo_loss),
                     ("robust_dpo", robust_dpo_loss)]:
        assert LOSSES.get(name) is fn


def test_no_batch_loop_large_batch_matches_reference() -> None:
    x = [t.float() for t in _inputs(n=4096, seed=7)]
    ref = -F.logsigmoid(0.1 * ((x[0] - x[2]) - (x[1] - x[3]))).mean()
    torch.testing.assert_close(dpo_loss(*x)[0], ref)


@pytest.mark.parametrize("fn", [dpo_loss, ipo_loss, conservative_dpo_loss, robust_dpo_loss])
def test_bad_input(fn) -> None:
    x = _inputs(n=4)
    with pytest.raises(ValueError, match=r"ref_rejected_logps.*shape"):
        fn(x[0], x[1], x[2], x[3][:3])
    bad = x[1].clone()
    bad[2] = float("nan")
    with pytest.raises(ValueError, match=r"policy_rejected_logps.*finite.*nan"):
        fn(x[0], bad, x[2], x[3])
    bad[2] = float("inf")
    with pytest.raises(ValueError, match=r"policy_rejected_logps.*finite.*inf"):
        fn(x[0], bad, x[2], x[3])
    for beta in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match=r"beta must be a finite number > 0, got"):
            fn(*x, beta=beta)
    with pytest.raises(ValueError, match="reduction"):
        fn(*x, reduction="avg")


@pytest.mark.parametrize("fn", [conservative_dpo_loss, robust_dpo_loss])
@pytest.mark.parametrize("eps", [0.5, 0.7, -0.1])
def test_bad_eps(fn, eps: float) -> None:
    with pytest.raises(ValueError, match=rf"eps must be in \[0.0, 0.5\), got {eps}"):
        fn(*_inputs(n=4), eps=eps)


def test_ipo_bad_lengths() -> None:
    x = _inputs(n=3)
    with pytest.raises(ValueError, match="chosen_lengths"):
        ipo_loss(*x, chosen_lengths=torch.ones(3, dtype=D64))
    with pytest.raises(ValueError, match="> 0"):
        ipo_loss(*x, chosen_lengths=torch.zeros(3, dtype=D64), rejected_lengths=torch.ones(3, dtype=D64))


def _flipped_labels(eps: float, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = 3.0 * torch.randn(n, generator=g, dtype=D64)
    clean = torch.bernoulli(torch.sigmoid(logits), generator=g)
    flip = torch.rand(n, generator=g, dtype=D64) < eps
    return logits, torch.where(flip, 1.0 - clean, clean)


@pytest.mark.parametrize("method", ["mle", "moments"])
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.25, 0.4])
def test_flip_rate_recovers_known_rate(method: str, eps: float) -> None:
    logits, labels = _flipped_labels(eps, 20_000, seed=int(eps * 100))
    est = estimate_flip_rate(logits, labels, method=method).item()
    assert abs(est - eps) < 0.02, (method, eps, est)


def test_flip_rate_deterministic_scorer_is_disagreement_rate() -> None:
    logits = torch.tensor([50.0, 50.0, -50.0, -50.0, 50.0], dtype=D64)
    labels = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0], dtype=D64)
    assert estimate_flip_rate(logits, labels, method="moments").item() == pytest.approx(0.2, abs=1e-9)
    assert estimate_flip_rate(logits, labels, method="mle").item() == pytest.approx(0.2, abs=1e-6)
    # labels=None means "chosen first": implicit DPO rewards with 1 of 4 negative margins.
    implicit = torch.tensor([40.0, 30.0, -35.0, 45.0], dtype=D64)
    assert estimate_flip_rate(implicit, method="moments").item() == pytest.approx(0.25, abs=1e-9)


def test_flip_rate_bad_input() -> None:
    with pytest.raises(ValueError, match="labels"):
        estimate_flip_rate(torch.zeros(3), torch.tensor([0.0, 1.5, 1.0]))
    with pytest.raises(ValueError, match="method"):
        estimate_flip_rate(torch.zeros(3), method="em")
    with pytest.raises(ValueError, match="max_eps"):
        estimate_flip_rate(torch.zeros(3), max_eps=0.5)


def test_low_precision_inputs_log_float32_accurate_metrics() -> None:
    x = [(t - 50.0).to(torch.bfloat16) for t in _inputs(n=4096, seed=11)]
    _, m16 = dpo_loss(*x, beta=0.1)
    _, m32 = dpo_loss(*[t.float() for t in x], beta=0.1)
    for key in m32:
        assert m16[key] == pytest.approx(m32[key], abs=1e-4), key
