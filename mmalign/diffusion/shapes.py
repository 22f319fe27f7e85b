"""Procedural shape images with an exactly known style (hue) and content (shape mask) for the offline benchmark.

Images are RGB in [-1, 1] (the range a pixel-space DDPM trains on), ``size x size`` pixels, one centred shape per
image on a dark grey background. The *content* is the shape class (circle, square, triangle, cross), drawn at a
fixed place so that its mask is known exactly; the *style* is the shape's hue (degrees, circular). Conditioning is a
fixed random embedding per class, standing in for precomputed text embeddings.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "SHAPES",
    "shape_masks",
    "hsv_to_rgb",
    "render",
    "class_embeddings",
    "sample_reference_hues",
    "build_tiny_unet",
    "shapes_scheduler",
    "shapes_embeddings",
    "EMBEDDING_SEED",
]

EMBEDDING_SEED = 1234  # the shapes task's fixed per-class "text embeddings" (benchmark and diffusion train share them)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
BACKGROUND = -0.6  # dark grey in [-1, 1]: unsaturated, so it never contributes a hue


def shape_masks(size: int) -> torch.Tensor:
    """Boolean masks ``[len(SHAPES), size, size]`` of the four shapes, centred, about 60% of the image wide."""
    if size < 8:
        raise ValueError(f"size must be >= 8 to draw distinguishable shapes, got {size}")
    c = (size - 1) / 2.0
    yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    dy, dx = yy - c, xx - c
    r = 0.32 * size
    circle = dx**2 + dy**2 <= r**2
    square = (np.abs(dx) <= 0.8 * r) & (np.abs(dy) <= 0.8 * r)
    # isosceles triangle, apex up: inside when below the two slanted edges and above the base
    top, base = c - r, c + 0.8 * r
    frac = (yy - top) / (base - top)
    triangle = (yy >= top) & (yy <= base) & (np.abs(dx) <= frac * r * 1.05)
    arm = 0.3 * r
    cross = ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    return torch.from_numpy(np.stack([circle, square, triangle, cross]))


def hsv_to_rgb(hue_deg: torch.Tensor, sat: float = 0.85, val: float = 0.9) -> torch.Tensor:
    """RGB in [0, 1], shape ``[N, 3]``, of hues (degrees, any real) at fixed saturation and value."""
    h = torch.remainder(hue_deg, 360.0) / 60.0
    k = torch.stack([torch.remainder(n + h, 6.0) for n in (5.0, 3.0, 1.0)], dim=-1)
    return val - val * sat * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)


def render(
    classes: torch.Tensor, hues: torch.Tensor, size: int, generator: torch.Generator | None = None, noise: float = 0.03
) -> torch.Tensor:
    """Images ``[N, 3, size, size]`` in [-1, 1]: shape ``classes[i]`` filled with hue ``hues[i]`` (+ pixel noise)."""
    if classes.shape != hues.shape or classes.ndim != 1:
        raise ValueError(f"classes and hues must be 1-D of equal length, got {tuple(classes.shape)}, {tuple(hues.shape)}")
    masks = shape_masks(size)[classes.long()].unsqueeze(1).float()  # [N,1,H,W]
    fg = (hsv_to_rgb(hues.float()) * 2.0 - 1.0)[:, :, None, None]  # [N,3,1,1]
    img = masks * fg + (1.0 - masks) * BACKGROUND
    if noise > 0:
        img = img + noise * torch.randn(img.shape, generator=generator)
    return img.clamp(-1.0, 1.0)


def class_embeddings(num_classes: int, seq_len: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Fixed random "text embeddings" ``[num_classes, seq_len, dim]``, one per prompt (shape class)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_classes, seq_len, dim, generator=g)


def sample_reference_hues(
    n: int, generator: torch.Generator, main_hue: float = 0.0, spread: float = 12.0,
    rare_hue: float = 120.0, rare_prob: float = 0.1,
) -> torch.Tensor:
    """Hues of the pretraining distribution: N(main_hue, spread) w.p. 1-rare_prob, else N(rare_hue, spread)."""
    rare = torch.rand(n, generator=generator) < rare_prob
    centre = torch.where(rare, torch.tensor(rare_hue), torch.tensor(main_hue))
    return centre + spread * torch.randn(n, generator=generator)


def build_tiny_unet(
    size: int = 16, channels: tuple[int, ...] = (16, 32), cross_attention_dim: int = 32, in_channels: int = 3
) -> torch.nn.Module:
    """A very small pixel-space ``UNet2DConditionModel`` with cross-attention at the lower resolution only.

    Attention modules are named ``to_q/to_k/to_v/to_out.0`` as in Stable Diffusion, so the same LoRA targets apply.
    """
    from diffusers import UNet2DConditionModel

    n = len(channels)
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1)
    up = ("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",)
    groups = math.gcd(*channels) if n > 1 else channels[0]
    return UNet2DConditionModel(
        sample_size=size, in_channels=in_channels, out_channels=in_channels, block_out_channels=channels,
        layers_per_block=1, down_block_types=down, up_block_types=up, cross_attention_dim=cross_attention_dim,
        attention_head_dim=8, norm_num_groups=min(8, groups),
    )


def shapes_scheduler() -> object:
    """The shapes task's training scheduler: DDPM, 1000 steps, ε-prediction, clipped samples."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, prediction_type="epsilon", clip_sample=True)


def shapes_embeddings(embed_dim: int = 32) -> torch.Tensor:
    """The shapes task's conditioning ``[len(SHAPES), 2, embed_dim]``: one fixed random embedding per shape class."""
    return class_embeddings(len(SHAPES), 2, embed_dim, seed=EMBEDDING_SEED)
