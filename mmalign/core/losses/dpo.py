"""DPO family on summed sequence log-probabilities: DPO, IPO, conservative DPO (cDPO), robust DPO (rDPO).

Notation: ρ_w = log π_θ(y_w|x) − log π_ref(y_w|x), ρ_l likewise, Δ = ρ_w − ρ_l. Every input is ``[B]`` (one summed
log-probability per response); the chosen response is always the first one (label 1). Metrics (a lazy mapping of
Python floats, computed on first read, see :class:`~mmalign.core.losses._common.LossMetrics`):
``rewards/chosen`` = mean β ρ_w (TRL's implicit reward), ``rewards/rejected``, ``rewards/margin`` = mean βΔ,
``train/pref_accuracy`` = fraction with Δ > 0 (ties half credit).
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from mmalign.core.losses._common import LossMetrics, _plain, check_inputs_finite, check_shapes, fused_means
from mmalign.core.validation import check_beta, check_eps, check_reduction, reduce_loss

__all__ = ["dpo_loss", "ipo_loss", "conservative_dpo_loss", "robust_dpo_loss"]

Metrics = LossMetrics


def _dpo_metrics(beta: float, rho_w: Tensor, rho_l: Tensor, delta: Tensor) -> dict[str, float]:
    mean_w, mean_l, mean_sign = fused_means([rho_w, rho_l, delta.sign()])
    return {"rewards/chosen": beta * mean_w, "rewards/rejected": beta * mean_l,
            "rewards/margin": beta * (mean_w - mean_l), "train/pref_accuracy": 0.5 + 0.5 * mean_sign}


def _margins(
    policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
    beta: float, reduction: str, chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None,
) -> tuple[Tensor, LossMetrics]:
    """Validated Δ = ρ_w − ρ_l (length-normalised when lengths are given) and the standard metrics (lazy)."""
    delta, metrics, inputs, lengths = _unchecked_margins(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, reduction,
        chosen_lengths, rejected_lengths)
    check_inputs_finite(delta, inputs, positive=lengths)  # Δ involves every input
    return delta, metrics


def _unchecked_margins(
    policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
    beta: float, reduction: str, chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None,
) -> tuple[Tensor, LossMetrics, dict[str, Tensor], dict[str, Tensor] | None]:
    """Δ and metrics with shapes and scalars checked but tensor values not yet: returns ``(Δ, metrics, inputs,
    lengths)`` for :func:`check_inputs_finite` on a witness (any tensor non-finite wherever Δ is)."""
    inputs = {
        "policy_chosen_logps": policy_chosen_logps, "policy_rejected_logps": policy_rejected_logps,
        "ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps,
    }
    check_beta(beta)
    check_reduction(reduction)
    lengths: dict[str, Tensor] | None = None
    if chosen_lengths is not None and rejected_lengths is not None:
        lengths = {"chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths}
        inputs.update(lengths)
    check_shapes(inputs)
    rho_w, rho_l = policy_chosen_logps - ref_chosen_logps, policy_rejected_logps - ref_rejected_logps
    if chosen_lengths is not None and rejected_lengths is not None:
        rho_w, rho_l = rho_w / chosen_lengths.to(rho_w.dtype), rho_l / rejected_lengths.to(rho_l.dtype)
    delta = rho_w - rho_l
    return delta, LossMetrics(partial(_dpo_metrics, beta), rho_w, rho_l, delta), inputs, lengths


def dpo_loss(
    policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
    *, beta: float = 0.1, reduction: str = "mean",
) -> tuple[Tensor, Metrics]:
    r"""Sigmoid DPO loss ``−log σ(βΔ)`` (Rafailov et al. 2023, arXiv 2305.18290, Eq. 7).

    Shapes: four ``[B]`` tensors of summed token log-probs. β > 0. Reduction over the batch.
    Limit cases: Δ = 0 gives ``log 2``; Δ → +∞ gives 0; the gradient in Δ is ``−β σ(−βΔ)``.
    """
    delta, metrics = _margins(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                              beta, reduction)
    per_pair = -F.logsigmoid(beta * delta)
    return reduce_loss(per_pair, reduction), metrics


def ipo_loss(
    policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
    *, beta: float = 0.1, chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None,
    reduction: str = "mean",
) -> tuple[Tensor, Metrics]:
    r"""IPO loss ``(ρ_w/n_w − ρ_l/n_l − 1/(2β))²`` (Azar et al. 2023, arXiv 2310.12036, Eq. 17; β plays τ).

    ``chosen_lengths``/``rejected_lengths`` (``[B]``, > 0, number of completion tokens) give the per-token-averaged
    log-ratios of the IPO authors and TRL; leave both ``None`` for token-summed log-ratios (OpenRLHF). The loss is
    bounded below by 0, reached at the finite margin ``1/(2β)`` (IPO does not push Δ to infinity).
    Limit case: with ``n = 1`` and ``Δ = 1/(2β)`` the loss is exactly 0.
    """
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("chosen_lengths and rejected_lengths must be given together (or both None), got "
                         f"chosen_lengths={'None' if chosen_lengths is None else 'tensor'}, "
                         f"rejected_lengths={'None' if rejected_lengths is None else 'tensor'}")
    if chosen_lengths is not None and rejected_lengths is not None:
        fast = _ipo_normalised_fast(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                                    beta, chosen_lengths, rejected_lengths, reduction)
        if fast is not None:
            return fast
    delta, metrics, inputs, lengths = _unchecked_margins(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, reduction,
        chosen_lengths, rejected_lengths)
    loss = reduce_loss((delta - 1.0 / (2.0 * beta)).square(), reduction)
    # a reduced squared loss is non-finite wherever Δ is (±inf and NaN alike): it is its own witness, one read
    check_inputs_finite(loss if loss.dim() == 0 else delta, inputs, positive=lengths)
    return loss, metrics


def _ipo_normalised_fast(
    pcl: Tensor, prl: Tensor, rcl: Tensor, rrl: Tensor, beta: float, nw: Tensor, nl: Tensor, reduction: str,
) -> tuple[Tensor, Metrics] | None:
    """The common length-normalised IPO call on CPU with every check inline (the general path's Python costs ~15%
    of a 4k-pair step); ``None`` when the call is not that common case or any check fails, so that the general path
    runs and raises its precise error."""
    shape = pcl.shape
    if not (type(pcl) is Tensor and type(prl) is Tensor and type(rcl) is Tensor and type(rrl) is Tensor
            and type(nw) is Tensor and type(nl) is Tensor and len(shape) == 1 and not pcl.is_cuda
            and prl.shape == shape and rcl.shape == shape and rrl.shape == shape and nw.shape == shape
            and nl.shape == shape and pcl.is_floating_point() and nw.dtype == pcl.dtype and nl.dtype == pcl.dtype
            and (reduction == "mean" or reduction == "sum") and type(beta) is float and 0.0 < beta < math.inf):
        return None
    rho_w, rho_l = (pcl - rcl) / nw, (prl - rrl) / nl
    delta = rho_w - rho_l
    per_pair = (delta - 1.0 / (2.0 * beta)).square()
    loss = per_pair.mean() if reduction == "mean" else per_pair.sum()
    lo_w, hi_w = torch.aminmax(_plain(nw))
    lo_l, hi_l = torch.aminmax(_plain(nl))
    # the reduced square is non-finite wherever Δ is; the counts must be finite and > 0
    if not (math.isfinite(loss.detach().item()) and 0.0 < float(lo_w) <= float(hi_w) < math.inf
            and 0.0 < float(lo_l) <= float(hi_l) < math.inf):
        return None
    return loss, LossMetrics(partial(_dpo_metrics, beta), rho_w, rho_l, delta)


def conservative_dpo_loss(
    policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
    *, beta: float = 0.1, eps: float = 0.1, reduction: str = "mean",
) -> tuple[Tensor, Metrics]:
    r"""Conservative DPO (cDPO, label smoothing; Mitchell 2023, https://ericmitchell.ai/cdpo.pdf, Eq. 3).

    ``−(1−ε) log σ(βΔ) − ε log σ(−βΔ)``: BCE of σ(βΔ) against the soft target ``1 − ε``, ε ∈ [0, 0.5).
    Biased under label flips (not the clean loss in expectation) but bounded: its minimum is at the finite margin
    ``Δ* = log((1−ε)/ε) / β``. Limit case: ε = 0 gives :func:`dpo_loss`. Not to be confused with
    :func:`robust_dpo_loss`.
    """
    check_eps(eps)
    delta, metrics = _margins(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                              beta, reduction)
    z = beta * delta
    per_pair = -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    return reduce_loss(per_pair, reduction), metrics


def robust_dpo_loss(
    policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
    *, beta: float = 0.1, eps: float = 0.1, reduction: str = "mean",
) -> tuple[Tensor, Metrics]:
    r"""Robust DPO (rDPO; Chowdhury, Kini, Natarajan, ICML 2024, arXiv 2403.00409; the unbiased loss of its Sec. 3).

    .. math::
        \ell = \frac{-(1-\varepsilon)\log\sigma(\beta\Delta) + \varepsilon\log\sigma(-\beta\Delta)}
                    {1-2\varepsilon}

    ε ∈ [0, 0.5) is the known (or estimated, :func:`~mmalign.core.losses.estimate_flip_rate`) probability that a
    label was flipped. Unbiased: its expectation over the flip (this loss of the observed order with probability
    1 − ε, of the swapped order with probability ε) is the clean DPO loss exactly. The loss is unbounded below as
    Δ → ∞ and its variance grows as ε → 0.5. Limit case: ε = 0 gives :func:`dpo_loss`. (Re-Align's "rDPO" is a
    different method: :func:`~mmalign.core.losses.realign_loss`.)
    """
    check_eps(eps)
    delta, metrics = _margins(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                              beta, reduction)
    z = beta * delta
    per_pair = (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)
    return reduce_loss(per_pair, reduction), metrics
