"""RRPO, refined regularized preference optimisation (Sarkar & Etemad, NeurIPS 2025, arXiv 2504.12083).

Sub-sequence rewards on aligned differing phrases plus a token-wise KL to the reference on the chosen response.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mmalign.core.losses._common import LossMetrics, fused_means
from mmalign.core.validation import (
    check_all_finite, check_beta, check_mask, check_ndim, check_nonnegative, check_reduction, check_same_shape,
    check_tensor, reduce_loss,
)

__all__ = ["rrpo_loss", "tokenwise_kl"]


def tokenwise_kl(ref_logprobs: Tensor, policy_logprobs: Tensor, mask: Tensor | None = None) -> Tensor:
    r"""Per-token ``KL(π_ref(·|x, y_<t) ‖ π_θ(·|x, y_<t))`` from full-vocabulary log-probabilities.

    ``Σ_v exp(ref_v) (ref_v − policy_v)``: inputs ``[B, L, V]`` log-softmax outputs (reference usually detached),
    output ``[B, L]``, zero where ``mask`` (``[B, L]``) is False. Gradient flows into ``policy_logprobs``.
    Use a ``-inf``-free log-softmax (finite values); the check rejects NaN/inf.

    Examples:
        >>> import torch
        >>> from mmalign.core.losses import tokenwise_kl
        >>> ref = torch.log_softmax(torch.tensor([[[1.0, 0.0, 0.0]]]), -1)
        >>> tokenwise_kl(ref, ref)  # [B, L] = [1, 1]; 0 for identical distributions
        tensor([[0.]])
    """
    check_ndim("ref_logprobs", ref_logprobs, 3)
    check_same_shape({"ref_logprobs": ref_logprobs, "policy_logprobs": policy_logprobs})
    check_all_finite({"ref_logprobs": ref_logprobs, "policy_logprobs": policy_logprobs})
    kl = (ref_logprobs.exp() * (ref_logprobs - policy_logprobs)).sum(dim=-1)
    if mask is not None:
        check_mask("mask", mask, kl.shape)
        kl = kl * mask.to(kl.dtype)
    return kl


def _phrase_sum(log_ratio: Tensor, segment_ids: Tensor) -> Tensor:
    """Sum of token log-ratios over phrase tokens (id > 0); equal phrase counts make Σ_i (r_i⁺ − r_i⁻) a difference
    of sums."""
    return (log_ratio * (segment_ids > 0).to(log_ratio.dtype)).sum(dim=-1)


def _rrpo_metrics(reward_w: Tensor, reward_l: Tensor, kl_sum: Tensor, n_phrases: Tensor) -> dict[str, float]:
    margin = reward_w - reward_l
    stats = fused_means([reward_w, reward_l, margin.sign(), kl_sum, n_phrases.to(margin.dtype)])
    return {"rewards/chosen": stats[0], "rewards/rejected": stats[1], "rewards/margin": stats[0] - stats[1],
            "train/pref_accuracy": 0.5 + 0.5 * stats[2], "rrpo/token_kl": stats[3], "rrpo/num_phrases": stats[4]}


def rrpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_segment_ids: Tensor,
    rejected_segment_ids: Tensor,
    chosen_token_kl: Tensor,
    *,
    beta: float = 0.1,
    alpha: float = 0.01,
    chosen_mask: Tensor | None = None,
    reduction: str = "mean",
) -> tuple[Tensor, LossMetrics]:
    r"""RRPO loss ``−log σ(Σ_i (r_i⁺ − r_i⁻)) + α Σ_t KL_t`` on token log-probabilities.

    .. math::
        r_i = \beta \sum_{t \in \text{phrase } i} (\log\pi_\theta(y_t|x, y_{<t}) - \log\pi_{ref}(y_t|x, y_{<t})),\qquad
        \ell = -\log\sigma\Big(\sum_{i=1}^{N} (r^+_i - r^-_i)\Big) + \alpha \sum_{t=1}^{|y^+|} KL_t

    Shapes (``L_w``/``L_l`` = padded chosen/rejected lengths):
        policy_chosen_logps, ref_chosen_logps: ``[B, L_w]`` log-prob of each chosen label token.
        policy_rejected_logps, ref_rejected_logps: ``[B, L_l]`` likewise for the rejected response.
        chosen_segment_ids / rejected_segment_ids: ``[B, L_w]`` / ``[B, L_l]`` integers, 0 outside the differing
            phrases, i for tokens of phrase i (1-based); phrase i of the chosen response is paired with phrase i of
            the rejected one (the ``<MASK>…</MASK>`` tags of the RRPO data). Padding has id 0.
        chosen_token_kl: ``[B, L_w]`` per-token KL(π_ref ‖ π_θ) on the chosen response, from :func:`tokenwise_kl`.
        chosen_mask: ``[B, L_w]`` valid chosen tokens for the KL sum (``None`` = all).
    Every pair must have the same number of phrases in both responses (``ValueError`` otherwise); a pair without
    phrases contributes ``log 2`` + the KL term (the official data pipeline skips such pairs).

    Returns ``(loss, metrics)`` (metrics: a lazy mapping of Python floats): ``rewards/chosen`` = mean Σ_i r_i⁺,
    ``rewards/rejected``, ``rewards/margin``, ``train/pref_accuracy`` (margin > 0), ``rrpo/token_kl`` (mean
    Σ_t KL_t), ``rrpo/num_phrases``.

    Limit cases: α = 0 and every token inside one phrase on both sides gives :func:`~mmalign.core.losses.dpo_loss`
    on summed log-probs; β (0.1–0.9) and α (0.01–0.1) are the ranges of the official code.

    Examples:
        >>> import torch
        >>> from mmalign.core.losses import rrpo_loss
        >>> chosen, rejected = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-3.0, -2.0]])
        >>> ref = torch.tensor([[-2.0, -2.0]])
        >>> ids = torch.tensor([[1, 0]])  # one differing phrase: the first token of each response
        >>> loss, metrics = rrpo_loss(chosen, rejected, ref, ref, ids, ids, torch.zeros(1, 2), beta=1.0)
        >>> round(loss.item(), 4), metrics['rewards/margin']  # -log σ(1 − (−1))
        (0.1269, 2.0)
    """
    _check_rrpo(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_segment_ids,
                rejected_segment_ids, chosen_token_kl, beta, alpha, chosen_mask, reduction)
    reward_w = beta * _phrase_sum(policy_chosen_logps - ref_chosen_logps, chosen_segment_ids)
    reward_l = beta * _phrase_sum(policy_rejected_logps - ref_rejected_logps, rejected_segment_ids)
    kl = chosen_token_kl if chosen_mask is None else chosen_token_kl * chosen_mask.to(chosen_token_kl.dtype)
    kl_sum = kl.sum(dim=-1)
    loss = reduce_loss(-F.logsigmoid(reward_w - reward_l) + alpha * kl_sum, reduction)
    return loss, LossMetrics(_rrpo_metrics, reward_w, reward_l, kl_sum, chosen_segment_ids.amax(dim=-1).clamp_min(0))


def _check_rrpo(
    policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
    chosen_segment_ids: Tensor, rejected_segment_ids: Tensor, chosen_token_kl: Tensor, beta: float, alpha: float,
    chosen_mask: Tensor | None, reduction: str,
) -> None:
    """Validate a :func:`rrpo_loss` call (shapes, dtypes, finite values, equal phrase counts per pair)."""
    check_ndim("policy_chosen_logps", policy_chosen_logps, 2)
    check_ndim("policy_rejected_logps", policy_rejected_logps, 2)
    check_same_shape({"policy_chosen_logps": policy_chosen_logps, "ref_chosen_logps": ref_chosen_logps,
                      "chosen_segment_ids": chosen_segment_ids, "chosen_token_kl": chosen_token_kl})
    check_same_shape({"policy_rejected_logps": policy_rejected_logps, "ref_rejected_logps": ref_rejected_logps,
                      "rejected_segment_ids": rejected_segment_ids})
    if policy_rejected_logps.shape[0] != policy_chosen_logps.shape[0]:
        raise ValueError(f"policy_rejected_logps must have batch size {policy_chosen_logps.shape[0]} like "
                         f"policy_chosen_logps, got shape {tuple(policy_rejected_logps.shape)}")
    for name, ids in (("chosen_segment_ids", chosen_segment_ids), ("rejected_segment_ids", rejected_segment_ids)):
        check_tensor(name, ids, floating=False)
        if ids.is_floating_point() or ids.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor of phrase indices, got dtype {ids.dtype}")
    if chosen_mask is not None:
        check_mask("chosen_mask", chosen_mask, chosen_token_kl.shape)
    check_beta(beta)
    check_nonnegative("alpha", alpha)
    check_reduction(reduction)
    check_all_finite({
        "policy_chosen_logps": policy_chosen_logps, "policy_rejected_logps": policy_rejected_logps,
        "ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps,
        "chosen_token_kl": chosen_token_kl})
    n_chosen = chosen_segment_ids.amax(dim=-1).clamp_min(0)
    n_rejected = rejected_segment_ids.amax(dim=-1).clamp_min(0)
    differ = (n_chosen != n_rejected).nonzero()
    if len(differ):
        row = int(differ[0, 0])
        raise ValueError(f"chosen_segment_ids and rejected_segment_ids must hold the same number of phrases per pair, "
                         f"got {int(n_chosen[row])} vs {int(n_rejected[row])} in row {row}")
