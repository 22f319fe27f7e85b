"""A LoRA run's frozen base (names and fingerprint) and a run's final ``model.safetensors``.

A LoRA run's checkpoints and final weights leave the frozen base out: at a 7B base megabytes of adapters instead of
gigabytes of base weights, every ``save_every``. What is left out is named and fingerprinted (:class:`FrozenBase`), so
a resumed run, or a model the final weights are loaded into, must be that base, or the file is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mmalign.train.checkpoint_files import CheckpointError

if TYPE_CHECKING:
    from mmalign.train.checkpoint import CheckpointContents

__all__ = ["FrozenBase", "frozen_base", "omitted_tensors", "FROZEN_BASE_KEY", "save_run_weights", "load_run_weights"]


@dataclass(frozen=True)
class FrozenBase:
    """The frozen parameters of a LoRA run (state-dict names) and a fingerprint of their values.

    A LoRA run's checkpoints leave these out (at a 7B base: megabytes of adapters instead of gigabytes of base
    weights, every ``save_every``); a resumed run rebuilds its base the way it first did and must match the
    fingerprint, or the checkpoint is refused.
    """

    names: frozenset[str]
    fingerprint: str

    def record(self) -> dict[str, Any]:
        """What a checkpoint's ``trainer_state.json`` keeps of it (``frozen_base``), checked by
        :func:`omitted_tensors` on resume."""
        return {"fingerprint": self.fingerprint, "tensors": len(self.names)}


def frozen_base(model: torch.nn.Module) -> FrozenBase | None:
    """Names and fingerprint of ``model``'s frozen parameters (None if it has none).

    The fingerprint hashes each tensor's name, shape, dtype and up to 1,024 evenly strided values, bitwise: it does
    not depend on summation order, threads or device, and two different bases (other pretrained weights, another
    init) differ in it; a change to a few isolated weights could go unseen."""
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    state = model.state_dict(keep_vars=True)
    names = sorted(k for k, v in state.items() if id(v) in frozen)
    if not names:
        return None
    digest = hashlib.sha256()
    with torch.no_grad():
        for name in names:
            flat = state[name].detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 1024)][:1024].cpu().contiguous()
            digest.update(f"{name}|{tuple(state[name].shape)}|{state[name].dtype}|".encode())
            digest.update(sample.view(torch.uint8).numpy().tobytes() if sample.numel() else b"")
    return FrozenBase(frozenset(names), digest.hexdigest()[:16])


def omitted_tensors(contents: "CheckpointContents", frozen: FrozenBase | None) -> frozenset[str]:
    """The state-dict names a checkpoint left out (a LoRA run's frozen base), after checking that ``frozen`` (this
    run's base) is the one it was trained on; empty for a checkpoint that holds every tensor."""
    saved = contents.state.get("frozen_base")
    if saved is None:
        return frozenset()
    path = contents.path / "model.safetensors"
    if frozen is None:
        raise CheckpointError(f"{path} holds only the trained weights of a LoRA run, not its frozen base; this run "
                              "has no frozen base to complete them (resume with the run's trainer.lora settings)")
    if saved != frozen.record():
        raise CheckpointError(
            f"{path} holds only the trained weights of a LoRA run; this run's frozen base weights are not the ones "
            f"it was trained on ({len(frozen.names)} tensors, fingerprint {frozen.fingerprint} vs "
            f"{saved.get('tensors')} tensors, {saved.get('fingerprint')}): resume on the same base model")
    return frozen.names


FROZEN_BASE_KEY = "mmalign.frozen_base"  # safetensors metadata of a LoRA run's final weights: FrozenBase.record()


def save_run_weights(path: Path, tensors: dict[str, torch.Tensor], frozen: FrozenBase | None = None) -> None:
    """Write a run's final ``model.safetensors`` atomically: every tensor, or for a LoRA run (``frozen``) only the
    trained ones, with the frozen base's record in the file's metadata so :func:`load_run_weights` can check it."""
    from safetensors.torch import save_file

    meta = {FROZEN_BASE_KEY: json.dumps(frozen.record(), sort_keys=True)} if frozen is not None else None
    kept = {k: v.detach().contiguous().cpu() for k, v in tensors.items() if frozen is None or k not in frozen.names}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(kept, str(tmp), metadata=meta)
    tmp.replace(path)


def load_run_weights(model: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """Load a run's final ``model.safetensors`` into ``model`` in place and return it.

    A full-weight run's file must match ``model``'s state dict exactly. A LoRA run's holds only the trained tensors
    (adapters under peft's names) and a fingerprint of the frozen base it was trained on: ``model`` must be that base
    wrapped with the same LoRA settings (e.g. ``add_lora(base, ...)``); its frozen weights are checked against the
    fingerprint and kept, the trained ones replaced. Anything else raises ``ValueError`` naming the file. For the
    tools outside mmalign, use the run's artifacts instead (a PEFT adapter folder, a diffusers ``lora/`` folder).
    """
    from safetensors import safe_open

    from mmalign.fileio import read_safetensors

    p = Path(path)
    tensors = read_safetensors(p, "run weights")
    with safe_open(str(p), framework="pt") as f:
        saved = (f.metadata() or {}).get(FROZEN_BASE_KEY)
    expected = set(model.state_dict())
    if saved is not None:
        frozen = frozen_base(model)
        record = json.loads(saved)
        if frozen is None or frozen.record() != record:
            got = f"{len(frozen.names)} tensors, fingerprint {frozen.fingerprint}" if frozen else "no frozen weights"
            raise ValueError(
                f"{str(p)!r} holds the trained weights of a LoRA run only; the model given is not the base it was "
                f"trained on, wrapped with the same LoRA settings ({got} vs {record.get('tensors')} tensors, "
                f"{record.get('fingerprint')}): build the run's base model and add its LoRA first")
        expected -= frozen.names
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ValueError(f"{str(p)!r} does not match the model: missing {missing[:5]} ({len(missing)}), "
                         f"unexpected {unexpected[:5]} ({len(unexpected)})")
    model.load_state_dict(tensors, strict=False)
    return model
