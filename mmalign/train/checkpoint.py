"""Atomic, resumable checkpoints in safetensors + JSON (no pickle).

Layout of ``<run_dir>/checkpoints/``::

    step-00000100/          one complete checkpoint
        model.safetensors       model weights (main process)
        optimizer.safetensors   optimizer tensors, keyed ``state.<param index>.<name>``
        optimizer.json          optimizer param groups and non-tensor state
        scheduler.json          LR scheduler state
        rng-<rank>.safetensors  torch CPU/CUDA RNG states of each process
        rng-<rank>.json         python and numpy RNG states of each process
        trainer_state.json      step, data position, config fingerprint
        manifest.json           byte size of every file above (written last)
    latest                  name of the newest complete checkpoint

A checkpoint is written into ``step-<8-digit step>.tmp`` and renamed into place only when every file is flushed;
``latest`` is replaced atomically afterwards. A crash at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "atomic_write_text"]

MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, truncated or corrupt; the message names the file."""


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as fh:
        json.dump(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises several error types for truncated/corrupt files
        raise CheckpointError(f"checkpoint file {path} is corrupt or truncated ({type(err).__name__}: {err})") from None


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"checkpoint file {path} is corrupt or truncated ({err})") from None


def model_state_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with tied/shared storages de-duplicated by cloning (safetensors refuses shared storage)."""
    out: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for name, tensor in model.state_dict().items():
        ptr = tensor.untyped_storage().data_ptr() if tensor.numel() else -1
        out[name] = tensor.clone() if (ptr in seen and ptr != -1) else tensor
        seen.setdefault(ptr, name)
    return out


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for idx, values in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_state(generators: dict[str, torch.Generator] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    for name, gen in (generators or {}).items():
        tensors[f"generator.{name}"] = gen.get_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    np_state = np.random.get_state()
    py_state = random.getstate()
    meta = {
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    return tensors, meta


def _set_rng_state(
    tensors: dict[str, torch.Tensor], meta: dict[str, Any], generators: dict[str, torch.Generator] | None = None
) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    for name, gen in (generators or {}).items():
        key = f"generator.{name}"
        if key not in tensors:
            raise CheckpointError(f"checkpoint holds no state for the random generator {name!r}")
        gen.set_state(tensors[key])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    n = meta["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = meta["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def save_checkpoint(
    root: Path,
    step: int,
    *,
    model_tensors: dict[str, torch.Tensor] | None,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    trainer_state: dict[str, Any],
    rank: int = 0,
    world_size: int = 1,
    barrier: Any = None,
    keep: int = 2,
    generators: dict[str, torch.Generator] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically under ``root`` and return its final folder.

    Every process writes its own RNG files; the main process (rank 0) writes model, optimizer, scheduler and state,
    renames the folder into place and updates ``latest``. ``barrier`` (e.g. ``accelerator.wait_for_everyone``)
    synchronises processes in a distributed run. ``generators`` are extra random streams (e.g. a loss's noise
    generator) saved with each process's RNG states.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f"step-{step:08d}.tmp"
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    if barrier is not None:
        barrier()
    rng_t, rng_meta = _rng_state(generators)
    _save_tensors(tmp / f"rng-{rank}.safetensors", rng_t)
    _write_json(tmp / f"rng-{rank}.json", rng_meta)
    if rank == 0:
        if model_tensors is not None:
            _save_tensors(tmp / "model.safetensors", model_tensors)
        if optimizer is not None:
            opt_t, opt_meta = _optimizer_to_files(optimizer)
            _save_tensors(tmp / "optimizer.safetensors", opt_t)
            _write_json(tmp / "optimizer.json", opt_meta)
        if scheduler is not None:
            _write_json(tmp / "scheduler.json", scheduler.state_dict())
        _write_json(tmp / "trainer_state.json", {**trainer_state, "step": step, "world_size": world_size})
    if barrier is not None:
        barrier()
    if rank == 0:
        sizes = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        _write_json(tmp / MANIFEST, sizes)
        _fsync_dir(tmp)
        if final.exists():  # a checkpoint of the same step from an earlier, resumed run: replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        atomic_write_text(root / "latest", final.name)
        complete = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in complete[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    if barrier is not None:
        barrier()
    return final


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (following ``latest``), or None when there is none."""
    root = Path(root)
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"{pointer} names {path.name}, which does not exist")
    return path


def _verify_manifest(path: Path) -> None:
    manifest = _read_json(path / MANIFEST)
    for name, size in manifest.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint file missing: {f}")
        if f.stat().st_size != size:
            raise CheckpointError(
                f"checkpoint file {f} is truncated or was modified: {f.stat().st_size} bytes, manifest says {size}"
            )


def load_checkpoint(
    path: Path,
    *,
    model: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    rank: int = 0,
    generators: dict[str, torch.Generator] | None = None,
) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and this process's RNG states (and ``generators``); return the state."""
    path = Path(path)
    _verify_manifest(path)
    state = _read_json(path / "trainer_state.json")
    if model is not None:
        tensors = _load_tensors(path / "model.safetensors")
        try:
            missing, unexpected = model.load_state_dict(tensors, strict=False)
        except RuntimeError as err:  # shape mismatches
            raise CheckpointError(f"{path / 'model.safetensors'} does not match the model: {err}") from None
        # tied weights are stored once per name, so nothing may be missing
        if missing or unexpected:
            raise CheckpointError(
                f"{path / 'model.safetensors'} does not match the model: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
    if optimizer is not None:
        opt = _optimizer_from_files(_load_tensors(path / "optimizer.safetensors"), _read_json(path / "optimizer.json"))
        try:
            optimizer.load_state_dict(opt)
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"{path / 'optimizer.json'} does not match the optimizer: {err}") from None
    if scheduler is not None:
        scheduler.load_state_dict(_read_json(path / "scheduler.json"))
    rank_file = path / f"rng-{rank}.safetensors"
    if not rank_file.is_file():
        rank_file = path / "rng-0.safetensors"  # resumed on more processes than saved: reuse rank 0's stream
    meta_file = rank_file.with_suffix(".json")
    _set_rng_state(_load_tensors(rank_file), _read_json(meta_file), generators)
    return state
