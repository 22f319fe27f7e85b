"""``mmalign robotics reward``: a Bradley–Terry reward ensemble from a segment preference file, saved as a folder.

The file is any :mod:`mmalign.data` source of kind ``segment`` (``obs_first``, ``act_first``, ``obs_second``,
``act_second``, optional ``label`` = P(first ≻ second); ``mmalign label export`` of a clip project writes one). Labels
``1``/``0``/``0.5`` (or any probability) are soft Bradley–Terry targets; rows the validator rejects (a NaN label = a
skipped query, bad shapes) refuse the file, or with ``skip_invalid=true`` are left out and counted. Segments of
different lengths are padded and masked.

The reward model sees observations and actions only. The other columns of an export are checked and reported, never
used: ``frames_*`` (the clips people watched; a vector model cannot read pixels), ``qpos_*``/``qvel_*`` (the
simulator states the clips were drawn from), ``rewards_*`` (true rewards, which a reward learned from preferences
must not see) and the labelling metadata (``id``, ``num_labels``, ``comments``). Per-step columns must have one row
per observation (a file whose states or frames belong to other segments is refused, naming the row); every unused
column is listed in the log and in the summary (``data/unused_columns``).

Fitting is :class:`~mmalign.robotics.reward_trainer.RewardTrainer`'s observation standardisation plus
:func:`mmalign.core.reward_models.fit_reward_model` on a seeded train / held-out split; the result is
``<run>/reward_model/`` (``save_pretrained``: config.json + model.safetensors), which
``gymnasium.make("mmalign/LearnedReward-v0", env_id=..., reward_model=<folder>)`` and
:class:`~mmalign.robotics.LearnedRewardWrapper` load to train any agent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmalign.config import Config, check_choice, check_positive, check_range, option

__all__ = ["RewardJobConfig", "validate", "run", "load_segment_pairs"]

# Columns the reward model reads; the step-aligned ones of the others are checked for their step counts.
_USED = ("obs_first", "act_first", "obs_second", "act_second", "label")
_PER_STEP = ("rewards", "frames", "qpos", "qvel")

# Vector reward models of REWARD_MODELS and the name of their input-size argument.
_VECTOR_MODELS = {"mlp": "obs_dim", "feature_head": "feature_dim"}


@dataclass
class RewardJobConfig(Config):
    """Options of ``mmalign robotics reward``."""

    data: str = option("", "segment preference data: a .jsonl/.json/.parquet file, a datasets folder or a Hub id")
    split: str = option("", "split of a datasets folder or Hub data set ('' = the only one)")
    columns: str = option("", "column mapping 'field=column,...' (see mmalign.data)")
    skip_invalid: bool = option(False, "leave out (and count) rows the validator rejects instead of refusing the file")
    env_id: str = option("", "gymnasium env the data comes from: its spaces must match the data ('' = no check)")
    model: str = option("mlp", "REWARD_MODELS name of each ensemble member (a vector model: mlp or feature_head)")
    ensemble_size: int = option(3, "ensemble members (each fits its own bootstrap resample)")
    hidden: int = option(64, "hidden width")
    layers: int = option(2, "hidden layers")
    action_squares: bool = option(True, "mlp: also feed the squared actions (control costs are quadratic; as "
                                  "robotics.pebble's rm_action_squares)")
    normalize_obs: bool = option(True, "standardise observations with the training steps' mean/std (stored)")
    epochs: int = option(100, "Bradley–Terry epochs")
    batch_size: int = option(64, "pairs per step and member")
    lr: float = option(1e-3, "Adam learning rate")
    val_fraction: float = option(0.2, "pairs held out (seeded split) for the held-out preference accuracy; 0 = none")
    seed: int = option(0, "seed of the split, the initialisation and the batches")
    device: str = option("cpu", "cpu, cuda or auto")

    def __post_init__(self) -> None:
        check_choice("model", self.model, _VECTOR_MODELS)
        if self.action_squares and self.model != "mlp":
            raise ValueError(f"action_squares needs model=mlp, got {self.model!r} (set action_squares=false)")
        for name in ("ensemble_size", "hidden", "layers", "epochs", "batch_size", "lr"):
            check_positive(name, getattr(self, name))
        check_range("val_fraction", self.val_fraction, 0.0, 1.0, high_open=True)


def _steps(where: str, value: Any, trailing: int) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float32)
    if arr.ndim == 1:  # scalar observations/actions per step
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ValueError(f"{where} must be [steps, features] with at least one step, got shape {arr.shape}")
    if trailing and arr.shape[1] != trailing:
        raise ValueError(f"{where} has {arr.shape[1]} features per step, but earlier rows have {trailing}")
    return arr


def load_segment_pairs(cfg: RewardJobConfig) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read and check the file; ``(padded arrays obs1/act1/mask1/obs2/act2/mask2 [N, H, ...], labels [N]), info)``.

    Raises ``FileNotFoundError``/``ValueError`` naming the file, row and field for anything unusable.
    """
    from mmalign.data import is_hub_id, load_preference_data

    if not cfg.data:
        raise ValueError("data is required: a segment preference file (e.g. from `mmalign label export`)")
    if not is_hub_id(cfg.data) and not Path(cfg.data).exists():
        raise FileNotFoundError(f"data {cfg.data!r} does not exist")
    ds = load_preference_data(cfg.data, "segment", skip_invalid=cfg.skip_invalid, split=cfg.split or None,
                              columns=cfg.columns or None)
    # first/second are not chosen/rejected: a row without a label is unlabelled, never "first preferred"
    unlabelled = [i for i, row in enumerate(ds.rows) if row.get("label") is None]
    if unlabelled and not cfg.skip_invalid:
        rows = [ds.row_number(i) for i in unlabelled]
        raise ValueError(f"{cfg.data}: rows {rows[:10]}{' ...' if len(rows) > 10 else ''} have no label: segment pairs "
                         f"need label = P(first ≻ second) (skip_invalid=true leaves them out)")
    keep = [i for i in range(len(ds.rows)) if i not in set(unlabelled)]
    sides: dict[str, list[np.ndarray]] = {k: [] for k in ("obs1", "act1", "obs2", "act2")}
    dims = {"obs": 0, "act": 0}
    for i in keep:
        row = ds.rows[i]
        for key, field in (("obs1", "obs_first"), ("act1", "act_first"), ("obs2", "obs_second"),
                           ("act2", "act_second")):
            arr = _steps(f"{cfg.data}: row {ds.row_number(i)} field {field!r}", row[field], dims[key[:3]])
            dims[key[:3]] = arr.shape[1]
            sides[key].append(arr)
        for a, o, field in (("act1", "obs1", "act_first"), ("act2", "obs2", "act_second")):
            if len(sides[a][-1]) != len(sides[o][-1]):
                raise ValueError(f"{cfg.data}: row {ds.row_number(i)}: {field!r} has {len(sides[a][-1])} steps, the "
                                 f"observations {len(sides[o][-1])}")
        _check_unused_steps(cfg.data, ds.row_number(i), row, len(sides["obs1"][-1]), len(sides["obs2"][-1]))
    labels = np.asarray([float(ds.rows[i]["label"]) for i in keep], np.float32)
    unused = sorted({k for i in keep for k, v in ds.rows[i].items() if k not in _USED and v is not None})
    info = {"rows": len(keep), "dropped_rows": len(ds.report.dropped) + len(unlabelled), "obs_dim": dims["obs"],
            "act_dim": dims["act"], "ties": int((labels == 0.5).sum()), "unused_columns": unused}
    if len(labels) < 2:
        raise ValueError(f"{cfg.data}: needs at least 2 usable labelled pairs to fit a reward model, got {len(labels)}"
                         f" ({ds.report.summary()})")
    horizon = max(len(a) for key in ("obs1", "obs2") for a in sides[key])
    out: dict[str, np.ndarray] = {"y": labels}
    for key, values in sides.items():
        padded = np.zeros((len(values), horizon, values[0].shape[1]), np.float32)
        for j, a in enumerate(values):
            padded[j, :len(a)] = a
        out[key] = padded
        if key.startswith("obs"):
            out["mask" + key[-1]] = np.arange(horizon)[None] < np.array([len(a) for a in values])[:, None]
    return out, info


def _check_unused_steps(data: str, row_number: int, row: dict[str, Any], steps_first: int, steps_second: int) -> None:
    """Per-step columns the model does not read must still describe the same steps as the observations."""
    for side, steps in (("first", steps_first), ("second", steps_second)):
        for stem in _PER_STEP:
            value = row.get(f"{stem}_{side}")
            if value is None:
                continue
            n = len(value) if isinstance(value, (list, tuple)) else int(np.shape(value)[0]) if np.ndim(value) else 1
            if n != steps:
                raise ValueError(f"{data}: row {row_number} field '{stem}_{side}' has {n} steps, the observations "
                                 f"{steps}: the column belongs to another segment")


def _check_env(cfg: RewardJobConfig, obs_dim: int, act_dim: int) -> None:
    import gymnasium as gym

    from mmalign.robotics.wrappers import action_dim, check_action_space

    try:
        env = gym.make(cfg.env_id)
    except Exception as err:  # unknown id, missing MuJoCo: one clear line naming the field
        raise ValueError(f"env_id {cfg.env_id!r} cannot be made: {err}") from None
    try:
        check_action_space(env.action_space, f"env_id {cfg.env_id!r}")
        want_obs, want_act = int(np.prod(env.observation_space.shape or ())), action_dim(env.action_space)
    finally:
        env.close()
    if (obs_dim, act_dim) != (want_obs, want_act):
        raise ValueError(f"{cfg.data}: the segments have {obs_dim} observation and {act_dim} action features per step "
                         f"(fields obs_first/act_first), but env_id {cfg.env_id!r} has {want_obs} and {want_act}")


def validate(cfg: RewardJobConfig, resume: bool = False) -> None:
    """Everything before a run folder: ``--resume`` (unsupported), the file, its rows, the env's spaces."""
    if resume:
        raise ValueError("--resume is not supported by robotics.reward (a fit takes seconds); start a new run")
    _, info = load_segment_pairs(cfg)
    if cfg.env_id:
        _check_env(cfg, info["obs_dim"], info["act_dim"])


def run(cfg: RewardJobConfig, run_dir: Path) -> dict[str, Any]:
    """Fit the ensemble, report held-out preference accuracy, save ``run_dir/reward_model``."""
    import torch

    from mmalign.core.reward_models import RewardEnsemble, RewardFitConfig, SegmentPairs, fit_reward_model
    from mmalign.core.reward_models.fit import resolve_device
    from mmalign.registry import REWARD_MODELS
    from mmalign.robotics.reward_trainer import RewardTrainer

    validate(cfg)
    pairs, info = load_segment_pairs(cfg)
    obs_dim, act_dim = info["obs_dim"], info["act_dim"]
    factory = REWARD_MODELS.get(cfg.model)
    kwargs: dict[str, Any] = {_VECTOR_MODELS[cfg.model]: obs_dim, "act_dim": act_dim,
                              "hidden": (cfg.hidden,) * cfg.layers}
    if cfg.action_squares and act_dim:
        kwargs["action_squares"] = True
    ensemble = RewardEnsemble.build(lambda: factory(**kwargs), size=cfg.ensemble_size, seed=cfg.seed)
    device = resolve_device(cfg.device)
    trainer = RewardTrainer(ensemble, device=device, normalize_obs=cfg.normalize_obs, seed=cfg.seed)
    n = len(pairs["y"])
    order = np.random.default_rng(cfg.seed).permutation(n)
    n_val = int(round(cfg.val_fraction * n)) if n >= 4 else 0  # at least 2 pairs on each side
    n_val = min(n_val, n - 2)
    val_idx, train_idx = order[:n_val], order[n_val:]
    # statistics of the training pairs' real (unpadded) steps only
    steps = np.concatenate([pairs[f"obs{s}"][train_idx][pairs[f"mask{s}"][train_idx]] for s in "12"])
    trainer.fit_input_stats(steps, np.zeros((len(steps), act_dim), np.float32))

    def subset(idx: np.ndarray) -> SegmentPairs:
        t = {k: torch.as_tensor(trainer.norm(v[idx]) if k.startswith("obs") else v[idx]) for k, v in pairs.items()}
        return SegmentPairs(t["obs1"], t["obs2"], t["y"], t["act1"], t["act2"], t["mask1"], t["mask2"])

    fit_cfg = RewardFitConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
                              device=str(device), val_fraction=0.0)
    result = fit_reward_model(trainer.ensemble, subset(train_idx), subset(val_idx) if n_val else None, fit_cfg)
    folder = trainer.save_pretrained(run_dir / "reward_model", env_id=cfg.env_id or None, source=str(cfg.data),
                                     pairs=int(n - n_val), obs_dim=obs_dim, act_dim=act_dim)
    with open(run_dir / "history.jsonl", "w") as fh:
        fh.writelines(json.dumps(row) + "\n" for row in result.history)
    metrics = {k: float(v) for k, v in result.metrics.items()}
    summary = {**metrics, "data/rows": info["rows"], "data/dropped_rows": info["dropped_rows"],
               "data/ties": info["ties"], "data/unused_columns": ",".join(info["unused_columns"]),
               "reward_model": str(folder)}
    if info["unused_columns"]:
        print(f"[mmalign] columns not used by the reward model (checked, kept in the file): "
              f"{', '.join(info['unused_columns'])}")
    acc = metrics.get("eval/pref_accuracy")
    print(f"[mmalign] reward model from {n} pairs ({info['dropped_rows']} rows left out) -> {folder}; held-out "
          f"preference accuracy {'n/a' if acc is None else f'{acc:.3f} on {n_val} pairs'}")
    return summary
