"""Tiny diffusers models built from config (no downloads) for the diffusion tests."""

from __future__ import annotations

import torch


def tiny_sd_unet(seed: int = 0) -> torch.nn.Module:
    """diffusers' own SD test UNet (tests/models/unets): 4 latent channels, 16x16, cross_attention_dim 8."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(4, 8), norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8, attention_head_dim=2,
        in_channels=4, out_channels=4, layers_per_block=1, sample_size=16,
    )


def tiny_sdxl_unet(seed: int = 0) -> torch.nn.Module:
    """diffusers' SDXL pipeline test UNet: text_time added conditioning (pooled text 32 + 6 time ids x 8)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(2, 4), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=1,
    )


def ddpm(prediction_type: str = "epsilon"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)


def pair_batch(b: int = 3, c: int = 4, size: int = 16, dim: int = 8, seed: int = 0):
    from mmalign.diffusion.adapter import PairBatch

    g = torch.Generator().manual_seed(seed)
    return PairBatch(torch.randn(b, c, size, size, generator=g), torch.randn(b, c, size, size, generator=g),
                     torch.randn(b, 2, dim, generator=g))
