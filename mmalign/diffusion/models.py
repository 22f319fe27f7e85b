"""What ``diffusion train`` and ``diffusion sample`` load: the tiny shapes UNet or any diffusers pipeline.

A pipeline is a local folder or a Hub id (``DiffusionPipeline.from_pretrained``: SD 1.x/2.x, SDXL, ...). Training
takes its UNet (trained: LoRA or full), its VAE and text encoder(s) (frozen: they encode the pairs) and a DDPM
scheduler built from the pipeline's scheduler config (same betas and prediction type, ε or v).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["TrainingModel", "load_pipeline", "load_training_model", "ddpm_like"]


@dataclass
class TrainingModel:
    """The trained UNet, its training scheduler and, for a pipeline, the pipeline (VAE, text encoders, sampling)."""

    unet: torch.nn.Module
    scheduler: Any
    pipe: Any | None = None


def load_pipeline(model: str, dtype: torch.dtype | None = None) -> Any:
    """``DiffusionPipeline.from_pretrained(model)`` (a local folder or a Hub id), safety checker off, quiet."""
    from diffusers import DiffusionPipeline

    path = Path(model)
    if path.exists() and not (path / "model_index.json").is_file():
        raise ValueError(f"model {model!r} is a local path without model_index.json: give a diffusers pipeline "
                         "folder (pipe.save_pretrained) or a Hub id")
    kwargs: dict[str, Any] = {"safety_checker": None, "requires_safety_checker": False}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    try:
        pipe = DiffusionPipeline.from_pretrained(model, **kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(f"model {model!r} could not be loaded as a diffusers pipeline: {str(err)[:300]}") from err
    if not hasattr(pipe, "unet") or not hasattr(pipe, "vae"):
        raise ValueError(f"model {model!r} is a {type(pipe).__name__} without a UNet and a VAE; mmalign trains "
                         "latent-diffusion UNet pipelines (SD 1.x/2.x, SDXL)")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ddpm_like(scheduler_config: Any, prediction_type: str = "") -> Any:
    """A DDPM training scheduler with the betas and prediction type of ``scheduler_config`` (or ``prediction_type``)."""
    from diffusers import DDPMScheduler

    overrides = {"prediction_type": prediction_type} if prediction_type else {}
    return DDPMScheduler.from_config(scheduler_config, **overrides)


def load_training_model(model: str, *, seed: int = 0, image_size: int = 16, prediction_type: str = "",
                        init_weights: str = "") -> TrainingModel:
    """The UNet to train (``tiny``: the shapes task's pixel-space UNet, seeded; else the pipeline's), its DDPM
    training scheduler (``prediction_type`` overrides the pipeline's) and, for a pipeline, the pipeline with frozen
    VAE and text encoders. ``init_weights`` (:func:`mmalign.diffusion.artifacts.load_unet_weights`) is loaded last."""
    from mmalign.diffusion.artifacts import load_unet_weights

    pipe = None
    if model == "tiny":
        from mmalign.diffusion.shapes import build_tiny_unet, shapes_scheduler

        torch.manual_seed(seed)
        unet = build_tiny_unet(image_size, (16, 32), 32)
        scheduler = ddpm_like(shapes_scheduler().config, prediction_type)
    else:
        pipe = load_pipeline(model)
        unet = pipe.unet
        scheduler = ddpm_like(pipe.scheduler.config, prediction_type)
        for part in ("vae", "text_encoder", "text_encoder_2"):
            module = getattr(pipe, part, None)
            if module is not None:
                module.eval().requires_grad_(False)
    if init_weights:
        load_unet_weights(unet, init_weights, "init_weights")
    unet.train()
    return TrainingModel(unet, scheduler, pipe)
