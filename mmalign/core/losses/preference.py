"""Bradley–Terry preference loss on scalar rewards (reward-model training)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from mmalign.core.losses._common import (
    LossMetrics, check_loss_inputs, expected_pair_metrics, fused_means, pair_rows,
)
from mmalign.core.validation import (
    check_mask, check_nonnegative, check_range, check_reduction, check_same_shape, check_tensor, reduce_loss,
)

__all__ = ["bradley_terry_loss"]


def _bt_metrics(r1: Tensor, r2: Tensor, labels: Tensor | None, weight: Tensor | None) -> dict[str, float]:
    rows = [r.reshape(-1) for r in pair_rows(r1, r2, labels)]
    if weight is None:
        stats = fused_means(rows)
    else:  # means over the kept pairs only
        w = weight.reshape(-1)
        kept = fused_means([r * w for r in rows] + [w])
        stats = [v / kept[-1] if kept[-1] else math.nan for v in kept[:-1]]
    chosen, rejected, accuracy = expected_pair_metrics(stats, labels is not None)
    return {"rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margin": chosen - rejected,
            "train/pref_accuracy": accuracy}


def bradley_terry_loss(
    reward_first: Tensor,
    reward_second: Tensor,
    labels: Tensor | None = None,
    *,
    margin: Tensor | float | None = None,
    center_coef: float = 0.0,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> tuple[Tensor, LossMetrics]:
    r"""Bradley–Terry loss: binary cross-entropy of ``σ(r_1 − r_2)`` against the label ``P(first ≻ second)``.

    .. math::
        z = r_1 - r_2 - (2p - 1)\,m, \qquad
        \ell = -p \log\sigma(z) - (1 - p)\log\sigma(-z) + c\,(r_1 + r_2)^2

    For a hard label ``p = 1`` this is ``-log σ(r_w − r_l − m)`` (Llama-2 margin loss, TRL ``RewardTrainer``); the
    margin is signed by ``2p − 1`` so that it always asks the *preferred* item to win by ``m`` and vanishes for a tie.
    The centring term ``c (r_1 + r_2)^2`` is Eisenstein et al. 2023 (arXiv 2312.09244, Eq. 2; TRL
    ``center_rewards_coefficient``, recommended 0.01); it pins the free additive constant of BT rewards.

    Args:
        reward_first, reward_second: rewards of the two items, shape ``[B]`` (any shape, identical).
        labels: ``P(first ≻ second)`` in ``[0, 1]`` (soft labels allowed, tie = 0.5), same shape; ``None`` = all 1.
        margin: required reward gap ``m`` (scalar or same shape), ``None`` = 0.
        center_coef: weight ``c >= 0`` of the reward-centring term.
        mask: optional boolean mask of pairs to keep (a teacher's ``answered``); masked pairs contribute 0, their
            labels are ignored (NaN allowed), and the mean and the metrics run over kept pairs only.
        reduction: ``"mean"`` (over the batch), ``"sum"`` or ``"none"`` (per-pair losses).

    Returns:
        ``(loss, metrics)``; metrics are a lazy mapping of Python floats (computed on first read,
        :class:`~mmalign.core.losses._common.LossMetrics`; batch means over the kept pairs), taken in
        expectation over a label drawn from ``p``: ``rewards/chosen`` = mean ``p r_1 + (1−p) r_2`` (the preferred
        item's reward for hard labels), ``rewards/rejected``, ``rewards/margin``, ``train/pref_accuracy`` = mean
        probability that such a label agrees with the sign of ``r_1 − r_2`` (a tie on either side earns 1/2).

    Limit cases: ``labels=0.5`` gives ``log 2`` at ``r_1 = r_2`` and a loss minimised by equal rewards; with
    ``margin=None, center_coef=0`` and hard labels this is exactly ``-logsigmoid(r_w - r_l)``.

    Examples:
        >>> import torch
        >>> from mmalign.core.losses import bradley_terry_loss
        >>> reward_first, reward_second = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0])
        >>> loss, metrics = bradley_terry_loss(reward_first, reward_second, torch.tensor([1.0, 0.5]))
        >>> round(loss.item(), 4)  # mean of -log σ(2) and log 2
        0.41
        >>> metrics['train/pref_accuracy']  # a tie earns 1/2
        0.75
    """
    labels, weight = _check_bt(reward_first, reward_second, labels, margin, center_coef, mask, reduction)
    logit = reward_first - reward_second
    if margin is not None:
        # 2p − 1: the margin always favours the preferred item and vanishes for a tie.
        logit = logit - (margin if labels is None else (2.0 * labels - 1.0) * margin)
    if labels is None:
        per_pair = -F.logsigmoid(logit)
    else:
        per_pair = F.binary_cross_entropy_with_logits(logit, labels.to(logit.dtype), reduction="none")
    if center_coef:
        per_pair = per_pair + center_coef * (reward_first + reward_second).square()
    loss = reduce_loss(per_pair, reduction, weight)
    return loss, LossMetrics(_bt_metrics, reward_first, reward_second, labels, weight)


def _check_bt(
    reward_first: Tensor, reward_second: Tensor, labels: Tensor | None, margin: Tensor | float | None,
    center_coef: float, mask: Tensor | None, reduction: str,
) -> tuple[Tensor | None, Tensor | None]:
    """Validate a :func:`bradley_terry_loss` call; returns the labels with masked pairs set to 0.5 (skipped pairs
    may carry NaN labels: teachers mark them so) and the 0/1 weight of the kept pairs (``None`` without a mask)."""
    inputs = {"reward_first": reward_first, "reward_second": reward_second}
    if isinstance(margin, Tensor):
        inputs["margin"] = margin
    elif margin is not None:
        check_range("margin", margin, -math.inf, math.inf)
    if labels is not None:
        check_tensor("labels", labels)
        inputs["labels"] = labels
    check_same_shape(inputs)
    check_nonnegative("center_coef", center_coef)
    check_reduction(reduction)
    weight = None
    if mask is not None:
        check_mask("mask", mask, reward_first.shape)
        keep = mask.bool()
        weight = keep.to(reward_first.dtype)
        if labels is not None:
            labels = torch.where(keep, labels, torch.full((), 0.5, dtype=labels.dtype, device=labels.device))
            inputs["labels"] = labels
    check_loss_inputs(inputs, ndim=None, labels=labels)
    return labels, weight
