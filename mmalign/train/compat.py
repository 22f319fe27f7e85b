"""What a launch and a resume must keep: the LR schedule, the settings fingerprint, refused launch modes.

A checkpoint records a fingerprint of the training settings that determine the trajectory; a resume with other
values is refused, except for settings that do not change it (logging, saving, sharding, how the global batch is
split over processes) and ``max_steps`` as long as the LR schedule of the steps already taken is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Callable

from mmalign.train.checkpoint import CheckpointError
from mmalign.train.config import TrainerConfig

__all__ = ["process_state", "check_launch", "_lr_lambda", "_fingerprint", "_legacy_fingerprint", "_check_max_steps"]


def _lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


# settings that do not change the trajectory, so a run may be resumed with other values (max_steps: unless the LR
# schedule depends on it, which _check_max_steps refuses on resume; optimizer_in_backward: the same updates, stepped
# inside backward; gradient_checkpointing: the same activations, recomputed)
_FREE = {"max_steps", "progress", "plots", "save_every", "eval_every", "log_every", "keep_checkpoints",
         "optimizer_in_backward", "gradient_checkpointing"}
_SHARDING = {"distributed", "fsdp_wrap", "zero_stage", "zero_offload_optimizer"}


def _fingerprint(cfg: TrainerConfig, world_size: int) -> str:
    """Hash of the settings a resume must keep; the data order depends on the global batch, not on how it is split."""
    keep = {k: v for k, v in cfg.to_dict().items()
            if k not in _FREE | _SHARDING | {"batch_size", "grad_accum_steps"}}
    keep["global_batch"] = cfg.batch_size * cfg.grad_accum_steps * world_size
    return "g-" + hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def _legacy_fingerprint(cfg: TrainerConfig) -> str:
    """The fingerprint of checkpoints written before the global-batch form (per-process batch settings)."""
    keep = {k: v for k, v in cfg.to_dict().items() if k not in _FREE | _SHARDING}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def process_state(cpu: bool = False) -> Any:
    """accelerate's process state (``PartialState``), created the way the trainer needs it.

    accelerate keeps one state per process, set by whichever call creates it first. On a machine without a GPU it
    joins a torchrun/gloo process group only when created with ``cpu=True``; created without, every process reads
    itself as the only one (rank 0 of 1), and a later ``Accelerator(cpu=True)`` silently reuses that state. Every
    mmalign call site therefore goes through this function (``cpu``: the config's ``trainer.cpu``).
    """
    import torch
    from accelerate import PartialState

    has_accel = torch.cuda.is_available() or (
        getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    )
    state = PartialState(cpu=cpu or not has_accel)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if state.num_processes != launched:
        raise RuntimeError(
            f"launched on {launched} processes (WORLD_SIZE) but accelerate's process state sees "
            f"{state.num_processes}: it was created earlier in this process without cpu=True on a machine without a "
            f"GPU; create it through mmalign.train.compat.process_state() (or Accelerator(cpu=True)) first"
        )
    return state


def check_launch(cfg: TrainerConfig, distributed_type: str) -> None:
    """Refuse accelerate launch modes whose sharded state these checkpoints cannot hold, before any work starts.

    accelerate's FSDP and DeepSpeed plugins would wrap the model and optimizer themselves and save their state only
    through ``accelerator.save_state``, as pickled files (against the project's no-pickle rule). The trainer applies
    both itself instead (``trainer.distributed=fsdp`` / ``deepspeed``), with consolidated safetensors checkpoints.
    """
    if distributed_type in {"FSDP", "DEEPSPEED", "MEGATRON_LM"}:
        raise ValueError(
            f"accelerate launch configured {distributed_type}, whose plugin saves its sharded model/optimizer state "
            f"only as pickle files; launch without the FSDP/DeepSpeed plugin (torchrun or plain accelerate launch) "
            f"and set trainer.distributed=fsdp (torch FSDP2) or trainer.distributed=deepspeed (ZeRO, "
            f"trainer.zero_stage) instead (got distributed={cfg.distributed!r})"
        )


def _check_max_steps(cfg: TrainerConfig, saved: Any, step: int, path: Path) -> None:
    """Refuse a resume whose ``max_steps`` changes a learning rate the checkpointed steps already used.

    The LR of each step ``s <= step`` (the checkpoint's optimizer holds the one for ``step``) must be the same under
    the saved and the new ``max_steps``; only then does the resumed run follow an uninterrupted run with the new value.
    A constant schedule (with or without warmup) never depends on it; linear and cosine decay do once past warmup.
    """
    if saved is None or int(saved) == cfg.max_steps or cfg.lr_schedule == "constant":
        return
    old = _lr_lambda(cfg.lr_schedule, cfg.warmup_steps, int(saved))
    new = _lr_lambda(cfg.lr_schedule, cfg.warmup_steps, cfg.max_steps)
    changed = next((s for s in range(step + 1) if old(s) != new(s)), None)
    if changed is not None:
        raise CheckpointError(
            f"{path} was written by a run with max_steps={int(saved)}; resuming with max_steps={cfg.max_steps} "
            f"would change the learning rate the {cfg.lr_schedule!r} schedule gave step {changed} "
            f"({old(changed):.6g} vs {new(changed):.6g} x lr), so the run would follow neither trajectory; resume "
            f"with max_steps={int(saved)}, or start a new run"
        )
