"""From image pairs to what the UNet trains on: resize/crop/flip, VAE latents and prompt embeddings in batches.

:func:`prepare_pair` turns one (chosen, rejected) pair of PIL images into pixel tensors at the model's resolution
(as Diffusion-DPO's and MaPO's scripts do: the rejected image is first resized to the chosen one's size, both get
the same resize, crop and flip). :class:`PairEncoder` encodes a collated batch with the pipeline's frozen VAE and
text encoder(s) on the fly: VAE latents of both images, prompt embeddings and, for SDXL, pooled embeddings and time
ids. :func:`encode_dataset` runs it once over a whole data set to build a latent cache.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

__all__ = ["pil_to_tensor", "prepare_pair", "PairEncoder", "encode_dataset"]


def pil_to_tensor(image: Any) -> Tensor:
    """A PIL image as RGB ``[3, H, W]`` float in [-1, 1]."""
    rgb = image.convert("RGB")
    data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).reshape(rgb.height, rgb.width, 3)
    return data.permute(2, 0, 1).float() / 127.5 - 1.0


def prepare_pair(chosen: Any, rejected: Any, resolution: int, *, random_crop: bool = False, hflip: bool = False,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(chosen [3,R,R], rejected [3,R,R], time_ids [6])`` in [-1, 1] from two PIL images.

    The rejected image is resized to the chosen one's size; the shorter side of both is resized to ``resolution``
    (bilinear, antialiased), then both are cropped alike (centre, or at one random place) and, with ``hflip``,
    flipped together with probability ½. ``time_ids`` is SDXL's micro-conditioning: original (h, w) of the chosen
    image, crop top-left (y, x), target (R, R). Random draws come from ``generator`` (default: torch's global RNG,
    which the trainer reseeds per batch).
    """
    from PIL import Image

    if resolution <= 0:
        raise ValueError(f"resolution must be a positive integer, got {resolution}")
    if rejected.size != chosen.size:
        rejected = rejected.resize(chosen.size, Image.BILINEAR)
    h, w = chosen.height, chosen.width
    pair = torch.cat([pil_to_tensor(chosen), pil_to_tensor(rejected)])  # [6, H, W]: one resize/crop/flip for both
    scale = resolution / min(h, w)
    size = (max(resolution, round(h * scale)), max(resolution, round(w * scale)))
    pair = torch.nn.functional.interpolate(pair[None], size=size, mode="bilinear", align_corners=False,
                                           antialias=True)[0]
    if random_crop:
        y = int(torch.randint(0, size[0] - resolution + 1, (1,), generator=generator))
        x = int(torch.randint(0, size[1] - resolution + 1, (1,), generator=generator))
    else:
        y, x = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    pair = pair[:, y : y + resolution, x : x + resolution]
    if hflip and float(torch.rand((), generator=generator)) < 0.5:
        pair = pair.flip(-1)
    time_ids = torch.tensor([h, w, y, x, resolution, resolution], dtype=torch.float32)
    return pair[:3].clamp(-1, 1), pair[3:].clamp(-1, 1), time_ids


class PairEncoder:
    """Encodes collated pixel batches with a pipeline's frozen VAE and text encoder(s) into pair-batch tensors.

    Input batch: ``chosen_pixels``/``rejected_pixels`` ``[B, 3, R, R]`` in [-1, 1], ``caption`` (B strings),
    ``time_ids`` ``[B, 6]``. Output: ``chosen``/``rejected`` latents (VAE sample × ``scaling_factor``, drawn with
    ``generator``), ``encoder_hidden_states`` and, for pipelines with pooled embeddings (SDXL), ``text_embeds`` and
    ``time_ids``. The frozen modules follow the trained model's device at the first call.
    """

    def __init__(self, pipe: Any, generator: torch.Generator | None = None, vae_batch_size: int = 8,
                 encode_text: bool = True) -> None:
        if vae_batch_size <= 0:
            raise ValueError(f"vae_batch_size must be a positive integer, got {vae_batch_size}")
        self.pipe, self.generator, self.vae_batch_size = pipe, generator, vae_batch_size
        self.encode_text = encode_text  # False: pass the captions on (the loss encodes them, text encoders train)

    @torch.no_grad()
    def latents(self, pixels: Tensor) -> Tensor:
        vae = self.pipe.vae
        param = next(vae.parameters())
        out = []
        for i in range(0, pixels.shape[0], self.vae_batch_size):
            dist = vae.encode(pixels[i : i + self.vae_batch_size].to(param.device, param.dtype)).latent_dist
            out.append(dist.sample(generator=self.generator).float())
        return torch.cat(out) * float(vae.config.scaling_factor)

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any], device: torch.device | None = None) -> dict[str, Any]:
        from mmalign.diffusion.pipeline import encode_prompts

        if device is not None and self.pipe.device != device:
            self.pipe.to(device)
        n = batch["chosen_pixels"].shape[0]
        lat = self.latents(torch.cat([batch["chosen_pixels"], batch["rejected_pixels"]]))
        out: dict[str, Any] = {"chosen": lat[:n], "rejected": lat[n:]}
        if not self.encode_text:
            out["captions"] = list(batch["caption"])
            if getattr(self.pipe.unet.config, "addition_embed_type", None) == "text_time":  # SDXL
                out["time_ids"] = batch["time_ids"].to(lat.device, torch.float32)
            return out
        emb = encode_prompts(self.pipe, list(batch["caption"]))
        out["encoder_hidden_states"] = emb["encoder_hidden_states"].to(lat.device)
        if "text_embeds" in emb:
            out["text_embeds"] = emb["text_embeds"].to(lat.device)
            out["time_ids"] = batch["time_ids"].to(lat.device, torch.float32)
        return out


def encode_dataset(encoder: PairEncoder, dataset: Any, batch_size: int = 8,
                   device: torch.device | None = None) -> dict[str, Tensor]:
    """Every item of ``dataset`` (pixel pairs, see :class:`PairEncoder`) encoded, as pair-cache columns on the CPU
    (with ``labels`` where the items carry a ``label``)."""
    from torch.utils.data import default_collate

    parts: dict[str, list[Tensor]] = {}
    for start in range(0, len(dataset), batch_size):
        items: Sequence[Any] = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
        batch = default_collate(list(items))
        for key, value in encoder(batch, device).items():
            parts.setdefault(key, []).append(value.cpu())
        if "label" in batch:  # kept ties: the cache's labels column (1, or 0.5 for a tie)
            parts.setdefault("labels", []).append(batch["label"].float())
    return {k: torch.cat(v) for k, v in parts.items()}
