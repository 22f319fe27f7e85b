"""Memory savers of the generic trainer: the optimizer step inside backward and activation checkpointing."""

from __future__ import annotations

import torch

__all__ = ["enable_gradient_checkpointing"]


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
