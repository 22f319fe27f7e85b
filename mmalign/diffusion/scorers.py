"""Pluggable image scorers: exact pixel statistics for the offline benchmark, and an open_clip CLIP score.

A scorer maps generated images ``[N, 3, H, W]`` in [-1, 1] (plus what it needs about the prompts) to per-image
scores ``[N]`` (higher = better) and is called as ``scorer(images, **context)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmalign.diffusion.shapes import shape_masks

__all__ = ["rgb_to_hsv", "circular_mean_hue", "shape_hue", "hue_distance", "HueScorer", "ShapeFidelityScorer", "ClipScorer"]


def rgb_to_hsv(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hue (degrees in [0, 360)), saturation and value, each ``[N, H, W]``, of images ``[N, 3, H, W]`` in [-1, 1]."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, H, W], got {tuple(images.shape)}")
    rgb = ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)
    r, g, b = rgb.unbind(1)
    mx, argmx = rgb.max(dim=1)
    mn = rgb.min(dim=1).values
    delta = mx - mn
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(argmx == 0, torch.remainder((g - b) / safe, 6.0), torch.where(argmx == 1, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    h = torch.where(delta > 0, h * 60.0, torch.zeros_like(h))
    s = torch.where(mx > 0, delta / torch.where(mx > 0, mx, torch.ones_like(mx)), torch.zeros_like(mx))
    return h, s, mx


def circular_mean_hue(images: torch.Tensor, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Saturation-weighted circular mean hue (degrees) ``[N]`` and its resultant length in [0, 1] ``[N]``.

    The grey background has zero saturation; ``weights`` ``[N, H, W]`` (e.g. the prompted shape's mask) further
    restrict which pixels count, so residual sampling noise in the background cannot shift the hue.
    """
    h, s, _ = rgb_to_hsv(images)
    rad = torch.deg2rad(h)
    w = (s if weights is None else s * weights.to(s.dtype)).flatten(1)
    c = (w * torch.cos(rad).flatten(1)).sum(1)
    si = (w * torch.sin(rad).flatten(1)).sum(1)
    total = w.sum(1).clamp_min(1e-8)
    return torch.remainder(torch.rad2deg(torch.atan2(si, c)), 360.0), torch.sqrt(c**2 + si**2) / total


def hue_distance(a: torch.Tensor, b: torch.Tensor | float) -> torch.Tensor:
    """Circular distance in degrees, in [0, 180]."""
    d = torch.remainder(torch.as_tensor(a) - torch.as_tensor(b), 360.0)
    return torch.minimum(d, 360.0 - d)


def shape_hue(images: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
    """Mean hue ``[N]`` of each image, inside the prompted shape's mask when ``classes`` are given."""
    weights = None if classes is None else shape_masks(images.shape[-1])[classes.long()]
    return circular_mean_hue(images, weights)[0]


class HueScorer:
    """Style match: 1 if an image's mean hue lies within ``tolerance`` degrees of ``target_hue``, else 0.

    With ``classes`` (shape ids of the prompts) only pixels inside the prompted shape's mask count.
    ``distance(images)`` gives the circular distance itself (lower is better).
    """

    def __init__(self, target_hue: float, tolerance: float = 20.0) -> None:
        if not 0 < tolerance <= 180:
            raise ValueError(f"tolerance must be in (0, 180] degrees, got {tolerance}")
        self.target_hue = float(target_hue)
        self.tolerance = float(tolerance)

    def distance(self, images: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        return hue_distance(shape_hue(images, classes), self.target_hue)

    def __call__(self, images: torch.Tensor, *, classes: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        return (self.distance(images, classes) <= self.tolerance).float()


class ShapeFidelityScorer:
    """Content check: IoU between an image's foreground and the prompted shape's exact mask.

    Foreground = pixels brighter than ``val_threshold`` in HSV value (shapes have value 0.9 whatever their hue, the
    background 0.2). ``correct`` tells whether the prompted shape is also the best-matching one among all shapes.
    """

    def __init__(self, size: int, val_threshold: float = 0.55) -> None:
        self.masks = shape_masks(size)
        self.val_threshold = val_threshold

    def foreground(self, images: torch.Tensor) -> torch.Tensor:
        return rgb_to_hsv(images)[2] > self.val_threshold

    def iou_all(self, images: torch.Tensor) -> torch.Tensor:
        """IoU ``[N, num_shapes]`` of each image's foreground with every shape mask."""
        if images.shape[-2:] != self.masks.shape[-2:]:
            raise ValueError(f"images must be {tuple(self.masks.shape[-2:])} pixels, got {tuple(images.shape[-2:])}")
        fg = self.foreground(images).flatten(1).float()[:, None, :]
        m = self.masks.flatten(1).float()[None]
        inter = (fg * m).sum(-1)
        union = ((fg + m) > 0).float().sum(-1)
        return inter / union.clamp_min(1.0)

    def correct(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        return (self.iou_all(images).argmax(1) == classes.long()).float()

    def __call__(self, images: torch.Tensor, *, classes: torch.Tensor, **_: Any) -> torch.Tensor:
        return self.iou_all(images).gather(1, classes.long()[:, None]).squeeze(1)


class ClipScorer:
    """CLIP score ``100 * max(cos(image, text), 0)`` with an open_clip model.

    ``pretrained`` is a local weights file (never downloaded); ``None`` keeps the random initialisation, which is
    only useful for tests. Captions are tokenised with open_clip's bundled tokenizer for the model (no download
    for the standard BPE tokenizer).
    """

    def __init__(self, model_name: str = "ViT-B-32", pretrained: str | Path | None = None,
                 model_cfg: dict[str, Any] | None = None, device: str | torch.device = "cpu") -> None:
        import open_clip

        if pretrained is not None and not Path(pretrained).is_file():
            raise ValueError(f"pretrained must be a local weights file, got {str(pretrained)!r} (not found)")
        if model_cfg is not None:
            # a model built from an explicit config dict (tiny test models); no registry lookup, no weights
            from open_clip.model import CLIP

            self.model = CLIP(**model_cfg)
            self.tokenizer = open_clip.SimpleTokenizer(context_length=model_cfg["text_cfg"]["context_length"])
            size = model_cfg["vision_cfg"]["image_size"]
        else:
            self.model = open_clip.create_model(model_name, pretrained=str(pretrained) if pretrained else None)
            self.tokenizer = open_clip.get_tokenizer(model_name)
            size = self.model.visual.image_size
        self.image_size = size if isinstance(size, int) else size[0]
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        # OpenAI CLIP normalisation constants
        self.mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], device=self.device)[:, None, None]
        self.std = torch.tensor([0.26862954, 0.26130258, 0.27577711], device=self.device)[:, None, None]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, *, captions: list[str], **_: Any) -> torch.Tensor:
        if len(captions) != images.shape[0]:
            raise ValueError(f"captions must have one entry per image ({images.shape[0]}), got {len(captions)}")
        x = ((images.float().to(self.device) + 1.0) / 2.0).clamp(0, 1)
        x = torch.nn.functional.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False)
        x = (x - self.mean) / self.std
        img = torch.nn.functional.normalize(self.model.encode_image(x), dim=-1)
        txt = torch.nn.functional.normalize(self.model.encode_text(self.tokenizer(captions).to(self.device)), dim=-1)
        return 100.0 * (img * txt).sum(-1).clamp_min(0.0)
