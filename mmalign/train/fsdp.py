"""Fully sharded data parallel training (torch FSDP2 ``fully_shard``) and consolidated checkpoints of sharded state.

The trainer applies ``fully_shard`` itself (``TrainerConfig.distributed = "fsdp"``) instead of relying on accelerate's
FSDP plugin: accelerate turns its plugin on only for GPU process groups (a CPU/gloo launch silently stays DDP), so that
path could not be tested here, and its ``save_state`` writes pickled optimizer files. ``fully_shard`` runs the same
code on every backend (CPU/gloo tested, CUDA/NCCL is the same call with a CUDA device mesh).

Checkpoints of a sharded run use the one consolidated format of :mod:`mmalign.train.checkpoint`: model and optimizer
state are gathered in full to rank 0 (offloaded to CPU) with ``torch.distributed.checkpoint.state_dict``, and the
optimizer state, keyed by parameter name there, is re-keyed to the integer indices of a plain torch optimizer. A
checkpoint written by a sharded run is therefore the same kind of file as a 1-process checkpoint and loads into
either; loading scatters the full state back into the shards.
"""

from __future__ import annotations

from typing import Any, Sequence, cast

import torch

__all__ = [
    "is_sharded",
    "shard_model",
    "optimizer_param_names",
    "gather_full_state",
    "load_full_state",
    "all_ranks_ok",
    "runs_in_lockstep",
]


# methods besides forward() that domain adapters call on a (possibly peft-wrapped) model
FORWARD_METHODS = ("get_image_features", "get_video_features")


def unwrap_model(model: Any) -> Any:
    """The module inside training wrappers (DDP, DataParallel, a DeepSpeed engine: anything exposing ``.module``);
    a peft model stays a peft model. Config, helper methods and peft's ``disable_adapter`` are read from it, never
    from the wrapper (cf. diffusers #6351)."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def is_sharded(model: torch.nn.Module | None) -> bool:
    """True when ``model`` holds FSDP2-sharded (DTensor) parameters."""
    if model is None or not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def shard_model(model: torch.nn.Module, wrap: Sequence[str], device: torch.device,
                mixed_precision: str = "no") -> torch.nn.Module:
    """Move ``model`` to ``device`` and shard it over all processes of the default process group.

    Every submodule whose class name is in ``wrap`` (default: the model's ``_no_split_modules``, as transformers
    models declare their decoder layers) becomes its own FSDP unit, innermost first, so only one unit's full
    parameters live in memory at a time; the root then holds the remaining parameters.

    ``mixed_precision="bf16"`` (the trainer's resolved setting) gives every unit FSDP2's mixed-precision policy:
    the sharded parameters and optimizer state stay fp32 (the master copy), each unit all-gathers bf16 copies for its
    forward and backward (half the communication and unsharded memory), and gradients are reduce-scattered in fp32.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    classes = {type(m).__name__ for m in model.modules()}
    names = set(wrap) or set(getattr(model, "_no_split_modules", None) or [])
    unknown = set(wrap) - classes
    if unknown:
        raise ValueError(f"fsdp_wrap names {sorted(unknown)}, which are not module classes of the model "
                         f"(it has {sorted(classes)})")
    if not dist.is_initialized():
        raise RuntimeError("distributed=fsdp needs a process group; launch with torchrun or accelerate launch")
    if mixed_precision not in ("no", "bf16"):
        raise ValueError(f"mixed_precision must be 'no' or 'bf16' with FSDP, got {mixed_precision!r}")
    model.to(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if mixed_precision == "bf16" else MixedPrecisionPolicy())
    # reversed pre-order visits children before their parents, as nested fully_shard requires
    for name, module in reversed(list(model.named_modules())):
        if name and type(module).__name__ in names:
            fully_shard(module, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    # Adapters call some methods of the root directly (a VLM's shared image features); FSDP2 gathers the root's
    # parameters only around forward() unless a method is registered as a forward method too.
    from torch.distributed.fsdp import register_fsdp_forward_method

    for name in FORWARD_METHODS:
        if callable(getattr(model, name, None)):
            register_fsdp_forward_method(model, name)
    return model


def optimizer_param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str] | None:
    """Name of each optimizer parameter in state-dict index order, or None if one is not a parameter of ``model``."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = [names.get(id(p)) for group in optimizer.param_groups for p in group["params"]]
    return None if any(n is None for n in out) else [n for n in out if n is not None]


def gather_full_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any] | None]:
    """Collective: full model state and index-keyed full optimizer state on rank 0 (CPU); ``(None, None)`` elsewhere."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if optimizer is None:
        msd = get_model_state_dict(model, options=options)
        return cast(dict[str, torch.Tensor], msd) or None, None
    msd, named = get_state_dict(model, optimizer, options=options)
    if not msd:
        return None, None
    osd = cast(dict[str, Any], named)
    # DCP lists the parameter names of each group in the optimizer's own order: position = plain state-dict index
    order = [name for group in osd["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(order)}
    state = {index[name]: value for name, value in osd["state"].items()}
    groups = [{**group, "params": [index[n] for n in group["params"]]} for group in osd["param_groups"]]
    return cast(dict[str, torch.Tensor], msd), {"state": state, "param_groups": groups}


def load_full_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    model_tensors: dict[str, torch.Tensor] | None,
    optimizer_state: dict[str, Any] | None,
    strict: bool = True,
) -> None:
    """Collective: scatter a full (consolidated) model state and index-keyed optimizer state into the shards.

    Every process passes the same full state (each reads the checkpoint files), so no process waits on another's
    file access; ``model_tensors``/``optimizer_state`` may be None to leave that part untouched.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    if model_tensors is not None:  # strict=False: a LoRA checkpoint without the frozen base (names checked before)
        set_model_state_dict(model, cast(Any, model_tensors),
                             options=StateDictOptions(full_state_dict=True, strict=strict))
    if optimizer is not None and optimizer_state is not None:
        names = optimizer_param_names(model, optimizer)
        if names is None:
            raise ValueError("the optimizer holds parameters that are not parameters of the model")
        named = {
            "state": {names[int(i)]: value for i, value in optimizer_state["state"].items()},
            "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]}
                             for g in optimizer_state["param_groups"]],
        }
        set_optimizer_state_dict(model, optimizer, cast(Any, named), options=options)


def all_ranks_ok(ok: bool, device: torch.device) -> bool:
    """Collective: True only if ``ok`` holds on every process (so all raise together instead of one hanging)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def runs_in_lockstep(model: torch.nn.Module) -> bool:
    """True when every process must run the same number of forward passes of ``model``.

    That is the case when its parameters are sharded over several processes (FSDP2 DTensors or DeepSpeed ZeRO-3
    partitions): each forward gathers them collectively, so a process that stops early (e.g. a generation loop whose
    rows all hit EOS) leaves the others waiting forever. Loops with data-dependent lengths check this and agree on
    stopping with :func:`all_ranks_ok`.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return False
    return is_sharded(model) or any(hasattr(p, "ds_id") for p in model.parameters())
