"""Diffusion-DPO with a reference distinct from the initial policy (e.g. SFT on chosen, then DPO)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmalign.diffusion.artifacts import load_unet_weights
from mmalign.diffusion.train import DiffusionTrainConfig, _reference, run as run_train


def _cfg(method: str, lora: bool = False, steps: int = 2, **kw) -> DiffusionTrainConfig:
    return DiffusionTrainConfig.from_dict({
        "method": method, "data": "shapes:style_90", "num_pairs": 8, "image_size": 8, "eval_samples_per_class": 0,
        "beta": 500.0, **kw,
        "trainer": {"max_steps": steps, "batch_size": 4, "log_every": 1, "progress": False, "plots": False,
                    "cpu": True, "lr": 1e-2, "lora": {"enabled": lora, "r": 2, "alpha": 2.0,
                                                      "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}}})


def _first_loss(run_dir) -> float:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r["train/loss"] for r in rows if "train/loss" in r and r.get("step") == 1)


@pytest.fixture(scope="module")
def sft_weights(tmp_path_factory):
    """A full-weight SFT-on-chosen run of the tiny model (its model.safetensors serves as reference)."""
    out = tmp_path_factory.mktemp("sft")
    run_train(_cfg("sft", steps=3), out)
    return out / "model.safetensors"


def test_sft_then_dpo_starts_at_log2_and_keeps_the_sft_reference(tmp_path, sft_weights):
    run_train(_cfg("diffusion_dpo", init_weights=str(sft_weights), ref_weights=str(sft_weights)), tmp_path / "a")
    assert _first_loss(tmp_path / "a") == pytest.approx(math.log(2), abs=1e-5)  # policy = reference at step 1
    trained = load_file(str(tmp_path / "a" / "model.safetensors"))
    sft = load_file(str(sft_weights))
    assert any(not torch.equal(trained[k], sft[k]) for k in sft)  # the policy moved, the reference file did not
    # the reference distinct from the initial (freshly initialised) policy: DPO starts away from log 2
    run_train(_cfg("diffusion_dpo", ref_weights=str(sft_weights)), tmp_path / "b")
    assert abs(_first_loss(tmp_path / "b") - math.log(2)) > 1e-3


def test_reference_network_is_frozen_and_loaded_from_ref_weights(sft_weights):
    from mmalign.diffusion.benchmark import BenchmarkConfig, build_model

    torch.manual_seed(0)
    policy = build_model(BenchmarkConfig(size=8))
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    for lora in (False, True):  # with LoRA too, ref_weights gives a separate network (not adapters-disabled)
        ref = _reference(_cfg("diffusion_dpo", lora=lora, ref_weights=str(sft_weights)), policy)
        assert ref is not None and ref is not policy and not any(p.requires_grad for p in ref.parameters())
        assert all(torch.equal(ref.state_dict()[k], v) for k, v in load_file(str(sft_weights)).items())
    assert all(torch.equal(policy.state_dict()[k], v) for k, v in before.items())
    assert _reference(_cfg("diffusion_dpo", lora=True), policy) is None  # LoRA: adapters-disabled reference
    ref = _reference(_cfg("diffusion_dpo"), policy)  # default: frozen copy of the initial policy
    assert all(torch.equal(ref.state_dict()[k], v) for k, v in before.items())


def test_reference_weights_errors(tmp_path, sft_weights):
    with pytest.raises(ValueError, match="ref_weights is only used by methods with a reference"):
        _cfg("mapo", ref_weights=str(sft_weights))
    with pytest.raises(ValueError, match="ref_weights must be an existing"):
        _cfg("diffusion_dpo", ref_weights=str(tmp_path / "missing.safetensors"))
    from mmalign.diffusion.benchmark import BenchmarkConfig, build_model

    unet = build_model(BenchmarkConfig(size=8))
    lora_file = tmp_path / "lora.safetensors"
    save_file({"base_model.model.conv_in.lora_A.default.weight": torch.zeros(2, 3)}, str(lora_file))
    with pytest.raises(ValueError, match="a LoRA run.s model.safetensors"):
        load_unet_weights(unet, str(lora_file), "ref_weights")
    wrong = tmp_path / "wrong.safetensors"
    save_file({k: v.contiguous() for k, v in build_model(BenchmarkConfig(size=8, channels=[8, 16])).state_dict().items()},
              str(wrong))
    with pytest.raises(ValueError, match="ref_weights .*does not fit the model's UNet"):
        load_unet_weights(unet, str(wrong), "ref_weights")
