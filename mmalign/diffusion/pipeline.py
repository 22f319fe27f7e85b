"""Full diffusers pipelines around a trained UNet: build tiny ones offline, generate images, score them.

``tiny_sd_pipeline`` assembles a real :class:`diffusers.StableDiffusionPipeline` (UNet, ``AutoencoderKL``,
``CLIPTextModel`` + ``CLIPTokenizer``, DDIM scheduler) from configs only: the tokenizer is a byte-level BPE built in
memory (every byte, plus one merged token per given word), so nothing is downloaded. ``with_unet`` swaps a trained
(optionally LoRA-wrapped) UNet into any pipeline, ``generate`` runs the pipeline's own ``__call__`` (prompt
encoding, CFG, scheduler loop, VAE decode) and ``evaluate_pipeline`` scores the images with pluggable scorers
(:mod:`mmalign.diffusion.scorers`). ``encode_prompts`` gives the prompt embeddings that training caches
(and, for SDXL, the pooled ``text_embeds``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

__all__ = ["tiny_clip_tokenizer", "tiny_sd_pipeline", "tiny_sdxl_pipeline", "plain_unet", "with_unet", "encode_prompts",
           "prompt_conditioning", "generate", "evaluate_pipeline", "save_images", "image_grid"]

_SPECIALS = ("<|startoftext|>", "<|endoftext|>")


def _byte_chars() -> list[str]:
    # GPT-2 / CLIP byte-to-unicode table: printable bytes map to themselves, the rest to code points from 256 up
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    extra = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(extra))]


def tiny_clip_tokenizer(words: Sequence[str] = (), model_max_length: int = 16) -> Any:
    """A CLIP byte-level BPE tokenizer built in memory: every byte is a token, each of ``words`` one merged token.

    Any text tokenizes (unknown words fall apart into bytes); ``model_max_length`` is the padded prompt length.
    """
    from transformers import CLIPTokenizer

    chars = _byte_chars()
    vocab: dict[str, int] = {}
    for tok in (*_SPECIALS, *chars, *(c + "</w>" for c in chars)):
        vocab.setdefault(tok, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in words:
        w = word.lower()
        if not w.isalpha() or not w.isascii():
            raise ValueError(f"words must be ASCII letters only (one BPE token each), got {word!r}")
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        while len(parts) > 1:  # merge left to right: c i r ... -> ci r ... -> cir ... -> circle</w>
            pair = (parts[0], parts[1])
            if pair not in merges:
                merges.append(pair)
            parts = [parts[0] + parts[1], *parts[2:]]
            vocab.setdefault(parts[0], len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def tiny_sd_pipeline(unet: Any | None = None, *, words: Sequence[str] = (), image_size: int = 32,
                     text_dim: int = 32, seed: int = 0) -> Any:
    """A complete ``StableDiffusionPipeline`` from tiny configs (no download): VAE (2× down), CLIP text encoder,
    in-memory tokenizer, DDIM scheduler and ``unet`` (default: a random 4-channel latent UNet with
    ``cross_attention_dim = text_dim``). Images are ``image_size``² RGB; latents ``[4, image_size/2, image_size/2]``.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if image_size % 2:
        raise ValueError(f"image_size must be even (the VAE halves it), got {image_size}")
    tokenizer = tiny_clip_tokenizer(words)
    torch.manual_seed(seed)
    if unet is None:
        unet = UNet2DConditionModel(
            block_out_channels=(16, 32), layers_per_block=1, sample_size=image_size // 2, in_channels=4,
            out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=text_dim, attention_head_dim=4,
            norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=4, sample_size=image_size)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=text_dim, intermediate_size=2 * text_dim, num_attention_heads=2,
        num_hidden_layers=2, max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(*, words: Sequence[str] = (), image_size: int = 32, text_dim: int = 16, seed: int = 0) -> Any:
    """A complete ``StableDiffusionXLPipeline`` from tiny configs (no download): two CLIP text encoders (the second
    with a projection: the pooled ``text_embeds``), a UNet with SDXL's ``text_time`` added conditioning (pooled
    embedding + 6 time ids), a VAE (2× down) and a DDIM scheduler. Latents ``[4, image_size/2, image_size/2]``."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if image_size % 2:
        raise ValueError(f"image_size must be even (the VAE halves it), got {image_size}")
    tokenizer = tiny_clip_tokenizer(words)
    torch.manual_seed(seed)
    time_dim = 8
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=image_size // 2, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=time_dim, projection_class_embeddings_input_dim=text_dim + 6 * time_dim,
        cross_attention_dim=2 * text_dim, norm_num_groups=1)
    vae = AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=4, sample_size=image_size)
    text_cfg = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=text_dim, intermediate_size=2 * text_dim, num_attention_heads=2,
        num_hidden_layers=2, max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=text_dim)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=CLIPTextModel(text_cfg), tokenizer=tokenizer,
                                     text_encoder_2=CLIPTextModelWithProjection(text_cfg), tokenizer_2=tokenizer,
                                     unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def plain_unet(unet: torch.nn.Module) -> torch.nn.Module:
    # pipelines read unet.config / in_channels: hand them the diffusers module. peft injects its LoRA layers into
    # that module, so the adapters stay active; DDP/accelerate wrappers are peeled off first
    while hasattr(unet, "module") and isinstance(unet.module, torch.nn.Module):
        unet = unet.module
    unet = unet.get_base_model() if hasattr(unet, "get_base_model") else unet
    # a UNet trained together with its text encoders (mmalign.diffusion.text_training) holds the UNet inside
    return unet.unet if hasattr(unet, "text_encoders") else unet


def with_unet(pipe: Any, unet: torch.nn.Module) -> Any:
    """The same pipeline class and components with ``unet`` (full weights or peft LoRA-wrapped) as its UNet."""
    plain = plain_unet(unet)
    if plain.config.in_channels != pipe.unet.config.in_channels:
        raise ValueError(f"unet must take the pipeline's {pipe.unet.config.in_channels} latent channels, got "
                         f"{plain.config.in_channels}")
    new = type(pipe)(**{**pipe.components, "unet": plain})
    new.set_progress_bar_config(disable=True)
    return new


@torch.no_grad()
def encode_prompts(pipe: Any, prompts: Sequence[str]) -> dict[str, Tensor]:
    """:func:`prompt_conditioning` without gradients, as float32 CPU tensors (pair-cache columns)."""
    return {k: v.float().cpu() for k, v in prompt_conditioning(pipe, prompts).items()}


def prompt_conditioning(pipe: Any, prompts: Sequence[str]) -> dict[str, Tensor]:
    """Prompt embeddings exactly as the pipeline conditions on them (on its device; gradients flow to trainable
    text encoders).

    Returns ``{"encoder_hidden_states": [N, L, D]}``, plus ``"text_embeds": [N, P]`` (the pooled embedding of the
    last text encoder) for pipelines whose ``encode_prompt`` returns pooled embeddings (SDXL:
    ``(prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds)``). An SDXL
    cache also needs ``time_ids`` ``[N, 6]`` per image (:func:`mmalign.diffusion.data.sdxl_time_ids`).
    """
    out = pipe.encode_prompt(list(prompts), device=pipe.device, num_images_per_prompt=1,
                             do_classifier_free_guidance=False)
    if not isinstance(out, (tuple, list)) or len(out) not in (2, 4):
        got = f"{len(out)} values" if isinstance(out, (tuple, list)) else type(out).__name__
        raise ValueError(f"{type(pipe).__name__}.encode_prompt must return (prompt_embeds, negative_prompt_embeds) "
                         f"or, SDXL, (prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, "
                         f"negative_pooled_prompt_embeds); got {got}")
    emb = {"encoder_hidden_states": out[0]}
    if len(out) == 4:
        if out[2] is None:
            raise ValueError(f"{type(pipe).__name__}.encode_prompt returned no pooled_prompt_embeds; an SDXL-type "
                             "UNet needs them as text_embeds")
        emb["text_embeds"] = out[2]
    return emb


def generate(pipe: Any, prompts: Sequence[str] | None = None, *, prompt_embeds: Tensor | None = None,
             negative_prompt_embeds: Tensor | None = None, num_inference_steps: int = 20, guidance_scale: float = 1.0,
             generator: torch.Generator | None = None, **kwargs: Any) -> Tensor:
    """Images ``[N, 3, H, W]`` in [-1, 1] from the pipeline's own ``__call__`` (prompts or precomputed embeddings).

    ``guidance_scale > 1`` uses classifier-free guidance against the empty prompt (tokenized by the pipeline) or
    ``negative_prompt_embeds``. Extra keyword arguments go to the pipeline (``height``, ``width``, ...).
    """
    if (prompts is None) == (prompt_embeds is None):
        raise ValueError("give exactly one of prompts or prompt_embeds")
    if num_inference_steps <= 0:
        raise ValueError(f"num_inference_steps must be > 0, got {num_inference_steps}")
    out = pipe(prompt=None if prompts is None else list(prompts), prompt_embeds=prompt_embeds,
               negative_prompt_embeds=negative_prompt_embeds, num_inference_steps=num_inference_steps,
               guidance_scale=guidance_scale, generator=generator, output_type="pt", **kwargs)
    return out.images.float().cpu() * 2.0 - 1.0  # the pipeline returns [0, 1]


def evaluate_pipeline(pipe: Any, prompts: Sequence[str], scorers: dict[str, Callable[..., Tensor]], *,
                      images_per_prompt: int = 1, seed: int = 0, **gen_kwargs: Any) -> tuple[dict[str, float], Tensor]:
    """Generate ``images_per_prompt`` images per prompt (fixed seed) and score them: ``{name: mean score}``, images.

    Each scorer is called as ``scorer(images, captions=[prompt per image], **context)`` (extra context is ignored by
    scorers that do not need it) and returns ``[N]``.
    """
    if images_per_prompt <= 0:
        raise ValueError(f"images_per_prompt must be > 0, got {images_per_prompt}")
    captions = [p for p in prompts for _ in range(images_per_prompt)]
    images = generate(pipe, captions, generator=torch.Generator().manual_seed(seed), **gen_kwargs)
    scores = {name: float(fn(images, captions=captions).float().mean()) for name, fn in scorers.items()}
    return scores, images


def save_images(images: Tensor, folder: str | Path, names: Sequence[str]) -> list[Path]:
    """Write images ``[N, 3, H, W]`` in [-1, 1] as ``folder/<name>.png``; returns the paths."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if len(names) != images.shape[0]:
        raise ValueError(f"names must name each of the {images.shape[0]} images, got {len(names)}")
    pixels = ((images.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    paths = []
    for name, img in zip(names, pixels):
        paths.append(folder / f"{name}.png")
        Image.fromarray(img).save(paths[-1])
    return paths


def image_grid(images: Tensor, rows: int) -> Tensor:
    """Images ``[N, 3, H, W]`` tiled as one ``[3, rows·H, cols·W]`` image, row-major (N = rows × cols)."""
    n, c, h, w = images.shape
    if rows <= 0 or n % rows:
        raise ValueError(f"{n} images do not fill {rows} rows")
    cols = n // rows
    return images.reshape(rows, cols, c, h, w).permute(2, 0, 3, 1, 4).reshape(c, rows * h, cols * w)
