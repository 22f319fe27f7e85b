"""The one LoRA helper: wrap a model with peft LoRA adapters, seeded, leaving the caller's RNG streams untouched.

Used by the generic trainer (``trainer.lora``), the VLM job and the diffusion code, so that every domain builds its
adapters the same way and saves them the same way (``PeftModel.save_pretrained`` writes only the adapter weights).
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["add_lora", "is_peft_model"]


def is_peft_model(model: Any) -> bool:
    """Whether ``model`` is already wrapped by peft (then :func:`add_lora` leaves it as it is)."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def add_lora(model: Any, *, r: int = 8, alpha: float | None = None, dropout: float = 0.0,
             target_modules: Sequence[str] | str = ("q_proj", "k_proj", "v_proj", "o_proj"), seed: int = 0,
             init: str | bool = True) -> Any:
    """``model`` wrapped with peft LoRA adapters (rank ``r``, scaling ``alpha / r``; ``alpha`` None = ``r``).

    Only the adapters train. ``target_modules``: module-name suffixes (a list) or a peft regex (a string).
    ``init``: peft's ``init_lora_weights`` (True = Kaiming A and zero B, so the wrapped model starts equal to the
    base; ``"gaussian"`` as diffusers' DPO script). peft draws the initial weights from the global RNG: they are
    drawn as after ``torch.manual_seed(seed)`` inside a forked RNG state, so the caller's streams stay as they were.
    A model that is already a ``PeftModel`` is returned unchanged.
    """
    from peft import LoraConfig, get_peft_model

    from mmalign.core.rng import seeded_global_rng

    if is_peft_model(model):
        return model
    if r <= 0 or (alpha is not None and alpha <= 0):
        raise ValueError(f"LoRA r and alpha must be > 0, got r={r}, alpha={alpha}")
    if not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    if not targets:
        raise ValueError("target_modules must name at least one module")
    cfg = LoraConfig(r=r, lora_alpha=alpha if alpha is not None else r, lora_dropout=dropout,
                     init_lora_weights=init, target_modules=targets)
    with seeded_global_rng(seed):
        return get_peft_model(model, cfg)
