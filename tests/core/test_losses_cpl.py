"""CPL: values, λ = 1 equals BT on discounted sums, soft labels, masks, BC term, gradcheck, direction, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmalign.core.losses import bradley_terry_loss, cpl_loss, discounted_segment_score

D64 = torch.float64


def _segments(b: int = 4, t: int = 5, seed: int = 0, requires_grad: bool = False) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple((-1.0 + 0.5 * torch.randn(b, t, generator=g, dtype=D64)).requires_grad_(requires_grad)
                 for _ in range(2))


def test_hand_computed() -> None:
    lp1 = torch.tensor([[-1.0, -2.0]], dtype=D64)
    lp2 = torch.tensor([[-3.0, -1.0]], dtype=D64)
    # alpha 0.5, gamma 0.5: S1 = 0.5(-1 - 1) = -1, S2 = 0.5(-3 - 0.5) = -1.75; lambda 0.5: -log s(-1 + 0.875)
    loss, m = cpl_loss(lp1, lp2, alpha=0.5, gamma=0.5, bias=0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(0.125)))
    assert m["rewards/chosen"] == pytest.approx(-1.0)
    assert m["rewards/margin"] == pytest.approx(0.75)
    # soft label 0.25: 0.25 * -log s(S1 - .5 S2) + 0.75 * -log s(S2 - .5 S1)
    loss, _ = cpl_loss(lp1, lp2, torch.tensor([0.25], dtype=D64), alpha=0.5, gamma=0.5, bias=0.5)
    expected = 0.25 * math.log1p(math.exp(0.125)) + 0.75 * math.log1p(math.exp(-(-1.75 + 0.5)))
    assert loss.item() == pytest.approx(expected)
    # BC: mean log-likelihood over the 4 steps = -7/4
    loss_bc, m = cpl_loss(lp1, lp2, alpha=0.5, gamma=0.5, bias=0.5, bc_coef=2.0)
    assert m["train/bc_nll"] == pytest.approx(1.75)
    assert loss_bc.item() == pytest.approx(math.log1p(math.exp(0.125)) + 3.5)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_lambda_one_is_bt_on_discounted_sums(gamma: float) -> None:
    lp1, lp2 = _segments(b=16, t=8)
    labels = torch.rand(16, generator=torch.Generator().manual_seed(2), dtype=D64)
    loss, _ = cpl_loss(lp1, lp2, labels, alpha=0.3, gamma=gamma, bias=1.0, reduction="none")
    s1 = 0.3 * (lp1 * gamma ** torch.arange(8, dtype=D64)).sum(-1)
    s2 = 0.3 * (lp2 * gamma ** torch.arange(8, dtype=D64)).sum(-1)
    bt, _ = bradley_terry_loss(s1, s2, labels, reduction="none")
    torch.testing.assert_close(loss, bt)


def test_masks_exclude_padding() -> None:
    lp1, lp2 = _segments(b=3, t=6)
    mask1 = torch.arange(6).expand(3, 6) < torch.tensor([[6], [3], [1]])
    mask2 = torch.arange(6).expand(3, 6) < torch.tensor([[2], [6], [4]])
    padded1 = torch.where(mask1, lp1, torch.full_like(lp1, -123.0))
    padded2 = torch.where(mask2, lp2, torch.full_like(lp2, 77.0))
    loss, m = cpl_loss(padded1, padded2, mask_first=mask1, mask_second=mask2, bc_coef=1.0, reduction="none")
    for i in range(3):  # reference per row on the unpadded steps
        a, b = lp1[i][mask1[i]], lp2[i][mask2[i]]
        ref = -F.logsigmoid(0.1 * a.sum() - 0.1 * b.sum()) - torch.cat([a, b]).mean()
        torch.testing.assert_close(loss[i], ref)
    assert discounted_segment_score(padded1, mask1, 1.0, 1.0)[1].item() == pytest.approx(lp1[1, :3].sum().item())


def test_gradcheck_and_direction() -> None:
    lp1, lp2 = _segments(requires_grad=True)
    labels = torch.tensor([1.0, 0.0, 0.5, 0.8], dtype=D64)
    mask = torch.tensor([[1, 1, 1, 0, 0]] * 4, dtype=torch.bool)
    assert torch.autograd.gradcheck(
        lambda a, b: cpl_loss(a, b, labels, alpha=0.2, gamma=0.95, bias=0.5, mask_first=mask, bc_coef=0.3)[0],
        (lp1, lp2))
    a, b = lp1.detach(), lp2.detach()
    assert cpl_loss(a + 0.1, b, bias=0.5)[0] < cpl_loss(a, b, bias=0.5)[0]
    assert cpl_loss(a, b - 0.1, bias=0.5)[0] < cpl_loss(a, b, bias=0.5)[0]


def test_bad_input() -> None:
    lp1, lp2 = _segments()
    with pytest.raises(ValueError, match="logp_second.*shape"):
        cpl_loss(lp1, lp2[:, :3])
    with pytest.raises(ValueError, match="logp_first.*2-D"):
        cpl_loss(lp1[:, 0], lp2[:, 0])
    with pytest.raises(ValueError, match=r"bias must be in \(0.0, 1.0\], got 0.0"):
        cpl_loss(lp1, lp2, bias=0.0)
    with pytest.raises(ValueError, match="bias.*1.5"):
        cpl_loss(lp1, lp2, bias=1.5)
    with pytest.raises(ValueError, match="alpha"):
        cpl_loss(lp1, lp2, alpha=0.0)
    with pytest.raises(ValueError, match="gamma"):
        cpl_loss(lp1, lp2, gamma=1.1)
    with pytest.raises(ValueError, match="labels.*shape"):
        cpl_loss(lp1, lp2, torch.ones(5, dtype=D64))
    with pytest.raises(ValueError, match=r"labels.*\[0, 1\]"):
        cpl_loss(lp1, lp2, torch.tensor([1.0, 2.0, 0.0, 0.0], dtype=D64))
    bad = lp1.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="logp_first.*finite"):
        cpl_loss(bad, lp2)
    with pytest.raises(ValueError, match="mask_second"):
        cpl_loss(lp1, lp2, mask_second=torch.ones(4, 4, dtype=torch.bool))
