"""Bradley–Terry loss: values, soft labels/ties, margin sign, centring, gradcheck, direction, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmalign.core.losses import bradley_terry_loss

D64 = torch.float64


def test_hand_computed_hard_soft_margin_center() -> None:
    r1, r2 = torch.tensor([2.0], dtype=D64), torch.tensor([0.5], dtype=D64)
    loss, m = bradley_terry_loss(r1, r2)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.5)))
    assert m["rewards/margin"] == pytest.approx(1.5)
    assert m["train/pref_accuracy"] == 1.0
    # soft label 0.7: -0.7 log s(1.5) - 0.3 log s(-1.5)
    loss, _ = bradley_terry_loss(r1, r2, torch.tensor([0.7], dtype=D64))
    assert loss.item() == pytest.approx(0.7 * math.log1p(math.exp(-1.5)) + 0.3 * math.log1p(math.exp(1.5)))
    # margin 1 with first preferred: -log s(0.5); with second preferred: -log s(-(1.5 + 1))
    loss, _ = bradley_terry_loss(r1, r2, margin=1.0)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.5)))
    loss, m = bradley_terry_loss(r1, r2, torch.tensor([0.0], dtype=D64), margin=torch.tensor([1.0], dtype=D64))
    assert loss.item() == pytest.approx(math.log1p(math.exp(2.5)))
    assert m["rewards/chosen"] == 0.5 and m["train/pref_accuracy"] == 0.0
    # centring: + c (r1 + r2)^2
    loss, _ = bradley_terry_loss(r1, r2, center_coef=0.01)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.5)) + 0.01 * 2.5**2)


def test_tie_label_and_half_credit() -> None:
    r = torch.tensor([0.3, -1.0], dtype=D64)
    loss, m = bradley_terry_loss(r, r, torch.full((2,), 0.5, dtype=D64))
    assert loss.item() == pytest.approx(math.log(2.0))
    assert m["train/pref_accuracy"] == 0.5  # a tie (label or prediction) earns half credit
    _, m = bradley_terry_loss(r + 1, r, torch.full((2,), 0.5, dtype=D64))
    assert m["train/pref_accuracy"] == 0.5
    _, m = bradley_terry_loss(r, r, torch.tensor([1.0, 0.0], dtype=D64))
    assert m["train/pref_accuracy"] == 0.5
    _, m = bradley_terry_loss(r + 1, r, torch.tensor([0.9, 0.2], dtype=D64))
    # Soft labels: expectation over a label drawn from p (agreement 0.9 and 0.2).
    assert m["train/pref_accuracy"] == pytest.approx(0.55)
    chosen = (0.9 * (r[0] + 1) + 0.1 * r[0] + 0.2 * (r[1] + 1) + 0.8 * r[1]) / 2
    assert m["rewards/chosen"] == pytest.approx(chosen.item())
    assert m["rewards/margin"] == pytest.approx((0.8 - 0.6) / 2)


def test_mask_drops_skipped_pairs() -> None:
    r1, r2 = torch.tensor([1.0, 5.0, -2.0], dtype=D64), torch.zeros(3, dtype=D64)
    mask = torch.tensor([True, False, True])
    loss, m = bradley_terry_loss(r1, r2, mask=mask)
    expected = -F.logsigmoid(r1[mask]).mean()
    torch.testing.assert_close(loss, expected)
    assert m["rewards/chosen"] == pytest.approx(-0.5)
    # A teacher's skipped pairs carry NaN labels: masked, they are ignored.
    labels = torch.tensor([1.0, float("nan"), 0.0], dtype=D64)
    loss, m = bradley_terry_loss(r1, r2, labels, mask=mask, reduction="none")
    torch.testing.assert_close(loss, torch.stack([-F.logsigmoid(r1[0]), torch.zeros((), dtype=D64),
                                                  -F.logsigmoid(-r1[2])]))
    assert m["train/pref_accuracy"] == 1.0 and m["rewards/margin"] == pytest.approx(1.5)


def test_gradcheck_and_direction() -> None:
    g = torch.Generator().manual_seed(0)
    r1, r2 = (torch.randn(6, generator=g, dtype=D64, requires_grad=True) for _ in range(2))
    labels = torch.rand(6, generator=g, dtype=D64)
    margin = torch.rand(6, generator=g, dtype=D64)
    assert torch.autograd.gradcheck(
        lambda a, b: bradley_terry_loss(a, b, labels, margin=margin, center_coef=0.1)[0], (r1, r2))
    base = bradley_terry_loss(r1.detach(), r2.detach())[0]
    assert bradley_terry_loss(r1.detach() + 0.1, r2.detach())[0] < base
    # Second preferred: raising the second reward lowers the loss.
    zeros = torch.zeros(6, dtype=D64)
    assert bradley_terry_loss(r1.detach(), r2.detach() + 0.1, zeros)[0] < bradley_terry_loss(
        r1.detach(), r2.detach(), zeros)[0]


def test_matches_hard_label_reference_on_swaps() -> None:
    g = torch.Generator().manual_seed(1)
    r1, r2 = torch.randn(100, generator=g), torch.randn(100, generator=g)
    labels = (torch.rand(100, generator=g) > 0.5).float()
    loss, _ = bradley_terry_loss(r1, r2, labels, reduction="none")
    chosen, rejected = torch.where(labels > 0.5, r1, r2), torch.where(labels > 0.5, r2, r1)
    torch.testing.assert_close(loss, -F.logsigmoid(chosen - rejected))


def test_bad_input() -> None:
    r = torch.zeros(4)
    with pytest.raises(ValueError, match="reward_second.*shape"):
        bradley_terry_loss(r, torch.zeros(5))
    with pytest.raises(ValueError, match=r"labels.*\[0, 1\].*1.5"):
        bradley_terry_loss(r, r, torch.tensor([0.0, 1.5, 0.2, 1.0]))
    with pytest.raises(ValueError, match=r"labels.*-0.1"):
        bradley_terry_loss(r, r, torch.tensor([0.0, -0.1, 0.2, 1.0]))
    with pytest.raises(ValueError, match=r"labels"):
        bradley_terry_loss(r, r, torch.tensor([0.0, float("nan"), 0.2, 1.0]))
    with pytest.raises(ValueError, match="reward_first.*finite"):
        bradley_terry_loss(torch.tensor([0.0, float("inf"), 0, 0]), r)
    with pytest.raises(ValueError, match="center_coef"):
        bradley_terry_loss(r, r, center_coef=-1.0)
    with pytest.raises(ValueError, match="margin"):
        bradley_terry_loss(r, r, margin=float("nan"))
