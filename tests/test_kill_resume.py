"""SIGKILL at random moments, then the same command (``--resume`` once the run folder exists): the result equals an
uninterrupted run's, for every resumable job (slow: each job runs six times; the benchmark jobs resume by row).

One moment is drawn in each fifth of the uninterrupted run's wall time (from a generator seeded by the job's name),
so every phase is hit somewhere across the jobs: imports, data, SFT, DPO, between result rows, inside checkpoint
writes, and, in the last fifth, the final checkpoint, evaluation and artifact writing. Whatever the moment, the
comparison must hold, so the test does not depend on timing for its verdict.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

pytestmark = pytest.mark.slow
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
KILLS = 5
_TIMING = ("seconds", "wall", "perf/", "time")


def _rows(path: Path) -> list[str]:
    """JSON rows without timing fields, re-serialised (NaN compares equal as text)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [json.dumps({k: v for k, v in r.items() if not any(t in k for t in _TIMING)}, sort_keys=True)
            for r in rows]


def _tensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return {k: v.numpy().tobytes() for k, v in load_file(str(path)).items()}


def _demo_result(run: Path) -> Any:
    return _tensors(run / "model.safetensors"), _rows(run / "metrics.jsonl")


def _market_result(run: Path) -> Any:
    return _rows(run / "results.jsonl"), (run / "table.md").read_text()


def _text_result(run: Path) -> Any:
    weights = {p.parent.name: _tensors(p) for p in sorted(run.glob("*/model.safetensors"))}
    return _rows(run / "text_results.jsonl"), (run / "text_table.md").read_text(), weights


def _vlm_result(run: Path) -> Any:
    """Both phases: the SFT phase's rows and weights, the saved base, the preference rows, weights and adapter."""
    files = ("sft/model.safetensors", "base_model/model.safetensors", "model.safetensors",
             "adapter/adapter_model.safetensors")
    return [_tensors(run / f) for f in files], _rows(run / "sft" / "metrics.jsonl"), _rows(run / "metrics.jsonl")


def _diffusion_result(run: Path) -> Any:
    lora = sorted(run.glob("lora/*.safetensors"))
    return _tensors(run / "model.safetensors"), [_tensors(p) for p in lora], _rows(run / "metrics.jsonl")


def _vlm_benchmark_result(run: Path) -> Any:
    """Every row of every seed (timings left out) and the weights the SFT and row trainers ended with."""
    per_seed = json.loads((run / "results.json").read_text())
    rows = {seed: {row: {k: v for k, v in m.items() if not any(t in k for t in _TIMING)} for row, m in r.items()}
            for seed, r in per_seed.items()}
    weights = {str(p.relative_to(run)): _tensors(p) for p in sorted(run.glob("seed*/*/model.safetensors"))}
    return json.dumps(rows, sort_keys=True), weights


def _diffusion_benchmark_result(run: Path) -> Any:
    return _rows(run / "results.jsonl"), _tensors(run / "reference.safetensors")


def _pickapic_pipeline(inputs: Path) -> list[str]:
    """A tiny SD pipeline folder and Pick-a-Pic pairs (image files next to the JSONL) made in ``inputs``."""
    from PIL import Image

    from mmalign.diffusion.pipeline import tiny_sd_pipeline

    words = ["a", "red", "green", "circle", "square"]
    tiny_sd_pipeline(words=words, image_size=16, text_dim=16).save_pretrained(inputs / "pipe")
    rows = []
    for i in range(8):
        for side, color in (("a", (200, 20 + 10 * i, 20)), ("b", (20, 200, 20 + 10 * i))):
            Image.new("RGB", (20, 24), color).save(inputs / f"{side}{i}.png")
        rows.append({"caption": ["a red circle", "a green square"][i % 2], "jpg_0": f"a{i}.png",
                     "jpg_1": f"b{i}.png", "label_0": i % 2})
    (inputs / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [f"model={inputs / 'pipe'}", f"data={inputs / 'pairs.jsonl'}", "trainer.lora.enabled=true",
            "trainer.max_steps=24", "trainer.batch_size=4", "trainer.save_every=3", "trainer.log_every=1",
            "trainer.lr=0.01", "trainer.plots=false", "trainer.cpu=true"]


QUIET_TRAIN = ["progress=false", "plots=false"]
# arguments: a list, or a function that makes the inputs in a folder and returns the list
JOBS: list[tuple[str, list[str] | Callable[[Path], list[str]], Callable[[Path], Any]]] = [
    ("train demo", ["trainer.progress=false", "trainer.plots=false", "n_pairs=512", "hidden=32",
                    "trainer.max_steps=60", "trainer.save_every=4", "trainer.log_every=2"], _demo_result),
    ("hindsight market", ["--config", "configs/hindsight/smoke.yaml", "plots=false"], _market_result),
    ("hindsight text", ["market.seeds=[0]", "market.n_pairs=256", "n_sft=256", "n_eval=10",
                        "sft.max_steps=30", "sft.save_every=5", "sft.batch_size=16",
                        *[f"sft.{o}" for o in QUIET_TRAIN], "dpo.max_steps=10", "dpo.save_every=3",
                        "dpo.batch_size=16", *[f"dpo.{o}" for o in QUIET_TRAIN]], _text_result),
    ("vlm train", ["n_scenes=32", "sft_steps=30", "trainer.max_steps=16", "trainer.batch_size=4",
                   "trainer.save_every=3", "trainer.log_every=1", *[f"trainer.{o}" for o in QUIET_TRAIN]],
     _vlm_result),
    ("diffusion train", ["trainer.max_steps=40", "trainer.batch_size=8", "trainer.save_every=4",
                         "trainer.log_every=2", "trainer.eval_every=10", "trainer.plots=false"], _diffusion_result),
    ("diffusion train pickapic lora", _pickapic_pipeline, _diffusion_result),
    ("vlm benchmark", ["seeds=[0]", "methods=[dpo,bdhs_online]", "n_sft_scenes=32", "sft_steps=12", "batch_size=8",
                       "n_pref_scenes=16", "pref_steps=6", "pref_batch_size=4", "n_test_scenes=8", "vision_steps=10",
                       "lora_r=2"], _vlm_benchmark_result),
    ("diffusion benchmark", ["size=8", "channels=[8,16]", "embed_dim=8", "pretrain_steps=150", "pretrain_batch=16",
                             "num_pairs=8", "finetune_steps=25", "finetune_batch=4", "settings=[style_90,safety]",
                             "methods=[sft,mapo,dpo_500+lora2,sftdpo_500]", "seeds=[0]", "samples_per_class=2",
                             "sample_steps=4"], _diffusion_benchmark_result),
]


def kill_moments(name: str, kills: int = KILLS) -> list[float]:
    """One fraction of the run's wall time in each of ``kills`` equal slices of it, the last slice included."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return [(k + rng.uniform(0.02, 0.98)) / kills for k in range(kills)]


def _command(job: str, run: Path, args: list[str], resume: bool) -> list[str]:
    return [sys.executable, "-m", "mmalign.cli", *job.split()[:2], "--output-dir", str(run),
            *(["--resume"] if resume else []), *args]


@pytest.mark.parametrize("job, args, result", JOBS, ids=[j[0] for j in JOBS])
def test_sigkill_at_random_moments_resumes_to_the_uninterrupted_result(
        tmp_path: Path, job: str, args: list[str] | Callable[[Path], list[str]], result: Callable[[Path], Any]) -> None:
    root = Path(__file__).resolve().parents[1]
    if callable(args):
        (tmp_path / "inputs").mkdir()
        args = args(tmp_path / "inputs")
    t0 = time.monotonic()
    subprocess.run(_command(job, tmp_path / "full", args, False), check=True, env=ENV, cwd=root,
                   capture_output=True)
    wall = time.monotonic() - t0
    expected = result(tmp_path / "full")
    for k, fraction in enumerate(kill_moments(job)):
        run = tmp_path / f"killed-{k}"
        proc = subprocess.Popen(_command(job, run, args, False), env=ENV, cwd=root, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=fraction * wall)
            print(f"{job}: kill {k} at {fraction:.2f} of {wall:.1f}s came after the run ended")
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            print(f"{job}: killed {k} at {fraction:.2f} of {wall:.1f}s")
        # the same command again: a run that made its folder continues with --resume, one that did not starts anew
        again = subprocess.run(_command(job, run, args, (run / "config.yaml").is_file()), env=ENV, cwd=root,
                               capture_output=True, text=True)
        assert again.returncode == 0, f"kill {k} at {fraction:.2f} of {wall:.0f}s: {again.stderr[-2000:]}"
        assert result(run) == expected, f"kill {k} at {fraction:.2f} of {wall:.0f}s: the resumed run differs"
