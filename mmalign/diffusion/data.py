"""Diffusion preference data: image-pair loading with clear errors, cached VAE latents / text embeddings, datasets.

The training loop never touches raw images or prompts: pairs are turned once into model-space tensors (VAE latents,
or pixels for a pixel-space UNet) and precomputed prompt embeddings, cached as safetensors, and served by
:class:`CachedPairDataset` as dicts the adapter's loss function takes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

__all__ = [
    "load_image",
    "load_image_pair",
    "encode_latents",
    "sdxl_time_ids",
    "CachedPairDataset",
    "save_pair_cache",
    "load_pair_cache",
]

_REQUIRED = ("chosen", "rejected", "encoder_hidden_states")


def load_image(path: str | Path) -> Tensor:
    """An RGB image file as ``[3, H, W]`` in [-1, 1]; unreadable or corrupt files raise ``ValueError`` naming them."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"image file {str(path)!r} does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            rgb = im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"image file {str(path)!r} is corrupt or not an image ({err})") from err
    from mmalign.diffusion.encoding import pil_to_tensor

    return pil_to_tensor(rgb)


def load_image_pair(chosen: str | Path, rejected: str | Path, resolution: int | None = None) -> tuple[Tensor, Tensor]:
    """Load a (chosen, rejected) pair; sizes must agree (or pass ``resolution`` to resize both, square)."""
    w, l_ = load_image(chosen), load_image(rejected)
    if resolution is not None:
        if resolution <= 0:
            raise ValueError(f"resolution must be a positive integer, got {resolution}")
        w, l_ = (torch.nn.functional.interpolate(x[None], size=(resolution, resolution), mode="bilinear",
                                                 align_corners=False, antialias=True)[0] for x in (w, l_))
    elif w.shape != l_.shape:
        raise ValueError(f"image pair sizes differ: chosen {str(chosen)!r} is {tuple(w.shape[1:])}, rejected "
                         f"{str(rejected)!r} is {tuple(l_.shape[1:])} (H, W); pass resolution= to resize both")
    return w, l_


@torch.no_grad()
def encode_latents(vae: Any, images: Tensor, batch_size: int = 8, generator: torch.Generator | None = None) -> Tensor:
    """VAE latents ``[N, C_lat, H/8, W/8]`` of images ``[N, 3, H, W]`` in [-1, 1], scaled by ``scaling_factor``."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, H, W] in [-1, 1], got shape {tuple(images.shape)}")
    device = next(vae.parameters()).device
    dtype = next(vae.parameters()).dtype
    out = []
    for i in range(0, images.shape[0], batch_size):
        dist = vae.encode(images[i : i + batch_size].to(device, dtype)).latent_dist
        out.append(dist.sample(generator=generator).float().cpu())
    return torch.cat(out) * float(vae.config.scaling_factor)


def sdxl_time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int] = (0, 0),
                  target_size: tuple[int, int] | None = None) -> Tensor:
    """SDXL's micro-conditioning ``[6]``: original (h, w), crop top-left (y, x), target (h, w)."""
    target = target_size or original_size
    return torch.tensor([*original_size, *crop_top_left, *target], dtype=torch.float32)


PIXEL_SLACK = 0.05  # pixel caches hold [-1, 1]; beyond ±(1 + this) the images were scaled wrongly (e.g. 0..255)


def _bad_rows(mask: Tensor) -> list[int]:
    return mask.nonzero().flatten()[:10].tolist()


class CachedPairDataset(torch.utils.data.Dataset):
    """Preference pairs as precomputed tensors (chosen first; a ``labels`` column, if given, is applied here).

    tensors: ``chosen``/``rejected`` ``[N, C, H, W]``, ``encoder_hidden_states`` ``[N, L, D]``, optionally SDXL's
    ``text_embeds`` ``[N, P]`` and ``time_ids`` ``[N, 6]``, and ``labels`` ``[N]`` = P(first ≻ second); pairs with
    label < 0.5 are swapped so that chosen is first; ties (0.5) are dropped (as Pick-a-Pic "split decisions"), or,
    with ``keep_ties``, kept with a ``label`` column (1, or 0.5 for a tie) that the loss weights both ways.
    ``space``: ``pixels`` (values must lie in [-1, 1]), ``latents`` (any finite values) or ``auto`` (pixels when
    C = 3, as no VAE has 3 latent channels). Bad values raise ``ValueError`` naming the column and rows.
    """

    def __init__(self, tensors: dict[str, Tensor], keep_ties: bool = False, space: str = "auto") -> None:
        missing = [k for k in _REQUIRED if k not in tensors]
        if missing:
            raise ValueError(f"tensors must hold {list(_REQUIRED)}; missing {missing}")
        if space not in ("auto", "pixels", "latents"):
            raise ValueError(f"space must be auto, pixels or latents, got {space!r}")
        t = dict(tensors)
        n = t["chosen"].shape[0]
        for key, value in t.items():
            if value.shape[0] != n:
                raise ValueError(f"tensors[{key!r}] has {value.shape[0]} rows, expected {n} (rows of 'chosen')")
        if t["chosen"].shape != t["rejected"].shape:
            raise ValueError(f"rejected must have the shape of chosen {tuple(t['chosen'].shape)}, got "
                             f"{tuple(t['rejected'].shape)}")
        pixels = space == "pixels" or (space == "auto" and t["chosen"].ndim == 4 and t["chosen"].shape[1] == 3)
        for key in ("chosen", "rejected", "encoder_hidden_states", "text_embeds", "time_ids"):
            if key not in t:
                continue
            flat = t[key].flatten(1).float()
            bad = ~torch.isfinite(flat).all(1)
            if bad.any():
                raise ValueError(f"tensors[{key!r}] rows {_bad_rows(bad)} hold non-finite values (corrupt image, "
                                 "latent or embedding)")
            if pixels and key in ("chosen", "rejected"):
                bad = flat.abs().amax(1) > 1.0 + PIXEL_SLACK
                if bad.any():
                    raise ValueError(f"tensors[{key!r}] rows {_bad_rows(bad)} hold pixels outside [-1, 1] (max |x| "
                                     f"{flat.abs().max().item():.3g}); scale images to [-1, 1] (x / 127.5 - 1)")
        if ("text_embeds" in t) != ("time_ids" in t):
            raise ValueError("text_embeds and time_ids (SDXL added conditioning) must be given together")
        if "labels" in t:
            labels = t.pop("labels").float()
            bad = ~((labels >= 0) & (labels <= 1))  # NaN fails both comparisons
            if bad.any():
                raise ValueError(f"labels must be P(first > second) in [0, 1]; rows {_bad_rows(bad)} hold "
                                 f"{labels[bad][:10].tolist()}")
            swap = labels < 0.5
            c, r = t["chosen"].clone(), t["rejected"].clone()
            c[swap], r[swap] = t["rejected"][swap], t["chosen"][swap]
            t["chosen"], t["rejected"] = c, r
            if keep_ties:
                t["label"] = torch.maximum(labels, 1.0 - labels)
            else:
                keep = labels != 0.5
                t = {k: v[keep] for k, v in t.items()}
        self.tensors = t

    def __len__(self) -> int:
        return self.tensors["chosen"].shape[0]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


def save_pair_cache(path: str | Path, tensors: dict[str, Tensor]) -> None:
    """Write a pair cache (validated first) as one safetensors file."""
    from safetensors.torch import save_file

    CachedPairDataset(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def load_pair_cache(path: str | Path, keys: Sequence[str] | None = None, keep_ties: bool = False) -> CachedPairDataset:
    """Read a pair cache written by :func:`save_pair_cache` (optionally only ``keys``).

    The ``labels`` column is read whenever the file holds it, whatever ``keys`` says: it decides which image of each
    pair is the chosen one (and drops ties), so leaving it out would silently train on reversed pairs.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"pair cache {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
            if keys is not None:
                missing = [k for k in keys if k not in names]
                if missing:
                    raise ValueError(f"keys {missing} are not in the cache, which holds {sorted(names)}")
                wanted = set(keys) | ({"labels"} & set(names))
                names = [k for k in names if k in wanted]
            data = {k: f.get_tensor(k) for k in names}
        return CachedPairDataset(data, keep_ties=keep_ties)
    except (ValueError, OSError, RuntimeError) as err:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"pair cache {str(path)!r}: {err}") from err
    except Exception as err:
        if type(err).__name__ != "SafetensorError":
            raise
        raise ValueError(f"pair cache {str(path)!r} is not a readable safetensors file ({err})") from err
