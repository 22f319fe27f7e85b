"""The robotics edge of the core reward models: build, fit, query-select, save and load a state-action ensemble.

The ensemble is :class:`mmalign.core.reward_models.RewardEnsemble` of :class:`MLPRewardModel` members (tanh output,
as PEBBLE); fitting is :func:`mmalign.core.reward_models.fit_reward_model` (Bradley–Terry); query selection is
:mod:`mmalign.core.query`. Checkpoints are one safetensors file whose metadata records the env id, observation and
action sizes and the architecture, so a checkpoint for a different observation space is refused on load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "build_ensemble",
    "ensemble_member_rewards",
    "fit_ensemble",
    "select_pairs",
    "save_reward_model",
    "load_reward_model",
    "CHECKPOINT_FORMAT",
]

CHECKPOINT_FORMAT = "mmalign.robotics.reward_ensemble.v1"


def build_ensemble(obs_dim: int, act_dim: int, size: int, hidden: int, *, seed: int, layers: int = 2,
                   input_norm: bool = False, action_squares: bool = False) -> Any:
    """A ``size``-member state-action reward ensemble, each an MLP with ``layers`` hidden layers of ``hidden``
    (``input_norm`` / ``action_squares``: see :class:`~mmalign.core.reward_models.MLPRewardModel`)."""
    from mmalign.core.reward_models import MLPRewardModel, RewardEnsemble

    return RewardEnsemble.build(
        lambda: MLPRewardModel(obs_dim, act_dim, hidden=(hidden,) * layers, input_norm=input_norm,
                               action_squares=action_squares), size=size, seed=seed
    )


def ensemble_member_rewards(ensemble: Any, obs: Tensor, act: Tensor) -> Tensor:
    """``[K, *lead]`` per-member rewards of steps ``obs [*lead, obs_dim]``, ``act [*lead, act_dim]``."""
    if obs.dim() == 2:  # a batch of single steps: add a length-1 time axis for the [N, H] reward-model API
        return ensemble.step_rewards(obs[:, None], act[:, None])[..., 0]
    return ensemble.step_rewards(obs, act)


def fit_ensemble(
    ensemble: Any, obs1: Tensor, act1: Tensor, obs2: Tensor, act2: Tensor, labels: Tensor, *,
    epochs: int, batch_size: int, lr: float, seed: int, val_fraction: float = 0.0,
) -> dict[str, float]:
    """Refit the ensemble (warm start) with the BT loss on the labelled pairs so far; returns final metrics.

    By default it trains on every pair (as PEBBLE); ``val_fraction > 0`` holds out that fraction (of at least 10
    pairs) for ``eval/*`` metrics. ``train/num_pairs`` / ``train/num_val_pairs`` count the pairs on each side.
    """
    from mmalign.core.reward_models import RewardFitConfig, SegmentPairs, fit_reward_model

    device = next(ensemble.parameters()).device
    pairs = SegmentPairs(obs1, obs2, labels, act1, act2)
    cfg = RewardFitConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=str(device),
                          val_fraction=val_fraction)
    result = fit_reward_model(ensemble, pairs, config=cfg)
    return {k: float(v) for k, v in result.metrics.items()}


def select_pairs(selector: str, returns_first: Tensor, returns_second: Tensor, num: int, *, seed: int) -> Any:
    """Indices of the ``num`` candidate pairs chosen by a core query selector from member returns ``[K, N]``."""
    import numpy as np

    from mmalign.core import query  # noqa: F401  (registers the selectors)
    from mmalign.registry import QUERY_SELECTORS

    logits = (returns_first - returns_second).float()
    chosen = QUERY_SELECTORS.get(selector)(logits, num, rng=torch.Generator().manual_seed(seed))
    return np.asarray(chosen.cpu(), dtype=np.int64)


def save_reward_model(
    ensemble: Any, path: str | Path, env_id: str, obs_dim: int, act_dim: int, *,
    obs_mean: Any = None, obs_std: Any = None,
) -> Path:
    """Write the ensemble's weights, input standardisation and the metadata :func:`load_reward_model` checks.

    The reward of a step is ``ensemble((obs − obs_mean) / obs_std, act)``; stats default to 0 / 1.
    """
    from safetensors.torch import save_file

    path = Path(path)
    first = ensemble.members[0]
    linears = [m for m in first.net if isinstance(m, torch.nn.Linear)]
    meta = {
        "format": CHECKPOINT_FORMAT,
        "env_id": env_id,
        "obs_dim": obs_dim,
        "act_dim": act_dim,
        "size": len(ensemble),
        "hidden": linears[0].out_features,
        "layers": len(linears) - 1,
        "input_norm": bool(getattr(first, "input_norm", False)),
        "action_squares": bool(getattr(first, "action_squares", False)),
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in ensemble.state_dict().items()}
    tensors["input.obs_mean"] = torch.zeros(obs_dim) if obs_mean is None else torch.as_tensor(obs_mean).float()
    tensors["input.obs_std"] = torch.ones(obs_dim) if obs_std is None else torch.as_tensor(obs_std).float()
    save_file(tensors, str(path), metadata={"mmalign": json.dumps(meta)})
    return path


def load_reward_model(path: str | Path, *, obs_dim: int | None = None, act_dim: int | None = None) -> tuple[Any, dict]:
    """Load an ensemble saved by :func:`save_reward_model`; ``(ensemble, metadata)``.

    ``metadata["obs_mean"]``/``["obs_std"]`` (tensors) standardise observations before the ensemble.

    Raises ``ValueError`` when the file is not such a checkpoint, or when ``obs_dim``/``act_dim`` are given and
    differ from the checkpoint's (a reward model for a different observation or action space).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reward checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get("mmalign")
        meta = json.loads(raw) if raw else {}
    except Exception as err:  # SafetensorError (empty/corrupt header), JSONDecodeError: never a deep traceback
        raise ValueError(f"reward checkpoint {path} is not a readable safetensors reward checkpoint: {err}") from err
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"reward checkpoint {path} must have format {CHECKPOINT_FORMAT!r}, got {meta.get('format')!r}")
    for name, want in (("obs_dim", obs_dim), ("act_dim", act_dim)):
        if want is not None and int(meta[name]) != int(want):
            raise ValueError(
                f"reward checkpoint {path} was trained for {name}={meta[name]} (env {meta['env_id']}), "
                f"but the env has {name}={want}"
            )
    # older checkpoints (before the input options) have neither key: plain members
    ens = build_ensemble(meta["obs_dim"], meta["act_dim"], meta["size"], meta["hidden"], seed=0, layers=meta["layers"],
                         input_norm=bool(meta.get("input_norm", False)),
                         action_squares=bool(meta.get("action_squares", False)))
    try:
        state = load_file(str(path))
    except Exception as err:  # a truncated file can have an intact header
        raise ValueError(f"reward checkpoint {path} is truncated or corrupt: {err}") from err
    meta["obs_mean"] = state.pop("input.obs_mean")
    meta["obs_std"] = state.pop("input.obs_std")
    ens.load_state_dict(state)
    ens.eval()
    return ens, meta
