"""RRPO (+ token-wise KL) and Re-Align's visual DPO term."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmalign.core.losses import dpo_loss, realign_loss, rrpo_loss, tokenwise_kl, visual_dpo_loss

D64 = torch.float64


def _rrpo_inputs(b: int = 2, lw: int = 5, ll: int = 4, seed: int = 0, requires_grad: bool = False):
    g = torch.Generator().manual_seed(seed)
    logps = [(-2.0 + torch.randn(b, n, generator=g, dtype=D64)).requires_grad_(requires_grad)
             for n in (lw, ll, lw, ll)]
    seg_w = torch.tensor([[0, 1, 1, 0, 2], [1, 0, 0, 0, 0]])[:b, :lw]
    seg_l = torch.tensor([[1, 0, 2, 2], [0, 0, 1, 0]])[:b, :ll]
    kl = (0.1 * torch.rand(b, lw, generator=g, dtype=D64)).requires_grad_(requires_grad)
    return logps, seg_w, seg_l, kl


def test_tokenwise_kl_matches_definition() -> None:
    g = torch.Generator().manual_seed(0)
    ref = torch.log_softmax(torch.randn(2, 3, 7, generator=g, dtype=D64), -1)
    pol = torch.log_softmax(torch.randn(2, 3, 7, generator=g, dtype=D64), -1)
    kl = tokenwise_kl(ref, pol)
    expected = F.kl_div(pol, ref, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(kl, expected)
    assert bool((kl >= 0).all())
    assert tokenwise_kl(ref, ref).abs().max().item() < 1e-12
    mask = torch.tensor([[True, False, True], [False, False, True]])
    torch.testing.assert_close(tokenwise_kl(ref, pol, mask), expected * mask)


def test_rrpo_hand_computed() -> None:
    (pw, pl, rw, rl), seg_w, seg_l, kl = _rrpo_inputs()
    loss, m = rrpo_loss(pw, pl, rw, rl, seg_w, seg_l, kl, beta=0.5, alpha=0.1, reduction="none")
    for i in range(2):
        rew_w = 0.5 * ((pw[i] - rw[i]) * (seg_w[i] > 0)).sum()
        rew_l = 0.5 * ((pl[i] - rl[i]) * (seg_l[i] > 0)).sum()
        expected = -F.logsigmoid(rew_w - rew_l) + 0.1 * kl[i].sum()
        torch.testing.assert_close(loss[i], expected)
    assert m["rrpo/num_phrases"] == 1.5
    # phrase 1 of row 0: tokens 1-2 of chosen vs token 0 of rejected, phrase 2: token 4 vs tokens 2-3
    manual = 0.5 * ((pw[0, 1] - rw[0, 1] + pw[0, 2] - rw[0, 2] - (pl[0, 0] - rl[0, 0]))
                    + (pw[0, 4] - rw[0, 4] - (pl[0, 2] - rl[0, 2] + pl[0, 3] - rl[0, 3])))
    assert m["rewards/margin"] == pytest.approx(((manual + (
        0.5 * ((pw[1, 0] - rw[1, 0]) - (pl[1, 2] - rl[1, 2])))) / 2).item())


def test_rrpo_limit_is_dpo_when_everything_is_one_phrase() -> None:
    (pw, pl, rw, rl), _, _, kl = _rrpo_inputs()
    ones_w, ones_l = torch.ones(2, 5, dtype=torch.long), torch.ones(2, 4, dtype=torch.long)
    loss, _ = rrpo_loss(pw, pl, rw, rl, ones_w, ones_l, kl, beta=0.3, alpha=0.0)
    ref, _ = dpo_loss(pw.sum(-1), pl.sum(-1), rw.sum(-1), rl.sum(-1), beta=0.3)
    torch.testing.assert_close(loss, ref)


def test_rrpo_gradcheck_direction_and_kl_mask() -> None:
    (pw, pl, rw, rl), seg_w, seg_l, kl = _rrpo_inputs(requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    assert torch.autograd.gradcheck(
        lambda a, b, c, d, k: rrpo_loss(a, b, c, d, seg_w, seg_l, k, beta=0.4, alpha=0.05, chosen_mask=mask)[0],
        (pw, pl, rw, rl, kl))
    d = [t.detach() for t in (pw, pl, rw, rl)]
    base = rrpo_loss(*d, seg_w, seg_l, kl.detach())[0]
    up = d[0] + 0.1 * (seg_w > 0)  # raise log-probs of the chosen phrases only
    assert rrpo_loss(up, *d[1:], seg_w, seg_l, kl.detach())[0] < base
    outside = d[0] + 5.0 * (seg_w == 0)  # tokens outside phrases do not enter the reward
    torch.testing.assert_close(rrpo_loss(outside, *d[1:], seg_w, seg_l, kl.detach())[0], base)
    masked = rrpo_loss(*d, seg_w, seg_l, kl.detach(), alpha=1.0, chosen_mask=mask, reduction="none")[0]
    unmasked = rrpo_loss(*d, seg_w, seg_l, kl.detach() * mask, alpha=1.0, reduction="none")[0]
    torch.testing.assert_close(masked, unmasked)


def test_rrpo_bad_input() -> None:
    (pw, pl, rw, rl), seg_w, seg_l, kl = _rrpo_inputs()
    with pytest.raises(ValueError, match="same number of phrases.*2 vs 1 in row 0"):
        rrpo_loss(pw, pl, rw, rl, seg_w, seg_l.clamp(max=1), kl)
    with pytest.raises(ValueError, match="chosen_token_kl.*shape"):
        rrpo_loss(pw, pl, rw, rl, seg_w, seg_l, kl[:, :3])
    with pytest.raises(ValueError, match="chosen_segment_ids.*integer"):
        rrpo_loss(pw, pl, rw, rl, seg_w.double(), seg_l, kl)
    with pytest.raises(ValueError, match="policy_rejected_logps.*batch size"):
        rrpo_loss(pw, pl[:1], rw, rl[:1], seg_w, seg_l[:1], kl)
    with pytest.raises(ValueError, match="beta"):
        rrpo_loss(pw, pl, rw, rl, seg_w, seg_l, kl, beta=-0.1)
    bad = pl.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="policy_rejected_logps.*finite"):
        rrpo_loss(pw, bad, rw, rl, seg_w, seg_l, kl)
    with pytest.raises(ValueError, match="ref_logprobs.*3-D"):
        tokenwise_kl(torch.zeros(2, 3), torch.zeros(2, 3))


def _vlm_inputs(n: int = 4, seed: int = 0, requires_grad: bool = False) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(-20.0 + 2.0 * torch.randn(n, generator=g, dtype=D64)).requires_grad_(requires_grad) for _ in range(6)]


def test_visual_dpo_hand_computed_and_limits() -> None:
    pc, pcv, rc, rcv = (torch.tensor([v], dtype=D64) for v in (-10.0, -14.0, -11.0, -12.0))
    # beta (1 - (-2)) = 0.1 * 3
    loss, m = visual_dpo_loss(pc, pcv, rc, rcv)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.3)))
    assert m["rewards/margin"] == pytest.approx(0.3)
    torch.testing.assert_close(loss, dpo_loss(pc, pcv, rc, rcv)[0])
    same, _ = visual_dpo_loss(pc, pc, rc, rc)
    assert same.item() == pytest.approx(math.log(2.0))


def test_realign_sum_and_limits() -> None:
    pc, pr, pcv, rc, rr, rcv = _vlm_inputs(n=8)
    loss, m = realign_loss(pc, pr, pcv, rc, rr, rcv, beta=0.2, reduction="none")
    expected = dpo_loss(pc, pr, rc, rr, beta=0.2, reduction="none")[0] + visual_dpo_loss(
        pc, pcv, rc, rcv, beta=0.2, reduction="none")[0]
    torch.testing.assert_close(loss, expected)
    assert "train/visual_pref_accuracy" in m and "rewards/chosen_retrieved" in m
    no_visual, _ = realign_loss(pc, pr, pcv, rc, rr, rcv, beta=0.2, visual_weight=0.0)
    torch.testing.assert_close(no_visual, dpo_loss(pc, pr, rc, rr, beta=0.2)[0])
    # by hand: textual ρ_w = 1, ρ_l = -2 -> -log σ(0.1·3); visual ρ(y_w|v) = 1, ρ(y_w|v_l) = -1 -> -log σ(0.1·2)
    one = [torch.tensor([v], dtype=D64) for v in (-10.0, -14.0, -13.0, -11.0, -12.0, -12.0)]
    loss, m = realign_loss(*one, visual_weight=0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.3)) + 0.5 * math.log1p(math.exp(-0.2)), abs=1e-12)
    assert m["rewards/visual_margin"] == pytest.approx(0.2)


def test_realign_gradcheck_and_direction() -> None:
    x = _vlm_inputs(requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: realign_loss(*t, beta=0.3, visual_weight=0.7)[0], x)
    assert torch.autograd.gradcheck(lambda *t: visual_dpo_loss(*t, beta=0.3)[0], x[:4])
    d = [t.detach() for t in x]
    base = realign_loss(*d)[0]
    assert realign_loss(d[0] + 0.5, *d[1:])[0] < base  # chosen under the true image
    assert realign_loss(d[0], d[1], d[2] - 0.5, *d[3:])[0] < base  # chosen under the retrieved image


def test_realign_bad_input() -> None:
    x = _vlm_inputs()
    with pytest.raises(ValueError, match="policy_chosen_retrieved_logps.*shape"):
        realign_loss(x[0], x[1], x[2][:2], *x[3:])
    with pytest.raises(ValueError, match="visual_weight"):
        realign_loss(*x, visual_weight=-1.0)
    bad = x[3].clone()
    bad[0] = float("nan")
    with pytest.raises(ValueError, match="ref_chosen_retrieved_logps.*finite"):
        visual_dpo_loss(x[0], x[1], x[2], bad)
