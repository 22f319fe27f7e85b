"""Run under ``torchrun --nproc_per_node 2``: FSDP training runs whose results ``test_fsdp.py`` compares.

One launch does all the multi-process work, because starting processes is what costs time on a small CPU machine:

- ``drop-full``: 8 steps with dropout (per-process RNG streams matter) and ``drop-stop``: the same run stopped after
  4 steps, then resumed in a fresh trainer (newly sharded model) to 8 steps;
- ``plain-full`` (8 steps) and ``plain-stop`` (4 steps) without dropout, compared with 1-process runs by the test;
- ``lora-full`` / ``lora-stop``: the same with peft LoRA adapters (frozen sharded base weights), one FSDP unit;
- a resume from a checkpoint whose ``rng-1`` file only rank 1 reads is corrupt: both ranks must raise (no hang).

Usage: ``torchrun --nproc_per_node 2 tests/train/_fsdp_worker.py OUT_DIR``; rank 0 writes ``OUT_DIR/result.json``.
With a third argument ``bf16`` it runs ``bf16-full`` / ``bf16-stop`` (+ resume) under ``mixed_precision=bf16``
instead (accelerate fixes the precision once per process) and records the weight dtypes its Linear layers saw.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from _sharded import corrupt_rank1_then_resume, demo_runner, finish_worker, record_linear_dtypes


_run = demo_runner(["trainer.progress=false", "trainer.plots=false", "trainer.distributed=fsdp",
                    "trainer.fsdp_wrap=[Linear]", "trainer.batch_size=16", "trainer.save_every=4",
                    "trainer.log_every=2", "n_pairs=256", "hidden=32"])


def bf16(out: Path) -> None:
    # sharded units only (the demo's reference pass runs unsharded)
    seen = record_linear_dtypes(lambda m: type(m).__name__.startswith("FSDP"))
    extra = ["dropout=0.0", "trainer.mixed_precision=bf16"]
    _run(out, "bf16-full", 8, extra)
    _run(out, "bf16-stop", 4, extra)
    resumed = _run(out, "bf16-stop", 8, extra, resume=True)["step"]
    if int(os.environ["RANK"]) == 0:
        (out / "result_bf16.json").write_text(json.dumps({"resumed": resumed, "forward_dtypes": sorted(seen)}))
    finish_worker()


def main(out: Path) -> None:
    torch.set_num_threads(1)
    drop, plain = ["dropout=0.2"], ["dropout=0.0"]
    result: dict = {}
    _run(out, "drop-full", 8, drop)
    _run(out, "drop-stop", 4, drop)
    result["resumed"] = _run(out, "drop-stop", 8, drop, resume=True)["step"]
    _run(out, "plain-full", 8, plain)
    _run(out, "plain-stop", 4, plain)
    lora = ["dropout=0.0", "trainer.lora.enabled=true", "trainer.lora.target_modules=['0','3']", "trainer.lr=0.01",
            "trainer.fsdp_wrap=[]"]  # and the default wrapping: the whole model as one unit
    _run(out, "lora-full", 8, lora)
    _run(out, "lora-stop", 4, lora)
    _run(out, "lora-stop", 8, lora, resume=True)
    result["corrupt_errors"] = corrupt_rank1_then_resume(
        out, "plain-stop", 4, lambda: _run(out, "bad", 8, plain, resume=True))
    if int(os.environ["RANK"]) == 0:
        (out / "result.json").write_text(json.dumps(result))
    finish_worker()


if __name__ == "__main__":
    if sys.argv[2:] == ["bf16"]:
        torch.set_num_threads(1)
        bf16(Path(sys.argv[1]))
    else:
        main(Path(sys.argv[1]))
