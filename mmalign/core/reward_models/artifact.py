"""``save_pretrained`` / ``from_pretrained`` methods shared by reward models and ensembles (see :mod:`.pretrained`)."""

from __future__ import annotations

from typing import Any

__all__ = ["SavePretrainedMixin"]


class SavePretrainedMixin:
    """Adds folder save/load (``config.json`` + ``model.safetensors``) to a reward model class."""

    def save_pretrained(self, folder: Any, **kwargs: Any) -> Any:
        """Write ``folder/config.json`` + ``model.safetensors`` (:func:`.pretrained.save_pretrained`)."""
        from mmalign.core.reward_models.pretrained import save_pretrained

        return save_pretrained(self, folder, **kwargs)  # type: ignore[arg-type]

    @classmethod
    def from_pretrained(cls, folder: Any, *, device: Any = "cpu") -> Any:
        """Load a folder written by :meth:`save_pretrained` (eval mode); the observation statistics and metadata
        are in ``model.pretrained_extras``."""
        from mmalign.core.reward_models.pretrained import load_pretrained

        model, extras = load_pretrained(folder, device=device)
        if not isinstance(model, cls):
            raise ValueError(f"{folder} holds a {type(model).__name__}, not a {cls.__name__}")
        model.pretrained_extras = extras
        return model
