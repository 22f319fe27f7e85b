"""Training the text encoder(s) with the UNet (``train_text_encoder=true``): one module, prompts encoded per step.

:class:`TextConditionedUNet` holds the pipeline's own UNet and text encoder(s) (the same objects, so LoRA that peft
injects into them, or their updated weights, are what the pipeline samples with); its ``forward`` is the UNet's.
:func:`prompt_embedder` encodes the batch's captions through the pipeline's ``encode_prompt`` with the text
encoders of whichever module it is given: the trained one (with gradients), the LoRA-disabled reference (the same
module inside ``disable_adapter``) or a frozen reference copy (its own encoders, swapped into the pipeline).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor

__all__ = ["TEXT_LORA_TARGETS", "TextConditionedUNet", "find_stack", "prompt_embedder"]

TEXT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # CLIP attention (the UNet's are to_q, ...)
_PARTS = ("text_encoder", "text_encoder_2")


class TextConditionedUNet(torch.nn.Module):
    """A UNet and the text encoder(s) that condition it, trained as one module; calls go to the UNet."""

    def __init__(self, unet: torch.nn.Module, text_encoder: torch.nn.Module,
                 text_encoder_2: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder
        if text_encoder_2 is not None:
            self.text_encoder_2 = text_encoder_2

    @property
    def text_encoders(self) -> dict[str, torch.nn.Module]:
        return {name: getattr(self, name) for name in _PARTS if hasattr(self, name)}

    @property
    def config(self) -> Any:
        return self.unet.config

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.unet(*args, **kwargs)

    @classmethod
    def from_pipeline(cls, pipe: Any) -> "TextConditionedUNet":
        return cls(pipe.unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None))


def find_stack(model: torch.nn.Module) -> TextConditionedUNet:
    """The :class:`TextConditionedUNet` inside DDP/accelerate/peft wrappers (LoRA layers stay in place)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    if not isinstance(model, TextConditionedUNet):
        raise ValueError(f"expected a UNet trained with its text encoders, got {type(model).__name__}")
    return model


@contextlib.contextmanager
def _encoders_of(pipe: Any, stack: TextConditionedUNet) -> Iterator[None]:
    saved = {name: getattr(pipe, name) for name in stack.text_encoders}
    for name, module in stack.text_encoders.items():
        setattr(pipe, name, module)
    try:
        yield
    finally:
        for name, module in saved.items():
            setattr(pipe, name, module)


def prompt_embedder(pipe: Any) -> Callable[[torch.nn.Module, Sequence[str]], dict[str, Tensor]]:
    """``embed(module, captions) -> {"encoder_hidden_states", ["text_embeds"]}`` with ``module``'s text encoders
    (gradients flow where they train; under ``no_grad`` for a reference)."""
    from mmalign.diffusion.pipeline import prompt_conditioning

    def embed(module: torch.nn.Module, captions: Sequence[str]) -> dict[str, Tensor]:
        with _encoders_of(pipe, find_stack(module)):
            return {k: v.float() for k, v in prompt_conditioning(pipe, list(captions)).items()}

    return embed
