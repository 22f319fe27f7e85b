"""The generic accelerate trainer, its config, checkpoints and logging."""

from mmalign.train.config import LoraOptions, TrainerConfig

__all__ = ["Trainer", "TrainerConfig", "LoraOptions", "seed_everything"]


def __getattr__(name: str):  # keep `import mmalign.train` light: accelerate loads with the Trainer
    if name in {"Trainer", "seed_everything"}:
        from mmalign.train import trainer

        return getattr(trainer, name)
    raise AttributeError(name)
