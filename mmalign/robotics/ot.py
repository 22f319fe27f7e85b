"""Batched entropic optimal transport between trajectories of frame embeddings (RAPL's OT similarity and reward).

RAPL (Tian et al., ICLR 2024, Sec. 4; arXiv 2412.04835 Eq. 3-4) compares two videos by an entropic OT plan between
their frame embeddings with cosine cost ``C[t, t'] = 1 - cos(z_t, z'_t')`` and uniform marginals; the similarity is
``-<plan, C>`` and the dense reward of frame ``t`` is ``r_t = -sum_t' plan[t, t'] C[t, t']``.

Everything here is batched over trajectory pairs and stays on the input's device and dtype. The plans come from
POT's batched log-domain Sinkhorn (``ot.batch.solve_batch``, torch backend; stable for small ``reg``) run for a fixed
number of iterations with ``grad="autodiff"``, so gradients reach the encoder by ordinary autodiff through the
unrolled iterations (the reference code differentiates the ddn layer implicitly; unrolling gives the same gradient up
to the truncation error of the last iterations).
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

__all__ = ["cosine_cost", "ot_plan", "ot_similarity", "ot_dense_reward", "nearest_demo_reward"]


def cosine_cost(x: Tensor, y: Tensor, eps: float = 1e-8) -> Tensor:
    """Cosine distance between every frame pair: ``x (..., T, D)``, ``y (..., S, D)`` -> ``(..., T, S)`` in [0, 2]."""
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(f"x and y must share the feature size, got {tuple(x.shape)} and {tuple(y.shape)}")
    xn = x / x.norm(dim=-1, keepdim=True).clamp_min(eps)
    yn = y / y.norm(dim=-1, keepdim=True).clamp_min(eps)
    return 1.0 - xn @ yn.transpose(-1, -2)


def ot_plan(cost: Tensor, reg: float, num_iters: int = 100) -> Tensor:
    r"""Entropic OT plans with uniform marginals of a batch of problems, by POT's batched log-domain Sinkhorn.

    Solves, for each ``B``, :math:`\min_P \langle P, C\rangle - \mathrm{reg}\, H(P)` s.t. :math:`P1 = 1/T,
    P^T1 = 1/S` (POT's ``ot.sinkhorn(a, b, M, reg)`` objective) with exactly ``num_iters`` iterations. Args:
    ``cost (B, T, S)``. Returns the plan ``(B, T, S)``, differentiable in ``cost``. ``reg -> 0`` approaches the
    exact OT plan; ``reg -> inf`` gives the independent coupling ``1 / (T S)``.

    Examples:
        >>> import torch
        >>> cost = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
        >>> ot_plan(cost, reg=0.1, num_iters=50).round(decimals=3)  # nearly the identity coupling, 1/2 per match
        tensor([[[0.5000, 0.0000],
                 [0.0000, 0.5000]]])
    """
    if cost.dim() != 3:
        raise ValueError(f"cost must have shape (B, T, S), got {tuple(cost.shape)}")
    if not isinstance(reg, numbers.Real) or not reg > 0:  # numbers.Real: NumPy scalars (np.float32) are numbers too
        raise ValueError(f"reg must be a number > 0, got {reg!r}")
    if num_iters < 1:
        raise ValueError(f"num_iters must be >= 1, got {num_iters}")
    import ot.batch  # heavy import only when a plan is needed

    # tol=0: run all num_iters iterations (no early stop), the same unrolled computation for every batch
    return ot.batch.solve_batch(cost, reg=float(reg), max_iter=num_iters, tol=0.0, method="log_sinkhorn",
                                grad="autodiff").plan


def ot_similarity(x: Tensor, y: Tensor, reg: float = 0.1, num_iters: int = 100) -> Tensor:
    """RAPL OT similarity ``-<plan, C>`` of trajectory pairs ``x (B, T, D)``, ``y (B, S, D)`` -> ``(B,)`` in [-2, 0].

    Identical trajectories of distinct frames give the largest similarity (close to 0 for small ``reg``).
    """
    cost = cosine_cost(x, y)
    return -(ot_plan(cost, reg, num_iters) * cost).sum(dim=(1, 2))


def ot_dense_reward(x: Tensor, y: Tensor, reg: float = 0.1, num_iters: int = 100) -> Tensor:
    """Per-frame OT reward ``r_t = -sum_t' plan[t, t'] C[t, t']`` of ``x (B, T, D)`` against ``y (B, S, D)``.

    Returns ``(B, T)``; the sum over ``t`` equals :func:`ot_similarity`. Scale: rewards sum to the similarity, so a
    per-frame value is about ``1/T`` of it (multiply by ``T`` for per-step magnitudes independent of length).
    """
    cost = cosine_cost(x, y)
    return -(ot_plan(cost, reg, num_iters) * cost).sum(dim=2)


def nearest_demo_reward(
    traj: Tensor, demos: Tensor, reg: float = 0.1, num_iters: int = 100
) -> tuple[Tensor, Tensor]:
    """Dense OT reward of each trajectory against its closest preferred demonstration (RAPL Sec. 4.2).

    Args: ``traj (N, T, D)`` embeddings of the trajectories to score, ``demos (K, S, D)`` of preferred demos.
    Returns ``(rewards (N, T), demo_index (N,))``: for each trajectory the per-frame rewards against the demo with the
    largest total OT similarity. All ``N * K`` problems are solved in one batch.
    """
    if traj.dim() != 3 or demos.dim() != 3:
        raise ValueError(f"traj and demos must be (N, T, D) and (K, S, D), got {tuple(traj.shape)}, {tuple(demos.shape)}")
    n, k = traj.shape[0], demos.shape[0]
    x = traj[:, None].expand(n, k, *traj.shape[1:]).reshape(n * k, *traj.shape[1:])
    y = demos[None].expand(n, k, *demos.shape[1:]).reshape(n * k, *demos.shape[1:])
    dense = ot_dense_reward(x, y, reg, num_iters).reshape(n, k, -1)
    idx = dense.sum(dim=2).argmax(dim=1)
    return dense[torch.arange(n, device=traj.device), idx], idx
