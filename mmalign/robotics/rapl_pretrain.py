"""Self-supervised pre-training of RAPL's frame encoder before any preference, and a BT reward head on it.

RAPL spends its preference budget only on *aligning* an encoder that was pre-trained without preferences (Tian et
al., ICLR 2024: an ImageNet ResNet-18 or MVP's MAE ViT). No such weights exist offline for the PushAvoid frames, so
the encoder is pre-trained here on the task's own unlabelled frames from both embodiments with a time-contrastive
objective (Sermanet et al., "Time-Contrastive Networks", 2018, single-view form with InfoNCE negatives as in
van den Oord et al. 2018): two frames a few steps apart in one rollout are a positive pair; every other frame in the
batch, including frames of the *same* rollout far apart in time, is a negative, so the embedding must encode what
changes over an episode (effector and puck positions), not only which scene it is.

:class:`EncoderReward` is the Bradley–Terry pixel baseline built on the same encoder: a linear per-frame reward head
on the embedding, trained end to end, so "BT from the pretrained encoder" and "BT from scratch" differ only in the
initial weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["time_contrastive_loss", "sample_time_contrastive_batch", "pretrain_time_contrastive", "base_encoder", "EncoderReward"]


def time_contrastive_loss(anchor: Tensor, positive: Tensor, temperature: float) -> tuple[Tensor, dict[str, float]]:
    r"""InfoNCE time-contrastive loss with in-batch negatives.

    .. math::
        \ell = -\frac{1}{B} \sum_i \log \frac{\exp(\cos(a_i, p_i)/\tau)}{\sum_j \exp(\cos(a_i, p_j)/\tau)}

    Args: ``anchor (B, D)`` and ``positive (B, D)`` embeddings, row ``i`` of each a frame pair a few steps apart in
    one rollout; ``temperature`` ``τ > 0``. Returns the mean loss and ``{"pretrain/accuracy": fraction of anchors
    whose most similar candidate is their own positive}``.
    """
    if anchor.dim() != 2 or anchor.shape != positive.shape:
        raise ValueError(f"anchor and positive must both be (B, D), got {tuple(anchor.shape)} and "
                         f"{tuple(positive.shape)}")
    if anchor.shape[0] < 2:
        raise ValueError(f"need at least 2 pairs for in-batch negatives, got {anchor.shape[0]}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    logits = F.normalize(anchor, dim=-1) @ F.normalize(positive, dim=-1).T / temperature
    target = torch.arange(anchor.shape[0], device=anchor.device)
    loss = F.cross_entropy(logits, target)
    acc = float((logits.argmax(dim=1) == target).float().mean())
    return loss, {"pretrain/accuracy": acc}


def sample_time_contrastive_batch(num_rollouts: int, steps: int, batch: int, window: int,
                                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Frame indices of one batch: ``(anchor (2k, 2), positive (2k, 2))`` rows of (rollout, time), ``k = batch // 2``.

    ``k`` distinct rollouts each give two anchors at least ``2 * window + 1`` steps apart (so each is a hard negative
    of the other) and a positive ``1..window`` steps from each anchor.
    """
    if steps < 2 * window + 2 or window < 1:
        raise ValueError(f"need window >= 1 and steps >= 2 * window + 2, got window={window}, steps={steps}")
    k = min(batch // 2, num_rollouts)
    if k < 1:
        raise ValueError(f"batch must be >= 2, got {batch}")
    roll = rng.choice(num_rollouts, size=k, replace=False)
    gap = 2 * window + 1
    t1 = rng.integers(0, steps - gap, size=k)
    t2 = t1 + gap + rng.integers(0, steps - gap - t1)  # t2 in [t1 + gap, steps - 1]
    anchors = np.concatenate([t1, t2])
    offset = rng.integers(1, window + 1, size=2 * k) * rng.choice([-1, 1], size=2 * k)
    pos = anchors + offset
    pos = np.where((pos < 0) | (pos >= steps), anchors - offset, pos)  # reflect at the episode ends
    r = np.concatenate([roll, roll])
    return np.stack([r, anchors], 1), np.stack([r, pos], 1)


def pretrain_time_contrastive(encoder: Any, frames: np.ndarray, steps: int, *, batch: int = 64, window: int = 2,
                              temperature: float = 0.1, lr: float = 1e-3, seed: int = 0) -> list[dict[str, float]]:
    """Pre-train ``encoder`` (a :class:`~mmalign.robotics.encoders.FrameEncoder`) in place on unlabelled rollouts
    ``frames (N, T, H, W, 3)`` uint8 for ``steps`` Adam steps of :func:`time_contrastive_loss`; returns per-step
    metrics. Leaves the encoder in ``train()`` mode (the caller calibrates its embedding normalisation)."""
    if frames.ndim != 5 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (N, T, H, W, 3), got {frames.dtype} {frames.shape}")
    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(encoder.parameters(), lr=lr)
    encoder.train()
    log = []
    for step in range(steps):
        a, p = sample_time_contrastive_batch(frames.shape[0], frames.shape[1], batch, window, rng)
        idx = np.concatenate([a, p])
        z = encoder(torch.from_numpy(frames[idx[:, 0], idx[:, 1]]))
        loss, metrics = time_contrastive_loss(z[: len(a)], z[len(a) :], temperature)
        opt.zero_grad()
        loss.backward()
        opt.step()
        log.append({"step": step, "pretrain/loss": loss.item(), **metrics})
    return log


def base_encoder(cfg: Any, frames_fn: Callable[[], np.ndarray], metrics: dict[str, float]) -> Any:
    """RAPL's encoder before any preference, for a :class:`~mmalign.robotics.rapl.RaplConfig` ``cfg``: random init
    (seeded), or after ``cfg.pretrain_steps`` steps of :func:`pretrain_time_contrastive` on ``frames_fn()`` (the
    run's unlabelled training rollouts of both embodiments, never the held-out ones). Pre-trained weights are cached
    in ``cfg.data_cache``, so all budgets of a seed share them. Returned in ``train()`` mode, its embedding
    normalisation not calibrated; pre-training time and final accuracy go to ``metrics``."""
    import time
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    from mmalign.core.rng import seeded_global_rng
    from mmalign.robotics.encoders import build_encoder

    with seeded_global_rng(cfg.seed):
        enc = build_encoder(cfg.encoder, cfg.embed_dim, cfg.image_size, cfg.weights_path or None,
                            embed_norm=cfg.embed_norm)
    if not cfg.pretrain_steps:
        return enc.train()
    cross = cfg.pretrain_cross_traj if cfg.cross_env_id else 0
    key = (f"tcpre_{cfg.env_id.replace('/', '_')}_s{cfg.seed}_n{cfg.n_train_traj}+{cross}_k{cfg.pretrain_steps}"
           f"_w{cfg.pretrain_window}_t{cfg.pretrain_temperature:g}_b{cfg.pretrain_batch}_lr{cfg.lr:g}_{cfg.encoder}{cfg.embed_dim}"
           f"{'n' if cfg.embed_norm else ''}.safetensors")
    path = Path(cfg.data_cache) / key if cfg.data_cache else None
    if path is not None and path.is_file():
        enc.load_state_dict(load_file(str(path)))
        return enc.train()
    frames = frames_fn()
    t1 = time.time()
    log = pretrain_time_contrastive(enc, frames, cfg.pretrain_steps, batch=cfg.pretrain_batch,
                                    window=cfg.pretrain_window, temperature=cfg.pretrain_temperature, lr=cfg.lr,
                                    seed=cfg.seed)
    metrics["pretrain/train_s"] = time.time() - t1
    metrics["pretrain/final_accuracy"] = float(np.mean([r["pretrain/accuracy"] for r in log[-20:]]))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, str(path))
    return enc.train()


class EncoderReward(nn.Module):
    """Per-frame reward ``w^T phi(o_t) + b`` on a :class:`~mmalign.robotics.encoders.FrameEncoder` ``phi``; a
    rollout's return is the sum over its frames. ``segment_returns`` takes frames ``(N, T, H, W, 3)`` uint8."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.embed_dim, 1)

    def segment_returns(self, frames: Tensor) -> Tensor:
        return self.head(self.encoder(frames)).squeeze(-1).sum(dim=-1)
