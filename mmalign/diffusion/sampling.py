"""Sampling through a standard diffusers scheduler loop (the loop every diffusers pipeline runs), with optional CFG.

Prompts come in as precomputed embeddings, so no tokenizer or text encoder is needed; latents come out undecoded
(decode with the pipeline's VAE where the model is latent-space).
"""

from __future__ import annotations

import inspect
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


def _check_rows(name: str, value: Tensor, n: int, ndim: int | None = None) -> None:
    """``value`` must have ``n`` rows (one per sample) or 1 row (shared by all samples), and ``ndim`` dimensions."""
    if value.ndim == 0 or (ndim is not None and value.ndim != ndim) or value.shape[0] not in (1, n):
        dims = f"{ndim} dimensions and " if ndim is not None else ""
        raise ValueError(f"{name} must have {dims}{n} rows (one per sample) or 1 row (shared), got shape "
                         f"{tuple(value.shape)}")


def _chunk(value: Tensor, sl: slice, rows: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Rows ``sl`` of a per-sample tensor, or its one shared row expanded to the chunk's ``rows``."""
    part = value.expand(rows, *value.shape[1:]) if value.shape[0] == 1 else value[sl]
    return part.to(device, dtype)


@torch.no_grad()
def sample(
    model: torch.nn.Module, scheduler: Any, encoder_hidden_states: Tensor, shape: tuple[int, int, int], *,
    num_inference_steps: int = 20, generator: torch.Generator | None = None,
    added_cond_kwargs: dict[str, Tensor] | None = None, guidance_scale: float = 1.0,
    uncond_hidden_states: Tensor | None = None, uncond_added_cond_kwargs: dict[str, Tensor] | None = None,
    batch_size: int = 64,
) -> Tensor:
    """Generate ``[N, *shape]`` samples for ``encoder_hidden_states [N, L, D]`` with ``num_inference_steps`` steps.

    ``guidance_scale > 1`` applies classifier-free guidance against ``uncond_hidden_states`` ([N, L, D] or [1, L, D]).
    ``added_cond_kwargs`` is SDXL's added conditioning (``text_embeds`` [N, P], ``time_ids`` [N, 6]; 1 row is shared
    by all samples). With guidance on such a model, ``uncond_added_cond_kwargs`` (same keys, N or 1 rows) is the
    unconditional branch's: SDXL pipelines pass the *negative* prompt's pooled embedding there (zeros for an empty
    negative prompt when ``force_zeros_for_empty_prompt``) and, by default, the same ``time_ids``. It is required
    rather than defaulted: reusing the prompt's pooled embedding would leak the prompt into the unconditional
    branch, and the right negative embedding depends on the pipeline.
    Initial noise is drawn on CPU from ``generator`` so that samples are reproducible across devices; it is scaled by
    the scheduler's ``init_noise_sigma`` after ``set_timesteps`` (as diffusers pipelines do), so every chunk of
    ``batch_size`` starts from the same distribution. Schedulers whose ``step`` draws noise (DDPM, ancestral ones)
    draw it from ``generator`` as well.
    """
    if num_inference_steps <= 0:
        raise ValueError(f"num_inference_steps must be > 0, got {num_inference_steps}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    if encoder_hidden_states.ndim != 3:
        raise ValueError(f"encoder_hidden_states must be [N, L, D], got {tuple(encoder_hidden_states.shape)}")
    n = encoder_hidden_states.shape[0]
    guided = guidance_scale > 1.0
    if added_cond_kwargs is not None:
        for k, v in added_cond_kwargs.items():
            _check_rows(f"added_cond_kwargs[{k!r}]", v, n)
    if guided:
        if uncond_hidden_states is None:
            raise ValueError(f"guidance_scale {guidance_scale} > 1 needs uncond_hidden_states")
        _check_rows("uncond_hidden_states", uncond_hidden_states, n, 3)
        if added_cond_kwargs is not None and uncond_added_cond_kwargs is None:
            raise ValueError(f"guidance_scale {guidance_scale} > 1 with added_cond_kwargs (SDXL) needs "
                             "uncond_added_cond_kwargs: the negative prompt's pooled text_embeds and its time_ids")
    if uncond_added_cond_kwargs is not None:
        keys = sorted(added_cond_kwargs or {})
        if sorted(uncond_added_cond_kwargs) != keys:
            raise ValueError(f"uncond_added_cond_kwargs must have the keys of added_cond_kwargs {keys}, got "
                             f"{sorted(uncond_added_cond_kwargs)}")
        for k, v in uncond_added_cond_kwargs.items():
            _check_rows(f"uncond_added_cond_kwargs[{k!r}]", v, n)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    noise = torch.randn((n, *shape), generator=generator)
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    outs = []
    for start in range(0, n, batch_size):
        sl = slice(start, min(n, start + batch_size))
        rows = sl.stop - sl.start
        hidden = encoder_hidden_states[sl].to(device, dtype)
        added = None if added_cond_kwargs is None else {
            k: _chunk(v, sl, rows, device, dtype) for k, v in added_cond_kwargs.items()}
        if guided:
            assert uncond_hidden_states is not None
            un = _chunk(uncond_hidden_states, sl, rows, device, dtype)
            un_added = None if uncond_added_cond_kwargs is None else {
                k: _chunk(v, sl, rows, device, dtype) for k, v in uncond_added_cond_kwargs.items()}
        # init_noise_sigma depends on the schedule for sigma-based schedulers (Euler): read it after set_timesteps
        scheduler.set_timesteps(num_inference_steps, device=device)
        x = noise[sl].to(device, dtype) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            inp = scheduler.scale_model_input(x, t)
            tt = t.expand(x.shape[0]).to(device)
            pred = unet_forward(model, inp, tt, hidden, added)
            if guided:
                pred_u = unet_forward(model, inp, tt, un, un_added)
                pred = pred_u + guidance_scale * (pred - pred_u)
            x = scheduler.step(pred, t, x, **step_kwargs).prev_sample
        outs.append(x.float().cpu())
    return torch.cat(outs)
