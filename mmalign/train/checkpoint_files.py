"""The files of a checkpoint folder: durable writes, checked reads, SHA-256 manifest, optimizer and RNG state.

Every reader raises :class:`CheckpointError` naming the file. The manifest (``manifest.json``, written last) records
each file's byte size and SHA-256; :func:`verify_manifest` checks that every listed file exists with its size and
that the files this process reads hash to the recorded digests, so a modified tensor file is refused instead of
resuming with different weights. Manifests of older checkpoints hold sizes only and are checked for sizes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from mmalign.train.errors import CheckpointError

MANIFEST = "manifest.json"
_HASH_CHUNK = 1 << 20


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


def _optimizer_to_files(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
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


def _cuda_rng_states(tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The ``torch_cuda_<i>`` states in device order (numeric: 2 before 10)."""
    keys = [k for k in tensors if k.startswith("torch_cuda_")]
    return [tensors[k] for k in sorted(keys, key=lambda k: int(k[len("torch_cuda_"):]))]


def _set_rng_state(
    tensors: dict[str, torch.Tensor], meta: dict[str, Any], generators: dict[str, torch.Generator] | None = None
) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    for name, gen in (generators or {}).items():
        key = f"generator.{name}"
        if key not in tensors:
            raise CheckpointError(f"checkpoint holds no state for the random generator {name!r}")
        gen.set_state(tensors[key])
    cuda = _cuda_rng_states(tensors)
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    n = meta["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = meta["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """Record size and SHA-256 of every file in ``folder`` (call once every other file is written and flushed)."""
    entries = {p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)}
               for p in sorted(folder.iterdir()) if p.name != MANIFEST}
    _write_json(folder / MANIFEST, entries)


def verify_manifest(folder: Path, hashed: Iterable[str] = ()) -> None:
    """Every file the manifest lists exists with its size; the ``hashed`` ones also match their SHA-256.

    Each process hashes only what it reads (its own RNG files, the model and optimizer where it loads them), so a
    damaged file is reported by the process that would have used it.
    """
    manifest = _read_json(folder / MANIFEST)
    if not isinstance(manifest, dict):
        raise CheckpointError(f"checkpoint file {folder / MANIFEST} is malformed: expected a mapping of file names")
    for name, entry in manifest.items():
        f = folder / name
        size, digest = (entry.get("size"), entry.get("sha256")) if isinstance(entry, dict) else (entry, None)
        if not f.is_file():
            raise CheckpointError(f"checkpoint file missing: {f}")
        if f.stat().st_size != size:
            raise CheckpointError(
                f"checkpoint file {f} is truncated or was modified: {f.stat().st_size} bytes, manifest says {size}"
            )
        if digest is not None and name in set(hashed):
            actual = file_sha256(f)
            if actual != digest:
                raise CheckpointError(
                    f"checkpoint file {f} is corrupt or truncated: its SHA-256 {actual[:16]}... differs from the "
                    f"manifest's {str(digest)[:16]}... (the file changed after the checkpoint was written); "
                    f"resume from another checkpoint or start a new run"
                )
