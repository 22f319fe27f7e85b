"""MaPO vs Diffusion-DPO cost at the same model and batch: step time, peak memory, largest batch (GPU).

Each measurement runs in a fresh process (``python -m mmalign.diffusion.perf <json spec>``) so that peak-memory
counters start clean. Memory on CPU is the growth of the process's peak resident set size (``ru_maxrss``) from just
after the trained model is built to the end of the timed steps: it includes Diffusion-DPO's frozen reference copy
(full fine-tuning), activations, gradients and optimizer state. On CUDA it is ``torch.cuda.max_memory_allocated``
over the same span. ``peak_total_mib`` adds the trained model's own weights (allocated before the span), which is
what a GPU's ``max_memory_allocated`` after loading the model reports; the exact byte counts of the weights, the
reference copy, gradients and optimizer state are returned too, and ``activations_mib`` is what remains of the
growth (activations, the reference's no-grad forward and allocator overhead).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from typing import Any

import torch

from mmalign.timing import time_steps

__all__ = ["UNET_SPECS", "build_unet", "measure", "measure_in_subprocess", "largest_batch"]

# UNet configs by name. "sdxl" is the SDXL-base UNet architecture (random weights; 2.6B parameters).
UNET_SPECS: dict[str, dict[str, Any]] = {
    "shapes16": {"kind": "shapes", "size": 16, "channels": 3},
    "sd_small": {"kind": "config", "channels": 4, "size": 32, "config": dict(
        block_out_channels=(64, 128, 256), layers_per_block=2, cross_attention_dim=256, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), in_channels=4, out_channels=4,
        sample_size=32)},
    # Stable Diffusion 1.x UNet layout (UNet2DConditionModel defaults: 4 levels, 2 layers per block, cross-attention
    # on 768-d text) at 0.4x its width (142M parameters instead of 860M) and 32x32 latents (256 px): weights and
    # optimizer state are a large share of memory, as in the SD/SDXL setting, yet it fits a shared CPU box
    "sd15_w128": {"kind": "config", "channels": 4, "size": 32, "text_len": 77, "config": dict(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
        in_channels=4, out_channels=4, sample_size=32)},
    "sdxl": {"kind": "config", "channels": 4, "size": 128, "sdxl": True, "config": dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
        transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)},
}


def build_unet(name: str, device: torch.device | str | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The named UNet with random weights, created (and initialised) directly on ``device`` (default: CPU).

    Creating an SDXL-size UNet (2.6B parameters) on a GPU takes seconds; on the CPU its random init takes minutes.
    """
    spec = UNET_SPECS[name]
    with torch.device(device or "cpu"):
        if spec["kind"] == "shapes":
            from mmalign.diffusion.shapes import build_tiny_unet

            return build_tiny_unet(spec["size"]), spec
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel(**spec["config"]), spec


def _batch(spec: dict[str, Any], unet: torch.nn.Module, b: int, device: torch.device, dtype: torch.dtype) -> Any:
    from mmalign.diffusion.adapter import PairBatch

    c, s = spec["channels"], spec["size"]
    dim = unet.config.cross_attention_dim
    g = torch.Generator().manual_seed(0)
    mk = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)  # noqa: E731
    kw = {}
    if spec.get("sdxl"):
        kw = {"text_embeds": mk(b, 1280), "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]]).repeat(b, 1).to(device, dtype)}
    return PairBatch(mk(b, c, s, s), mk(b, c, s, s), mk(b, spec.get("text_len", 77 if spec.get("sdxl") else 4), dim),
                     **kw)


def _mib(tensors: Any) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def _peak(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux -> MiB


def measure(method: str, unet_name: str = "shapes16", batch: int = 8, steps: int = 10, warmup: int = 2,
            lora: bool = False, device: str = "cpu", bf16: bool = False, grad_checkpointing: bool = False,
            threads: int = 1) -> dict[str, Any]:
    """Time ``steps`` optimizer steps of ``method`` (mapo, diffusion_dpo, sft) on ``batch`` pairs; see module doc."""
    import copy

    from diffusers import DDPMScheduler

    from mmalign.diffusion.adapter import add_lora, make_loss_fn

    torch.set_num_threads(threads)
    dev = torch.device(device)
    torch.manual_seed(0)
    unet, spec = build_unet(unet_name, dev if dev.type == "cuda" else None)
    if grad_checkpointing:
        unet.enable_gradient_checkpointing()
    dtype = torch.bfloat16 if bf16 else torch.float32
    unet.to(dev, dtype)
    if lora:
        unet = add_lora(unet, r=8)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
    base = _peak(dev)
    ref = None
    if method == "diffusion_dpo" and not lora:
        ref = copy.deepcopy(unet).eval().requires_grad_(False)
    sched = DDPMScheduler(num_train_timesteps=1000)
    loss_fn = make_loss_fn(method, sched, generator=torch.Generator().manual_seed(0), ref_model=ref, validate=False)
    opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-6)
    pb = _batch(spec, unet, batch, dev, dtype)

    def step() -> None:
        loss, _ = loss_fn(unet, pb)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = time_steps(step, steps=steps, warmup=warmup, device=dev)
    times.sort()
    median = times[len(times) // 2]
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    growth = _peak(dev) - base
    weights = _mib(unet.parameters())
    ref_mib = _mib(ref.parameters()) if ref is not None else 0.0
    grads = _mib(p for p in unet.parameters() if p.requires_grad)  # set_to_none frees them between steps
    optim = _mib(v for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
    return {"method": method, "unet": unet_name, "params_m": params, "batch_pairs": batch, "lora": lora, "device": device, "bf16": bf16,
            "grad_checkpointing": grad_checkpointing, "step_s_median": median, "step_s_min": times[0],
            "pairs_per_s": batch / median, "images_per_s": 2 * batch / median, "peak_mem_mib": growth,
            "peak_total_mib": growth + weights, "weights_mib": weights, "ref_weights_mib": ref_mib, "grads_mib": grads,
            "optimizer_mib": optim, "activations_mib": growth - ref_mib - grads - optim,
            "memory_counter": "cuda.max_memory_allocated" if dev.type == "cuda" else "ru_maxrss growth"}


def measure_in_subprocess(timeout: float = 1800, **kwargs: Any) -> dict[str, Any]:
    """Run :func:`measure` in a fresh interpreter; an out-of-memory failure returns ``{"oom": True}``."""
    proc = subprocess.run([sys.executable, "-m", "mmalign.diffusion.perf", json.dumps(kwargs)],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        if "out of memory" in proc.stderr.lower() or "OutOfMemoryError" in proc.stderr:
            return {**kwargs, "oom": True}
        raise RuntimeError(f"perf measurement {kwargs} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def largest_batch(method: str, start: int = 1, limit: int = 256, **kwargs: Any) -> int:
    """Largest power-of-two pair batch that runs 2 steps without running out of GPU memory (0 if none)."""
    best, b = 0, start
    while b <= limit:
        out = measure_in_subprocess(method=method, batch=b, steps=1, warmup=1, **kwargs)
        if out.get("oom"):
            break
        best, b = b, b * 2
    return best


if __name__ == "__main__":
    print(json.dumps(measure(**json.loads(sys.argv[1]))))
