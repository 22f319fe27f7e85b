"""Atomic, resumable checkpoints in safetensors + JSON (no pickle).

Layout of ``<run_dir>/checkpoints/``::

    step-00000100/          one complete checkpoint
        model.safetensors       model weights (main process); a LoRA run's without its frozen base (the run's
                                final model.safetensors too: see save_run_weights)
        optimizer.safetensors   optimizer tensors, keyed ``state.<param index>.<name>``
        optimizer.json          optimizer param groups, non-tensor state and parameter names by index
        scheduler.json          LR scheduler state
        scaler.json             fp16 loss-scaler state (scale, growth tracker, growth/backoff settings), if any
        rng-<rank>.safetensors  torch CPU/CUDA RNG states of each process
        rng-<rank>.json         python and numpy RNG states of each process
        trainer_state.json      step, data position, config fingerprint (+ the frozen base's, see FrozenBase)
        manifest.json           byte size and SHA-256 of every file above (written last, checked on load)
    latest                  name of the newest complete checkpoint

A checkpoint is written into ``step-<8-digit step>.tmp`` and renamed into place only when every file is flushed;
``latest`` is replaced atomically afterwards. A crash at any moment leaves the previous checkpoint intact. A step
whose folder already exists (written by an earlier start of the run) is replaced without a moment in which it is
missing: the old folder is renamed to ``step-<step>.replaced``, the new one renamed in, ``latest`` updated, and only
then the old one deleted; :func:`latest_checkpoint` falls back to the ``.replaced`` folder and the next save finishes
or rolls back an interrupted replacement. Rotation (``keep``) only deletes checkpoints of earlier steps than the one
just written; folders of later steps (left by an earlier run in the same folder) are kept and reported.

The format is consolidated: a run sharded with FSDP gathers its full model and optimizer state to rank 0 before
writing (:mod:`mmalign.train.fsdp`), so any checkpoint loads into a 1-process, DDP or FSDP run alike. Loading reads
and checks every file first and applies nothing until all of them are good.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection

import torch

from mmalign.fileio import atomic_write_text
from mmalign.train.checkpoint_files import (
    MANIFEST,  # noqa: F401  (re-exported)
    CheckpointError,
    _cuda_rng_states,  # noqa: F401  (re-exported for tests)
    _fsync_dir,
    _load_tensors,
    _optimizer_from_files,
    _optimizer_to_files,
    _read_json,
    _rng_state,
    _save_tensors,
    _set_rng_state,
    _write_json,
    verify_manifest,
    write_manifest,
)
from mmalign.train.run_weights import (  # noqa: F401  (re-exported: a LoRA run's frozen base, a run's final weights)
    FROZEN_BASE_KEY,
    FrozenBase,
    frozen_base,
    load_run_weights,
    omitted_tensors,
    save_run_weights,
)

__all__ = [
    "CheckpointError",
    "CheckpointContents",
    "save_checkpoint",
    "load_checkpoint",
    "read_checkpoint",
    "check_matches",
    "apply_checkpoint",
    "latest_checkpoint",
    "atomic_write_text",
    "model_state_tensors",
    "unshare_tensors",
]

SCALER = "scaler.json"
_SCALER_KEYS = {"scale": float, "growth_factor": float, "backoff_factor": float, "growth_interval": int,
                "_growth_tracker": int}
_KIND_NAMES = {float: "a number", int: "an integer"}
_REPLACED = ".replaced"  # suffix of a complete checkpoint folder moved aside while its step is written anew
_STEP_DIR = re.compile(r"step-(\d+)")


def model_state_tensors(model: torch.nn.Module, skip: Collection[str] = ()) -> dict[str, torch.Tensor]:
    """State dict (without the names in ``skip``) with tied/shared storages de-duplicated by cloning (safetensors
    refuses shared storage)."""
    return unshare_tensors(model.state_dict(), skip)


def unshare_tensors(state: dict[str, torch.Tensor], skip: Collection[str] = ()) -> dict[str, torch.Tensor]:
    """``state`` without the names in ``skip``, every tensor whose storage an earlier entry already uses cloned (tied
    weights appear under each name)."""
    out: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for name, tensor in state.items():
        if name in skip:
            continue
        ptr = tensor.untyped_storage().data_ptr() if tensor.numel() else -1
        out[name] = tensor.clone() if (ptr in seen and ptr != -1) else tensor
        seen.setdefault(ptr, name)
    return out


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
    optimizer_state: dict[str, Any] | None = None,
    param_names: list[str] | None = None,
    scaler: Any | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically under ``root`` and return its final folder.

    Every process writes its own RNG files; the main process (rank 0) writes model, optimizer, scheduler and state,
    renames the folder into place and updates ``latest``. ``barrier`` (e.g. ``accelerator.wait_for_everyone``)
    synchronises processes in a distributed run. ``generators`` are extra random streams (e.g. a loss's noise
    generator) saved with each process's RNG states. ``optimizer_state`` is an index-keyed optimizer state dict
    used instead of ``optimizer.state_dict()`` (a sharded run passes the state gathered in full);
    ``param_names`` names the optimizer's parameters by index, so loading can check they still match. ``scaler`` is
    the fp16 loss scaler (``torch.amp.GradScaler``, e.g. ``accelerator.scaler``); a disabled one writes nothing.
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
        if optimizer_state is None and optimizer is not None:
            optimizer_state = optimizer.state_dict()
        if optimizer_state is not None:
            opt_t, opt_meta = _optimizer_to_files(optimizer_state)
            if param_names is not None:
                opt_meta["param_names"] = list(param_names)
            _save_tensors(tmp / "optimizer.safetensors", opt_t)
            _write_json(tmp / "optimizer.json", opt_meta)
        if scheduler is not None:
            _write_json(tmp / "scheduler.json", scheduler.state_dict())
        scaler_state = scaler.state_dict() if scaler is not None else {}
        if scaler_state:  # {} when the scaler is disabled
            _write_json(tmp / SCALER, scaler_state)
        _write_json(tmp / "trainer_state.json", {**trainer_state, "step": step, "world_size": world_size})
    if barrier is not None:
        barrier()
    if rank == 0:
        write_manifest(tmp)
        _fsync_dir(tmp)
        _finish_replacements(root)
        aside = final.with_name(final.name + _REPLACED)
        if final.exists():
            # a checkpoint of the same step from an earlier start of the run: keep it complete (aside) until the new
            # one is in place and ``latest`` names it, so a crash at any moment leaves a loadable checkpoint
            os.replace(final, aside)
            _fsync_dir(root)
        os.replace(tmp, final)
        _fsync_dir(root)
        atomic_write_text(root / "latest", final.name)
        if aside.exists():
            shutil.rmtree(aside)
        _rotate(root, step, keep)
    if barrier is not None:
        barrier()
    return final


def _step_dirs(root: Path) -> dict[int, Path]:
    """Complete checkpoint folders under ``root`` by step (``.tmp`` and ``.replaced`` folders excluded)."""
    out: dict[int, Path] = {}
    for p in root.iterdir():
        match = _STEP_DIR.fullmatch(p.name)
        if match and p.is_dir():
            out[int(match.group(1))] = p
    return out


def _finish_replacements(root: Path) -> None:
    """Complete or roll back replacements a crash interrupted (main process, before writing a checkpoint).

    ``step-N.replaced`` next to ``step-N``: the new folder was in place, so the old one goes. Alone: the crash came
    before the new folder was renamed in, so the old one is renamed back and remains the checkpoint of step N.
    """
    for aside in sorted(root.glob(f"step-*{_REPLACED}")):
        final = aside.with_name(aside.name[: -len(_REPLACED)])
        if final.is_dir():
            shutil.rmtree(aside)
        else:
            os.replace(aside, final)
            _fsync_dir(root)


def _rotate(root: Path, step: int, keep: int) -> None:
    """Keep the ``keep`` newest checkpoints up to ``step`` (the one just written counts); never touch later ones."""
    dirs = _step_dirs(root)
    older = sorted(s for s in dirs if s < step)
    for s in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(dirs[s], ignore_errors=True)
    later = sorted(dirs[s].name for s in dirs if s > step)
    if later:
        warnings.warn(
            f"{root} holds checkpoints of later steps than the one just written ({later}), left by an earlier run in "
            f"this folder; they are kept, not rotated, and `latest` names {dirs[step].name}. Delete them if unneeded",
            stacklevel=3,
        )


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (following ``latest``), or None when there is none.

    When a save replacing that step was interrupted after the old folder was moved aside, the aside folder
    (``step-N.replaced``, still complete) is returned.
    """
    root = Path(root)
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not path.is_dir():
        aside = path.with_name(path.name + _REPLACED)
        if aside.is_dir():
            return aside
        raise CheckpointError(f"{pointer} names {path.name}, which does not exist")
    return path


@dataclass
class CheckpointContents:
    """Everything read (and checked) from one checkpoint folder, before anything is applied."""

    path: Path
    state: dict[str, Any]
    model_tensors: dict[str, torch.Tensor] | None = None
    optimizer_state: dict[str, Any] | None = None
    param_names: list[str] | None = None
    scheduler_state: dict[str, Any] | None = None
    scaler_state: dict[str, Any] | None = None
    rng_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    rng_meta: dict[str, Any] = field(default_factory=dict)


def read_checkpoint(path: Path, *, model: bool = True, optimizer: bool = True, scheduler: bool = True,
                    rank: int = 0, scaler: bool = True) -> CheckpointContents:
    """Verify the manifest and read the requested parts and this process's RNG files; errors name the file.

    The loss-scaler state is read when the checkpoint holds one (only runs with an fp16 loss scaler write it).
    """
    path = Path(path)
    rank_file = path / f"rng-{rank}.safetensors"
    if not rank_file.is_file():
        rank_file = path / "rng-0.safetensors"  # resumed on more processes than saved: reuse rank 0's stream
    reads = ["trainer_state.json", rank_file.name, rank_file.with_suffix(".json").name]
    reads += ["model.safetensors"] * model + ["optimizer.safetensors", "optimizer.json"] * optimizer
    reads += ["scheduler.json"] * scheduler + [SCALER] * scaler
    verify_manifest(path, hashed=reads)
    out = CheckpointContents(path=path, state=_read_json(path / "trainer_state.json"))
    if model:
        out.model_tensors = _load_tensors(path / "model.safetensors")
    if optimizer:
        meta = _read_json(path / "optimizer.json")
        try:
            out.optimizer_state = _optimizer_from_files(_load_tensors(path / "optimizer.safetensors"), meta)
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path / 'optimizer.json'} is malformed ({type(err).__name__}: {err})") from None
        out.param_names = meta.get("param_names")
    if scheduler:
        out.scheduler_state = _read_json(path / "scheduler.json")
    if scaler and (path / SCALER).is_file():
        out.scaler_state = _read_scaler(path / SCALER)
    out.rng_tensors = _load_tensors(rank_file)
    out.rng_meta = _read_json(rank_file.with_suffix(".json"))
    return out


def _read_scaler(path: Path) -> dict[str, Any]:
    state = _read_json(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint file {path} is malformed: expected the loss-scaler settings, got {state!r}")
    for key, kind in _SCALER_KEYS.items():
        value = state.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, kind)):
            raise CheckpointError(f"checkpoint file {path} is malformed: {key!r} must be {_KIND_NAMES[kind]}, "
                                  f"got {value!r}")
    return state


def check_matches(contents: CheckpointContents, model: torch.nn.Module | None,
                  optimizer: torch.optim.Optimizer | None, frozen: FrozenBase | None = None) -> None:
    """Raise CheckpointError if the checkpoint's tensors do not fit ``model`` / ``optimizer`` (names and shapes);
    ``frozen``: this run's frozen base, which a LoRA run's checkpoint leaves out (see :class:`FrozenBase`)."""
    if model is not None and contents.model_tensors is not None:
        file = contents.path / "model.safetensors"
        omitted = omitted_tensors(contents, frozen)
        # tied weights are stored once per name, so nothing may be missing; sharded parameters report full shapes
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in omitted}
        got = {k: tuple(v.shape) for k, v in contents.model_tensors.items()}
        missing, unexpected = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
        if missing or unexpected:
            raise CheckpointError(
                f"{file} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        wrong = [f"{k}: {got[k]} vs model {expected[k]}" for k in expected if got[k] != expected[k]]
        if wrong:
            raise CheckpointError(f"{file} does not match the model: shape mismatch {wrong[:5]}")
    if optimizer is not None and contents.optimizer_state is not None:
        from mmalign.train.fsdp import optimizer_param_names

        file = contents.path / "optimizer.json"
        saved = [len(g["params"]) for g in contents.optimizer_state["param_groups"]]
        current = [len(g["params"]) for g in optimizer.param_groups]
        if saved != current:
            raise CheckpointError(f"{file} does not match the optimizer: parameters per group {saved}, "
                                  f"the optimizer has {current}")
        names = optimizer_param_names(model, optimizer) if model is not None else None
        if contents.param_names is not None and names is not None and contents.param_names != names:
            diff = [f"{a} vs {b}" for a, b in zip(contents.param_names, names) if a != b]
            raise CheckpointError(f"{file} does not match the optimizer: saved parameter order differs ({diff[:3]})")


def apply_checkpoint(
    contents: CheckpointContents,
    *,
    model: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    generators: dict[str, torch.Generator] | None = None,
    scaler: Any | None = None,
    frozen: FrozenBase | None = None,
) -> dict[str, Any]:
    """Load what ``read_checkpoint`` read into model, optimizer, scheduler, loss scaler and the RNGs; return the
    trainer state. A LoRA run's frozen base, left out of its checkpoints, stays as this run built it.

    A model sharded with FSDP2 receives the consolidated state through a collective scatter, so every process
    must call this together.
    """
    from mmalign.train.fsdp import is_sharded, load_full_state

    path = contents.path
    complete = not omitted_tensors(contents, frozen)  # names checked by check_matches: only the base is missing
    if is_sharded(model):
        assert model is not None
        load_full_state(model, optimizer, contents.model_tensors, contents.optimizer_state, strict=complete)
    else:
        if model is not None and contents.model_tensors is not None:
            try:
                model.load_state_dict(contents.model_tensors, strict=complete)
            except RuntimeError as err:
                raise CheckpointError(f"{path / 'model.safetensors'} does not match the model: {err}") from None
        if optimizer is not None and contents.optimizer_state is not None:
            try:
                optimizer.load_state_dict(contents.optimizer_state)
            except (ValueError, KeyError) as err:
                raise CheckpointError(f"{path / 'optimizer.json'} does not match the optimizer: {err}") from None
    if scheduler is not None and contents.scheduler_state is not None:
        scheduler.load_state_dict(contents.scheduler_state)
    if scaler is not None and contents.scaler_state is not None:
        scaler.load_state_dict(contents.scaler_state)  # a disabled scaler ignores it
    _set_rng_state(contents.rng_tensors, contents.rng_meta, generators)
    return contents.state


def load_checkpoint(
    path: Path,
    *,
    model: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    rank: int = 0,
    generators: dict[str, torch.Generator] | None = None,
    agree: Callable[[bool], bool] | None = None,
    scaler: Any | None = None,
    frozen: FrozenBase | None = None,
) -> dict[str, Any]:
    """Restore model, optimizer, scheduler, loss scaler (when the checkpoint holds its state) and this process's RNG
    states (and ``generators``); return the state.

    Everything is read and checked before anything is applied. In a distributed run pass ``agree`` (a collective
    that is True only if every process passes True, e.g. :func:`mmalign.train.fsdp.all_ranks_ok`): a process whose
    read failed raises its own error and the others raise too, instead of waiting forever in the scatter.
    """
    error: CheckpointError | None = None
    contents: CheckpointContents | None = None
    try:
        contents = read_checkpoint(path, model=model is not None, optimizer=optimizer is not None,
                                   scheduler=scheduler is not None, rank=rank, scaler=scaler is not None)
        check_matches(contents, model, optimizer, frozen)
        if generators:
            missing = [n for n in generators if f"generator.{n}" not in contents.rng_tensors]
            if missing:
                raise CheckpointError(f"checkpoint holds no state for the random generator {missing[0]!r}")
    except CheckpointError as err:
        error = err
    if agree is not None and not agree(error is None) and error is None:
        raise CheckpointError(f"another process failed to read checkpoint {path} (its error names the file)")
    if error is not None:
        raise error
    assert contents is not None
    return apply_checkpoint(contents, model=model, optimizer=optimizer, scheduler=scheduler, generators=generators,
                            scaler=scaler, frozen=frozen)
