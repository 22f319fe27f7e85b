"""DeepSpeed ZeRO (stages 1-3) in the trainer, with the same consolidated safetensors checkpoints as every other run.

``TrainerConfig.distributed = "deepspeed"`` makes the trainer wrap the model and its AdamW optimizer with
``deepspeed.initialize`` (ZeRO stage ``zero_stage``) instead of DDP. The trainer keeps everything else: its data
order, LR schedule, logging, evaluation and checkpoints. DeepSpeed's own ``engine.save_checkpoint`` is not used: it
writes pickled ``.pt`` files. Instead a checkpoint gathers the full fp32 master weights and the full AdamW moments of
every parameter through DeepSpeed's public ``deepspeed.utils.safe_get_full_*`` accessors (collectives, every rank
calls them) and writes them in the consolidated format of :mod:`mmalign.train.checkpoint`, keyed exactly as a plain
``torch.optim.AdamW`` over the same parameters would key them. A DeepSpeed checkpoint therefore resumes on any
number of processes, with any ZeRO stage, with FSDP or without sharding at all, and vice versa.

Resuming runs in two halves: the trainer first loads the checkpoint into the plain model and the plain AdamW exactly
as an unsharded run does (all checks included); :func:`initialize` then takes the per-parameter AdamW state off the
plain optimizer, lets DeepSpeed flatten and partition the model, and writes each rank's slice of that state into the
flat partitions ZeRO optimises (AdamW creates its state lazily at the first step, so it is created here with the
saved step count first). Tested on CPU with 2 gloo processes: stop + resume is bitwise equal to an uninterrupted run
for stages 1, 2 and 3.

Two DeepSpeed specifics this module handles: ZeRO-1/2 link a parameter's slice of the optimizer state only after the
first optimizer step (``_lazy_init_hp_params_optimizer_state``), and ZeRO-3's ``set_full_hp_param`` reads past the
end of a parameter whose size is not a multiple of the world size (its last partition is padded), so ZeRO-3 slices
are written here from ``_get_fp32_opt_state_partition``. Both are private DeepSpeed methods: their absence is a clear
error naming the DeepSpeed version, not a silent wrong resume.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch

__all__ = ["deepspeed_config", "initialize", "gather_full_state", "saved_step"]

_ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def deepspeed_config(*, batch_size: int, grad_accum_steps: int, max_grad_norm: float, zero_stage: int,
                     mixed_precision: str, offload_optimizer: bool = False) -> dict[str, Any]:
    """The DeepSpeed config for the trainer's settings (micro-batch per process, accumulation, clipping, precision).

    The optimizer and LR schedule are not in it: the trainer passes its own ``torch.optim.AdamW`` and steps its own
    scheduler once per optimizer step, so a run's trajectory does not depend on how it is sharded.
    """
    if zero_stage not in (1, 2, 3):
        raise ValueError(f"zero_stage must be 1, 2 or 3, got {zero_stage!r}")
    if mixed_precision not in ("no", "bf16"):
        raise ValueError(f"mixed_precision must be 'no' or 'bf16' with DeepSpeed, got {mixed_precision!r}")
    return {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "gradient_clipping": float(max_grad_norm),
        "zero_optimization": {"stage": zero_stage,
                              **({"offload_optimizer": {"device": "cpu"}} if offload_optimizer else {})},
        # with offload DeepSpeed would swap in its own CPU Adam; the trainer's torch AdamW steps on the CPU partitions
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": mixed_precision == "bf16"},
        # the trainer's AdamW is torch's own, which ZeRO partitions like any torch optimizer
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def _import_deepspeed(device_type: str | None = None) -> Any:
    """Import DeepSpeed (a clear error if it is missing); with ``device_type``, make its accelerator that device's.

    DeepSpeed picks its accelerator once per process (CUDA when present). A run forced onto the CPU next to a GPU
    (``trainer.cpu``) asks for its CPU accelerator through ``DS_ACCELERATOR`` before the first import; if DeepSpeed
    already chose another device in this process, that is an error instead of a model silently placed elsewhere.
    """
    import os
    import sys

    if device_type == "cpu" and "deepspeed" not in sys.modules:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as err:
        raise ImportError(
            "trainer.distributed=deepspeed needs DeepSpeed: pip install 'mmalign[deepspeed]' (or deepspeed); "
            f"import failed with: {err}"
        ) from None
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if device_type is not None:
        from deepspeed.accelerator import get_accelerator

        ds_device = get_accelerator().device_name()
        if ds_device != device_type:
            raise RuntimeError(f"DeepSpeed's accelerator in this process is {ds_device!r} but the trainer runs on "
                               f"{device_type!r}; set DS_ACCELERATOR={device_type} before DeepSpeed is first imported")
    return deepspeed


def _is_zero3(zero_opt: Any) -> bool:
    return hasattr(zero_opt, "fp32_partitioned_groups_flat")


def _flat_partitions(zero_opt: Any) -> list[torch.Tensor]:
    """The flat fp32 tensors ZeRO's wrapped AdamW optimises on this rank, one per parameter group."""
    for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):  # ZeRO-1/2, ZeRO-3
        if hasattr(zero_opt, attr):
            return list(getattr(zero_opt, attr))
    raise RuntimeError(f"unsupported DeepSpeed optimizer {type(zero_opt).__name__}: it exposes no flat fp32 "
                       "partitions (tested with ZeRO stages 1-3 of DeepSpeed 0.19)")


def _private(obj: Any, name: str) -> Any:
    if not hasattr(obj, name):
        import deepspeed

        raise RuntimeError(f"DeepSpeed {deepspeed.__version__}'s {type(obj).__name__} has no {name}, which mmalign "
                           "uses to restore ZeRO optimizer state (tested with DeepSpeed 0.19)")
    return getattr(obj, name)


def _set_zero3_slice(zero_opt: Any, param: torch.Tensor, value: torch.Tensor, key: str | None) -> None:
    """Write this rank's slice of the full tensor ``value`` into ZeRO-3's partition of ``param`` (or its state)."""
    part, _ = _private(zero_opt, "_get_fp32_opt_state_partition")(param, release_swap_buffers=False,
                                                                  optim_state_key=key)
    rank = _private(zero_opt, "_get_param_partition_rank")(param)
    size = part.numel()
    piece = value.detach().reshape(-1)[rank * size:(rank + 1) * size]  # the last partition is padded past the end
    part.data[: piece.numel()].copy_(piece.to(part.dtype))


def saved_step(saved: list[dict[str, Any]]) -> float | None:
    """The one AdamW step count of per-parameter states (None when there is no state yet); unequal counts are an error.

    ZeRO keeps one flat AdamW state per parameter group, so every parameter shares the step count; a plain run whose
    parameters stepped different numbers of times (some had no gradient at first) cannot be resumed under ZeRO.
    """
    if not any(key in s for s in saved for key in _ADAM_KEYS):
        return None
    steps = {float(s["step"]) for s in saved if "step" in s}
    if len(steps) > 1:
        raise ValueError(f"the checkpoint's AdamW step counts differ between parameters ({sorted(steps)}); ZeRO keeps "
                         "one flat state per parameter group and cannot hold them")
    return steps.pop() if steps else 0.0


def _restore_state(engine: Any, params: list[torch.Tensor], saved: list[dict[str, Any]],
                   masters: list[torch.Tensor | None] | None) -> None:
    """Put back exact fp32 masters (if given), create ZeRO's AdamW state with the saved step, write the moments."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    zero_opt = engine.optimizer
    zero3 = _is_zero3(zero_opt)
    for p, master in zip(params, masters or []):  # the engine built its masters from bf16 weights
        if master is None:
            continue
        if zero3:
            _set_zero3_slice(zero_opt, p, master, None)
        else:
            safe_set_full_fp32_param(p, master)
    step = saved_step(saved)
    if step is None:
        return  # a run saved before its first step: AdamW creates its state at the first step as usual
    base = zero_opt.optimizer
    for flat in _flat_partitions(zero_opt):
        base.state[flat] = {"step": torch.tensor(step, dtype=torch.float32),
                            **{k: torch.zeros_like(flat) for k in _ADAM_KEYS}}
    if not zero3:
        _private(zero_opt, "_lazy_init_hp_params_optimizer_state")()
    for p, state in zip(params, saved):
        for key in _ADAM_KEYS:
            if key not in state:
                continue  # never had a gradient: its moments stay zero
            if zero3:
                _set_zero3_slice(zero_opt, p, state[key], key)
            else:
                safe_set_full_optimizer_state(p, state[key].to(torch.float32), key)


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict[str, Any],
               masters: dict[str, torch.Tensor] | None = None) -> Any:
    """Wrap ``model`` and its plain AdamW ``optimizer`` in a DeepSpeed engine, keeping the optimizer's state.

    ``optimizer`` may hold per-parameter state loaded from a checkpoint; it is moved into ZeRO's partitions.
    ``masters`` (name -> fp32 tensor) are exact fp32 master weights to restore when the engine computes in bf16
    (DeepSpeed casts the module to bf16 and would otherwise build its masters from the rounded weights).
    A process group must already exist (the trainer's accelerator creates it); DeepSpeed reuses it.
    """
    deepspeed = _import_deepspeed()
    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if any(id(p) not in names for p in params):
        raise ValueError("the optimizer holds parameters that are not parameters of the model")
    saved = [dict(optimizer.state.get(p, {})) for p in params]
    exact = [masters.get(names[id(p)]) for p in params] if masters else None
    saved_step(saved)  # unequal step counts fail here, before DeepSpeed starts
    optimizer.state.clear()  # ZeRO optimises flat partitions; the per-parameter state is restored into them below
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    _restore_state(engine, params, saved, exact)
    return engine


def gather_full_state(engine: Any, params: list[torch.Tensor], param_groups: list[dict[str, Any]],
                      optimizer: bool = True) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any] | None]:
    """Collective: full model state and index-keyed plain-AdamW state on rank 0 (CPU); ``(None, None)`` elsewhere.

    Trainable parameters are the fp32 masters; frozen ones (e.g. a LoRA base) and buffers are the module's own,
    gathered from their partitions under ZeRO-3, one at a time. ``params`` are the plain optimizer's parameters in
    state-dict index order (as :func:`initialize` received them; DeepSpeed keeps the parameter objects).
    ``param_groups`` are the plain optimizer's groups as its ``state_dict()`` gave them before DeepSpeed took it over
    (hyperparameters and parameter indices); their learning rates are refreshed from the engine. Rank 0 holds the
    full state in CPU memory while saving, as for FSDP.
    """
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    module = engine.module
    zero_opt = engine.optimizer
    main = dist.get_rank() == 0
    zero3 = _is_zero3(zero_opt)
    by_id = {id(p): n for n, p in module.named_parameters()}
    # one parameter at a time, the same order on every rank (each call is a collective); only rank 0 keeps a copy
    full: dict[int, torch.Tensor] = {}
    for p in module.parameters():
        value = safe_get_full_fp32_param(p) if p.requires_grad else None
        if value is None:  # not optimised (e.g. a LoRA base): the module's own value, gathered under ZeRO-3
            import deepspeed

            with deepspeed.zero.GatheredParameters([p]) if zero3 else contextlib.nullcontext():
                if main:
                    full[id(p)] = p.detach().cpu().clone()
        elif main:
            full[id(p)] = value.detach().cpu().clone()
        del value
    tensors: dict[str, torch.Tensor] = {}
    if main:
        for name, t in module.state_dict(keep_vars=True).items():
            tensors[name] = full[id(t)] if id(t) in by_id else t.detach().cpu().clone()

    base = zero_opt.optimizer
    flats = _flat_partitions(zero_opt)
    has_state = optimizer and all(flat in base.state for flat in flats)
    state: dict[int, dict[str, Any]] = {}
    if has_state:
        step = base.state[flats[0]]["step"].detach().cpu().clone()
        for i, p in enumerate(params):
            entry: dict[str, Any] = {"step": step.clone()}
            for key in _ADAM_KEYS:
                value = safe_get_full_optimizer_state(p, key)
                if main:
                    entry[key] = value.detach().cpu().clone()
                del value
            state[i] = entry
    if not main:
        return None, None
    if not optimizer:
        return tensors, None
    groups = [{**g, "lr": base.param_groups[i]["lr"]} for i, g in enumerate(param_groups)]
    return tensors, {"state": state, "param_groups": groups}
