"""Reference log-probs computed once and cached on disk (safetensors), keyed by a hash of the encoded data.

With full fine-tuning there is no LoRA to disable, and keeping a second model copy doubles memory; so the frozen
reference is run once over the dataset before training and its per-token log-probs are stored. The file name
carries the SHA-256 of the model identity, of a fingerprint of its weights and of every encoded branch (token ids,
response masks, pixel values), so a changed dataset, processor, image or reference weights never reuses stale
numbers: it simply misses the cache.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from mmalign.vision_lm.objectives import PairCollator, PrefPair

__all__ = ["data_hash", "reference_cache", "weights_fingerprint"]


def _update(h: Any, t: Tensor) -> None:
    h.update(str(tuple(t.shape)).encode())
    h.update(str(t.dtype).encode())
    h.update(t.detach().contiguous().cpu().numpy().tobytes())


def weights_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter's and buffer's name, shape, dtype and float64 sum and absolute sum.

    Cheap (one reduction per tensor, on the tensor's device) and sensitive to any change of the weights a
    reference cache could have been computed with — a model re-trained or re-initialised under the same ``model_id``
    misses the cache instead of reusing stale log-probs.
    """
    h = hashlib.sha256()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        if t.numel() and t.dtype != torch.bool:
            x = t.detach().to(torch.float64)
            h.update(torch.stack([x.sum(), x.abs().sum()]).cpu().numpy().tobytes())
    return h.hexdigest()


def data_hash(collator: PairCollator, pairs: Sequence[PrefPair], model_id: str, batch_size: int = 64) -> str:
    """SHA-256 over ``model_id`` and the encoded branches of every pair (what the reference actually sees)."""
    h = hashlib.sha256(model_id.encode())
    for start in range(0, len(pairs), batch_size):
        batch = collator([(i, pairs[i]) for i in range(start, min(start + batch_size, len(pairs)))])
        for name in ("chosen", "rejected", "retrieved"):
            if name in batch:
                b = batch[name]
                for t in (b.input_ids, b.response_mask, *b.vision.values()):
                    _update(h, t)
    return h.hexdigest()


@torch.no_grad()
def reference_cache(
    collator: PairCollator, pairs: Sequence[PrefPair], cache_dir: str | Path, model_id: str, *,
    batch_size: int = 32, with_logprobs: bool = False,
) -> tuple[dict[str, Tensor], Path, bool]:
    """Per-token reference log-probs of every branch, ``{"chosen/tokens": (N, L), ...}``, loaded or computed.

    The collator's adapter model must currently *be* the reference (e.g. the SFT checkpoint before training).
    ``with_logprobs`` also stores the full-vocabulary log-softmax on the chosen response (``"chosen/logprobs"``,
    (N, L, V)), which RRPO's token-wise KL needs; only sensible for small vocabularies. Returns
    ``(tensors, path, hit)`` where ``hit`` says whether the file already existed.
    """
    from safetensors.torch import load_file, save_file

    if collator.ref_cache is not None:
        raise ValueError("the collator used to build a reference cache must not itself carry a ref_cache")
    weights = weights_fingerprint(collator.adapter.base_model)
    key = data_hash(collator, pairs, model_id + f"|weights={weights}|logprobs={with_logprobs}")
    path = Path(cache_dir) / f"ref_logps-{key[:32]}.safetensors"
    if path.is_file():
        return load_file(str(path)), path, True
    adapter = collator.adapter
    model = adapter.model
    was_training = model.training
    model.eval()
    parts: dict[str, list[Tensor]] = {}
    try:
        for start in range(0, len(pairs), batch_size):
            batch = collator([(i, pairs[i]) for i in range(start, min(start + batch_size, len(pairs)))])
            names = [n for n in ("chosen", "rejected", "retrieved") if n in batch]
            dev = next(model.parameters()).device
            out = adapter.branch_logps([batch[n].to(dev) for n in names], return_logits=with_logprobs)
            for n, (lp, _, logits) in zip(names, out):
                parts.setdefault(f"{n}/tokens", []).append(lp.float().cpu())
                if with_logprobs and n == "chosen":
                    parts.setdefault("chosen/logprobs", []).append(torch.log_softmax(logits, -1).cpu())
    finally:
        model.train(was_training)
    tensors: dict[str, Tensor] = {}
    for k, chunks in parts.items():
        width = max(c.shape[1] for c in chunks)
        tensors[k] = torch.cat([torch.nn.functional.pad(c, (0, 0) * (c.ndim - 2) + (0, width - c.shape[1]))
                                for c in chunks]).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"data_hash": key, "model_id": model_id})
    tmp.replace(path)
    return tensors, path, False
