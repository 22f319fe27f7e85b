"""Gaussian robust reward learning (PEARL's RRL; Liu et al., ICML 2024, arXiv 2306.03615).

Each step's reward is ``N(μ, σ²)``; segment returns are sampled with the reparameterisation trick and scored with
the Bradley–Terry cross-entropy, and a KL term keeps the variance near a prior instead of collapsing. The paper's
exact prior and KL weight were not available to us (see docs/methods/losses.md): the prior here is
``N(μ, η²)`` with the same mean, i.e. ``KL = log(η/σ) + σ²/(2η²) − 1/2`` per step, averaged over valid steps.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from mmalign.core.losses._common import (
    LossMetrics, check_loss_inputs, expected_pair_metrics, fused_means, pair_rows,
)
from mmalign.core.validation import (
    check_all_finite, check_mask, check_ndim, check_nonnegative, check_positive, check_reduction, check_same_shape,
    check_shape, check_tensor, reduce_loss,
)

__all__ = ["gaussian_bt_loss", "gaussian_pair_uncertainty"]


def _masked(x: Tensor, mask: Tensor | None) -> Tensor:
    return x if mask is None else x * mask.to(x.dtype)


def gaussian_pair_uncertainty(
    log_std_first: Tensor, log_std_second: Tensor, mask_first: Tensor | None = None, mask_second: Tensor | None = None
) -> Tensor:
    """Std of the return difference ``R_1 − R_2`` under independent per-step Gaussians: ``[B, T] → [B]``.

    Examples:
        >>> import torch
        >>> from mmalign.core.losses import gaussian_pair_uncertainty
        >>> log_std = torch.zeros(1, 4)  # σ = 1 for 4 steps on each side
        >>> gaussian_pair_uncertainty(log_std, log_std)  # sqrt(4 + 4)
        tensor([2.8284])
    """
    var = _masked((2.0 * log_std_first).exp(), mask_first).sum(-1) + _masked((2.0 * log_std_second).exp(),
                                                                             mask_second).sum(-1)
    return var.sqrt()


def _gaussian_metrics(kl_mean: Tensor, var1: Tensor, var2: Tensor, mu1: Tensor, mu2: Tensor, labels: Tensor | None
                      ) -> dict[str, float]:
    stats = fused_means([kl_mean, (var1 + var2).sqrt(), *pair_rows(mu1, mu2, labels)])
    chosen, rejected, accuracy = expected_pair_metrics(stats[2:], labels is not None)
    return {
        "rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margin": chosen - rejected,
        "train/pref_accuracy": accuracy, "train/kl": stats[0], "uncertainty/pair_std": stats[1],
    }


def gaussian_bt_loss(
    mean_first: Tensor,
    log_std_first: Tensor,
    mean_second: Tensor,
    log_std_second: Tensor,
    labels: Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    num_samples: int = 1,
    prior_std: float = 1.0,
    kl_coef: float = 0.01,
    mask_first: Tensor | None = None,
    mask_second: Tensor | None = None,
    reduction: str = "mean",
) -> tuple[Tensor, LossMetrics]:
    r"""Bradley–Terry loss on reparameterised Gaussian segment returns plus a KL to a variance prior.

    .. math::
        r^{(k)}_{i,t} = \mu_{i,t} + \sigma_{i,t}\,\xi^{(k)}_{i,t},\quad R^{(k)}_i = \sum_t r^{(k)}_{i,t},\quad
        \ell = \frac{1}{K}\sum_k \mathrm{BCE}\big(R^{(k)}_1 - R^{(k)}_2,\ p\big)
               + c\,\overline{\mathrm{KL}\big(\mathcal N(\mu,\sigma^2)\,\|\,\mathcal N(\mu,\eta^2)\big)}

    Args:
        mean_first, log_std_first, mean_second, log_std_second: per-step reward mean and log-std, ``[B, T]``.
        labels: ``[B]`` ``P(first ≻ second)`` in [0, 1] (soft labels, e.g. PEARL's transferred ones); None = 1.
        generator: the ``torch.Generator`` drawing ξ (on the inputs' device); required unless ``noise`` is given.
        noise: explicit ξ of shape ``[K, 2, B, T]`` (index 0 = first segment), overriding ``generator``.
        num_samples: K reparameterised samples per pair when drawing from ``generator``.
        prior_std: η > 0 of the variance prior. kl_coef: weight c ≥ 0 of the mean per-step KL (one per pair).
        mask_first, mask_second: ``[B, T]`` valid steps (padded steps must still hold finite values).
        reduction: over pairs.

    Returns ``(loss, metrics)``, a lazy mapping of Python floats (computed on first read):
    ``rewards/chosen``/``rewards/rejected`` (mean returns Σμ of the
    label-preferred / other segment, in expectation over a label drawn from p), ``rewards/margin``,
    ``train/pref_accuracy`` (probability that such a label agrees with the sign of Σμ_1 − Σμ_2; ties 1/2),
    ``train/kl`` (mean per-step KL), ``uncertainty/pair_std`` (batch mean of :func:`gaussian_pair_uncertainty`;
    call that function for the per-pair ``[B]`` stds, e.g. for uncertainty-based query selection).

    Limit cases: σ → 0 with ``kl_coef = 0`` gives :func:`~mmalign.core.losses.bradley_terry_loss` on Σμ; the KL
    is 0 exactly at σ = η.

    Examples:
        >>> import torch
        >>> from mmalign.core.losses import gaussian_bt_loss
        >>> mean_first, mean_second = torch.full((2, 3), 1.0), torch.zeros(2, 3)
        >>> log_std = torch.full((2, 3), -20.0)  # σ ≈ 0: Bradley–Terry on the mean returns 3 vs 0
        >>> loss, metrics = gaussian_bt_loss(mean_first, log_std, mean_second, log_std,
        ...                                  generator=torch.Generator().manual_seed(0), kl_coef=0.0)
        >>> round(loss.item(), 4)  # -log σ(3)
        0.0486
        >>> metrics['train/pref_accuracy']
        1.0
    """
    inputs = {"mean_first": mean_first, "log_std_first": log_std_first, "mean_second": mean_second,
              "log_std_second": log_std_second}
    check_ndim("mean_first", mean_first, 2)
    check_same_shape(inputs)
    batch, steps = mean_first.shape
    if labels is not None:
        check_tensor("labels", labels)
        check_shape("labels", labels, (batch,))
    for name, m in (("mask_first", mask_first), ("mask_second", mask_second)):
        if m is not None:
            check_mask(name, m, mean_first.shape)
    if noise is None:
        if not isinstance(generator, torch.Generator):
            raise ValueError(
                f"generator must be a torch.Generator (explicit RNG) when noise is None, got {generator!r}")
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
            raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
        noise = torch.randn((num_samples, 2, batch, steps), generator=generator, dtype=mean_first.dtype,
                            device=mean_first.device)
    else:
        if noise.dim() != 4 or tuple(noise.shape[1:]) != (2, batch, steps):
            raise ValueError(f"noise must have shape [K, 2, {batch}, {steps}], got {tuple(noise.shape)}")
        check_all_finite({"noise": noise})
    check_positive("prior_std", prior_std)
    check_nonnegative("kl_coef", kl_coef)
    check_reduction(reduction)
    check_loss_inputs(inputs, ndim=2, labels=labels)

    std_first, std_second = log_std_first.exp(), log_std_second.exp()
    mu1, mu2 = _masked(mean_first, mask_first).sum(-1), _masked(mean_second, mask_second).sum(-1)
    var1 = _masked(std_first.square(), mask_first).sum(-1)
    var2 = _masked(std_second.square(), mask_second).sum(-1)
    # KL(N(μ, σ²) ‖ N(μ, η²)) = log η − log σ + σ²/(2η²) − 1/2 per step, averaged over the valid steps of a pair
    kl_first = math.log(prior_std) - log_std_first + std_first.square() / (2.0 * prior_std**2) - 0.5
    kl_second = math.log(prior_std) - log_std_second + std_second.square() / (2.0 * prior_std**2) - 0.5
    n_valid = _masked(torch.ones_like(mean_first), mask_first).sum(-1) + _masked(
        torch.ones_like(mean_second), mask_second).sum(-1)
    kl_mean = (_masked(kl_first, mask_first).sum(-1) + _masked(kl_second, mask_second).sum(-1)) / n_valid.clamp_min(1.0)
    ret_first = _masked(mean_first + std_first * noise[:, 0], mask_first).sum(-1)  # [K, B]
    ret_second = _masked(mean_second + std_second * noise[:, 1], mask_second).sum(-1)
    logit = ret_first - ret_second
    if labels is None:
        bce = -F.logsigmoid(logit)
    else:
        bce = F.binary_cross_entropy_with_logits(logit, labels.to(logit.dtype).expand_as(logit), reduction="none")
    per_pair = bce.mean(dim=0)
    if kl_coef:
        per_pair = per_pair + kl_coef * kl_mean
    loss = reduce_loss(per_pair, reduction)
    metrics = LossMetrics(_gaussian_metrics, kl_mean, var1, var2, mu1, mu2, labels)
    return loss, metrics
