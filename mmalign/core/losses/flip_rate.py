"""Estimate the label-flip rate ε of a preference dataset, so that robust DPO is usable when ε is unknown.

Noise model (Chowdhury et al. 2024): each clean label ``y ~ Bernoulli(p)`` (``p = σ(z)``, ``z`` the clean logit of
"first preferred") is flipped independently with probability ε, so the observed label has
``P(y_obs = 1) = a(ε) = p + ε (1 − 2p)``.

Given a scorer whose logits ``z`` are calibrated for the *clean* preferences (a reward model trained on trusted
data, the true returns of a simulator, or a DPO policy's implicit reward βΔ), two estimators are offered:

- ``"mle"`` (default): maximise the likelihood ``Σ_i y_i log a_i(ε) + (1 − y_i) log(1 − a_i(ε))`` over
  ε ∈ [0, ε_max]. It is concave in ε (log of an affine function), so bisection on the derivative finds the unique
  maximiser. Soft labels enter as fractional counts.
- ``"moments"``: match the disagreement rate with the scorer's mode. With ``q_i = min(p_i, 1 − p_i)`` (the clean
  probability of disagreeing with the mode) and ``d_i`` the observed disagreement,
  ``E[d_i] = q_i + ε (1 − 2 q_i)`` so ``ε̂ = Σ(d_i − q_i) / Σ(1 − 2 q_i)``. For a deterministic scorer
  (``|z| → ∞``) this is the plain disagreement rate.

Both are consistent when the scorer is calibrated; a scorer that is itself wrong inflates the estimate (its errors
look like flips), which errs on the conservative side for rDPO.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmalign.core.losses._common import check_loss_inputs
from mmalign.core.validation import check_range

__all__ = ["estimate_flip_rate"]


def estimate_flip_rate(
    logits: Tensor,
    labels: Tensor | None = None,
    *,
    method: str = "mle",
    max_eps: float = 0.49,
    iters: int = 40,
) -> Tensor:
    """Estimate the flip rate ε from a scorer's logits for "first ≻ second" and the observed labels.

    Args:
        logits: ``[B]`` clean-preference logits, e.g. ``r(first) − r(second)`` from a reward model or
            ``β·(ρ_w − ρ_l)`` from a DPO policy (with ``labels=None``, since the chosen response is first).
        labels: ``[B]`` observed ``P(first ≻ second)`` in [0, 1]; ``None`` = all 1 (chosen first).
        method: ``"mle"`` or ``"moments"`` (see the module docstring).
        max_eps: upper end of the search interval / clamp, in (0, 0.5).
        iters: bisection steps for ``"mle"`` (each halves the interval; 40 give ~1e-12).

    Returns:
        A detached 0-dim tensor ε̂ ∈ [0, max_eps] (clamped: a negative moment estimate means "no flips detected").

    Examples:
        >>> import torch
        >>> from mmalign.core.losses import estimate_flip_rate
        >>> logits = torch.tensor([9.0, 9.0, 9.0, 9.0, -9.0])  # a confident scorer
        >>> labels = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0])  # the fourth label disagrees with it
        >>> round(estimate_flip_rate(logits, labels, method='moments').item(), 3)
        0.2
    """
    check_loss_inputs({"logits": logits} if labels is None else {"logits": logits, "labels": labels}, labels=labels)
    if method not in ("mle", "moments"):
        raise ValueError(f"method must be one of ['mle', 'moments'], got {method!r}")
    check_range("max_eps", max_eps, 0.0, 0.5, low_open=True, high_open=True)
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be an int >= 1, got {iters!r}")

    with torch.no_grad():
        z = logits.detach().to(torch.float64)
        y = torch.ones_like(z) if labels is None else labels.detach().to(torch.float64)
        if method == "moments":
            q = torch.sigmoid(-z.abs())  # min(p, 1 - p) without cancellation
            # Observed disagreement with the mode: P(label says the opposite of sign(z)); z = 0 counts 1/2.
            mode_first = (z > 0).to(z.dtype) + 0.5 * (z == 0).to(z.dtype)
            d = mode_first * (1.0 - y) + (1.0 - mode_first) * y
            eps = (d - q).sum() / (1.0 - 2.0 * q).sum().clamp_min(torch.finfo(z.dtype).tiny)
            return eps.clamp(0.0, max_eps).to(logits.dtype)

        p = torch.sigmoid(z)
        one_minus_2p = torch.tanh(-z / 2.0)  # 1 − 2σ(z), exact for large |z|
        q = torch.sigmoid(-z)  # 1 − p without cancellation

        w_pos, w_neg = y * one_minus_2p, (1.0 - y) * one_minus_2p

        def slope(eps: Tensor) -> Tensor:
            # d/dε of the log-likelihood; a and 1 − a are floored so that ε = 0 with a confident contradicted
            # label gives a huge positive slope instead of inf/NaN.
            a = (p + eps * one_minus_2p).clamp_min(1e-300)
            b = (q - eps * one_minus_2p).clamp_min(1e-300)
            return (w_pos / a - w_neg / b).sum()

        lo = torch.zeros((), dtype=z.dtype, device=z.device)
        hi = torch.full((), max_eps, dtype=z.dtype, device=z.device)
        for _ in range(iters):  # bisection over ε (a scalar), not over the batch
            mid = 0.5 * (lo + hi)
            rising = slope(mid) > 0
            lo = torch.where(rising, mid, lo)
            hi = torch.where(rising, hi, mid)
        return (0.5 * (lo + hi)).to(logits.dtype)
