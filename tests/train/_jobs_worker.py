"""Run under ``torchrun --nproc_per_node 2``: domain jobs and VLM generation with sharded parameters.

- the VLM train job (DPO; its adapter calls ``get_image_features`` on the root model, outside ``forward``) under
  FSDP2 and under ZeRO-3, the same with online BDHS (regeneration inside the loss), and the diffusion train job (MaPO, Diffusion-DPO with a frozen reference) under ZeRO-3;
- ``VLMAdapter.generate`` on a sharded tiny LLaVA (FSDP2, then ZeRO-3) where rank 0's rows stop after one token
  and rank 1's run to ``max_new_tokens``: the token loop must keep both processes stepping (else it hangs).

Usage: ``torchrun --nproc_per_node 2 tests/train/_jobs_worker.py OUT_DIR``; rank 0 writes ``OUT_DIR/jobs.json``.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch
from _sharded import finish_worker



def _vlm(out: Path, name: str, trainer: dict, **job: object) -> float:
    from mmalign.vision_lm.train import VLMTrainConfig, run

    cfg = VLMTrainConfig.from_dict({
        "method": "dpo", "sft_steps": 0, "n_scenes": 8, "max_length": 64, **job,
        "trainer": {"max_steps": 2, "batch_size": 2, "lr": 1e-3, "progress": False, "plots": False, "log_every": 1,
                    "lora": {"enabled": True, "r": 4, "alpha": 8.0}, **trainer}})
    return float(run(cfg, out / name)["train/loss"])


def _diffusion(out: Path, name: str, method: str, trainer: dict, eval_samples: int = 0) -> float:
    from mmalign.diffusion.train import DiffusionTrainConfig, run

    cfg = DiffusionTrainConfig.from_dict({
        "method": method, "data": "shapes:safety", "num_pairs": 16, "image_size": 8, "eval_samples_per_class": eval_samples,
        "trainer": {"max_steps": 2, "batch_size": 4, "log_every": 1, "progress": False, "plots": False, **trainer}})
    return float(run(cfg, out / name)["train/loss"])


def _generate(strategy: str) -> list[str]:
    from mmalign.train.fsdp import shard_model
    from mmalign.vision_lm import scenes as S
    from mmalign.vision_lm.adapter import VLExample, VLMAdapter
    from mmalign.vision_lm.tiny import build_tiny_llava

    model, processor = build_tiny_llava(S.vocabulary(), seed=0, vision_dim=32, text_dim=32)
    if strategy == "fsdp":
        model = shard_model(model, [], torch.device("cpu"))
    else:
        from mmalign.train.zero import deepspeed_config, initialize

        config = deepspeed_config(batch_size=1, grad_accum_steps=1, max_grad_norm=0.0, zero_stage=3,
                                  mixed_precision="no")
        model = initialize(model, torch.optim.AdamW(model.parameters()), config).module
    adapter = VLMAdapter(model, processor)
    rank = torch.distributed.get_rank()
    image = S.render(S.SceneGenerator().sample(__import__("numpy").random.default_rng(rank)))
    examples = [VLExample("<image> describe :", "a red", [image])] * (1 + rank)
    # rank 0 stops at any word; rank 1 never stops early
    stop = S.vocabulary() if rank == 0 else ()
    return adapter.generate(examples, max_new_tokens=12, stop_words=stop)


def main(out: Path) -> None:
    torch.set_num_threads(1)
    result: dict = {"loss": {}, "generated": {}}
    zero3 = {"distributed": "deepspeed", "zero_stage": 3}
    result["loss"]["vlm_fsdp"] = _vlm(out, "vlm-fsdp", {"distributed": "fsdp"})
    result["loss"]["vlm_zero3"] = _vlm(out, "vlm-zero3", zero3)
    bdhs = {"pair_source": "bdhs", "bdhs_online_prob": 1.0}
    result["loss"]["bdhs_fsdp"] = _vlm(out, "bdhs-fsdp", {"distributed": "fsdp"}, **bdhs)
    result["loss"]["bdhs_zero3"] = _vlm(out, "bdhs-zero3", zero3, **bdhs)
    # with evaluation (sampling on every process, as ZeRO-3 requires)
    result["loss"]["mapo_zero3"] = _diffusion(out, "mapo-zero3", "mapo", zero3, eval_samples=1)
    result["loss"]["dpo_zero3"] = _diffusion(out, "dpo-zero3", "diffusion_dpo", zero3)
    for strategy in ("fsdp", "zero3"):
        texts = _generate(strategy)
        gathered: list = [None, None]
        torch.distributed.all_gather_object(gathered, texts)
        result["generated"][strategy] = gathered
    if int(os.environ["RANK"]) == 0:
        assert all(math.isfinite(v) for v in result["loss"].values()), result
        (out / "jobs.json").write_text(json.dumps(result))
    finish_worker()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
