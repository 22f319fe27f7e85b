"""VLM training at real size on CPU: the `vlm train` smoke on a SmolVLM-256M-shaped model, mmalign vs TRL's
DPOTrainer (samples/s and peak RSS, interleaved A, B, A, B; LoRA and full fine-tuning; optionally one more TRL run
with glibc's mmap threshold fixed as `vlm train` fixes it), the RSS of each phase of mmalign's LoRA steps, and the
peak RSS of a lazy pass over a 20,000-pair Parquet file with embedded images.

    python scripts/bench_vlm_training.py --work /tmp/vlm_bench --rounds 2 --steps 2 --batch 1 --lazy-pairs 20000 \
        --trl-fixed-allocator

The model is SmolVLM-256M's published architecture (SigLIP 768x12 at 512 px, patch 16, pixel shuffle 4 -> 64 image
tokens; SmolLM2-135M decoder 576x30, 9 heads / 3 KV heads, vocabulary 49,280), random init (seed 0), with a
SmolVLMProcessor around an offline word-level tokenizer of the same vocabulary size (no download). Images are
512x512, one per pair, not split into tiles (do_image_splitting off: 64 image tokens each). Each side runs in its own
process (its peak RSS is that process's); the first step of every run is warm-up and is not timed. Writes
docs/benchmarks/vlm_training.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks" / "vlm_training.md"
# SmolVLM's turn layout, spaced for the word-level tokenizer (whose words are split at whitespace only)
TEMPLATE = ("<|im_start|> {% for m in messages %}{{ m['role'] | capitalize }}: {% for p in m['content'] %}"
            "{% if p['type'] == 'image' %}<image> {% else %}{{ p['text'] }} {% endif %}{% endfor %}<end_of_utterance>\n"
            "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")
WORDS = ["<|im_start|>", "User:", "Assistant:", "what", "is", "in", "the", "image", "describe", "a", "red", "blue", "green", "circle", "square", "on",
         "left", "right", "of", "small", "big", "there", "yes", "no", "and", "."]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def build_model(folder: Path) -> None:
    """A SmolVLM-256M-shaped model (random init, seed 0) and its processor, saved as a local model folder."""
    import torch
    from transformers import AutoModelForImageTextToText, SmolVLMConfig, SmolVLMImageProcessor, SmolVLMProcessor
    from transformers import SmolVLMVideoProcessor

    from mmalign.vision_lm.families import family_tokenizer

    vocab = 49280
    fillers = [f"w{i}" for i in range(vocab)]
    tok = family_tokenizer("smolvlm", WORDS + fillers)
    words = WORDS + fillers[: vocab - len(tok) + len(fillers)]
    tok = family_tokenizer("smolvlm", words)
    assert len(tok) == vocab, len(tok)
    cfg = SmolVLMConfig(
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=512, patch_size=16),
        text_config=dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=vocab, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True, pad_token_id=0, bos_token_id=2,
                         eos_token_id=3),
        image_token_id=4, scale_factor=4, tie_word_embeddings=True)
    sizes = dict(size={"longest_edge": 512}, max_image_size={"longest_edge": 512}, do_image_splitting=False,
                 image_mean=[0.5] * 3, image_std=[0.5] * 3)
    proc = SmolVLMProcessor(image_processor=SmolVLMImageProcessor(**sizes),
                            video_processor=SmolVLMVideoProcessor(**{k: v for k, v in sizes.items()
                                                                     if k != "do_image_splitting"}),
                            tokenizer=tok, image_seq_len=64, chat_template=TEMPLATE)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(cfg)
    model.save_pretrained(folder)
    proc.save_pretrained(folder)


def _image_bytes(rng, size: int, fmt: str = "PNG") -> bytes:
    """A smooth random RGB image (colour gradients plus mild noise) as PNG (or JPEG) bytes."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size] / size
    c = rng.random((3, 3))
    img = np.stack([c[k, 0] * x + c[k, 1] * y + c[k, 2] for k in range(3)], -1) / 3
    img = np.clip(img * 255 + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def build_data(path: Path, n: int, size: int = 512, seed: int = 0, distinct: int | None = None,
               fmt: str = "PNG") -> None:
    """``n`` conversational preference pairs with embedded PNG/JPEG images in a Parquet file (written in chunks).

    ``distinct``: how many different images to draw (reused cyclically), to bound the generation time.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    pool = [_image_bytes(rng, size, fmt) for _ in range(min(n, distinct or n))]
    writer = None
    for start in range(0, n, 1000):
        rows = []
        for i in range(start, min(n, start + 1000)):
            rows.append({
                "prompt": [{"role": "user", "content": [{"type": "image", "text": None},
                                                        {"type": "text", "text": "describe the image ."}]}],
                "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "a red circle on the left ."}]}],
                "rejected": [{"role": "assistant", "content": [{"type": "text", "text":
                                                                "a big blue square on the right of a green circle ."}]}],
                "images": [{"bytes": pool[i % len(pool)], "path": None}]})
        table = pa.Table.from_pylist(rows)
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    assert writer is not None
    writer.close()


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------- the two sides
def side_mmalign(model_dir: str, data: str, mode: str, steps: int, batch: int, lr: float, threads: int,
                 variant: str = "") -> dict:
    """mmalign's product path (vlm train's run(): data -> adapter -> loss -> trainer -> artifacts), timed per step.

    ``variant``: comma list of ``cache`` (LoRA: reference log-probs precomputed, ``reference=cache``; full fine-tuning
    always precomputes them), ``inbwd`` (``trainer.optimizer_in_backward=true``, no clipping), ``return``
    (``cpu_return_memory=true``), ``gc`` (``trainer.gradient_checkpointing=true``); empty: vlm train's defaults."""
    import torch

    from mmalign.vision_lm.train import VLMTrainConfig, run

    opts = set(filter(None, variant.split(",")))
    torch.set_num_threads(threads)
    lora = {"enabled": mode == "lora", "r": 16, "alpha": 32.0, "target_modules": LORA_TARGETS}
    cfg = VLMTrainConfig.from_dict({
        "model_path": model_dir, "data": data, "method": "dpo", "beta": 0.1, "dtype": "float32",
        "reference": "lora" if mode == "lora" and "cache" not in opts else "cache", "max_length": 4096,
        "cpu_return_memory": "return" in opts,
        "trainer": {"max_steps": steps, "batch_size": batch, "lr": lr, "lr_schedule": "constant", "log_every": 1,
                    "progress": False, "plots": False, "cpu": True, "lora": lora, "keep_checkpoints": 1,
                    "optimizer_in_backward": "inbwd" in opts, "max_grad_norm": 0.0 if "inbwd" in opts else 1.0,
                    "gradient_checkpointing": "gc" in opts}})
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        out = run(cfg, Path(tmp))
        total = time.perf_counter() - t0
        rows = [json.loads(x) for x in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    rates = [r["perf/examples_per_s"] for r in rows if "perf/examples_per_s" in r][1:]  # step 1 is warm-up
    step_s = [batch / r for r in rates]
    return {"side": "mmalign", "mode": mode, "samples_per_s": batch / (sum(step_s) / len(step_s)),
            "step_s": step_s, "peak_rss_mb": _peak_mb(), "total_s": total, "loss": out.get("train/loss"),
            "ref_precompute_s": out.get("time/ref_precompute_s", 0.0), "variant": variant}


def side_trl(model_dir: str, data: str, mode: str, steps: int, batch: int, lr: float, threads: int,
             variant: str = "") -> dict:
    """TRL's DPOTrainer on the same model folder and Parquet (images decoded by datasets), same settings;
    ``variant`` ``noclip``: no gradient clipping (``max_grad_norm=0``), as mmalign's ``inbwd`` runs; ``gc``: gradient
    checkpointing (TRL's default; non-reentrant, as mmalign's)."""
    import torch
    from datasets import Features, Image, List, Value, load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(threads)
    ds = load_dataset("parquet", data_files=data, split="train")
    ds = ds.cast_column("images", List(Image()))
    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001, ANN003
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001, ANN003
            times.append(time.perf_counter() - self.t)

    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS) \
        if mode == "lora" else None
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(output_dir=tmp, per_device_train_batch_size=batch, max_steps=steps, learning_rate=lr,
                         lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[],
                         max_length=None, beta=0.1, dataloader_num_workers=0, disable_tqdm=True, seed=0,
                         bf16=False, use_cpu=True, gradient_checkpointing="gc" in variant.split(","),
                         gradient_checkpointing_kwargs={"use_reentrant": False},
                         max_grad_norm=0.0 if "noclip" in variant else 1.0)
        t0 = time.perf_counter()
        trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=processor,
                             peft_config=peft_config, callbacks=[Clock()])
        out = trainer.train()
        total = time.perf_counter() - t0
    step_s = times[1:]
    return {"side": "trl", "mode": mode, "samples_per_s": batch / (sum(step_s) / len(step_s)), "step_s": step_s,
            "peak_rss_mb": _peak_mb(), "total_s": total, "loss": out.training_loss, "variant": variant}


def profile(model_dir: str, data: str, mode: str, steps: int, batch: int, threads: int, variant: str = "") -> dict:
    """RSS per phase of mmalign's steps: sampled every 2 ms; for each phase (collate, image features, forward with or
    without grad, backward, optimizer step) the RSS at its start and the highest RSS until the next phase."""
    import threading

    import accelerate
    import torch

    from mmalign.vision_lm import adapter as A, objectives as O

    samples: list[tuple[float, float]] = []
    events: list[tuple[float, str]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append((time.perf_counter(), _rss_mb()))
            time.sleep(0.002)

    def wrap(owner: Any, name: str, label: str) -> None:
        fn = getattr(owner, name)

        def timed(*a: Any, **k: Any) -> Any:
            events.append((time.perf_counter(), label + ("" if torch.is_grad_enabled() else " (no grad)")))
            return fn(*a, **k)

        setattr(owner, name, timed)

    from mmalign.train.trainer import Trainer
    from mmalign.vision_lm import refcache

    for owner, name, label in ((refcache, "reference_cache", "reference precompute"),
                               (Trainer, "save", "checkpoint, then final weights and artifacts"),
                               (O.PairCollator, "__call__", "collate"), (A.VLMAdapter, "token_logps", "forward"),
                               (A.VLMAdapter, "_shared_image_features", "image features"),
                               (accelerate.Accelerator, "backward", "backward"),
                               (torch.optim.AdamW, "step", "optimizer step")):
        wrap(owner, name, label)
    threading.Thread(target=sample, daemon=True).start()
    side_mmalign(model_dir, data, mode, steps, batch, 1e-5, threads, variant=variant)
    done.set()
    events.append((time.perf_counter(), "done"))
    # one row per run of the same phase (optimizer_in_backward steps each parameter inside the backward pass)
    events = [e for i, e in enumerate(events) if i == 0 or e[1] != events[i - 1][1]]
    phases = []
    for (t, label), (t_next, _) in zip(events, events[1:] + [(float("inf"), "")]):
        seg = [r for s_, r in samples if t <= s_ < t_next] or [float("nan")]
        phases.append({"phase": label, "rss_start_mb": seg[0], "rss_max_mb": max(seg)})
    return {"mode": mode, "variant": variant, "phases": phases, "peak_rss_mb": _peak_mb()}


def lazy_pass(data: str, batch: int) -> dict:
    """Peak RSS of reading, validating and decoding every image of ``data`` batch by batch (nothing kept decoded)."""
    from mmalign.data import LazyImage, load_preference_data

    rss0 = _rss_mb()
    t0 = time.perf_counter()
    ds = load_preference_data(data, "text")
    t_load = time.perf_counter() - t0
    pixels = 0
    for start in range(0, len(ds), batch):
        imgs = [LazyImage(v, ds.base_dir).load() for r in ds.rows[start:start + batch] for v in r["images"]]
        pixels += sum(im.size[0] * im.size[1] for im in imgs)
    return {"pairs": len(ds), "peak_rss_mb": _peak_mb(), "rss_before_mb": rss0, "load_validate_s": t_load,
            "pass_s": time.perf_counter() - t0, "decoded_mpix": pixels / 1e6,
            "file_mb": Path(data).stat().st_size / 2**20}


def smoke(model_dir: Path, data: Path, work: Path) -> dict:
    """`mmalign vlm train model_path=... data=... trainer.max_steps=2` through the CLI, then peft loads the adapter."""
    run_dir = work / "smoke_run"
    cmd = [sys.executable, "-m", "mmalign.cli", "vlm", "train", f"model_path={model_dir}", f"data={data}",
           "cpu_return_memory=true", "trainer.max_steps=2", "trainer.batch_size=2", "trainer.progress=false",
           "trainer.plots=false",
           "trainer.log_every=1", "trainer.cpu=true", "--output-dir", str(run_dir)]
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        raise RuntimeError(f"vlm train failed:\n{out[-3000:]}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step_s = [2 / r["perf/examples_per_s"] for r in rows if "perf/examples_per_s" in r]
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(model_dir)
    PeftModel.from_pretrained(base, run_dir / "adapter")
    adapter_mb = (run_dir / "adapter" / "adapter_model.safetensors").stat().st_size / 2**20
    model_mb = sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) / 2**20
    ckpt = max((run_dir / "checkpoints").glob("step-*"))
    ckpt_mb = sum(p.stat().st_size for p in ckpt.iterdir()) / 2**20
    weights_mb = (run_dir / "model.safetensors").stat().st_size / 2**20
    return {"command": " ".join(["mmalign"] + cmd[3:]), "wall_s": wall, "step_s": step_s,
            "peak_rss_mb": usage.ru_maxrss / 1024, "adapter_mb": adapter_mb, "model_mb": model_mb,
            "load_end": os.getloadavg()[0], "checkpoint_mb": ckpt_mb, "weights_mb": weights_mb,
            "params_m": sum(p.numel() for p in base.parameters()) / 1e6}


# glibc's default mmap threshold, fixed (as `vlm train` fixes it on the CPU): the environment variable sets it in TRL's
# process before Python starts, for the extra TRL run that shows what the allocator setting alone is worth there
FIXED_ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": str(1024 * 1024)}  # = vision_lm.train.CPU_MMAP_THRESHOLD


# The arms per mode: those of every round run back to back in this order (the ratios pair each arm with the TRL run
# of its round), then one run of each extra. "side:variant"; TRL's "fixed" = FIXED_ALLOCATOR in its environment.
ARMS = {
    "lora": (["mmalign:", "mmalign:cache,return", "trl:"], ["mmalign:return", "mmalign:cache", "trl:fixed"]),
    "full": (["mmalign:inbwd,return", "trl:noclip"], ["mmalign:inbwd", "mmalign:", "trl:noclip,fixed"]),
    # both sides checkpointing every layer (TRL's own default), so only what each keeps besides activations differs
    "lora+gc": (["mmalign:gc", "trl:gc"], []),
    "full+gc": (["mmalign:inbwd,gc", "trl:noclip,gc"], ["mmalign:inbwd,gc,return"]),
}
SETTINGS = {"": "defaults", "cache": "`reference=cache`", "inbwd": "`trainer.optimizer_in_backward=true`",
            "return": "`cpu_return_memory=true`", "noclip": "`max_grad_norm=0`", "gc": "gradient checkpointing",
            "fixed": "`MALLOC_MMAP_THRESHOLD_=1048576`"}


def _child(args: argparse.Namespace, arm: str, mode: str) -> dict:
    """One arm in a fresh process; ``mode`` is the table's (``lora``, ``full``, ``lora+gc``, ``full+gc``)."""
    side, variant = arm.split(":")
    cmd = [sys.executable, __file__, "--side", side, "--mode", mode.split("+")[0], "--work", str(args.work), "--steps",
           str(args.steps), "--batch", str(args.batch), "--threads", str(args.threads), "--variant", variant]
    env = {**os.environ, **(FIXED_ALLOCATOR if "fixed" in variant.split(",") else {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        return {"side": side, "mode": mode, "variant": variant,
                "error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return {**json.loads(line[len("RESULT "):]), "arm": arm, "mode": mode}


def _settings(arm: str) -> str:
    side, variant = arm.split(":")
    return side + " " + ", ".join(SETTINGS[v] for v in (variant.split(",") if variant else [""]))


def _geo(xs: list[float]) -> float:
    import numpy as np

    return float(np.exp(np.mean(np.log(xs))))


def _compare_section(args: argparse.Namespace, runs: list[dict]) -> list[str]:
    """The comparison table: one row per arm and mode; ratios against the TRL run of the same round."""
    import numpy as np

    lines = ["## mmalign vs TRL DPOTrainer", "",
             f"Same model folder, same Parquet pairs, batch {args.batch} pair(s), {args.steps} steps per run (the "
             f"first untimed), AdamW lr 1e-5 constant, beta 0.1, fp32, torch threads {args.threads}. Modes `lora` and "
             "`full`: no gradient checkpointing on either side (TRL's default is on and was turned off); `+gc`: "
             "both sides recompute every layer in the backward pass (mmalign `trainer.gradient_checkpointing=true`, "
             "TRL `gradient_checkpointing=True`, both non-reentrant). Each run "
             "is a fresh process; peak RSS is that process's. In every round the arms ran back to back (mmalign "
             "arms, then TRL); a ratio divides an arm's rate by the TRL run of its own round (geometric mean over "
             "rounds), so load that drifts between rounds cancels. Extra arms ran once after the rounds. LoRA: r 16, "
             "alpha 32 on q/k/v/o projections (which include the SigLIP tower's q/k/v); TRL's reference is the "
             "model with its adapter disabled, as is mmalign's by default (`reference=lora`); with "
             "`reference=cache` mmalign precomputes the reference log-probs of all pairs once before training "
             "(time in its own column; TRL refuses `precompute_ref_log_probs` for vision data). Full fine-tuning: "
             "TRL keeps a frozen reference copy; mmalign precomputes (`reference=cache`).", "",
             "How TRL handles VLMs here: its `DataCollatorForVisionPreference` concatenates chosen and rejected "
             "with the images repeated, so every image is encoded twice per forward (policy and reference); it "
             "computes response log-probs through a fused, chunked LM head. mmalign encodes each image once and "
             "splices its features into both branches (SmolVLM splices image features into placeholder "
             "embeddings) and takes logits of the response positions only.", "",
             "| mode | arm | samples/s per run | x TRL (per round) | peak RSS MB | x TRL peak | reference "
             "precompute s |", "|---|---|---|---|---|---|---|"]
    verdicts = []
    for mode, (rounds, extras) in ARMS.items():
        mine = [r for r in runs if r.get("mode") == mode and "arm" in r]
        trl_arm = next(a for a in rounds if a.startswith("trl"))
        trl = {r["round"]: r for r in mine if r["arm"] == trl_arm and "error" not in r}
        trl_peak = max((r["peak_rss_mb"] for r in trl.values()), default=float("nan"))
        for arm in rounds + extras:
            got = [r for r in mine if r["arm"] == arm]
            ok = [r for r in got if "error" not in r]
            if not ok:
                if got:
                    lines.append(f"| {mode} | {_settings(arm)} | failed: {got[0]['error']} | | | | |")
                continue
            ratios = [r["samples_per_s"] / trl[r["round"]]["samples_per_s"] for r in ok
                      if r["round"] is not None and r["round"] in trl and arm != trl_arm]
            peak = max(r["peak_rss_mb"] for r in ok)
            ref = [r.get("ref_precompute_s") for r in ok if r.get("ref_precompute_s")]
            ratio_txt = (f"**{_geo(ratios):.2f}** ({', '.join(f'{x:.2f}' for x in ratios)})" if ratios
                         else "-" if arm == trl_arm else "one run")
            rates = ", ".join(f"{r['samples_per_s']:.4f}" for r in ok)
            lines.append(f"| {mode} | {_settings(arm)} | {rates} | "
                         f"{ratio_txt} | {peak:.0f} | {peak / trl_peak:.2f} | "
                         f"{', '.join(f'{x:.0f}' for x in ref) or '-'} |")
            if ratios:
                sp, mem = _geo(ratios), peak / trl_peak
                verdicts.append(f"- {mode}, {_settings(arm)}: {sp:.2f}x TRL's samples/s (goal >= 1.8x: "
                                f"{'met' if sp >= 1.8 else 'NOT met'}), peak RSS {mem:.2f}x TRL's (goal <= 0.7x: "
                                f"{'met' if mem <= 0.7 else 'NOT met'})"
                                + (f"; reference precompute {np.mean(ref):.0f} s for {args.pairs} pairs" if ref
                                   else "") + ".")
    return lines + ["", *verdicts, ""]


MEMORY_NOTES = (
    "Where the memory goes (the profiles below: RSS sampled every 2 ms around each phase of mmalign's steps, batch "
    "1). Both sides hold the weights (0.92 GB) and the Python/torch libraries (about 0.5 GB); full fine-tuning adds "
    "AdamW's two moments (1.84 GB) on both sides (both step with torch's fused AdamW, TRL's default "
    "`adamw_torch_fused`, which keeps no temporary copies), and TRL its reference copy (0.92 GB). The activations are mostly "
    "the vision tower's (1,024 patches at 512 px through 12 layers), which TRL holds for two images per pair and "
    "mmalign for one. The logits are small at 64 image + about 20 text tokens (mmalign takes the response positions "
    "only; TRL a chunked LM head), so chunked log-probs would not move the peak at this size. With LoRA the shared "
    "weights and libraries bound the ratio: one image's activations against two give {lora:.2f}x. In full "
    "fine-tuning the update inside the backward pass (`trainer.optimizer_in_backward`) keeps the gradients (0.92 GB) "
    "out of the peak only where they would outlive the activations; here the activations freed during the backward "
    "pass are about as large as the gradients that replace them, so the peak moves little ({inbwd:,.0f} MB against "
    "{plain:,.0f} MB without it); it matters where the activations are small next to the model (a large model at a "
    "small batch, or with gradient checkpointing). The rest is the allocator's: glibc serves blocks from 128 KiB up "
    "with their own mmap but raises that threshold (up to 32 MiB) each time such a block is freed, so activations "
    "then come from the heap, whose freed blocks fragment and stay in the process (in the full fine-tuning profile "
    "the second step starts far above the first). `cpu_return_memory=true` fixes the threshold at 1 MiB "
    "(`mallopt`), so activations are unmapped as they are freed, and trims the heap after every update "
    "(`malloc_trim`), so the free pages the many small blocks leave do not pile up from step to step (the RSS "
    "between steps stays flat): LoRA {lret:.2f}x of TRL's peak, full fine-tuning "
    "(with the update inside backward) {ret:.2f}x. TRL given the same allocator setting drops too ({lsame:.2f}x / "
    "{ret_same:.2f}x with both so configured). The price is page faults on every fresh block every step; in the "
    "rounds it is inside the ratios of the arms that use the setting (the extra arms ran once, later, under "
    "another load: their rates are not comparable with the rounds'). With "
    "gradient checkpointing on both sides the activations shrink to about one layer's, so what each side keeps "
    "besides them decides: in full fine-tuning mmalign holds no reference copy and, with the update inside "
    "backward, no gradients ({gc_full:.2f}x of TRL's peak; {gc_full_ret:.2f}x with `cpu_return_memory=true`); "
    "with LoRA both hold the same weights ({gc_lora:.2f}x).")


def _memory_notes(runs: list[dict]) -> str:
    def arm(mode: str, name: str) -> list[dict]:
        return [r for r in runs if r.get("mode") == mode and r.get("arm") == name and "error" not in r]

    def peak(mode: str, name: str) -> float:
        return max((r["peak_rss_mb"] for r in arm(mode, name)), default=float("nan"))

    return MEMORY_NOTES.format(
        lora=peak("lora", "mmalign:") / peak("lora", "trl:"), inbwd=peak("full", "mmalign:inbwd"),
        plain=peak("full", "mmalign:"), ret=peak("full", "mmalign:inbwd,return") / peak("full", "trl:noclip"),
        ret_same=peak("full", "mmalign:inbwd,return") / peak("full", "trl:noclip,fixed"),
        lret=peak("lora", "mmalign:return") / peak("lora", "trl:"),
        lsame=peak("lora", "mmalign:return") / peak("lora", "trl:fixed"),
        gc_full=peak("full+gc", "mmalign:inbwd,gc") / peak("full+gc", "trl:noclip,gc"),
        gc_full_ret=peak("full+gc", "mmalign:inbwd,gc,return") / peak("full+gc", "trl:noclip,gc"),
        gc_lora=peak("lora+gc", "mmalign:gc") / peak("lora+gc", "trl:gc"))


def _command(args: argparse.Namespace) -> str:
    return (f"python scripts/bench_vlm_training.py --work {args.work} --rounds {args.rounds} --steps {args.steps} "
            f"--batch {args.batch} --threads {args.threads} --lazy-pairs {args.lazy_pairs} --modes {args.modes}"
            f"{' --no-extras' if args.no_extras else ''}{' --skip ' + args.skip if args.skip else ''}")


def _commands_line(commands: dict[str, str], loads: dict[str, float] | None = None,
                   notes: dict[str, str] | None = None) -> str:
    """The comparison's command(s): one per invocation whose runs are on the page, with the modes it ran, the load
    average at its end and its note (``--note``), where recorded."""
    by_cmd: dict[str, list[str]] = {}
    for mode, cmd in commands.items():
        by_cmd.setdefault(cmd, []).append(mode)
    parts = []
    for cmd, modes in by_cmd.items():
        extra = [f"load average {loads[modes[0]]:.1f} at its end"] if loads and modes[0] in loads else []
        extra += [notes[modes[0]]] if notes and notes.get(modes[0]) else []
        parts.append(f"`{cmd}` (modes {', '.join(modes)}{''.join('; ' + e for e in extra)})")
    return "Commands: " + "; ".join(parts) + "."


def write_doc(args: argparse.Namespace, smoke_res: dict | None, runs: list[dict], lazy: dict | None,
              prof: list[dict] | None = None, load_end: float | None = None,
              commands: dict[str, str] | None = None, loads: dict[str, float] | None = None,
              notes: dict[str, str] | None = None) -> None:
    """The page; ``commands``: the command that ran each mode's comparison, where runs of several commands are kept
    (``loads``, ``notes``: per mode, the load average at the end of its command and the note it was given)."""
    import numpy as np
    import torch
    import transformers
    import trl

    cpu = platform.processor() or platform.machine()
    lines = ["# VLM training at real size (CPU)", "",
             "SmolVLM-256M's architecture (SigLIP 768x12 at 512 px + SmolLM2-135M decoder, vocabulary 49,280), "
             "random init (seed 0), saved as a local model folder with a SmolVLMProcessor around an offline "
             "word-level tokenizer of the same vocabulary size; generated conversational pairs with embedded 512x512 "
             "PNG images, one per pair, not split into tiles (64 image tokens). fp32 on CPU.", "",
             _commands_line(commands or {m: _command(args) for m in args.modes.split(",")}, loads, notes) + " "
             f"Machine: {cpu}, {os.cpu_count()} cores shared with other jobs"
             + ("" if loads else f" (load average {load_end if load_end is not None else os.getloadavg()[0]:.1f} at "
                                 "the end of the comparison)")
             + f"; torch {torch.__version__}, transformers "
             f"{transformers.__version__}, TRL {trl.__version__}. Seeds: model 0, data 0, trainer 0.", ""]
    if smoke_res:
        s = smoke_res
        lines += ["## `vlm train` smoke", "",
                  f"`{s['command']}` (LoRA r=16 on q/k/v/o projections, DPO, batch 2, 2 steps): "
                  f"{s['params_m']:.0f} M parameters; seconds per step {', '.join(f'{x:.1f}' for x in s['step_s'])} "
                  f"(first includes warm-up; load average {s.get('load_end', float('nan')):.1f} at its end, the "
                  "machine shared with other jobs: compare rates in the interleaved table below, not here); whole "
                  f"command {s['wall_s']:.0f} s; peak RSS {s['peak_rss_mb']:.0f} MB. "
                  f"`PeftModel.from_pretrained(base, run/adapter)` loads the result. Adapter folder weights "
                  f"{s['adapter_mb']:.1f} MB = {100 * s['adapter_mb'] / s['model_mb']:.2f}% of the model's "
                  f"{s['model_mb']:.0f} MB."
                  + (f" The run's checkpoint (adapters, optimizer state, RNG and schedule; the frozen base left out "
                     f"and fingerprinted) is {s['checkpoint_mb']:.0f} MB and its final `model.safetensors` (adapters "
                     f"and the base's fingerprint) {s['weights_mb']:.1f} MB, against the base model's "
                     f"{s['model_mb']:.0f} MB." if "checkpoint_mb" in s else ""),
                  ""]
    if runs:
        lines += _compare_section(args, runs) + [_memory_notes(runs), ""]
        for pr in prof or []:
            variant = pr.get("variant") or ("return" if pr["mode"] == "lora" else "")
            lines += [f"Profile, {pr['mode']}, {_settings('mmalign:' + variant)}: `python "
                      f"scripts/bench_vlm_training.py --side profile --mode {pr['mode']} --variant '{variant}' "
                      f"--steps {pr.get('steps', 2)} --batch 1 --threads {args.threads} --work {args.work}`; peak RSS "
                      f"{pr['peak_rss_mb']:.0f} MB.", "",
                      "| phase | RSS at start MB | max RSS until the next phase MB |", "|---|---|---|"]
            phases = [ph for ph in pr["phases"] if ph["phase"] != "done"]
            if phases and phases[0]["phase"] == "collate" and len(phases) > 1 and phases[1]["phase"] != "image " \
                    "features (no grad)":  # consecutive collations before training: the data check
                phases[0] = {**phases[0], "phase": "data check: collations"}
            first = next((i for i, ph in enumerate(phases) if ph["phase"] != "collate"), len(phases))
            if first > 1:  # the data check's collations before training: one row for them all
                lines.append(f"| data check: {first - 1} collations | {phases[0]['rss_start_mb']:.0f} | "
                             f"{max(ph['rss_max_mb'] for ph in phases[:first - 1]):.0f} |")
            lines += [f"| {ph['phase']} | {ph['rss_start_mb']:.0f} | {ph['rss_max_mb']:.0f} |"
                      for ph in phases[max(first - 1, 0):]]
            lines.append("")
    if lazy:
        lines += ["## Lazy pass over a large Parquet file", "",
                  f"Command: `python scripts/bench_vlm_training.py --side lazy --work {args.work}` (the lazy part "
                  f"alone). {lazy['pairs']:,} pairs with embedded 512x512 JPEG images (about 37 KB each, about "
                  f"750 MB of encoded bytes; {args.lazy_distinct} distinct images reused to bound generation time, "
                  f"which Parquet's dictionary encoding stores once: a {lazy['file_mb']:.0f} MB file): "
                  f"`load_preference_data` (read + validate every row, every image verified) took "
                  f"{lazy['load_validate_s']:.0f} s, then every image was decoded batch by batch "
                  f"({lazy['decoded_mpix']:.0f} Mpixel in all, {lazy['pass_s']:.0f} s total). Peak RSS "
                  f"{lazy['peak_rss_mb']:.0f} MB (RSS before {lazy['rss_before_mb']:.0f} MB). The rows hold "
                  "neither decoded pixels (decoded, the images alone would take "
                  f"{lazy['decoded_mpix'] * 3:.0f} MB) nor the encoded bytes: as the file is read, 512 rows at a "
                  "time, each image's bytes move to a temporary file and the row keeps a reference read per batch.",
                  ""]
    # the tiny-model section written by scripts/bench_vlm_perf.py stays as it is
    old = DOC.read_text() if DOC.is_file() else ""
    kept = old[old.index("<!-- perf:start -->"):] if "<!-- perf:start -->" in old else ""
    DOC.write_text("\n".join(lines) + ("\n" + kept if kept else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/vlm_bench"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--lazy-pairs", type=int, default=20000)
    ap.add_argument("--lazy-distinct", type=int, default=200)
    ap.add_argument("--modes", default=",".join(ARMS), help="comma list of ARMS keys; their runs replace earlier ones")
    ap.add_argument("--no-extras", action="store_true", help="only the rounds' arms, not the extra runs (ARMS)")
    ap.add_argument("--note", default="", help="what the page should say about this comparison's conditions")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: smoke, compare, lazy, profile")
    ap.add_argument("--side", choices=["mmalign", "trl", "lazy", "profile"], default=None,
                    help="internal: one child run")
    ap.add_argument("--mode", default="lora")
    ap.add_argument("--variant", default=None, help="internal: the child's variant (see side_mmalign / side_trl)")
    args = ap.parse_args()
    model_dir, data = args.work / "smolvlm256m", args.work / "pairs.parquet"
    if args.side == "profile":
        res = profile(str(model_dir), str(data), args.mode, args.steps, args.batch, args.threads, args.variant or "")
        print("RESULT " + json.dumps(res))
        return
    if args.side == "lazy":
        print("RESULT " + json.dumps(lazy_pass(str(args.work / "lazy.parquet"), 64)))
        return
    if args.side:
        kw = {"variant": args.variant or ""}
        fn = side_mmalign if args.side == "mmalign" else side_trl
        print("RESULT " + json.dumps(fn(str(model_dir), str(data), args.mode, args.steps, args.batch, 1e-5,
                                        args.threads, **kw)))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    if not (model_dir / "config.json").is_file():
        build_model(model_dir)
    if not data.is_file():
        build_data(data, args.pairs)
    skip = set(args.skip.split(","))
    saved = args.work / "results.json"  # every finished part, so the page can be written from what has run
    results = json.loads(saved.read_text()) if saved.is_file() else {"runs": []}
    if "smoke" not in skip:
        results["smoke"] = smoke(model_dir, data, args.work)
        saved.write_text(json.dumps(results))
        print(results["smoke"], flush=True)
    if "compare" not in skip:  # the modes run now replace their earlier runs; other modes' runs are kept
        modes = args.modes.split(",")
        results["runs"] = [r for r in results.get("runs", []) if r.get("mode") not in modes]
        results.setdefault("commands", {}).update({m: _command(args) for m in modes})
        for mode in modes:
            rounds, extras = ARMS[mode]
            for r in range(args.rounds):
                for arm in rounds:
                    results["runs"].append({**_child(args, arm, mode), "round": r})
                    saved.write_text(json.dumps(results))
                    print(results["runs"][-1], flush=True)
            for arm in extras if not args.no_extras else []:
                results["runs"].append({**_child(args, arm, mode), "round": None})
                saved.write_text(json.dumps(results))
                print(results["runs"][-1], flush=True)
        results["load_end"] = os.getloadavg()[0]
        results.setdefault("loads", {}).update({m: results["load_end"] for m in args.modes.split(",")})
        results.setdefault("notes", {}).update({m: args.note for m in args.modes.split(",")})
        saved.write_text(json.dumps(results))
    if "lazy" not in skip:
        lazy_file = args.work / "lazy.parquet"
        if not lazy_file.is_file():
            build_data(lazy_file, args.lazy_pairs, distinct=args.lazy_distinct, fmt="JPEG")
        proc = subprocess.run([sys.executable, __file__, "--side", "lazy", "--work", str(args.work)],
                              capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        results["lazy"] = json.loads(line[len("RESULT "):]) if line else None
        saved.write_text(json.dumps(results))
        print(results["lazy"] or proc.stderr[-2000:], flush=True)
    if "profile" not in skip:
        results["profile"] = {**_child(args, "profile:return", "lora"), "steps": args.steps}
        results["profile_full"] = {**_child(args, "profile:inbwd", "full"), "steps": args.steps}
        saved.write_text(json.dumps(results))
    write_doc(args, results.get("smoke"), results["runs"], results.get("lazy"),
              [p for p in (results.get("profile"), results.get("profile_full")) if p], results.get("load_end"),
              results.get("commands"), results.get("loads"), results.get("notes"))


if __name__ == "__main__":
    main()
