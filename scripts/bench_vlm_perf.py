"""Same-image DPO throughput and peak memory: mmalign's VLM adapter vs TRL's DPOTrainer, same tiny LLaVA and data.

Each side runs in its own subprocess (so peak memory is per side): full fine-tuning of the same tiny LLaVA
(random init, seed 0), the same scene preference pairs, batch size, steps, AdamW learning rate and fp32 on CPU (bf16
on a GPU). TRL keeps a frozen reference copy of the model (it refuses precomputed reference log-probs for vision
data); mmalign precomputes them once into a safetensors cache (the time for that is reported separately).

    .venv/bin/pip install --no-deps --target /work/trl-site trl
    PYTHONPATH=/work/trl-site .venv/bin/python scripts/bench_vlm_perf.py --steps 30 --batch 8

Writes the "Performance" section of docs/benchmarks/vlm_training.md (between <!-- perf:start --> / <!-- perf:end -->).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from doc_sections import write_marked_section

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks" / "vlm_training.md"


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _setup(n_pairs: int):
    import numpy as np
    import torch

    from mmalign.vision_lm import scenes as S
    from mmalign.vision_lm.benchmark import corrupt_pairs
    from mmalign.vision_lm.tiny import build_tiny_llava

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    gen = S.SceneGenerator()
    scenes = [gen.sample(rng) for _ in range(n_pairs)]
    images = [S.render(s, rng=rng) for s in scenes]
    pairs = [p for p in corrupt_pairs(scenes, images, rng) if p.prompt.endswith("describe :")]
    model, processor = build_tiny_llava(S.vocabulary(), seed=0, patch_size=8)
    return model, processor, pairs


def _device_peak() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def side_mmalign(steps: int, batch: int, lr: float) -> dict:
    from mmalign.train import Trainer, TrainerConfig
    from mmalign.vision_lm.adapter import VLMAdapter
    from mmalign.vision_lm.objectives import PairCollator, PreferenceObjective
    from mmalign.vision_lm.refcache import reference_cache

    model, processor, pairs = _setup(steps * batch)
    adapter = VLMAdapter(model, processor)
    rss0 = _rss_mb()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        cache, _, _ = reference_cache(PairCollator(adapter), pairs, tmp, "perf-tiny", batch_size=batch)
        t_ref = time.perf_counter() - t0
        cfg = TrainerConfig.from_dict({"max_steps": steps, "batch_size": batch, "lr": lr, "log_every": steps,
                                       "progress": False, "plots": False, "keep_checkpoints": 1})
        trainer = Trainer(cfg, model, list(enumerate(pairs)), PreferenceObjective(adapter, "dpo"), Path(tmp) / "run",
                          collate_fn=PairCollator(adapter, ref_cache=cache))
        t0 = time.perf_counter()
        out = trainer.train()
        t_train = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"side": "mmalign", "train_s": t_train, "ref_precompute_s": t_ref, "samples": steps * batch,
            "peak_rss_mb": peak, "rss_before_train_mb": rss0, "device_peak_mb": _device_peak(),
            "final_loss": out.get("train/loss")}


def side_trl(steps: int, batch: int, lr: float) -> dict:
    from datasets import Dataset
    from PIL import Image
    from trl import DPOConfig, DPOTrainer

    model, processor, pairs = _setup(steps * batch)
    rows = [{"prompt": p.prompt, "chosen": p.chosen + " <eos>", "rejected": p.rejected + " <eos>",
             "images": [Image.fromarray(p.images[0])]} for p in pairs]  # EOS appended as mmalign does
    ds = Dataset.from_list(rows)
    rss0 = _rss_mb()
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(output_dir=tmp, per_device_train_batch_size=batch, max_steps=steps, learning_rate=lr,
                         lr_scheduler_type="constant", logging_steps=steps, save_strategy="no", report_to=[],
                         max_length=None, beta=0.1, dataloader_num_workers=0, disable_tqdm=True, seed=0,
                         bf16=False, use_cpu=not __import__("torch").cuda.is_available())
        # TRL would reload the reference from the hub id in the config; a from-config model has none, so hand it
        # the same frozen copy it would have loaded.
        ref = copy.deepcopy(model).eval()
        trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=ds, processing_class=processor)
        t0 = time.perf_counter()
        out = trainer.train()
        t_train = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"side": "trl", "train_s": t_train, "ref_precompute_s": 0.0, "samples": steps * batch,
            "peak_rss_mb": peak, "rss_before_train_mb": rss0, "device_peak_mb": _device_peak(),
            "final_loss": out.training_loss}


def write_section(results: list[dict], args: argparse.Namespace) -> None:
    import platform

    import torch

    by = {r["side"]: r for r in results if "error" not in r}
    lines = ["<!-- perf:start -->", "## Performance: same-image DPO, mmalign vs TRL DPOTrainer", "",
             f"Command: `PYTHONPATH=/work/trl-site .venv/bin/python scripts/bench_vlm_perf.py --steps {args.steps} "
             f"--batch {args.batch}`; date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
             f"machine: {platform.processor() or platform.machine()}, "
             f"{'GPU ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU, 1 torch thread'}"
             " (shared 2-core CPU with other jobs running: compare the two rows, not absolute numbers).", "",
             "Tiny LLaVA (CLIP 2x64 + Llama 2x96, 16 image tokens), full fine-tuning, fp32, AdamW, "
             f"batch {args.batch}, {args.steps} steps, same pairs. TRL keeps a reference model copy; mmalign uses "
             "reference log-probs precomputed once (time listed separately).", "",
             "| side | train samples/s | incl. ref precompute | peak RSS (MB) | RSS growth in training (MB) | "
             "GPU peak (MB) |", "|---|---|---|---|---|---|"]
    for side in ("mmalign", "trl"):
        r = by.get(side)
        if r is None:
            err = next((x["error"] for x in results if x.get("side") == side), "not run")
            lines.append(f"| {side} | failed: {err} | | | | |")
            continue
        sps = r["samples"] / r["train_s"]
        incl = r["samples"] / (r["train_s"] + r["ref_precompute_s"])
        gpu = f"{r['device_peak_mb']:.0f}" if r["device_peak_mb"] else "n/a"
        lines.append(f"| {side} | {sps:.1f} | {incl:.1f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['peak_rss_mb'] - r['rss_before_train_mb']:.0f} | {gpu} |")
    if "mmalign" in by and "trl" in by:
        ratio = (by["mmalign"]["samples"] / by["mmalign"]["train_s"]) / (by["trl"]["samples"] / by["trl"]["train_s"])
        lines += ["", f"Throughput ratio mmalign / TRL (training loop): **{ratio:.2f}x**."]
    write_marked_section(DOC, "perf", "\n".join(lines[1:]), "# VLM training at real size (CPU)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--side", choices=["mmalign", "trl"], default=None, help="internal: run one side")
    args = ap.parse_args()
    if args.side:
        fn = side_mmalign if args.side == "mmalign" else side_trl
        print("RESULT " + json.dumps(fn(args.steps, args.batch, args.lr)))
        return
    results = []
    for side in ("mmalign", "trl"):
        proc = subprocess.run([sys.executable, __file__, "--side", side, "--steps", str(args.steps), "--batch",
                               str(args.batch), "--lr", str(args.lr)], capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            results.append({"side": side, "error": tail[:300]})
        else:
            results.append(json.loads(line[len("RESULT "):]))
        print(results[-1], flush=True)
    write_section(results, args)


if __name__ == "__main__":
    main()
