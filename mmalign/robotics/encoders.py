"""Frame encoders for RAPL: a backbone (tiny CNN, torchvision ResNet-18 or an open_clip image tower) + projection head.

RAPL aligns a pretrained vision encoder with the user's notion of similarity (Tian et al. 2024; the reference code
uses an ImageNet ResNet-18 + linear head to 32-d). Pretrained weights are loaded only from a local file
(``weights_path``; no hub access): ResNet-18 from a torchvision state dict, open_clip from a checkpoint path accepted
by ``open_clip.create_model(..., pretrained=path)``. Without weights the backbone is randomly initialised (and for
open_clip built as a tiny ViT), which is what the CPU tests and benchmarks use.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TinyConvNet", "FrameEncoder", "build_encoder", "calibrate_embedding_norm", "ENCODER_KINDS"]

ENCODER_KINDS = ("tiny_cnn", "resnet18", "open_clip")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class TinyConvNet(nn.Module):
    """Four stride-2 convolutions to a 4x4 map, flattened: keeps *where* things are, which the reward depends on."""

    def __init__(self, channels: int = 16, image_size: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c_out in (channels, 2 * channels, 2 * channels, 2 * channels):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.ReLU()]
            c_in = c_out
        self.net = nn.Sequential(*layers)
        self.out_dim = c_in * (image_size // 16) ** 2

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).flatten(1)


class FrameEncoder(nn.Module):
    """Maps uint8 frames ``(..., H, W, 3)`` to embeddings ``(..., embed_dim)`` (backbone + linear projection head).

    ``embed_norm=True`` standardises every embedding dimension (``BatchNorm1d`` without affine parameters): batch
    statistics while training, stored statistics in ``eval()`` mode (set them with
    :func:`calibrate_embedding_norm`). Without it, a randomly initialised encoder maps every frame of a mostly
    static scene to nearly the same direction (cosine similarity >= 0.996 between all frames of PushAvoid at
    init: the shared background and the head's bias dominate), so every cosine-distance OT cost is ~0, the
    RAPL logits start at 0 and training can stall at ``log 2`` (docs/methods/rapl.md). RAPL's code has no such
    layer (``embed_norm=False`` reproduces it).
    """

    mean: Tensor
    std: Tensor

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        embed_dim: int,
        input_size: int,
        imagenet_norm: bool,
        embed_norm: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, embed_dim)
        # eps 1e-8, not 1e-5: at init the per-dimension variance across frames is ~1e-6 (nearly identical frames)
        self.norm = nn.BatchNorm1d(embed_dim, eps=1e-8, affine=False, momentum=None) if embed_norm else nn.Identity()
        self.input_size = input_size
        self.embed_dim = embed_dim
        mean = torch.tensor(_IMAGENET_MEAN if imagenet_norm else (0.5, 0.5, 0.5)).view(1, 3, 1, 1)
        std = torch.tensor(_IMAGENET_STD if imagenet_norm else (0.5, 0.5, 0.5)).view(1, 3, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def project(self, frames: Tensor) -> Tensor:
        """Embeddings before the optional normalisation, ``(M, embed_dim)`` for frames ``(..., H, W, 3)``."""
        if frames.dim() < 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must have shape (..., H, W, 3), got {tuple(frames.shape)}")
        x = frames.reshape(-1, *frames.shape[-3:]).to(self.device).permute(0, 3, 1, 2).float() / 255.0
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        x = (x - self.mean) / self.std
        return self.head(self.backbone(x))

    def forward(self, frames: Tensor) -> Tensor:
        lead = frames.shape[:-3]
        return self.norm(self.project(frames)).reshape(*lead, self.embed_dim)


@torch.no_grad()
def calibrate_embedding_norm(encoder: FrameEncoder, frames: Tensor, chunk: int = 256) -> None:
    """Set the stored statistics of ``encoder``'s embedding normalisation to the exact per-dimension mean and
    (population) variance of its embeddings of ``frames (..., H, W, 3)``, then put the encoder in ``eval()`` mode.
    An encoder built without ``embed_norm`` is only put in ``eval()`` mode."""
    encoder.eval()
    if not isinstance(encoder.norm, nn.BatchNorm1d):
        return
    flat = torch.as_tensor(frames).reshape(-1, *frames.shape[-3:])
    if flat.shape[0] < 2:
        raise ValueError(f"calibrate_embedding_norm needs at least 2 frames, got {flat.shape[0]}")
    z = torch.cat([encoder.project(flat[i : i + chunk]) for i in range(0, flat.shape[0], chunk)]).double()
    encoder.norm.running_mean.copy_(z.mean(0))
    encoder.norm.running_var.copy_(z.var(0, unbiased=False))
    encoder.norm.num_batches_tracked.fill_(1)


def _load_state_dict(path: str | Path) -> dict[str, Tensor]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weights_path must be an existing file, got {str(path)!r}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def build_encoder(
    kind: str = "tiny_cnn",
    embed_dim: int = 32,
    image_size: int = 64,
    weights_path: str | None = None,
    open_clip_model: str = "ViT-B-32",
    embed_norm: bool = False,
) -> FrameEncoder:
    """Build a :class:`FrameEncoder`.

    ``kind``: ``"tiny_cnn"`` (random, fast; benchmarks), ``"resnet18"`` (torchvision; ImageNet weights from
    ``weights_path`` when given, inputs resized to 112 as in the RAPL code) or ``"open_clip"`` (the image tower of
    ``open_clip_model`` with weights from ``weights_path``; without weights a tiny 2-layer ViT at ``image_size``).
    """
    if kind not in ENCODER_KINDS:
        raise ValueError(f"kind must be one of {list(ENCODER_KINDS)}, got {kind!r}")
    if embed_dim < 1:
        raise ValueError(f"embed_dim must be >= 1, got {embed_dim}")
    if kind == "tiny_cnn":
        if image_size % 16:
            raise ValueError(f"image_size must be a multiple of 16 for tiny_cnn, got {image_size}")
        net = TinyConvNet(image_size=image_size)
        if weights_path:
            net.load_state_dict(_load_state_dict(weights_path))
        return FrameEncoder(net, net.out_dim, embed_dim, image_size, imagenet_norm=False, embed_norm=embed_norm)
    if kind == "resnet18":
        import torchvision

        net = torchvision.models.resnet18(weights=None)
        if weights_path:
            net.load_state_dict(_load_state_dict(weights_path))
        net.fc = nn.Identity()
        return FrameEncoder(net, 512, embed_dim, 112, imagenet_norm=True, embed_norm=embed_norm)
    import open_clip

    if weights_path:
        model = open_clip.create_model(open_clip_model, pretrained=str(weights_path))
        visual = model.visual
        size = visual.image_size[0] if isinstance(visual.image_size, tuple) else int(visual.image_size)
        enc = FrameEncoder(visual, int(visual.output_dim), embed_dim, size, imagenet_norm=True, embed_norm=embed_norm)
        # A CLIP tower expects the pixel statistics it was trained with (OpenAI CLIP's, or the checkpoint's own
        # preprocess config, e.g. 0.5/0.5 for SigLIP), not ImageNet's; open_clip records them on the tower.
        mean, std = getattr(visual, "image_mean", None), getattr(visual, "image_std", None)
        if mean is not None and std is not None:
            enc.mean = torch.tensor(tuple(mean), dtype=torch.float32).view(1, 3, 1, 1)
            enc.std = torch.tensor(tuple(std), dtype=torch.float32).view(1, 3, 1, 1)
        return enc
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    cfg = CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=16, image_size=image_size)
    visual = _build_vision_tower(64, cfg)
    return FrameEncoder(visual, 64, embed_dim, image_size, imagenet_norm=True, embed_norm=embed_norm)
