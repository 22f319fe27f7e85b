"""Throughput of same-image DPO steps on a VLM: tokens/s and model-FLOPs utilisation (MFU).

Used by ``tests/vision_lm/test_perf.py`` (a tiny CPU check and a ``@pytest.mark.gpu`` measurement of a randomly
initialised ~2B-parameter LLaVA-style config in bf16). MFU = 6 · N_params · tokens/s / peak FLOP/s (the standard
dense-transformer estimate: forward + backward, attention-score FLOPs not counted, image tokens counted as tokens
of the language model; the vision tower's parameters are included in N_params).
"""

from __future__ import annotations

from typing import Any

import torch

from mmalign.timing import time_steps

__all__ = ["llava_2b_config", "dpo_step_throughput", "PEAK_BF16_FLOPS"]

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s.
PEAK_BF16_FLOPS: dict[str, float] = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def llava_2b_config(vocab_size: int = 32000) -> Any:
    """A LLaVA-1.5-style config of ~2.0B parameters: CLIP ViT-L/14 at 336 px + a 24-layer 2048-wide Llama."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=336, patch_size=14)
    text = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=16,
                       num_key_value_heads=16, vocab_size=vocab_size, max_position_embeddings=4096)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=vocab_size - 1,
                       image_seq_length=576, vision_feature_layer=-2)


def dpo_step_throughput(
    model: Any, *, batch_pairs: int = 4, prompt_text_tokens: int = 32, response_tokens: int = 128, steps: int = 5,
    warmup: int = 2, lr: float = 1e-5, seed: int = 0,
) -> dict[str, float]:
    """Time full DPO training steps (chosen + rejected in one forward, same image, cached reference log-probs).

    Inputs are synthetic token ids with the model's image placeholder tokens in front; returns tokens/s
    (all tokens of both branches, image tokens included), seconds/step, parameter count, MFU (on CUDA, when the
    GPU's peak is known) and peak device memory.
    """
    from mmalign.core.losses import dpo_loss
    from mmalign.vision_lm.adapter import EncodedBatch, VLMAdapter, image_token_ids_of

    cfg = model.config
    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    vcfg = cfg.vision_config
    n_img = (vcfg.image_size // vcfg.patch_size) ** 2
    image_id = image_token_ids_of(model)[0]
    vocab = cfg.text_config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    rows = 2 * batch_pairs
    text = torch.randint(0, vocab - 2, (rows, prompt_text_tokens + response_tokens), generator=gen)
    ids = torch.cat([torch.full((rows, n_img), image_id), text], dim=1)
    resp = torch.zeros_like(ids, dtype=torch.bool)
    resp[:, -response_tokens:] = True
    pix = torch.randn(batch_pairs, 3, vcfg.image_size, vcfg.image_size, generator=gen)
    batch = EncodedBatch(ids, torch.ones_like(ids), resp, {"pixel_values": torch.cat([pix, pix])}, {},
                         list(range(rows))).to(dev, dtype)
    adapter = VLMAdapter(model, processor=_NoProcessor())
    ref = torch.randn(rows, generator=gen).to(dev) - 50.0
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step() -> None:
        logps = adapter.sequence_logps(batch)
        loss, _ = dpo_loss(logps[:batch_pairs], logps[batch_pairs:], ref[:batch_pairs], ref[batch_pairs:], beta=0.1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = time_steps(step, steps=steps, warmup=warmup, device=dev)
    n_params = sum(p.numel() for p in model.parameters())
    sec = sum(times) / len(times)
    tokens_per_s = ids.numel() / sec
    out = {"tokens_per_s": tokens_per_s, "s_per_step": sec, "n_params": float(n_params),
           "tokens_per_step": float(ids.numel())}
    if dev.type == "cuda":
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
        if peak is not None:
            out["mfu"] = 6.0 * n_params * tokens_per_s / peak
    return out


class _NoProcessor:
    """Stands in for a processor when inputs are built directly as token ids (only ``tokenizer`` is looked up)."""

    tokenizer = None
    padding_side = "right"
