"""Sampling through a standard diffusers scheduler loop (the loop every diffusers pipeline runs), with optional CFG.

Prompts come in as precomputed embeddings, so no tokenizer or text encoder is needed; latents come out undecoded
(decode with the pipeline's VAE where the model is latent-space).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mmalign.diffusion.adapter import unet_forward

__all__ = ["sampling_scheduler", "sample"]


def sampling_scheduler(train_scheduler: Any, kind: str = "ddim") -> Any:
    """A sampler built from the training scheduler's config (same betas and prediction type)."""
    from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

    classes = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "euler": EulerDiscreteScheduler}
    if kind not in classes:
        raise ValueError(f"kind must be one of {list(classes)}, got {kind!r}")
    return classes[kind].from_config(train_scheduler.config)


@torch.no_grad()
def sample(
    model: torch.nn.Module, scheduler: Any, encoder_hidden_states: Tensor, shape: tuple[int, int, int], *,
    num_inference_steps: int = 20, generator: torch.Generator | None = None,
    added_cond_kwargs: dict[str, Tensor] | None = None, guidance_scale: float = 1.0,
    uncond_hidden_states: Tensor | None = None, batch_size: int = 64,
) -> Tensor:
    """Generate ``[N, *shape]`` samples for ``encoder_hidden_states [N, L, D]`` with ``num_inference_steps`` steps.

    ``guidance_scale > 1`` applies classifier-free guidance against ``uncond_hidden_states`` ([N, L, D] or [1, L, D]).
    Initial noise is drawn on CPU from ``generator`` so that samples are reproducible across devices.
    """
    if num_inference_steps <= 0:
        raise ValueError(f"num_inference_steps must be > 0, got {num_inference_steps}")
    if encoder_hidden_states.ndim != 3:
        raise ValueError(f"encoder_hidden_states must be [N, L, D], got {tuple(encoder_hidden_states.shape)}")
    if guidance_scale > 1.0 and uncond_hidden_states is None:
        raise ValueError(f"guidance_scale {guidance_scale} > 1 needs uncond_hidden_states")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    n = encoder_hidden_states.shape[0]
    noise = torch.randn((n, *shape), generator=generator)
    outs = []
    for start in range(0, n, batch_size):
        sl = slice(start, min(n, start + batch_size))
        hidden = encoder_hidden_states[sl].to(device, dtype)
        added = None if added_cond_kwargs is None else {k: v[sl].to(device, dtype) for k, v in added_cond_kwargs.items()}
        x = noise[sl].to(device, dtype) * scheduler.init_noise_sigma
        scheduler.set_timesteps(num_inference_steps, device=device)
        for t in scheduler.timesteps:
            inp = scheduler.scale_model_input(x, t)
            tt = t.expand(x.shape[0]).to(device)
            pred = unet_forward(model, inp, tt, hidden, added)
            if guidance_scale > 1.0:
                assert uncond_hidden_states is not None
                un = uncond_hidden_states.to(device, dtype).expand(x.shape[0], -1, -1)
                pred_u = unet_forward(model, inp, tt, un, added)
                pred = pred_u + guidance_scale * (pred - pred_u)
            x = scheduler.step(pred, t, x).prev_sample
        outs.append(x.float().cpu())
    return torch.cat(outs)
