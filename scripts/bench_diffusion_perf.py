"""MaPO vs Diffusion-DPO at the same model and batch: step time, peak memory and (GPU) largest batch, images/s.

    python scripts/bench_diffusion_perf.py            # CPU: tiny shapes UNet and a small SD-like latent UNet
    python scripts/bench_diffusion_perf.py --gpu      # CUDA: adds the SDXL-size UNet (random weights, bf16)
    python scripts/bench_diffusion_perf.py --large    # CPU: SD-1.x-layout UNet (142M), where weights dominate

Each number comes from a fresh process (see mmalign/diffusion/perf.py for the memory counters). Writes the "perf"
(CPU) or "perf-gpu" section of docs/benchmarks/diffusion.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
from pathlib import Path

from doc_sections import write_marked_section
from mmalign.diffusion.perf import largest_batch, measure_in_subprocess

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "diffusion.md"
TITLE = "# Diffusion alignment benchmarks"


def _rows(cases: list[dict]) -> list[str]:
    lines = ["| UNet | params | batch (pairs) | LoRA | method | step time (s, median) | images/s | peak mem (MiB) | "
             "MaPO / DPO time | MaPO / DPO mem |", "|---|---|---|---|---|---|---|---|---|---|"]
    for case in cases:
        res = {m: measure_in_subprocess(method=m, **case) for m in ("diffusion_dpo", "mapo")}
        for m, r in res.items():
            ratio_t = ratio_m = ""
            if m == "mapo" and not r.get("oom") and not res["diffusion_dpo"].get("oom"):
                ratio_t = f"{r['step_s_median'] / res['diffusion_dpo']['step_s_median']:.2f}"
                ratio_m = f"{r['peak_mem_mib'] / max(1e-9, res['diffusion_dpo']['peak_mem_mib']):.2f}"
            if r.get("oom"):
                lines.append(f"| {case['unet_name']} | | {case['batch']} | {case.get('lora', False)} | {m} | OOM | | | | |")
                continue
            lines.append(f"| {case['unet_name']} | {r['params_m']:.1f}M | {case['batch']} | {case.get('lora', False)} | "
                         f"{m} | {r['step_s_median']:.3f} | {r['images_per_s']:.1f} | {r['peak_mem_mib']:.0f} | "
                         f"{ratio_t} | {ratio_m} |")
            print(lines[-1], flush=True)
    return lines


def _large_rows(cases: list[dict]) -> list[str]:
    """Rows with the exact memory breakdown (MiB) and the total (growth + trained weights, the GPU-counter analogue)."""
    lines = ["| UNet | params | batch (pairs) | LoRA | grad ckpt | method | step time (s, median) | total peak | "
             "weights | ref copy | grads | optimizer | activations + rest | MaPO / DPO time | MaPO / DPO total mem | "
             "MaPO / DPO growth |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for case in cases:
        res = {m: measure_in_subprocess(method=m, **case) for m in ("diffusion_dpo", "mapo")}
        for m, r in res.items():
            ratios = ["", "", ""]
            if m == "mapo":
                d = res["diffusion_dpo"]
                ratios = [f"{r['step_s_median'] / d['step_s_median']:.2f}", f"{r['peak_total_mib'] / d['peak_total_mib']:.2f}",
                          f"{r['peak_mem_mib'] / d['peak_mem_mib']:.2f}"]
            lines.append(f"| {case['unet_name']} | {r['params_m']:.0f}M | {case['batch']} | {case.get('lora', False)} | "
                         f"{case.get('grad_checkpointing', False)} | {m} | {r['step_s_median']:.2f} | "
                         f"{r['peak_total_mib']:.0f} | {r['weights_mib']:.0f} | {r['ref_weights_mib']:.0f} | "
                         f"{r['grads_mib']:.0f} | {r['optimizer_mib']:.0f} | {r['activations_mib']:.0f} | "
                         + " | ".join(ratios) + " |")
            print(lines[-1], flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="measure on CUDA (bf16), incl. SDXL-size UNet and max batch")
    ap.add_argument("--large", action="store_true", help="CPU: SD-1.x-layout UNet (142M params), memory breakdown")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    common = {"steps": args.steps, "warmup": 2}
    if args.large:
        common.update(threads=args.threads, warmup=1)
        cases = [{"unet_name": "sd15_w128", "batch": 1, "grad_checkpointing": True, **common},
                 {"unet_name": "sd15_w128", "batch": 1, **common},
                 {"unet_name": "sd15_w128", "batch": 1, "lora": True, "grad_checkpointing": True, **common}]
        lines = _large_rows(cases)
        machine = f"{platform.machine()} CPU, {os.cpu_count()} cores shared with other jobs (contended), {args.threads} torch thread(s)"
        text = "\n".join([
            "## Cost at a weight-dominated size: SD-1.x-layout UNet on CPU", "",
            f"Command: `python scripts/bench_diffusion_perf.py --large --steps {args.steps}`  ",
            f"Date: {dt.date.today().isoformat()}. Machine: {machine}. fp32 weights, AdamW (2 fp32 states per "
            "parameter), 32×32 latents, 77 text tokens. One process per row; median of "
            f"{args.steps} steps after 1 warm-up step. Memory in MiB: *total peak* = growth of peak RSS during the "
            "steps + the trained model's weights (the analogue of a GPU's max_memory_allocated); weights, reference "
            "copy, gradients and optimizer state are exact byte counts; *activations + rest* = growth − reference − "
            "gradients − optimizer (autograd activations, the reference's no-grad forward, allocator slack).",
            "", *lines])
        write_marked_section(DOC, "perf-large", text, TITLE)
        print(text)
        return
    if args.gpu:
        common.update(device="cuda", bf16=True)
        cases = [{"unet_name": "sd_small", "batch": 32, **common}, {"unet_name": "sdxl", "batch": 2, **common,
                                                                     "grad_checkpointing": True},
                 {"unet_name": "sdxl", "batch": 2, "lora": True, **common, "grad_checkpointing": True}]
    else:
        common.update(threads=args.threads)
        cases = [{"unet_name": "shapes16", "batch": 8, **common}, {"unet_name": "shapes16", "batch": 8, "lora": True, **common},
                 {"unet_name": "sd_small", "batch": 4, **common}, {"unet_name": "sd_small", "batch": 4, "lora": True, **common}]
    lines = _rows(cases)
    if args.gpu:
        import torch

        lines += ["", "| UNet | method | largest batch (pairs, powers of two, bf16, grad checkpointing) |", "|---|---|---|"]
        for m in ("diffusion_dpo", "mapo"):
            best = largest_batch(m, unet_name="sdxl", device="cuda", bf16=True, grad_checkpointing=True)
            lines.append(f"| sdxl | {m} | {best} |")
        machine = torch.cuda.get_device_name(0)
        counter = "torch.cuda.max_memory_allocated growth after the trained model is on the GPU"
    else:
        machine = f"{platform.machine()} CPU, {os.cpu_count()} cores shared with other jobs (contended), {args.threads} torch thread(s)"
        counter = "growth of the process's peak RSS (resource.getrusage ru_maxrss) after the trained model is built"
    text = "\n".join([
        f"## Cost: MaPO vs Diffusion-DPO ({'GPU' if args.gpu else 'CPU'})", "",
        f"Command: `python scripts/bench_diffusion_perf.py{' --gpu' if args.gpu else ''} --steps {args.steps}`  ",
        f"Date: {dt.date.today().isoformat()}. Machine: {machine}. Memory counter: {counter}. One process per "
        f"number; median of {args.steps} steps after 2 warm-up steps. Full fine-tuning: Diffusion-DPO keeps a frozen "
        "reference copy; LoRA: its reference is the same UNet with adapters disabled (no copy, one extra forward).",
        "", *lines])
    write_marked_section(DOC, "perf-gpu" if args.gpu else "perf", text, TITLE)
    print(text)


if __name__ == "__main__":
    main()
