"""Run under ``torchrun --nproc_per_node N``: ZeRO state round trip through :mod:`mmalign.train.zero` on a device.

Trains a small MLP with ZeRO stage ``STAGE`` for 6 steps straight, and for 3 steps, gathers the full state
(:func:`gather_full_state`), loads it into a fresh plain model and AdamW, hands those to a fresh engine
(:func:`initialize`) and trains 3 more. Rank 0 writes ``OUT/roundtrip.json``: whether the two ends are bitwise
equal, the device, and the saved AdamW step. Usage: ``torchrun --nproc_per_node 1 _zero_roundtrip.py OUT STAGE DEVICE``
(``DEVICE`` cpu or cuda; on cuda the process group is NCCL, one GPU per process).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from _sharded import finish_worker

from mmalign.train.zero import deepspeed_config, gather_full_state, initialize


def _fresh(device: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 33), torch.nn.Tanh(), torch.nn.Linear(33, 3)).to(device)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def _train(engine, steps: range, device: str) -> None:  # noqa: ANN001 - a DeepSpeed engine
    x = torch.randn(64, 5, generator=torch.Generator().manual_seed(1)).to(device)
    y = torch.randn(64, 3, generator=torch.Generator().manual_seed(2)).to(device)
    rank, world = dist.get_rank(), dist.get_world_size()
    for step in steps:
        idx = torch.arange(8 * world * step + 8 * rank, 8 * world * step + 8 * (rank + 1)) % 64
        loss = ((engine(x[idx]) - y[idx]) ** 2).mean()
        engine.backward(loss)
        engine.step()


def main(out: Path, stage: int, device: str) -> None:
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    if device == "cuda":
        torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())
        device = f"cuda:{torch.cuda.current_device()}"
    config = deepspeed_config(batch_size=8, grad_accum_steps=1, max_grad_norm=1.0, zero_stage=stage,
                              mixed_precision="no")

    model, opt = _fresh(device)
    params = list(model.parameters())
    groups = opt.state_dict()["param_groups"]
    straight = initialize(model, opt, config)
    _train(straight, range(6), device)
    want, _ = gather_full_state(straight, params, groups, optimizer=False)

    model, opt = _fresh(device)
    params = list(model.parameters())
    first = initialize(model, opt, config)
    _train(first, range(3), device)
    tensors, opt_state = gather_full_state(first, params, groups)
    # every rank loads the same full state, as the trainer does from the checkpoint files
    box = [(tensors, opt_state)]
    dist.broadcast_object_list(box, src=0)
    tensors, opt_state = box[0]
    model, opt = _fresh(device)
    model.load_state_dict(tensors)
    opt.load_state_dict(opt_state)
    params = list(model.parameters())
    second = initialize(model, opt, config)
    _train(second, range(3, 6), device)
    got, _ = gather_full_state(second, params, groups, optimizer=False)
    if dist.get_rank() == 0:
        assert want is not None and got is not None
        result = {"bitwise": all(torch.equal(want[k], got[k]) for k in want),
                  "max_diff": max(float((want[k] - got[k]).abs().max()) for k in want),
                  "device": str(next(second.module.parameters()).device),
                  "saved_step": float(opt_state["state"][0]["step"])}
        (out / "roundtrip.json").write_text(json.dumps(result))
    finish_worker()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
