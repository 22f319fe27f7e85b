"""Real-size smoke of ``mmalign diffusion train`` on CPU: an SD-1.5-shaped UNet (its published config, random
weights) with LoRA, one MaPO and one Diffusion-DPO run at a small latent size, interleaved (MaPO, DPO, MaPO, ...).

    python scripts/bench_diffusion_train.py                  # latent 16x16, 3 steps per run, 2 repetitions
    python scripts/bench_diffusion_train.py --write          # also writes the "smoke-cpu" block of the docs page

Only the UNet is SD-1.5-sized (859.5M parameters, cross-attention 768): the VAE (2x down, 4 latent channels) and the
CLIP text encoder (width 768, one layer, 77 tokens) are small, so the timings are the UNet's. Each run is a fresh
``mmalign diffusion train`` process through the CLI on a generated Pick-a-Pic-layout JSONL (images VAE-encoded on
the fly), batch 1 pair, LoRA r=8 on to_q/to_k/to_v/to_out.0; Diffusion-DPO's reference is the same UNet with the
adapters disabled. Seconds per step: median over steps 2..N of batch / ``perf/examples_per_s`` (step 1 is warm-up).
Peak RSS: the process's ``ru_maxrss`` (whole process: weights, pipeline, activations).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from doc_sections import machine, write_marked_section

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "diffusion_training.md"

# Stable Diffusion 1.5's published unet/config.json (runwayml/stable-diffusion-v1-5), the architecture fields
SD15_UNET = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "cross_attention_dim": 768, "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                                     "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
WORDS = ["a", "red", "green", "circle", "square", "photo", "of"]

_CHILD = """
import resource, sys, torch
torch.set_num_threads(int(sys.argv[1]))
from mmalign.cli import main
code = main(sys.argv[2:])
print("MAXRSS_KIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
sys.exit(code)
"""


def build(folder: Path, latent: int, pairs: int, seed: int) -> tuple[Path, Path]:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from PIL import Image
    from transformers import CLIPTextConfig, CLIPTextModel

    from mmalign.diffusion.pipeline import tiny_clip_tokenizer

    pipe_dir = folder / "sd15-shaped"
    if not (pipe_dir / "model_index.json").is_file():
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**{**SD15_UNET, "sample_size": latent})
        tok = tiny_clip_tokenizer(WORDS, model_max_length=77)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=768,
                                            num_attention_heads=12, num_hidden_layers=1, max_position_embeddings=77,
                                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                            pad_token_id=tok.pad_token_id))
        vae = AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=4,
                            down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                            norm_num_groups=4, sample_size=2 * latent)
        sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
        StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                safety_checker=None, feature_extractor=None,
                                requires_safety_checker=False).save_pretrained(pipe_dir)
    data = folder / "data"
    data.mkdir(exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(pairs):
        names = []
        for side in (0, 1):
            px = torch.randint(0, 256, (2 * latent, 2 * latent, 3), generator=g, dtype=torch.uint8).numpy()
            names.append(f"{i}_{side}.png")
            Image.fromarray(px).save(data / names[-1])
        rows.append({"caption": "a photo of a red circle", "jpg_0": names[0], "jpg_1": names[1], "label_0": 1})
    (data / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return pipe_dir, data / "pairs.jsonl"


def one_run(method: str, pipe_dir: Path, data: Path, out: Path, steps: int, threads: int, seed: int) -> dict:
    args = ["diffusion", "train", f"method={method}", f"model={pipe_dir}", f"data={data}", "hflip=false",
            f"trainer.max_steps={steps}", "trainer.batch_size=1", "trainer.log_every=1", "trainer.cpu=true",
            "trainer.plots=false", "trainer.lora.enabled=true", "trainer.lora.r=8", f"trainer.seed={seed}",
            "--output-dir", str(out)]
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(threads), *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"{method} run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rss = next(int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("MAXRSS_KIB"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    per_step = [1.0 / r["perf/examples_per_s"] for r in rows if "perf/examples_per_s" in r and r["step"] >= 2]
    for heavy in (out / "model.safetensors", *out.glob("checkpoints/*/*.safetensors")):
        heavy.unlink()  # 3.4 GB each (the trainer's full-state files); the numbers are read already
    return {"method": method, "s_per_step": statistics.median(per_step), "peak_rss_mib": rss / 1024,
            "loss": [r for r in rows if "train/loss" in r][-1]["train/loss"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latent", type=int, default=16, help="latent side (images are 2x: the small VAE halves)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="", help="folder for the pipeline and data (default: a temporary one)")
    p.add_argument("--write", action="store_true", help=f"write the smoke-cpu block of {DOC.name}")
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="mmalign-sd15-"))
    pipe_dir, data = build(work, args.latent, pairs=8, seed=args.seed)
    results = []
    for rep in range(args.reps):
        for method in ("mapo", "diffusion_dpo"):  # interleaved: drift on the shared machine hits both alike
            r = one_run(method, pipe_dir, data, work / f"run-{method}-{rep}", args.steps, args.threads, args.seed)
            results.append(r)
            print(json.dumps(r), flush=True)
    med = {m: {k: statistics.median(r[k] for r in results if r["method"] == m) for k in ("s_per_step", "peak_rss_mib")}
           for m in ("mapo", "diffusion_dpo")}
    lines = ["| method | s/step (median of runs) | peak RSS (MiB) | runs (s/step) |", "|---|---|---|---|"]
    for m in ("mapo", "diffusion_dpo"):
        runs = ", ".join(f"{r['s_per_step']:.2f}" for r in results if r["method"] == m)
        lines.append(f"| {m} | {med[m]['s_per_step']:.2f} | {med[m]['peak_rss_mib']:.0f} | {runs} |")
    ratio_t = med["mapo"]["s_per_step"] / med["diffusion_dpo"]["s_per_step"]
    ratio_m = med["mapo"]["peak_rss_mib"] / med["diffusion_dpo"]["peak_rss_mib"]
    cmd = " ".join(["python", "scripts/bench_diffusion_train.py", *sys.argv[1:]])
    body = "\n".join([
        f"Command: `{cmd}` (seed {args.seed}; latent {args.latent}x{args.latent}, images {2 * args.latent}px; "
        f"{args.steps} steps per run, {args.reps} interleaved repetitions; torch threads {args.threads}).",
        f"Machine: {machine()}, {os.cpu_count()} cores shared with other work.", "", *lines, "",
        f"MaPO / Diffusion-DPO: time {ratio_t:.2f}, peak RSS {ratio_m:.2f}."])
    print(body)
    if args.write:
        from doc_sections import write_marked_section

        write_marked_section(DOC, "smoke-cpu", body, title="# Diffusion training: real-size smoke")


if __name__ == "__main__":
    main()
