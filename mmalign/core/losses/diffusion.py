"""Preference losses for diffusion models on per-sample denoising errors: Diffusion-DPO and MaPO.

Inputs are per-sample denoising errors ``l = mean_{C,H,W} (prediction − target)²``, shape ``[B]``, where the chosen
and rejected image of a pair were noised with the **same** noise and timestep (the domain adapter's job). A lower
error means a higher likelihood (the ELBO is −l up to scale and constants), so preferring the chosen image means
lowering ``l_w`` relative to ``l_l``.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from mmalign.core.losses._common import LossMetrics, check_loss_inputs, fused_means
from mmalign.core.validation import check_beta, check_nonnegative, check_positive, check_reduction, reduce_loss

__all__ = ["diffusion_dpo_loss", "mapo_loss", "mapo_score"]

_SMALL = 1e-4  # below this |c·l|, s(l) uses its Taylor series 1 − x/2 + x²/12 (error < 1e-17)


def _diffusion_dpo_metrics(beta: float, lw: Tensor, ll: Tensor, ref_w: Tensor, ref_l: Tensor, inside: Tensor
                           ) -> dict[str, float]:
    # Rewards are linear in the errors: their batch means come from the errors' means.
    stats = fused_means([lw, ll, ref_w, ref_l, inside.sign()])
    reward_w, reward_l = -0.5 * beta * (stats[0] - stats[2]), -0.5 * beta * (stats[1] - stats[3])
    names = ("diffusion/model_err_chosen", "diffusion/model_err_rejected", "diffusion/ref_err_chosen",
             "diffusion/ref_err_rejected")
    return {"rewards/chosen": reward_w, "rewards/rejected": reward_l, "rewards/margin": reward_w - reward_l,
            "train/pref_accuracy": 0.5 + 0.5 * stats[4], **dict(zip(names, stats[:4]))}


def diffusion_dpo_loss(
    model_err_chosen: Tensor, model_err_rejected: Tensor, ref_err_chosen: Tensor, ref_err_rejected: Tensor,
    *, beta: float = 5000.0, reduction: str = "mean",
) -> tuple[Tensor, LossMetrics]:
    r"""Diffusion-DPO loss (Wallace et al., CVPR 2024, arXiv 2311.12908; its objective with T·ω(λ_t) folded into β).

    .. math:: \ell = -\log\sigma\Big(-\frac{\beta}{2}\big[(l_w - l_l) - (l^{ref}_w - l^{ref}_l)\big]\Big)

    β convention: this is the official ``SalesforceAIResearch/DiffusionDPO`` form (``inside = −0.5·β·(model_diff −
    ref_diff)``), whose ``--beta_dpo`` default is 5000 for SD1.5 and SDXL. diffusers' SD1.5 research script folds the
    ½ into β (its default 2500 is the same loss as β = 5000 here); pass ``beta = 2 × β_diffusers`` to match it.

    Shapes: four ``[B]`` per-sample errors (policy and frozen reference, same noise/timestep per pair).
    Metrics: ``rewards/chosen`` = mean −(β/2)(l_w − l^ref_w), ``rewards/rejected`` likewise, ``rewards/margin``
    (the sigmoid's argument), ``train/pref_accuracy`` (fraction with argument > 0, ties earning ½ as in every
    mmalign loss; the official ``implicit_acc`` counts a tie as 0, so at initialisation — policy = reference, every
    argument 0 — official logs read 0 where mmalign reads 0.5),
    ``diffusion/model_err_chosen``, ``diffusion/model_err_rejected``, ``diffusion/ref_err_chosen``,
    ``diffusion/ref_err_rejected``.

    Limit cases: policy = reference gives ``log 2``; lowering ``l_w`` (or raising ``l_l``) lowers the loss.

    Examples:
        >>> import torch
        >>> from mmalign.core.losses import diffusion_dpo_loss
        >>> ref = torch.tensor([0.5, 0.5])
        >>> loss, _ = diffusion_dpo_loss(ref, ref, ref, ref)  # policy = reference
        >>> round(loss.item(), 4)
        0.6931
        >>> loss, metrics = diffusion_dpo_loss(torch.tensor([0.4, 0.4]), ref, ref, ref, beta=10.0)
        >>> round(loss.item(), 4), metrics['train/pref_accuracy']  # the chosen image got likelier: -log σ(0.5)
        (0.4741, 1.0)
    """
    inputs = {
        "model_err_chosen": model_err_chosen, "model_err_rejected": model_err_rejected,
        "ref_err_chosen": ref_err_chosen, "ref_err_rejected": ref_err_rejected,
    }
    check_beta(beta)
    check_reduction(reduction)
    check_loss_inputs(inputs)
    inside = -0.5 * beta * ((model_err_chosen - model_err_rejected) - (ref_err_chosen - ref_err_rejected))
    loss = reduce_loss(-F.logsigmoid(inside), reduction)
    metrics = LossMetrics(partial(_diffusion_dpo_metrics, beta), model_err_chosen, model_err_rejected, ref_err_chosen,
                          ref_err_rejected, inside)
    return loss, metrics


def mapo_score(err: Tensor, c: float = 0.5) -> Tensor:
    r"""MaPO's bounded score ``s(l) = c·l / (exp(c·l) − 1)``: 1 at l = 0, in (0, 1] and decreasing for l ≥ 0.

    Evaluated with its Taylor series ``1 − x/2 + x²/12`` near 0 (where ``x / expm1(x)`` is 0/0) and elsewhere as
    ``a e^{−a} / (1 − e^{−a}) + max(−x, 0)`` with ``a = |x|`` (equal to ``x / expm1(x)``, but free of the overflow of
    ``expm1`` for large x that turns the gradient into NaN), computed so that the unused branch never produces NaN
    gradients.

    Examples:
        >>> import torch
        >>> from mmalign.core.losses import mapo_score
        >>> mapo_score(torch.tensor([0.0, 2.0, 1e4]), c=0.5)  # 1 at 0, c·l / (e^{c·l} − 1), 0 without overflow
        tensor([1.0000, 0.5820, 0.0000])
    """
    x = c * err
    small = x.abs() < _SMALL
    safe_x = torch.where(small, torch.ones_like(x), x)
    a = safe_x.abs()
    # s(−a) = a + s(a), and s(a) = a·e^{−a} / (−expm1(−a)) never overflows for a > 0.
    stable = a * torch.exp(-a) / -torch.expm1(-a) + (-safe_x).clamp_min(0.0)
    return torch.where(small, 1.0 - x / 2.0 + x.square() / 12.0, stable)


def _mapo_metrics(temperature: float, margin_weight: float, margin: Tensor, ratio: Tensor, err_chosen: Tensor,
                  scores: Tensor) -> dict[str, float]:
    stats = fused_means([scores[0], scores[1], margin.sign(), ratio, err_chosen])
    return {
        "rewards/chosen": temperature * stats[0], "rewards/rejected": temperature * stats[1],
        "rewards/margin": temperature * (stats[0] - stats[1]), "train/pref_accuracy": 0.5 + 0.5 * stats[2],
        "mapo/win_score": stats[0], "mapo/lose_score": stats[1], "mapo/or_loss": -margin_weight * stats[3],
        "mapo/chosen_err": stats[4],
    }


def mapo_loss(
    model_err_chosen: Tensor, model_err_rejected: Tensor,
    *, c: float = 0.5, temperature: float = 1000.0, margin_weight: float = 0.1, reduction: str = "mean",
) -> tuple[Tensor, LossMetrics]:
    r"""MaPO: margin-aware, reference-free preference loss (Hong et al. 2024, arXiv 2406.06424).

    Follows the official ``mapo-t2i/mapo`` ``utils.py::compute_loss``:

    .. math::
        s(l) = \frac{c\,l}{e^{c\,l} - 1}, \qquad
        \mathcal{L} = \operatorname{mean}_B(l_w)
            - w\,\operatorname{mean}_B\big[\log\sigma\big(T\,(s(l_w) - s(l_l))\big)\big]

    Both means run over the batch of pairs (``l`` itself is already a mean over C, H, W). Only the **chosen**
    error enters the likelihood (SFT) term; the margin ``s(l_w) − s(l_l)`` is positive exactly when ``l_w < l_l``.
    Defaults are the official ones: ``c`` = ``--snr_value`` 0.5 (a constant, not a per-timestep SNR),
    ``temperature`` T = 1000 (number of training timesteps), ``margin_weight`` w = ``--beta_mapo`` 0.1.
    With ``reduction="none"`` the per-pair loss is ``l_w − w log σ(T m)``, whose batch mean is the loss above.

    Shapes: ``[B]`` per-sample errors of the trained model (no reference model).
    Metrics: ``mapo/win_score`` = mean s(l_w), ``mapo/lose_score`` (official "Win/Lose Score"), ``mapo/or_loss`` =
    −mean(w · log σ(T m)) (official "OR loss" = ``-ratio_losses.mean()``, ``ratio_losses = beta_mapo · ratio``),
    ``mapo/chosen_err`` = mean l_w, ``rewards/chosen``/``rewards/rejected`` = T·s(l_w), T·s(l_l),
    ``rewards/margin`` = mean T m, ``train/pref_accuracy`` = fraction with m > 0, ties earning ½ (the suite-wide
    convention).

    Limit cases: w = 0 gives plain denoising (SFT) on the chosen image; l_w = l_l gives ``mean(l_w) + w log 2``; for
    small c·l, T m ≈ (T c / 2)(l_l − l_w), i.e. a reference-free Diffusion-DPO with β_eff = T·c.

    Examples:
        >>> import torch
        >>> from mmalign.core.losses import mapo_loss
        >>> err = torch.tensor([0.3, 0.3])
        >>> loss, _ = mapo_loss(err, err)  # equal errors: mean(l_w) + w log 2
        >>> round(loss.item(), 4)
        0.3693
    """
    inputs = {"model_err_chosen": model_err_chosen, "model_err_rejected": model_err_rejected}
    check_positive("c", c)
    check_positive("temperature", temperature)
    check_nonnegative("margin_weight", margin_weight)
    check_reduction(reduction)
    check_loss_inputs(inputs)
    scores = mapo_score(torch.stack([model_err_chosen, model_err_rejected]), c)
    margin = scores[0] - scores[1]
    ratio = F.logsigmoid(temperature * margin)
    loss = reduce_loss(model_err_chosen - margin_weight * ratio, reduction)
    metrics = LossMetrics(partial(_mapo_metrics, temperature, margin_weight), margin, ratio, model_err_chosen, scores)
    return loss, metrics
