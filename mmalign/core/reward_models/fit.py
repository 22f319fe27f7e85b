"""Train a reward model or ensemble with the Bradley–Terry loss on labelled segment pairs.

A small custom loop rather than :class:`mmalign.train.Trainer`: the online-PbRL loop refits a tiny reward model
every few thousand environment steps, where per-fit run folders, checkpoints and TensorBoard would dominate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from mmalign.core.metrics import preference_accuracy, preference_credit
from mmalign.core.reward_models.data import SegmentPairs
from mmalign.core.reward_models.ensemble import RewardEnsemble
from mmalign.core.reward_models.nets import RewardModel
from mmalign.core.validation import check_nonnegative, check_positive, check_range

__all__ = ["RewardFitConfig", "FitResult", "fit_reward_model", "evaluate", "pair_logits", "resolve_device"]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → CUDA if present, else CPU; anything else is passed to ``torch.device``; asking for CUDA on a
    machine without it raises ``ValueError`` (before any work, rather than at the first tensor moved there)."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} but CUDA is not available")
    return resolved


@dataclass(frozen=True)
class RewardFitConfig:
    """Hyper-parameters of :func:`fit_reward_model` (PEBBLE: lr 3e-4, batch 128, ensemble of 3)."""

    epochs: int = 50
    batch_size: int = 128
    lr: float = 3e-4
    weight_decay: float = 0.0
    bootstrap: bool = True  # each ensemble member trains on its own resample (with replacement) of the pairs
    center_coef: float = 0.0  # reward-centring coefficient passed to the BT loss
    val_fraction: float = 0.1  # held out when no validation set is given; 0 = none
    max_grad_norm: float = 10.0
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        check_positive("epochs", self.epochs)
        check_positive("batch_size", self.batch_size)
        check_positive("lr", self.lr)
        check_nonnegative("weight_decay", self.weight_decay)
        check_nonnegative("center_coef", self.center_coef)
        check_range("val_fraction", self.val_fraction, 0.0, 1.0, high_open=True)
        check_positive("max_grad_norm", self.max_grad_norm)


@dataclass
class FitResult:
    """Final metrics; ``history`` has one dict per epoch (``train/loss``, ``train/pref_accuracy``, ``eval/...``)."""

    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)


def _member_returns(model: RewardModel | RewardEnsemble, pairs: SegmentPairs) -> tuple[torch.Tensor, torch.Tensor]:
    """``[K, N]`` returns of the first and second segments (K = 1 for a single model)."""
    r1 = model.segment_returns(pairs.obs_first, pairs.act_first, pairs.mask_first)
    r2 = model.segment_returns(pairs.obs_second, pairs.act_second, pairs.mask_second)
    return (r1, r2) if r1.dim() == 2 else (r1.unsqueeze(0), r2.unsqueeze(0))


def pair_logits(model: RewardModel | RewardEnsemble, pairs: SegmentPairs, batch_size: int = 1024) -> torch.Tensor:
    """``[K, N]`` logits ``R̂(σ¹) − R̂(σ²)`` computed in chunks without gradients."""
    chunks = []
    with torch.no_grad():
        for i in range(0, len(pairs), batch_size):
            r1, r2 = _member_returns(model, pairs.subset(torch.arange(i, min(i + batch_size, len(pairs)))))
            chunks.append(r1 - r2)
    return torch.cat(chunks, dim=1)


@torch.no_grad()
def evaluate(model: RewardModel | RewardEnsemble, pairs: SegmentPairs, batch_size: int = 1024) -> dict[str, float]:
    """Held-out BT loss and preference accuracy (ties half credit) of the member-mean logit."""
    was_training = model.training
    model.eval()
    logits = pair_logits(model, pairs, batch_size).mean(0)
    model.train(was_training)
    labels = pairs.labels.to(logits.device, logits.dtype)
    from mmalign.core.losses import bradley_terry_loss  # noqa: PLC0415 (see fit_reward_model)

    loss, _ = bradley_terry_loss(logits, torch.zeros_like(logits), labels)
    return {"eval/loss": float(loss), "eval/pref_accuracy": preference_accuracy(logits.cpu(), labels.cpu())}


def fit_reward_model(
    model: RewardModel | RewardEnsemble,
    train: SegmentPairs,
    val: SegmentPairs | None = None,
    config: RewardFitConfig = RewardFitConfig(),
) -> FitResult:
    """Fit ``model`` in place with the BT loss; returns train and held-out metrics.

    Each epoch is ``ceil(N / batch_size)`` steps; at every step each ensemble member draws ``batch_size`` pairs from
    its own index set (a bootstrap resample when ``config.bootstrap``), and the members' losses are summed under one
    Adam optimiser. Runs on ``config.device`` (``auto`` = CUDA when present); the model stays on that device.

    Examples:
        >>> import torch
        >>> from mmalign.core.reward_models import MLPRewardModel, RewardFitConfig, SegmentPairs, fit_reward_model
        >>> from mmalign.core.rng import seeded_global_rng
        >>> g = torch.Generator().manual_seed(0)
        >>> obs_first, obs_second = torch.randn(64, 5, 2, generator=g), torch.randn(64, 5, 2, generator=g)
        >>> labels = (obs_first[..., 0].sum(1) > obs_second[..., 0].sum(1)).float()  # the true reward is obs[0]
        >>> with seeded_global_rng(0):
        ...     model = MLPRewardModel(obs_dim=2, hidden=(16,))
        >>> config = RewardFitConfig(epochs=10, batch_size=32, lr=1e-2, device="cpu", val_fraction=0.0)
        >>> result = fit_reward_model(model, SegmentPairs(obs_first, obs_second, labels), config=config)
        >>> result.history[0]["train/pref_accuracy"], result.metrics["train/pref_accuracy"]
        (0.640625, 0.921875)
    """
    # Imported here so that reward nets, ensembles and teachers import without the loss package.
    from mmalign.core.losses import bradley_terry_loss  # noqa: PLC0415

    if len(train) == 0:
        raise ValueError("train must hold at least one labelled pair, got 0")
    device = resolve_device(config.device)
    gen = torch.Generator().manual_seed(config.seed)
    if val is None and config.val_fraction > 0 and len(train) >= 10:
        train, val = train.split(config.val_fraction, gen)
    model.to(device)
    train = train.to(device)
    val = val.to(device) if val is not None else None
    members = model._models() if isinstance(model, RewardEnsemble) else [model]
    n = len(train)
    index_sets = [
        torch.randint(n, (n,), generator=gen) if config.bootstrap and len(members) > 1 else torch.arange(n)
        for _ in members
    ]
    optim = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(n / config.batch_size)
    history: list[dict[str, float]] = []
    model.train()
    for epoch in range(config.epochs):
        # Accumulated on the device and read once per epoch: no host sync per step.
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        acc_sum = torch.zeros((), device=device, dtype=torch.float64)
        for _ in range(steps_per_epoch):
            total = torch.zeros((), device=device)
            for member, idx in zip(members, index_sets):
                batch = train.subset(idx[torch.randint(len(idx), (config.batch_size,), generator=gen)])
                r1, r2 = _member_returns(member, batch)
                r1, r2 = r1[0], r2[0]
                logits = r1 - r2
                loss, _ = bradley_terry_loss(r1, r2, batch.labels.to(r1.dtype), center_coef=config.center_coef)
                total = total + loss
                acc_sum += preference_credit(logits, batch.labels).mean() / len(members)
            optim.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optim.step()
            loss_sum += total.detach() / len(members)
        row = {"epoch": float(epoch + 1), "train/loss": float(loss_sum) / steps_per_epoch,
               "train/pref_accuracy": float(acc_sum) / steps_per_epoch}
        if val is not None and (epoch + 1 == config.epochs or (epoch + 1) % 10 == 0):
            row.update(evaluate(model, val))
        history.append(row)
    final = dict(history[-1])
    final["train/num_pairs"] = float(n)  # pairs trained on (after any val_fraction hold-out)
    final["train/num_val_pairs"] = float(len(val)) if val is not None else 0.0
    return FitResult(final, history)
