"""Pluggable image scorers: exact pixel statistics for the offline benchmark, and an open_clip CLIP score.

A scorer maps generated images ``[N, 3, H, W]`` in [-1, 1] (plus what it needs about the prompts) to per-image
scores ``[N]`` (higher = better) and is called as ``scorer(images, **context)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmalign.diffusion.shapes import shape_masks

__all__ = ["rgb_to_hsv", "circular_mean_hue", "shape_hue", "hue_distance", "HueScorer", "ShapeFidelityScorer",
           "clip_preprocess", "ClipScorer"]


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


OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_RESIZE_MODES = ("shortest", "longest", "squash")


def clip_preprocess(images: torch.Tensor, size: int | tuple[int, int], mean: Any = OPENAI_CLIP_MEAN,
                    std: Any = OPENAI_CLIP_STD, *, interpolation: str = "bicubic", resize_mode: str = "shortest",
                    fill_color: int = 0) -> torch.Tensor:
    """open_clip's evaluation transform on image tensors ``[N, 3, H, W]`` in [-1, 1] -> normalised ``[N, 3, h, w]``.

    The arguments are the fields of open_clip's ``PreprocessCfg``. ``resize_mode`` ``shortest`` (default): resize
    the shorter side to ``size`` and centre-crop (a non-square image is cropped, never squashed); ``longest``: resize
    the longer side and centre-pad with ``fill_color`` (0-255); ``squash``: resize to ``size`` ignoring the aspect
    ratio. Resizing is antialiased (close to PIL's, which open_clip uses on image files) and clamped to [0, 1] as
    PIL's 8-bit output is; then ``(x - mean) / std`` per channel.
    """
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, H, W] in [-1, 1], got shape {tuple(images.shape)}")
    if resize_mode not in _RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {list(_RESIZE_MODES)}, got {resize_mode!r}")
    if interpolation not in ("bicubic", "bilinear", "random"):
        raise ValueError(f"interpolation must be bicubic, bilinear or random, got {interpolation!r}")
    mode = InterpolationMode.BILINEAR if interpolation == "bilinear" else InterpolationMode.BICUBIC  # as open_clip
    th, tw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    x = ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)
    h, w = x.shape[-2:]
    if resize_mode == "squash":
        new: list[int] = [th, tw]
    elif resize_mode == "shortest" and th == tw:
        new = [th]  # torchvision's shorter-side resize, what open_clip's Resize(int) does
    else:  # open_clip's ResizeKeepRatio
        ratio = max(h / th, w / tw) if resize_mode == "longest" else min(h / th, w / tw)
        new = [round(h / ratio), round(w / ratio)]
    x = TF.resize(x, new, interpolation=mode, antialias=True).clamp(0.0, 1.0)
    if resize_mode != "squash":
        x = _center_crop_or_pad(x, th, tw, fill_color / 255.0)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).reshape(-1, 1, 1)
    sd = torch.as_tensor(std, dtype=x.dtype, device=x.device).reshape(-1, 1, 1)
    return (x - m) / sd


def _center_crop_or_pad(x: torch.Tensor, th: int, tw: int, fill: float) -> torch.Tensor:
    # open_clip's center_crop_or_pad (torchvision's center_crop rounding), padding with ``fill``
    h, w = x.shape[-2:]
    if th > h or tw > w:
        pad_h, pad_w = max(th - h, 0), max(tw - w, 0)
        x = torch.nn.functional.pad(x, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2), value=fill)
        h, w = x.shape[-2:]
    top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
    return x[..., top : top + th, left : left + tw]


class ClipScorer:
    """CLIP score ``100 * max(cos(image, text), 0)`` with an open_clip model.

    ``pretrained`` is a local weights file (never downloaded); ``None`` keeps the random initialisation, which is
    only useful for tests. Captions are tokenised with open_clip's bundled tokenizer for the model (no download
    for the standard BPE tokenizer). Images go through the model's own evaluation preprocessing
    (:func:`clip_preprocess` with open_clip's ``preprocess_cfg`` of the model: size, mean, std, interpolation,
    resize mode; OpenAI CLIP's mean and std where the model sets none). ``model_cfg`` (an open_clip model config
    dict) may hold a ``preprocess_cfg`` entry, as open_clip's model-config files may; ``preprocess_cfg`` overrides
    fields, e.g. the mean and std of weights that open_clip cannot infer from a local file path.
    """

    def __init__(self, model_name: str = "ViT-B-32", pretrained: str | Path | None = None,
                 model_cfg: dict[str, Any] | None = None, device: str | torch.device = "cpu",
                 preprocess_cfg: dict[str, Any] | None = None) -> None:
        import open_clip

        if pretrained is not None and not Path(pretrained).is_file():
            raise ValueError(f"pretrained must be a local weights file, got {str(pretrained)!r} (not found)")
        if model_cfg is not None:
            # a model built from an explicit config dict (tiny test models); no registry lookup, no weights
            from open_clip.model import CLIP

            model_cfg = dict(model_cfg)
            own_cfg = model_cfg.pop("preprocess_cfg", {})
            self.model = CLIP(**model_cfg)
            self.tokenizer = open_clip.SimpleTokenizer(context_length=model_cfg["text_cfg"]["context_length"])
            cfg = {"size": model_cfg["vision_cfg"]["image_size"], **own_cfg}
        else:
            self.model = open_clip.create_model(model_name, pretrained=str(pretrained) if pretrained else None)
            self.tokenizer = open_clip.get_tokenizer(model_name)
            cfg = dict(open_clip.get_model_preprocess_cfg(self.model))
        cfg = {"size": getattr(self.model.visual, "image_size", 224), "mean": OPENAI_CLIP_MEAN, "std": OPENAI_CLIP_STD,
               "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0, **cfg, **(preprocess_cfg or {})}
        unknown = sorted(set(cfg) - {"size", "mean", "std", "interpolation", "resize_mode", "fill_color", "mode"})
        if unknown:
            raise ValueError(f"preprocess_cfg keys must be open_clip PreprocessCfg fields (size, mean, std, "
                             f"interpolation, resize_mode, fill_color, mode), got unknown {unknown}")
        size = cfg["size"]
        cfg["size"] = size if isinstance(size, int) else (int(size[0]), int(size[1]))
        cfg.pop("mode", None)
        self.preprocess_cfg = cfg
        self.image_size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
        self.device = torch.device(device)
        self.model.to(self.device).eval()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, *, captions: list[str], **_: Any) -> torch.Tensor:
        if len(captions) != images.shape[0]:
            raise ValueError(f"captions must have one entry per image ({images.shape[0]}), got {len(captions)}")
        x = clip_preprocess(images.to(self.device), **self.preprocess_cfg)
        img = torch.nn.functional.normalize(self.model.encode_image(x), dim=-1)
        txt = torch.nn.functional.normalize(self.model.encode_text(self.tokenizer(captions).to(self.device)), dim=-1)
        return 100.0 * (img * txt).sum(-1).clamp_min(0.0)
