"""Re-Align's retrieval-augmented visual preference term (Xing et al., EMNLP 2025, arXiv 2502.13146).

Re-Align calls its objective "rDPO" (retrieval-augmented DPO); it is unrelated to robust DPO
(:func:`~mmalign.core.losses.robust_dpo_loss`), hence the names ``visual_dpo_loss`` and ``realign_loss`` here.
"""

from __future__ import annotations

from functools import partial

import torch.nn.functional as F
from torch import Tensor

from mmalign.core.losses._common import LossMetrics, check_loss_inputs, fused_means
from mmalign.core.validation import check_beta, check_nonnegative, check_reduction, reduce_loss

__all__ = ["visual_dpo_loss", "realign_loss"]


def _visual_metrics(beta: float, pc: Tensor, pcr: Tensor, rc: Tensor, rcr: Tensor, logit: Tensor
                    ) -> dict[str, float]:
    # Rewards are linear in the inputs: their batch means come from the inputs' means.
    stats = fused_means([pc, pcr, rc, rcr, logit.sign()])
    reward_v, reward_vl = beta * (stats[0] - stats[2]), beta * (stats[1] - stats[3])
    return {"rewards/chosen": reward_v, "rewards/rejected": reward_vl, "rewards/margin": reward_v - reward_vl,
            "train/pref_accuracy": 0.5 + 0.5 * stats[4]}


def _realign_metrics(beta: float, pc: Tensor, pr: Tensor, pcr: Tensor, rc: Tensor, rr: Tensor, rcr: Tensor,
                     textual_logit: Tensor, visual_logit: Tensor) -> dict[str, float]:
    stats = fused_means([pc, pr, pcr, rc, rr, rcr, textual_logit.sign(), visual_logit.sign()])
    reward_w, reward_l = beta * (stats[0] - stats[3]), beta * (stats[1] - stats[4])
    reward_vl = beta * (stats[2] - stats[5])
    return {
        "rewards/chosen": reward_w, "rewards/rejected": reward_l, "rewards/margin": reward_w - reward_l,
        "train/pref_accuracy": 0.5 + 0.5 * stats[6], "rewards/chosen_retrieved": reward_vl,
        "rewards/visual_margin": reward_w - reward_vl, "train/visual_pref_accuracy": 0.5 + 0.5 * stats[7],
    }


def visual_dpo_loss(
    policy_chosen_logps: Tensor, policy_chosen_retrieved_logps: Tensor,
    ref_chosen_logps: Tensor, ref_chosen_retrieved_logps: Tensor,
    *, beta: float = 0.1, reduction: str = "mean",
) -> tuple[Tensor, LossMetrics]:
    r"""Visual DPO term: the chosen answer must be likelier under the true image v than under a retrieved image v_l.

    .. math::
        \ell_{vDPO} = -\log\sigma\Big(\beta \log\frac{\pi_\theta(y_w|x,v)}{\pi_{ref}(y_w|x,v)}
                                  - \beta \log\frac{\pi_\theta(y_w|x,v_l)}{\pi_{ref}(y_w|x,v_l)}\Big)

    All inputs ``[B]``: summed label-token log-probs of the chosen answer ``y_w`` under the true image
    (``*_chosen_logps``) and under the retrieved image (``*_chosen_retrieved_logps``). Label log-probs, not the
    released code's "highest non-label token" variant. Metrics ``rewards/chosen`` (β ρ(y_w|v)),
    ``rewards/rejected`` (β ρ(y_w|v_l)), ``rewards/margin``, ``train/pref_accuracy``.
    Limit cases: it is :func:`~mmalign.core.losses.dpo_loss` with the retrieved-image branch as the "rejected" one;
    identical images give ``log 2``.

    Examples:
        >>> import torch
        >>> from mmalign.core.losses import visual_dpo_loss
        >>> same = torch.tensor([-4.0])
        >>> round(visual_dpo_loss(same, same, same, same)[0].item(), 4)  # identical images: log 2
        0.6931
    """
    inputs = {
        "policy_chosen_logps": policy_chosen_logps, "policy_chosen_retrieved_logps": policy_chosen_retrieved_logps,
        "ref_chosen_logps": ref_chosen_logps, "ref_chosen_retrieved_logps": ref_chosen_retrieved_logps,
    }
    check_beta(beta)
    check_reduction(reduction)
    check_loss_inputs(inputs)
    logit = beta * ((policy_chosen_logps - ref_chosen_logps)
                    - (policy_chosen_retrieved_logps - ref_chosen_retrieved_logps))
    loss = reduce_loss(-F.logsigmoid(logit), reduction)
    return loss, LossMetrics(partial(_visual_metrics, beta), *inputs.values(), logit)


def realign_loss(
    policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, policy_chosen_retrieved_logps: Tensor,
    ref_chosen_logps: Tensor, ref_rejected_logps: Tensor, ref_chosen_retrieved_logps: Tensor,
    *, beta: float = 0.1, visual_weight: float = 1.0, reduction: str = "mean",
) -> tuple[Tensor, LossMetrics]:
    r"""Re-Align objective ``L = L_DPO + w · L_vDPO`` (paper: w = 1, one β for both terms; official β = 0.1).

    ``L_DPO = −log σ(β ρ(y_w|v) − β ρ(y_l|v))`` on the textual pair and ``L_vDPO`` from :func:`visual_dpo_loss` on
    the visual pair, with ρ = log π_θ − log π_ref of summed label-token log-probs. All six inputs are ``[B]``.
    Metrics: ``rewards/chosen``, ``rewards/rejected``, ``rewards/margin``, ``train/pref_accuracy`` (textual pair),
    ``rewards/chosen_retrieved``, ``rewards/visual_margin``, ``train/visual_pref_accuracy`` (visual pair; the
    released code's ``imageless_*``); a lazy mapping of Python floats (computed on first read).
    Limit cases: ``visual_weight = 0`` gives DPO; a retrieved image identical to v adds ``w log 2``.

    Examples:
        >>> import torch
        >>> from mmalign.core.losses import dpo_loss, realign_loss
        >>> x = torch.tensor([-4.0]), torch.tensor([-6.0]), torch.tensor([-5.0])
        >>> ref = torch.tensor([-5.0])
        >>> loss, metrics = realign_loss(*x, ref, ref, ref, beta=1.0)
        >>> round(loss.item(), 4)  # -log σ(1 + 1) − log σ(1 − 0)
        0.4402
        >>> torch.equal(realign_loss(*x, ref, ref, ref, visual_weight=0.0)[0], dpo_loss(x[0], x[1], ref, ref)[0])
        True
    """
    inputs = {
        "policy_chosen_logps": policy_chosen_logps, "policy_rejected_logps": policy_rejected_logps,
        "policy_chosen_retrieved_logps": policy_chosen_retrieved_logps, "ref_chosen_logps": ref_chosen_logps,
        "ref_rejected_logps": ref_rejected_logps, "ref_chosen_retrieved_logps": ref_chosen_retrieved_logps,
    }
    check_beta(beta)
    check_nonnegative("visual_weight", visual_weight)
    check_reduction(reduction)
    check_loss_inputs(inputs)
    rho_w = policy_chosen_logps - ref_chosen_logps
    textual_logit = beta * (rho_w - (policy_rejected_logps - ref_rejected_logps))
    visual_logit = beta * (rho_w - (policy_chosen_retrieved_logps - ref_chosen_retrieved_logps))
    loss = reduce_loss(-F.logsigmoid(textual_logit) - visual_weight * F.logsigmoid(visual_logit), reduction)
    return loss, LossMetrics(partial(_realign_metrics, beta), *inputs.values(), textual_logit, visual_logit)
