"""Reward models as artifacts: a folder with ``config.json`` and ``model.safetensors`` (no pickle anywhere).

::

    save_pretrained(ensemble, "reward_model", obs_mean=mean, obs_std=std, env_id="Reacher-v5")
    model, extras = load_pretrained("reward_model")          # extras["obs_mean"], extras["obs_std"], extras["meta"]
    ensemble = RewardEnsemble.from_pretrained("reward_model")  # the model only

``config.json`` names every member by its ``REWARD_MODELS`` name and constructor arguments
(``RewardModel.init_kwargs``); ``model.safetensors`` holds the state dict, i.e. the weights together with the
buffers of every normalisation (input statistics of ``MLPRewardModel(input_norm=True)``, each member's reward
mean/std), plus an optional observation standardisation ``obs_mean``/``obs_std`` applied before the model. Loading
rebuilds the members from the config and loads the tensors strictly (a missing or extra tensor is an error), so a
saved model reloads bitwise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mmalign.core.reward_models.ensemble import RewardEnsemble
from mmalign.core.reward_models.nets import RewardModel

__all__ = ["save_pretrained", "load_pretrained", "PRETRAINED_FORMAT", "CONFIG_NAME", "WEIGHTS_NAME"]

PRETRAINED_FORMAT = "mmalign.reward_model.v1"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def _registry_name(model: RewardModel) -> str:
    from mmalign.registry import REWARD_MODELS

    for entry in REWARD_MODELS.entries():
        if entry.load() is type(model):
            return entry.name
    raise ValueError(f"{type(model).__name__} is not registered in REWARD_MODELS; register it to save it")


def _member_config(model: RewardModel) -> dict[str, Any]:
    kwargs = getattr(model, "init_kwargs", None)
    if kwargs is None:
        raise ValueError(f"{type(model).__name__} has no init_kwargs: it cannot be rebuilt from config.json")
    return {"name": _registry_name(model), "kwargs": kwargs}


def save_pretrained(model: RewardModel | RewardEnsemble, folder: str | Path, *, obs_mean: Any = None,
                    obs_std: Any = None, **meta: Any) -> Path:
    """Write ``folder/config.json`` + ``folder/model.safetensors``; ``meta`` (JSON-able) is kept in the config.

    ``obs_mean``/``obs_std``: observation standardisation ``(obs − mean) / std`` applied before the model.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    members = model._models() if isinstance(model, RewardEnsemble) else [model]
    config = {
        "format": PRETRAINED_FORMAT,
        "ensemble": isinstance(model, RewardEnsemble),
        "members": [_member_config(m) for m in members],
        "obs_norm": obs_mean is not None,
        "meta": meta,
    }
    try:
        text = json.dumps(config, indent=1)
    except TypeError as err:
        raise ValueError(f"save_pretrained: metadata must be JSON-serialisable: {err}") from None
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if obs_mean is not None:
        if obs_std is None:
            raise ValueError("obs_std must be given with obs_mean")
        tensors["__input__.obs_mean"] = torch.as_tensor(obs_mean, dtype=torch.float32).clone()
        tensors["__input__.obs_std"] = torch.as_tensor(obs_std, dtype=torch.float32).clone()
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": PRETRAINED_FORMAT})
    (folder / CONFIG_NAME).write_text(text)
    return folder


def load_pretrained(folder: str | Path, *, device: str | torch.device = "cpu"
                    ) -> tuple[RewardModel | RewardEnsemble, dict[str, Any]]:
    """Rebuild a model saved by :func:`save_pretrained`; ``(model in eval mode, {"obs_mean", "obs_std", "meta"})``.

    Raises ``FileNotFoundError`` for a missing folder/file and ``ValueError`` (naming the file) for anything else
    wrong: another format, an unknown member name, bad constructor arguments, corrupt or mismatched tensors.
    """
    from safetensors.torch import load_file

    from mmalign.registry import REWARD_MODELS

    folder = Path(folder)
    cfg_path, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for path in (cfg_path, weights):
        if not path.is_file():
            raise FileNotFoundError(f"reward model folder {folder} has no {path.name} (expected {CONFIG_NAME} and "
                                    f"{WEIGHTS_NAME}, written by save_pretrained)")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{cfg_path} is not valid JSON: {err}") from None
    if not isinstance(config, dict) or config.get("format") != PRETRAINED_FORMAT:
        got = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{cfg_path}: format must be {PRETRAINED_FORMAT!r}, got {got!r}")
    members = []
    for k, spec in enumerate(config.get("members") or []):
        name = spec.get("name") if isinstance(spec, dict) else None
        if name not in REWARD_MODELS:
            raise ValueError(f"{cfg_path}: members[{k}].name must be one of {REWARD_MODELS.names()}, got {name!r}")
        try:
            members.append(REWARD_MODELS.get(name)(**spec.get("kwargs", {})))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{cfg_path}: members[{k}] ({name}) cannot be built: {err}") from None
    if not members:
        raise ValueError(f"{cfg_path}: members must list at least one reward model")
    model: RewardModel | RewardEnsemble = RewardEnsemble(members) if config.get("ensemble") else members[0]
    try:
        state = load_file(str(weights))
    except Exception as err:  # SafetensorError: a truncated or corrupt file
        raise ValueError(f"{weights} is not a readable safetensors file: {err}") from None
    extras: dict[str, Any] = {"meta": config.get("meta", {}), "obs_mean": None, "obs_std": None}
    if config.get("obs_norm"):
        try:
            extras["obs_mean"] = state.pop("__input__.obs_mean")
            extras["obs_std"] = state.pop("__input__.obs_std")
        except KeyError:
            raise ValueError(f"{weights}: config.json says obs_norm but the observation statistics are "
                             f"missing") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{weights} does not match {cfg_path}: {err}") from None
    return model.to(device).eval(), extras
