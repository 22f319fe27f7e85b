"""The latent cache: image pairs encoded once (VAE latents + prompt embeddings), keyed by data and encoder identity.

The file ``<folder>/<key>.safetensors`` is a pair cache (:func:`mmalign.diffusion.data.save_pair_cache`) whose key
hashes the pairs (:meth:`mmalign.data.image_pairs.ImagePairDataset.fingerprint`: captions, image identities,
labels, resolution) and the weights and configs of the VAE and text encoder(s). Changing the data or the model
gives another key, so a stale cache is never read. Cached images are centre-cropped and not flipped (the
augmentation is frozen), and each VAE latent is one draw of the latent distribution.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

__all__ = ["encoder_identity", "cache_key", "cached_latents"]


def _hash_module(h: Any, module: torch.nn.Module) -> None:
    config = getattr(module, "config", None)  # diffusers: a FrozenDict; transformers: a PretrainedConfig
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())


def encoder_identity(pipe: Any) -> str:
    """A digest of the pipeline parts that produce the cached tensors: VAE and text encoder(s), weights and config."""
    h = hashlib.sha256()
    for part in ("vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, part, None)
        if module is not None:
            h.update(part.encode())
            _hash_module(h, module)
    return h.hexdigest()


def cache_key(pairs: Any, pipe: Any) -> str:
    return hashlib.sha256(f"{pairs.fingerprint()}|{encoder_identity(pipe)}".encode()).hexdigest()[:24]


def cached_latents(folder: Path, pairs: Any, encoder: Any, batch_size: int = 8) -> Any:
    """The pair dataset of ``pairs`` encoded by ``encoder``: read from ``folder`` when its key is there, else
    encoded now (centre crop, no flip) and written there first."""
    from mmalign.diffusion.data import load_pair_cache, save_pair_cache
    from mmalign.diffusion.encoding import encode_dataset

    folder = Path(folder)
    path = folder / f"{cache_key(pairs, encoder.pipe)}.safetensors"
    if not path.is_file():
        fixed = pairs.deterministic()
        device = torch.device("cuda") if torch.cuda.is_available() else None  # encode where training will run
        tensors = encode_dataset(encoder, fixed, batch_size=batch_size, device=device)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_pair_cache(tmp, tensors)
        tmp.replace(path)  # atomic: a killed run never leaves a half-written cache under the key
        print(f"[mmalign] latent cache written: {path}")
    return load_pair_cache(path, keep_ties=pairs.keep_ties)
