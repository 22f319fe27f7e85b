"""Contrastive Preference Learning (CPL; Hejna et al., ICLR 2024, arXiv 2310.13639): regret-based preference loss
on a policy's per-step log-likelihoods, with the conservative bias λ and an optional behaviour-cloning term."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mmalign.core.losses._common import (
    LossMetrics, check_loss_inputs, expected_pair_metrics, fused_means, pair_rows,
)
from mmalign.core.validation import (
    check_mask, check_ndim, check_nonnegative, check_positive, check_range, check_reduction, check_same_shape,
    check_shape, check_tensor, reduce_loss,
)

__all__ = ["cpl_loss", "discounted_segment_score"]


def _apply_mask(logp: Tensor, mask: Tensor | None) -> Tensor:
    # where (not multiply) so that padded steps holding -inf/NaN neither leak into sums nor into gradients.
    if mask is None:
        return logp
    return torch.where(mask.bool(), logp, torch.zeros((), dtype=logp.dtype, device=logp.device))


def discounted_segment_score(logp: Tensor, mask: Tensor | None, alpha: float, gamma: float) -> Tensor:
    """``S(σ) = Σ_t γ^t α log π(a_t|s_t)`` over valid steps: ``[B, T] → [B]`` (t counted from the segment start).

    Examples:
        >>> import torch
        >>> from mmalign.core.losses import discounted_segment_score
        >>> logp = torch.tensor([[-1.0, -1.0, -1.0]])
        >>> discounted_segment_score(logp, None, alpha=0.1, gamma=0.5)  # 0.1 · (−1 − 0.5 − 0.25)
        tensor([-0.1750])
    """
    logp = _apply_mask(logp, mask)
    steps = torch.arange(logp.shape[-1], dtype=logp.dtype, device=logp.device)
    return alpha * (logp * gamma**steps).sum(dim=-1)


def _bc_nll(lp1: Tensor, lp2: Tensor, mask_first: Tensor | None, mask_second: Tensor | None) -> Tensor:
    """Per-pair negative mean log-likelihood over the valid steps of both (masked) segments ``lp1``, ``lp2``."""
    def valid_steps(mask: Tensor | None) -> Tensor:
        if mask is None:
            return torch.full(lp1.shape[:1], float(lp1.shape[-1]), dtype=lp1.dtype, device=lp1.device)
        return mask.to(lp1.dtype).sum(dim=-1)

    return -(lp1.sum(dim=-1) + lp2.sum(dim=-1)) / (valid_steps(mask_first) + valid_steps(mask_second)).clamp_min(1.0)


def _cpl_metrics(s1: Tensor, s2: Tensor, labels: Tensor | None, lp1: Tensor, lp2: Tensor, mask_first: Tensor | None,
                 mask_second: Tensor | None) -> dict[str, float]:
    bc_nll = _bc_nll(lp1, lp2, mask_first, mask_second)
    stats = fused_means([*pair_rows(s1, s2, labels), bc_nll])
    chosen, rejected, accuracy = expected_pair_metrics(stats, labels is not None)
    return {"rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margin": chosen - rejected,
            "train/pref_accuracy": accuracy, "train/bc_nll": stats[-1]}


def cpl_loss(
    logp_first: Tensor,
    logp_second: Tensor,
    labels: Tensor | None = None,
    *,
    alpha: float = 0.1,
    gamma: float = 1.0,
    bias: float = 1.0,
    mask_first: Tensor | None = None,
    mask_second: Tensor | None = None,
    bc_coef: float = 0.0,
    reduction: str = "mean",
) -> tuple[Tensor, LossMetrics]:
    r"""CPL loss with conservative bias λ (``bias``) and soft labels.

    With :math:`S_i = \sum_t \gamma^t \alpha \log\pi_\theta(a^i_t|s^i_t)` and label :math:`p = P(1 \succ 2)`:

    .. math::
        \ell = -p \log\sigma(S_1 - \lambda S_2) - (1 - p)\log\sigma(S_2 - \lambda S_1)
               + c_{BC}\,\Big(-\tfrac{1}{N}\sum_{\text{valid } t, i} \log\pi_\theta(a^i_t|s^i_t)\Big)

    For a hard label this is the paper's CPL(λ) (Sec. 4, "conservative" variant):
    ``−log exp(S⁺)/(exp(S⁺) + exp(λS⁻))``; λ multiplies the **dispreferred** segment's score in each BCE term, which
    for soft labels means λ scales segment 2 in the "first preferred" term and segment 1 in the "second preferred"
    term (as in the official ``biased_bce_with_logits``). The BC term (CPL-BC) is ``bc_coef`` times the negative mean
    log-likelihood over the valid steps of both segments of each pair.

    Args:
        logp_first, logp_second: per-step ``log π(a_t|s_t)`` of the two segments, ``[B, T]``. Padded steps are
            excluded with the masks and may hold any value; valid steps must be finite.
        labels: ``[B]`` ``P(first ≻ second)`` in [0, 1]; ``None`` = first preferred.
        alpha: temperature α > 0 (advantage = α log π). gamma: discount in (0, 1] (official code: 1).
        bias: λ ∈ (0, 1]; 1 = plain CPL. mask_first, mask_second: ``[B, T]`` valid-step masks (``None`` = all).
        bc_coef: weight ≥ 0 of the BC regulariser. reduction: over pairs, ``"mean" | "sum" | "none"``.

    Returns:
        ``(loss, metrics)``; metrics are a lazy mapping of Python floats (batch means, computed on first read):
        ``rewards/chosen``/``rewards/rejected`` (S of the label-preferred / other segment, in expectation over a
        label drawn from p), ``rewards/margin``,
        ``train/pref_accuracy`` (probability that such a label agrees with the sign of S_1 − S_2; ties 1/2),
        ``train/bc_nll`` (mean negative log-likelihood per valid step).

    Limit cases: λ = 1 gives the Bradley–Terry loss on the discounted log-likelihood sums ``S_1, S_2``; T = 1,
    γ = 1 with log-ratios to a reference gives DPO (the contextual-bandit case).

    Examples:
        >>> import torch
        >>> from mmalign.core.losses import cpl_loss
        >>> logp_first = torch.full((2, 4), -0.5)  # the preferred segments are likelier under the policy
        >>> logp_second = torch.full((2, 4), -2.0)
        >>> loss, metrics = cpl_loss(logp_first, logp_second, alpha=0.5)
        >>> round(loss.item(), 4)  # -log σ(0.5 · (−2 + 8))
        0.0486
        >>> metrics['train/pref_accuracy']
        1.0
    """
    lp1, lp2 = _check_cpl(logp_first, logp_second, labels, alpha, gamma, bias, mask_first, mask_second, bc_coef,
                          reduction)
    s1, s2 = discounted_segment_score(lp1, None, alpha, gamma), discounted_segment_score(lp2, None, alpha, gamma)
    per_pair = -F.logsigmoid(s1 - bias * s2)
    if labels is not None:
        p = labels.to(s1.dtype)
        per_pair = p * per_pair - (1.0 - p) * F.logsigmoid(s2 - bias * s1)
    if bc_coef:
        per_pair = per_pair + bc_coef * _bc_nll(lp1, lp2, mask_first, mask_second)
    loss = reduce_loss(per_pair, reduction)
    return loss, LossMetrics(_cpl_metrics, s1, s2, labels, lp1, lp2, mask_first, mask_second)


def _check_cpl(
    logp_first: Tensor, logp_second: Tensor, labels: Tensor | None, alpha: float, gamma: float, bias: float,
    mask_first: Tensor | None, mask_second: Tensor | None, bc_coef: float, reduction: str,
) -> tuple[Tensor, Tensor]:
    """Validate a :func:`cpl_loss` call; returns the log-likelihoods with padded steps set to 0 (they may hold any
    value; the valid ones must be finite)."""
    check_ndim("logp_first", logp_first, 2)
    check_same_shape({"logp_first": logp_first, "logp_second": logp_second})
    if labels is not None:
        check_tensor("labels", labels)
        check_shape("labels", labels, logp_first.shape[:1])
    for name, m in (("mask_first", mask_first), ("mask_second", mask_second)):
        if m is not None:
            check_mask(name, m, logp_first.shape)
    check_positive("alpha", alpha)
    check_range("gamma", gamma, 0.0, 1.0, low_open=True)
    check_range("bias", bias, 0.0, 1.0, low_open=True)
    check_nonnegative("bc_coef", bc_coef)
    check_reduction(reduction)
    lp1, lp2 = _apply_mask(logp_first, mask_first), _apply_mask(logp_second, mask_second)
    check_loss_inputs({"logp_first": lp1, "logp_second": lp2}, ndim=2, labels=labels)
    return lp1, lp2
