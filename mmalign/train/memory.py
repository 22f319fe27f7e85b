"""Memory savers of the generic trainer: the optimizer step inside backward, activation checkpointing, and glibc's
heap on the CPU (freed activation memory given back to the OS)."""

from __future__ import annotations

import functools
from typing import Any

import torch

__all__ = ["enable_gradient_checkpointing", "fix_mmap_threshold", "trim_heap"]


def _step_in_backward(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
    """Apply ``optimizer``'s update to each parameter as soon as its gradient is accumulated, then free the gradient.

    torch optimizers skip parameters whose ``.grad`` is None; inside the hook only this parameter has one (every
    earlier one was freed by its own hook), so ``step()`` updates it alone, with its own state and the group's current
    LR. The optimizer and its state dict stay the usual ones, so checkpoints resume with or without the option.
    """

    def hook(p: torch.Tensor) -> None:
        optimizer.step()
        p.grad = None

    for p in params:
        p.register_post_accumulate_grad_hook(hook)


def enable_gradient_checkpointing(model: torch.nn.Module) -> list[str]:
    """Turn on activation checkpointing in every transformers or diffusers model inside ``model`` (the model itself,
    the base of a peft wrapper, or the parts of a composite such as a UNet with its text encoder); returns their
    class names. Non-reentrant checkpointing: layers with frozen inputs (LoRA) need no input gradients, and the
    recomputed forward draws the same dropout masks (the RNG state is replayed), so training follows the same
    trajectory (bitwise without dropout; with dropout up to the attention kernel's rounding). ``ValueError`` if
    ``model`` holds no such model."""
    enabled: list[str] = []
    inside: set[int] = set()  # submodules of a model already enabled: the call covers them
    for module in model.modules():
        if id(module) in inside:
            continue
        if hasattr(module, "gradient_checkpointing_enable") and hasattr(module, "supports_gradient_checkpointing"):
            if not module.supports_gradient_checkpointing:
                raise ValueError(f"trainer.gradient_checkpointing: {type(module).__name__} does not support gradient "
                                 "checkpointing (transformers' supports_gradient_checkpointing is False)")
            if hasattr(module, "activation_checkpointing_enable"):  # transformers >= 5.2x: the new name
                module.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif hasattr(module, "enable_gradient_checkpointing") and hasattr(module, "_supports_gradient_checkpointing"):
            if not module._supports_gradient_checkpointing:
                raise ValueError(f"trainer.gradient_checkpointing: {type(module).__name__} does not support gradient "
                                 "checkpointing (diffusers' _supports_gradient_checkpointing is False)")
            module.enable_gradient_checkpointing()
        else:
            continue
        enabled.append(type(module).__name__)
        inside.update(id(m) for m in module.modules())
    if not enabled:
        raise ValueError(f"trainer.gradient_checkpointing: {type(model).__name__} holds no transformers or diffusers "
                         "model, whose layers know how to recompute themselves; turn it off for this model")
    return enabled


@functools.cache
def _glibc() -> Any:
    """The C library through ctypes on Linux with glibc (loaded once: the trainer trims every step); None elsewhere
    (musl, macOS, Windows)."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def fix_mmap_threshold(nbytes: int) -> bool:
    """Serve every heap block of ``nbytes`` or more with its own ``mmap``, unmapped as soon as it is freed.

    glibc starts at 128 KiB but raises this threshold to the size of each such block freed (up to 32 MiB), after
    which a training step's activations come from the heap and their freed blocks stay in the process. Setting it
    (``mallopt(M_MMAP_THRESHOLD)``) turns the raising off. Returns whether it was set (False outside glibc)."""
    libc = _glibc()
    m_mmap_threshold = -3  # from malloc.h
    return libc is not None and libc.mallopt(m_mmap_threshold, int(nbytes)) == 1


def trim_heap() -> bool:
    """Give the heap's free pages back to the OS (``malloc_trim(0)``: the top of the heap and every whole free page
    inside it); the small blocks below the mmap threshold otherwise fragment the heap step after step. Returns
    whether anything was released (False also outside glibc)."""
    libc = _glibc()
    return libc is not None and libc.malloc_trim(0) == 1
