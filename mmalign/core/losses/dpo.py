"""DPO family on summed sequence log-probabilities: DPO, IPO, conservative DPO (cDPO), robust DPO (rDPO).

Notation: ρ_w = log π_θ(y_w|x) − log π_ref(y_w|x), ρ_l likewise, Δ = ρ_w − ρ_l. Every input is ``[B]`` (one summed
log-probability per response); the chosen response is always the first one (label 1). Metrics (a lazy mapping of
Python floats, computed on first read, see :class:`~mmalign.core.losses._common.LossMetrics`):
``rewards/chosen`` = mean β ρ_w (TRL's implicit reward), ``rewards/rejected``, ``rewards/margin`` = mean βΔ,
``train/pref_accuracy`` = fraction with Δ > 0 (ties half credit).
"""

from __future__ import annotations

from functools import partial

import torch.nn.functional as F
from torch import Tensor

from mmalign.core.losses._common import LossMetrics, check_loss_inputs, fused_means
from mmalign.core.validation import check_beta, check_eps, check_reduction, reduce_loss

__all__ = ["dpo_loss", "ipo_loss", "conservative_dpo_loss", "robust_dpo_loss"]


def _dpo_metrics(beta: float, rho_w: Tensor, rho_l: Tensor) -> dict[str, float]:
    mean_w, mean_l, mean_sign = fused_means([rho_w, rho_l, (rho_w - rho_l).sign()])
    return {"rewards/chosen": beta * mean_w, "rewards/rejected": beta * mean_l,
            "rewards/margin": beta * (mean_w - mean_l), "train/pref_accuracy": 0.5 + 0.5 * mean_sign}


def _log_ratios(
    policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
    beta: float, reduction: str, chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor, LossMetrics]:
    """``(ρ_w, ρ_l, metrics)`` after validating every argument; ρ is divided by the token count when lengths are
    given (IPO's per-token log-ratios)."""
    check_beta(beta)
    check_reduction(reduction)
    inputs = {
        "policy_chosen_logps": policy_chosen_logps, "policy_rejected_logps": policy_rejected_logps,
        "ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps,
    }
    lengths: dict[str, Tensor] = {}
    if chosen_lengths is not None and rejected_lengths is not None:
        lengths = {"chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths}
    check_loss_inputs({**inputs, **lengths}, positive=lengths)
    rho_w, rho_l = policy_chosen_logps - ref_chosen_logps, policy_rejected_logps - ref_rejected_logps
    if chosen_lengths is not None and rejected_lengths is not None:
        rho_w, rho_l = rho_w / chosen_lengths.to(rho_w.dtype), rho_l / rejected_lengths.to(rho_l.dtype)
    return rho_w, rho_l, LossMetrics(partial(_dpo_metrics, beta), rho_w, rho_l)


def dpo_loss(
    policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
    *, beta: float = 0.1, reduction: str = "mean",
) -> tuple[Tensor, LossMetrics]:
    r"""Sigmoid DPO loss ``−log σ(βΔ)`` (Rafailov et al. 2023, arXiv 2305.18290, Eq. 7).

    Shapes: four ``[B]`` tensors of summed token log-probs. β > 0. Reduction over the batch.
    Limit cases: Δ = 0 gives ``log 2``; Δ → +∞ gives 0; the gradient in Δ is ``−β σ(−βΔ)``.

    Examples:
        >>> import torch
        >>> from mmalign.core.losses import dpo_loss
        >>> policy_chosen, policy_rejected = torch.tensor([-5.0, -6.0]), torch.tensor([-7.0, -6.0])
        >>> ref = torch.tensor([-6.0, -6.0])
        >>> loss, metrics = dpo_loss(policy_chosen, policy_rejected, ref, ref, beta=0.5)
        >>> round(loss.item(), 4)  # mean of -log σ(0.5 · 2) and -log σ(0)
        0.5032
        >>> metrics['rewards/margin'], metrics['train/pref_accuracy']
        (0.5, 0.75)
    """
    rho_w, rho_l, metrics = _log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                        ref_rejected_logps, beta, reduction)
    loss = reduce_loss(-F.logsigmoid(beta * (rho_w - rho_l)), reduction)
    return loss, metrics


def ipo_loss(
    policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
    *, beta: float = 0.1, chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None,
    reduction: str = "mean",
) -> tuple[Tensor, LossMetrics]:
    r"""IPO loss ``(ρ_w/n_w − ρ_l/n_l − 1/(2β))²`` (Azar et al. 2023, arXiv 2310.12036, Eq. 17; β plays τ).

    ``chosen_lengths``/``rejected_lengths`` (``[B]``, > 0, number of completion tokens) give the per-token-averaged
    log-ratios of the IPO authors and TRL; leave both ``None`` for token-summed log-ratios (OpenRLHF). The loss is
    bounded below by 0, reached at the finite margin ``1/(2β)`` (IPO does not push Δ to infinity).
    Limit case: with ``n = 1`` and ``Δ = 1/(2β)`` the loss is exactly 0.

    Examples:
        >>> import torch
        >>> from mmalign.core.losses import ipo_loss
        >>> ref = torch.tensor([-5.0])
        >>> loss, _ = ipo_loss(torch.tensor([-4.0]), torch.tensor([-6.0]), ref, ref, beta=0.5)
        >>> loss.item()  # Δ = 2 overshoots the target margin 1/(2β) = 1: (2 − 1)²
        1.0
    """
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("chosen_lengths and rejected_lengths must be given together (or both None), got "
                         f"chosen_lengths={'None' if chosen_lengths is None else 'tensor'}, "
                         f"rejected_lengths={'None' if rejected_lengths is None else 'tensor'}")
    rho_w, rho_l, metrics = _log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                        ref_rejected_logps, beta, reduction, chosen_lengths, rejected_lengths)
    loss = reduce_loss((rho_w - rho_l - 1.0 / (2.0 * beta)).square(), reduction)
    return loss, metrics


def conservative_dpo_loss(
    policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
    *, beta: float = 0.1, eps: float = 0.1, reduction: str = "mean",
) -> tuple[Tensor, LossMetrics]:
    r"""Conservative DPO (cDPO, label smoothing; Mitchell 2023, https://ericmitchell.ai/cdpo.pdf, Eq. 3).

    ``−(1−ε) log σ(βΔ) − ε log σ(−βΔ)``: BCE of σ(βΔ) against the soft target ``1 − ε``, ε ∈ [0, 0.5).
    Biased under label flips (not the clean loss in expectation) but bounded: its minimum is at the finite margin
    ``Δ* = log((1−ε)/ε) / β``. Limit case: ε = 0 gives :func:`dpo_loss`. Not to be confused with
    :func:`robust_dpo_loss`.

    Examples:
        >>> import torch
        >>> from mmalign.core.losses import conservative_dpo_loss
        >>> zero = torch.zeros(3)
        >>> loss, _ = conservative_dpo_loss(zero, zero, zero, zero, eps=0.1)
        >>> round(loss.item(), 4)  # Δ = 0: log 2 whatever ε
        0.6931
    """
    check_eps(eps)
    rho_w, rho_l, metrics = _log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                        ref_rejected_logps, beta, reduction)
    z = beta * (rho_w - rho_l)
    per_pair = -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    return reduce_loss(per_pair, reduction), metrics


def robust_dpo_loss(
    policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
    *, beta: float = 0.1, eps: float = 0.1, reduction: str = "mean",
) -> tuple[Tensor, LossMetrics]:
    r"""Robust DPO (rDPO; Chowdhury, Kini, Natarajan, ICML 2024, arXiv 2403.00409; the unbiased loss of its Sec. 3).

    .. math::
        \ell = \frac{-(1-\varepsilon)\log\sigma(\beta\Delta) + \varepsilon\log\sigma(-\beta\Delta)}
                    {1-2\varepsilon}

    ε ∈ [0, 0.5) is the known (or estimated, :func:`~mmalign.core.losses.estimate_flip_rate`) probability that a
    label was flipped. Unbiased: its expectation over the flip (this loss of the observed order with probability
    1 − ε, of the swapped order with probability ε) is the clean DPO loss exactly. The loss is unbounded below as
    Δ → ∞ and its variance grows as ε → 0.5. Limit case: ε = 0 gives :func:`dpo_loss`. (Re-Align's "rDPO" is a
    different method: :func:`~mmalign.core.losses.realign_loss`.)

    Examples:
        >>> import torch
        >>> from mmalign.core.losses import dpo_loss, robust_dpo_loss
        >>> x = [torch.tensor([-5.0]), torch.tensor([-7.0]), torch.tensor([-6.0]), torch.tensor([-6.0])]
        >>> torch.equal(robust_dpo_loss(*x, eps=0.0)[0], dpo_loss(*x)[0])  # ε = 0 is DPO
        True
        >>> round(robust_dpo_loss(*x, beta=1.0, eps=0.2)[0].item(), 4)
        -0.5397
    """
    check_eps(eps)
    rho_w, rho_l, metrics = _log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                        ref_rejected_logps, beta, reduction)
    z = beta * (rho_w - rho_l)
    per_pair = (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)
    return reduce_loss(per_pair, reduction), metrics
