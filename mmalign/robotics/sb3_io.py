"""Stable-baselines3 policies on disk without pickle: safetensors + JSON, and a safe reader of SB3 ``.zip`` files.

``model.save`` in SB3 writes a zip whose ``data`` entry holds cloudpickled objects (spaces, schedules, classes) and
``SAC.load`` unpickles them, so a crafted zip runs code when loaded. Here a policy is stored as its ``state_dict`` in
a safetensors file whose header carries the JSON needed to rebuild it (algorithm, env id, ``policy_kwargs``); loading
builds a fresh SB3 model for that env and copies the weights in. Nothing is unpickled.

A user's SB3 zip is read by :func:`read_sb3_zip`: the ``data`` entry is parsed as JSON and its pickled
(``:serialized:``) values are never decoded; the weights in ``policy.pth`` are read with ``torch.load(...,
weights_only=True)``, whose restricted unpickler refuses anything but tensors and plain containers. Only with
``allow_pickle=True`` (a file the user trusts) is SB3's own ``load`` used, with a warning.
"""

from __future__ import annotations

import io
import json
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["FORMAT", "save_sb3_policy", "load_sb3_policy", "read_sb3_zip", "load_sb3_any", "check_policy_file"]

FORMAT = "mmalign-sb3-policy-v1"
_ALGOS = ("SAC", "PPO", "TD3")


def _algo_class(name: str) -> Any:
    import stable_baselines3

    if name not in _ALGOS:
        raise ValueError(f"unsupported SB3 algorithm {name!r}; one of {list(_ALGOS)}")
    return getattr(stable_baselines3, name)


def save_sb3_policy(model: Any, path: str | Path, env_id: str) -> Path:
    """Write ``model.policy``'s weights and what rebuilds it (algorithm, env id, policy_kwargs) to ``path``."""
    from safetensors.torch import save_file

    from mmalign.train.checkpoint import unshare_tensors

    algo = type(model).__name__
    _algo_class(algo)
    kwargs = dict(model.policy_kwargs)
    try:
        meta = json.dumps({"format": FORMAT, "algo": algo, "env_id": env_id, "policy_kwargs": kwargs})
    except TypeError as err:  # e.g. activation_fn=nn.Tanh: a class cannot be stored without pickle
        raise ValueError(f"policy_kwargs {kwargs!r} of this {algo} are not plain JSON values ({err}); only "
                         f"JSON-representable policy settings can be saved without pickle") from None
    tensors = unshare_tensors({k: v.detach().cpu().contiguous() for k, v in model.policy.state_dict().items()})
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"mmalign": meta})
    tmp.replace(path)
    return path


def _build(algo: str, env_id: str, policy_kwargs: dict[str, Any]) -> Any:
    import gymnasium

    import mmalign.envs  # noqa: F401  (registers the mmalign/ ids)

    cls = _algo_class(algo)
    extra = {"buffer_size": 1} if algo in ("SAC", "TD3") else {}  # a loaded policy needs no replay buffer
    return cls("MlpPolicy", gymnasium.make(env_id), policy_kwargs=policy_kwargs, device="cpu", verbose=0, **extra)


def _load_into(model: Any, state: dict[str, torch.Tensor], path: Path) -> Any:
    try:
        model.policy.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path} does not fit a {type(model).__name__} policy for this env: "
                         f"{str(err).splitlines()[0]}") from None
    model.policy.set_training_mode(False)
    return model


def check_policy_file(path: str | Path, *, env_id: str | None = None, algo: str | None = None) -> dict[str, Any]:
    """Read and check the JSON header of a file written by :func:`save_sb3_policy`; return it (nothing is built)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"policy file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get("mmalign")
        meta = json.loads(raw) if raw else {}
    except Exception as err:  # SafetensorError (0-byte, corrupt header), JSONDecodeError
        raise ValueError(f"policy file {path} is not a readable safetensors policy ({type(err).__name__}: {err})") \
            from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"policy file {path} must carry format {FORMAT!r} in its header (written by "
                         f"mmalign.robotics.sb3_io.save_sb3_policy), got {meta.get('format') if isinstance(meta, dict) else meta!r}")
    if algo is not None and meta.get("algo") != algo:
        raise ValueError(f"policy file {path} holds a {meta.get('algo')} policy, expected {algo}")
    if env_id is not None and meta.get("env_id") != env_id:
        raise ValueError(f"policy file {path} was trained on {meta.get('env_id')!r}, not {env_id!r}")
    if not isinstance(meta.get("policy_kwargs"), dict):
        raise ValueError(f"policy file {path}: policy_kwargs must be a mapping, got {meta.get('policy_kwargs')!r}")
    return meta


def load_sb3_policy(path: str | Path, *, env_id: str | None = None, algo: str | None = None) -> Any:
    """Build a fresh SB3 model from the header of ``path`` and load its weights (see :func:`save_sb3_policy`)."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = check_policy_file(path, env_id=env_id, algo=algo)
    model = _build(meta["algo"], meta["env_id"], meta["policy_kwargs"])
    try:
        state = load_file(str(path))
    except Exception as err:  # a truncated file can keep an intact header
        raise ValueError(f"policy file {path} is truncated or corrupt ({type(err).__name__}: {err})") from None
    return _load_into(model, state, path)


def read_sb3_zip(path: str | Path, *, env_id: str, algo: str) -> Any:
    """Load an SB3 ``.zip`` without unpickling: JSON ``data`` (pickled values skipped), tensors-only ``policy.pth``.

    The model is rebuilt for ``env_id`` with the zip's ``policy_kwargs`` (refused when SB3 had to pickle them, e.g.
    a custom activation class).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SB3 file not found: {path}")
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            if "policy.pth" not in names:
                raise ValueError(f"{path} is not an SB3 model zip: it has no policy.pth entry (entries: "
                                 f"{sorted(names)[:8]})")
            data = json.loads(archive.read("data").decode()) if "data" in names else {}
            policy_bytes = archive.read("policy.pth")
    except (zipfile.BadZipFile, OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a readable SB3 model zip ({type(err).__name__}: {err})") from None
    kwargs = data.get("policy_kwargs", {}) if isinstance(data, dict) else {}
    if isinstance(kwargs, dict) and ":serialized:" in kwargs:
        raise ValueError(f"{path}: the policy_kwargs in its 'data' entry are pickled, which is not read here (it "
                         f"could run code); save the policy with mmalign.robotics.sb3_io.save_sb3_policy, or set "
                         f"allow_pickle=true if you trust this file")
    if not isinstance(kwargs, dict):
        raise ValueError(f"{path}: policy_kwargs in 'data' must be a mapping, got {kwargs!r}")
    try:
        state = torch.load(io.BytesIO(policy_bytes), map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for any global beyond tensors and plain containers
        raise ValueError(f"{path}: policy.pth holds pickled objects that are not plain tensors; refused (it could "
                         f"run code). Set allow_pickle=true only for a file you trust "
                         f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path}: policy.pth must hold a state dict of tensors")
    return _load_into(_build(algo, env_id, kwargs), state, path)


def load_sb3_any(path: str | Path, *, env_id: str, algo: str, allow_pickle: bool = False) -> Any:
    """Load a policy from an mmalign ``.safetensors`` policy file or an SB3 ``.zip`` (safely unless ``allow_pickle``)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_sb3_policy(path, env_id=env_id, algo=algo)
    if path.suffix != ".zip":
        raise ValueError(f"{path}: expected a .safetensors policy (mmalign) or an SB3 .zip, got a {path.suffix or 'file without suffix'}")
    if not allow_pickle:
        return read_sb3_zip(path, env_id=env_id, algo=algo)
    warnings.warn(f"allow_pickle=true: loading {path} with stable-baselines3's own loader, which unpickles the file "
                  f"and can run any code it contains; use it only for files you trust", stacklevel=2)
    if not path.is_file():
        raise FileNotFoundError(f"SB3 file not found: {path}")
    return _algo_class(algo).load(path, device="cpu")
