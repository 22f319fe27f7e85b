"""Pickled payloads that create a marker file when unpickled, planted in files of every kind a job may read.

Used by the no-pickle tests: if any loader unpickles one of these files, the marker appears.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import zipfile
from pathlib import Path


class Payload:
    """Unpickling this object calls ``Path(marker).touch()``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (Path(self.marker),))


def payload_bytes(marker: Path) -> bytes:
    return pickle.dumps(Payload(marker))


def torch_pickle_bytes(marker: Path) -> bytes:
    """A file in torch.save's zip format whose data.pkl holds the payload (what a .pt/.pth/.bin may hold)."""
    import torch

    buf = io.BytesIO()
    torch.save({"weight": Payload(marker)}, buf)
    return buf.getvalue()


def sb3_zip_bytes(marker: Path) -> bytes:
    """An SB3-style model zip: ``data`` JSON with a cloudpickled (``:serialized:``) value, ``policy.pth`` pickled."""
    buf = io.BytesIO()
    serialized = base64.b64encode(payload_bytes(marker)).decode()
    data = {"observation_space": {":type:": "<class 'gymnasium.spaces.box.Box'>", ":serialized:": serialized},
            "policy_kwargs": {"net_arch": [64, 64]}}
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("data", json.dumps(data))
        zf.writestr("policy.pth", torch_pickle_bytes(marker))
        zf.writestr("pytorch_variables.pth", torch_pickle_bytes(marker))
        zf.writestr("_stable_baselines3_version", "2.9.2")
    return buf.getvalue()


def plant(folder: Path, marker: Path) -> dict[str, Path]:
    """Write the payload as every file kind a path option may name; returns {kind: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    raw, torch_bytes = payload_bytes(marker), torch_pickle_bytes(marker)
    files = {
        "pkl": ("payload.pkl", raw),
        "pt": ("payload.pt", torch_bytes),
        "pth": ("payload.pth", torch_bytes),
        "bin": ("pytorch_model.bin", torch_bytes),
        "safetensors": ("payload.safetensors", raw),
        "npz": ("payload.npz", raw),
        "jsonl": ("payload.jsonl", raw),
        "zip": ("payload.zip", sb3_zip_bytes(marker)),
    }
    out = {}
    for kind, (name, data) in files.items():
        (folder / name).write_bytes(data)
        out[kind] = folder / name
    # a folder that looks like a model / pipeline folder whose weights are pickled
    model_dir = folder / "model_dir"
    for sub in ("", "unet"):
        d = model_dir / sub
        d.mkdir(parents=True, exist_ok=True)
        (d / "pytorch_model.bin").write_bytes(torch_bytes)
        (d / "diffusion_pytorch_model.bin").write_bytes(torch_bytes)
        (d / "config.json").write_text("{}")
    out["dir"] = model_dir
    return out
