"""Run under ``torchrun --nproc_per_node 2``: DeepSpeed ZeRO training runs whose results ``test_zero.py`` compares.

One launch does all the multi-process work (starting processes and DeepSpeed engines is what costs time here):

- ``z{1,2,3}-full``: 8 steps with dropout (per-process RNG streams matter) and ``z{1,2,3}-stop``: the same run stopped
  after 4 steps, then resumed in a fresh trainer (a new engine) to 8 steps;
- ``o{2,3}-full`` / ``o{2,3}-stop``: the same with ZeRO-Offload (``zero_offload_optimizer``);
- ``z2-plain`` / ``z3-plain``: 8 steps without dropout, with 2 micro-batches of 8 per process and per step and the
  gradient clipped (the test compares them with a 1-process run of the same global batch of 32);
- ``z2-to-z3``: the 4-step ZeRO-2 checkpoint resumed under ZeRO-3 (the checkpoints are consolidated);
- ``lora-full`` / ``lora-stop``: peft LoRA adapters under ZeRO-3 (frozen base weights partitioned too);
- a resume from a checkpoint whose ``rng-1`` file only rank 1 reads is corrupt: both ranks must raise (no hang);
- per stage, how many fp32 master and parameter elements rank 0 holds (ZeRO must really partition);
- ``tied-full`` / ``tied-stop``: a model whose embedding and output layer share a weight, under ZeRO-3.

The model's hidden width is odd (33), so parameters straddle the partition boundary between the two ranks and the
last ZeRO-3 partition of a parameter is padded. Usage: ``torchrun --nproc_per_node 2 tests/train/_zero_worker.py
OUT_DIR``; rank 0 writes ``OUT_DIR/result.json``. With a third argument ``bf16`` it runs ``b{1,2,3}-full`` /
``b{1,2,3}-stop`` (+ resume) under ``mixed_precision=bf16`` instead (accelerate fixes the precision once per process)
and records the weight dtypes the Linear layers saw while training (``b1-*`` too).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from _sharded import corrupt_rank1_then_resume, demo_runner, finish_worker, record_linear_dtypes


_run = demo_runner(["trainer.progress=false", "trainer.plots=false", "trainer.distributed=deepspeed",
                    "trainer.batch_size=16", "trainer.save_every=4", "trainer.log_every=2", "trainer.eval_every=4",
                    "n_pairs=256", "hidden=33"])


def bf16(out: Path) -> None:
    # training passes only (the demo's reference pass runs before the engine exists, evaluation without grad)
    seen = record_linear_dtypes(lambda m: torch.is_grad_enabled())
    result: dict = {"resumed": {}}
    for stage in (1, 2, 3):
        extra = ["dropout=0.0", "trainer.mixed_precision=bf16", f"trainer.zero_stage={stage}"]
        _run(out, f"b{stage}-full", 8, extra)
        _run(out, f"b{stage}-stop", 4, extra)
        result["resumed"][stage] = _run(out, f"b{stage}-stop", 8, extra, resume=True)["step"]
    if int(os.environ["RANK"]) == 0:
        (out / "result_bf16.json").write_text(json.dumps({**result, "forward_dtypes": sorted(seen)}))
    finish_worker()


def partition_sizes() -> dict:
    """Per ZeRO stage: this rank's fp32 master elements and the parameter elements it holds, vs the model's total."""
    from mmalign.train.zero import _flat_partitions, deepspeed_config, initialize

    sizes = {}
    for stage in (1, 2, 3):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 33), torch.nn.Tanh(), torch.nn.Linear(33, 32))
        config = deepspeed_config(batch_size=1, grad_accum_steps=1, max_grad_norm=0.0, zero_stage=stage,
                                  mixed_precision="no")
        total = sum(p.numel() for p in model.parameters())  # before ZeRO-3 empties the module's parameters
        engine = initialize(model, torch.optim.AdamW(model.parameters()), config)
        sizes[stage] = {
            "total": total,
            "masters": sum(f.numel() for f in _flat_partitions(engine.optimizer)),
            "held": sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters()),
        }
    return sizes


class TiedLM(torch.nn.Module):
    """Embedding and output layer share one weight (as GPT-2's wte / lm_head do)."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = torch.nn.Embedding(11, 6)
        self.mid = torch.nn.Linear(6, 6)
        self.lm_head = torch.nn.Linear(6, 11, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.tanh(self.mid(self.wte(ids))))


def tied(out: Path, name: str, steps: int, resume: bool = False) -> None:
    """ZeRO-3 training of TiedLM through the trainer (tied weights must be saved once per name)."""
    from mmalign.config import load_config
    from mmalign.train.config import TrainerConfig
    from mmalign.train.trainer import Trainer

    cfg = load_config(TrainerConfig, None, [f"max_steps={steps}", "batch_size=4", "save_every=2", "progress=false",
                                            "plots=false", "lr=0.01", "distributed=deepspeed", "zero_stage=3"])
    torch.manual_seed(0)
    data = [(torch.randint(0, 11, (5,), generator=torch.Generator().manual_seed(i)),) for i in range(32)]

    def loss_fn(model, batch):  # noqa: ANN001, ANN202
        (ids,) = batch
        logits = model(ids[:, :-1])
        return torch.nn.functional.cross_entropy(logits.reshape(-1, 11), ids[:, 1:].reshape(-1)), {}

    Trainer(cfg, TiedLM(), data, loss_fn, out / name).train(resume=resume)


def main(out: Path) -> None:
    result: dict = {"resumed": {}, "sizes": partition_sizes()}
    for stage in (1, 2, 3):
        extra = ["dropout=0.2", f"trainer.zero_stage={stage}"]
        _run(out, f"z{stage}-full", 8, extra)
        _run(out, f"z{stage}-stop", 4, extra)
        result["resumed"][stage] = _run(out, f"z{stage}-stop", 8, extra, resume=True)["step"]
    # clipping active (gradient norms are about 0.2): the engine clips as the plain trainer does
    for stage in (2, 3):  # ZeRO-Offload: masters and AdamW state stepped in CPU memory
        extra = ["dropout=0.2", f"trainer.zero_stage={stage}", "trainer.zero_offload_optimizer=true"]
        _run(out, f"o{stage}-full", 8, extra)
        _run(out, f"o{stage}-stop", 4, extra)
        result["resumed"][f"o{stage}"] = _run(out, f"o{stage}-stop", 8, extra, resume=True)["step"]
    plain = ["dropout=0.0", "trainer.batch_size=8", "trainer.grad_accum_steps=2", "trainer.max_grad_norm=0.05"]
    for stage in (2, 3):
        _run(out, f"z{stage}-plain", 8, [*plain, f"trainer.zero_stage={stage}"])
    _run(out, "z2-to-z3", 4, [*plain, "trainer.zero_stage=2"])
    _run(out, "z2-to-z3", 8, [*plain, "trainer.zero_stage=3"], resume=True)
    lora = ["dropout=0.0", "trainer.zero_stage=3", "trainer.lora.enabled=true",
            "trainer.lora.target_modules=['0','3']", "trainer.lr=0.01"]
    _run(out, "lora-full", 8, lora)
    _run(out, "lora-stop", 4, lora)
    _run(out, "lora-stop", 8, lora, resume=True)
    tied(out, "tied-full", 4)
    tied(out, "tied-stop", 2)
    tied(out, "tied-stop", 4, resume=True)
    result["corrupt_errors"] = corrupt_rank1_then_resume(
        out, "z2-stop", 4, lambda: _run(out, "bad", 8, ["dropout=0.2", "trainer.zero_stage=2"], resume=True))
    if int(os.environ["RANK"]) == 0:
        (out / "result.json").write_text(json.dumps(result))
    finish_worker()


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[2:] == ["bf16"]:
        bf16(Path(sys.argv[1]))
    else:
        main(Path(sys.argv[1]))
