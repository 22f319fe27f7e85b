"""The diffusion jobs end to end on tiny budgets: train (through the generic trainer), benchmark, perf."""

from __future__ import annotations

import json

import pytest
import torch

from mmalign.config import load_config
from mmalign.diffusion.benchmark import BenchmarkConfig, make_pairs, run as run_benchmark
from mmalign.diffusion.train import DiffusionTrainConfig, run as run_train
from mmalign.registry import JOBS


def test_jobs_are_registered_and_configs_load():
    assert "diffusion.train" in JOBS and "diffusion.benchmark" in JOBS and "diffusion.sample" in JOBS
    for name in ("train_mapo", "train_dpo", "train_dpo_lora", "train_dpo_sftref", "pickapic_sd15_lora"):
        cfg = load_config(DiffusionTrainConfig, f"configs/diffusion/{name}.yaml")
        assert cfg.method in ("mapo", "diffusion_dpo")
    assert load_config(BenchmarkConfig, "configs/diffusion/benchmark.yaml").seeds


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="'orpo' is neither 'sft' nor a registered loss"):
        DiffusionTrainConfig(method="orpo")
    with pytest.raises(ValueError, match="shapes setting must be"):
        DiffusionTrainConfig(data="shapes:purple")
    with pytest.raises(ValueError, match="dpo_<positive beta>"):
        BenchmarkConfig(methods=["dpo_x"])
    with pytest.raises(ValueError, match="sftdpo_<positive beta>"):
        BenchmarkConfig(methods=["sftdpo_-5"])
    with pytest.raises(ValueError, match="<method>@<positive lr>"):
        BenchmarkConfig(methods=["dpo_5@fast"])
    with pytest.raises(ValueError, match="settings entries"):
        BenchmarkConfig(settings=["style"])
    for bad in ("mapo+lora0", "mapo+lorax", "mapo+qlora8", "mapo+"):
        with pytest.raises(ValueError, match=r"<method>\+lora<positive rank>"):
            BenchmarkConfig(methods=[bad])
    with pytest.raises(ValueError, match="'orpo'"):
        BenchmarkConfig(methods=["orpo+lora4"])


def test_parse_method_splits_adapter_and_lr():
    from mmalign.diffusion.benchmark import parse_method

    assert parse_method("dpo_5000+lora8@1e-4") == ("dpo_5000", 8, 1e-4)
    assert parse_method("sftdpo_500@3e-5") == ("sftdpo_500", 0, 3e-5)
    assert parse_method("mapo") == ("mapo", 0, None)


@pytest.mark.parametrize("method,lora", [("diffusion_dpo", True), ("mapo", False)])
def test_train_job_through_the_generic_trainer(tmp_path, method, lora):
    cfg = DiffusionTrainConfig.from_dict({
        "method": method, "data": "shapes:safety", "num_pairs": 8, "image_size": 8, "eval_samples_per_class": 1,
        "trainer": {"max_steps": 2, "batch_size": 4, "log_every": 1, "progress": False, "plots": False,
                    "cpu": True, "lora": {"enabled": lora, "r": 2, "alpha": 2.0,
                                          "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}}})
    out = run_train(cfg, tmp_path)
    assert out["step"] == 2 and "eval/pref_score" in out and "train/pref_accuracy" in out
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "metrics.jsonl").is_file()


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_shapes_evaluation_samples_with_the_training_prediction_type(tmp_path, monkeypatch, prediction_type):
    """The end-of-run samples are drawn by a sampler with the training scheduler's config (prediction type)."""
    import mmalign.diffusion.sampling as S

    seen, original = [], S.sample

    def spy(model, scheduler, *args, **kwargs):
        seen.append(scheduler.config.prediction_type)
        return original(model, scheduler, *args, **{**kwargs, "num_inference_steps": 1})

    monkeypatch.setattr(S, "sample", spy)
    cfg = DiffusionTrainConfig.from_dict({
        "method": "sft", "prediction_type": prediction_type, "data": "shapes:style_90", "num_pairs": 4,
        "image_size": 8, "eval_samples_per_class": 1,
        "trainer": {"max_steps": 1, "batch_size": 4, "progress": False, "plots": False, "cpu": True}})
    run_train(cfg, tmp_path)
    assert seen and set(seen) == {prediction_type}


def test_benchmark_pairs_match_their_setting():
    from mmalign.diffusion.scorers import circular_mean_hue, hue_distance

    g = torch.Generator().manual_seed(0)
    p = make_pairs("style_90", 64, g, 16)
    hw, hl = circular_mean_hue(p["chosen"])[0], circular_mean_hue(p["rejected"])[0]
    assert hue_distance(hw, 90.0).mean() < 10 and hue_distance(hl, 0.0).mean() < 15
    s = make_pairs("safety", 64, g, 16)
    assert hue_distance(circular_mean_hue(s["rejected"])[0], 120.0).mean() < 15


def test_benchmark_smoke_is_resumable(tmp_path):
    cfg = BenchmarkConfig(size=8, channels=[8, 16], embed_dim=8, pretrain_steps=2, pretrain_batch=4, num_pairs=8,
                          finetune_steps=2, finetune_batch=2, samples_per_class=1, sample_steps=2,
                          settings=["style_90", "safety"], methods=["sft", "mapo", "dpo_1000@1e-4", "sftdpo_1000@1e-4"],
                          seeds=[0])
    out = run_benchmark(cfg, tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 5 and "safety/mapo/pref_score" in out
    assert all(0.0 <= r["pref_score"] <= 1.0 and 0.0 <= r["fidelity_iou"] <= 1.0 for r in rows)
    sftdpo = [r for r in rows if r["method"].startswith("sftdpo")]
    sft = {r["setting"]: r for r in rows if r["method"] == "sft"}
    # its SFT stage is the sft arm itself, and its DPO reference is that SFT model (not the pretrained one)
    assert all(r["sft_stage_final_loss"] == sft[r["setting"]]["final_loss"] for r in sftdpo)
    run_benchmark(cfg, tmp_path)  # every cell is done: nothing is added
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 10


def test_sftdpo_reference_is_the_sft_model():
    """sftdpo's DPO stage starts at policy = reference = the SFT model: its first loss is exactly log 2."""
    import math

    from mmalign.diffusion.benchmark import build_model, finetune

    cfg = BenchmarkConfig(size=8, channels=[8, 16], embed_dim=8, finetune_steps=1, finetune_batch=2)
    torch.manual_seed(0)
    ref = build_model(cfg)
    pairs = make_pairs("style_90", 4, torch.Generator().manual_seed(0), 8)
    sft_model, _ = finetune(cfg, ref, "sft", pairs, 0)
    _, out = finetune(cfg, ref, "sftdpo_1000@1e-4", pairs, 0)
    assert out["final_loss"] == pytest.approx(math.log(2), abs=1e-6)  # one step: the loss before any DPO update
    # replay the DPO stage's first draw: its reference errors are the SFT model's, not the pretrained model's
    from mmalign.diffusion.adapter import PairBatch, pair_denoising_errors, paired_noise_and_timesteps
    from mmalign.diffusion.shapes import shapes_embeddings, shapes_scheduler

    g = torch.Generator().manual_seed(10_000 + 0 + 1_000_000)
    idx = torch.randint(0, 4, (2,), generator=g)
    batch = PairBatch(pairs["chosen"][idx], pairs["rejected"][idx], shapes_embeddings(cfg.embed_dim)[pairs["classes"][idx]])
    noise, t = paired_noise_and_timesteps(batch.chosen, 1000, g)
    with torch.no_grad():
        via_sft = pair_denoising_errors(sft_model, shapes_scheduler(), batch, noise, t)[0].mean().item()
        via_pretrained = pair_denoising_errors(ref, shapes_scheduler(), batch, noise, t)[0].mean().item()
    assert out["diffusion/ref_err_chosen"] == pytest.approx(via_sft, rel=1e-5)
    assert abs(via_sft - via_pretrained) > 1e-4


def _tiny_lora_setup():
    from mmalign.diffusion.benchmark import build_model

    cfg = BenchmarkConfig(size=8, channels=[8, 16], embed_dim=8, finetune_steps=1, finetune_batch=2)
    torch.manual_seed(0)
    ref = build_model(cfg)
    return cfg, ref, make_pairs("style_90", 4, torch.Generator().manual_seed(0), 8)


def test_lora_dpo_references_the_untouched_base_and_returns_a_plain_unet():
    """+lora: only adapters train, the reference is the base with adapters off (first DPO loss exactly log 2), and
    the returned model is the merged plain UNet; the pretrained reference object itself is never modified."""
    import math

    from diffusers import UNet2DConditionModel

    from mmalign.diffusion.benchmark import finetune

    cfg, ref, pairs = _tiny_lora_setup()
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    model, out = finetune(cfg, ref, "dpo_1000+lora2@1e-2", pairs, 0)
    assert out["final_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert type(model) is UNet2DConditionModel and not any("lora" in k for k in model.state_dict())
    assert all(torch.equal(before[k], v) for k, v in ref.state_dict().items())
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # LoRA reaches only the attention projections it targets; every other weight is the base's
    assert changed and all(any(t in k for t in ("to_q", "to_k", "to_v", "to_out.0")) for k in changed)


def test_lora_sftdpo_references_the_merged_sft_model():
    import math

    from mmalign.diffusion.benchmark import finetune

    cfg, ref, pairs = _tiny_lora_setup()
    sft, _ = finetune(cfg, ref, "sft+lora2@1e-2", pairs, 0)
    _, out = finetune(cfg, ref, "sftdpo_1000+lora2@1e-2", pairs, 0)
    assert out["final_loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference = merged SFT model
    assert any(not torch.equal(a, b) for a, b in zip(sft.state_dict().values(), ref.state_dict().values()))


def test_circular_w1_hand_computed():
    from mmalign.diffusion.benchmark import circular_w1

    assert circular_w1([350.0], [10.0]) == pytest.approx(20.0, abs=1e-3)  # across 0°, not 340°
    assert circular_w1([0.0], [180.0]) == pytest.approx(180.0, abs=1e-3)
    assert circular_w1([0.0, 90.0], [90.0, 0.0]) == pytest.approx(0.0, abs=1e-3)
    assert circular_w1([0.0, 90.0], [45.0, 135.0]) == pytest.approx(45.0, abs=1e-3)


def test_evaluate_joint_score_and_mismatch(tmp_path):
    from mmalign.diffusion.benchmark import evaluate

    cfg, ref, pairs = _tiny_lora_setup()
    cfg = BenchmarkConfig(size=8, channels=[8, 16], embed_dim=8, samples_per_class=2, sample_steps=2)
    far = evaluate(cfg, ref, "style_90", 0, chosen_hue=torch.full((8,), 90.0))
    near = evaluate(cfg, ref, "style_90", 0, chosen_hue=torch.full((8,), 100.0))
    assert far["pref_shape"] <= min(far["pref_score"], far["shape_acc"])
    # same samples: moving every chosen hue by 10° moves W1 by at most 10°
    assert 0.0 <= far["w1_chosen"] <= 180.0 and abs(far["w1_chosen"] - near["w1_chosen"]) <= 10.0 + 1e-6
    assert "w1_chosen" not in evaluate(cfg, ref, "style_90", 0)


def test_perf_measurement_runs_on_cpu():
    from mmalign.diffusion.perf import measure

    r = measure("mapo", batch=1, steps=1, warmup=0)
    assert r["step_s_median"] > 0 and r["memory_counter"] == "ru_maxrss growth"
    d = measure("diffusion_dpo", batch=1, steps=1, warmup=0)
    # exact byte counts: MaPO has no reference copy, DPO's frozen copy is the size of the weights; AdamW keeps 2 states (+ step counters)
    assert r["ref_weights_mib"] == 0.0 and d["ref_weights_mib"] == pytest.approx(d["weights_mib"])
    assert r["optimizer_mib"] == pytest.approx(2 * r["grads_mib"], rel=1e-2) and r["grads_mib"] == pytest.approx(r["weights_mib"])
    assert d["peak_total_mib"] == pytest.approx(d["peak_mem_mib"] + d["weights_mib"])


@pytest.mark.gpu
def test_perf_gpu_sdxl_bf16_and_largest_batch():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from mmalign.diffusion.perf import largest_batch, measure_in_subprocess

    for method in ("diffusion_dpo", "mapo"):
        r = measure_in_subprocess(method=method, unet_name="sdxl", batch=1, steps=2, warmup=1, device="cuda",
                                  bf16=True, grad_checkpointing=True)
        assert r["images_per_s"] > 0 and r["peak_mem_mib"] > 0
    assert largest_batch("mapo", unet_name="sd_small", device="cuda", bf16=True, limit=8) >= 1


def test_train_job_resume_redraws_the_same_noise(tmp_path):
    """The loss's noise generator is checkpointed: stopping at step 2 and resuming to 4 equals a straight 4-step run."""
    from safetensors.torch import load_file

    def cfg(steps):
        return DiffusionTrainConfig.from_dict({
            "method": "mapo", "data": "shapes:safety", "num_pairs": 8, "image_size": 8, "eval_samples_per_class": 0,
            "trainer": {"max_steps": steps, "batch_size": 4, "log_every": 1, "progress": False, "plots": False,
                        "cpu": True}})

    run_train(cfg(4), tmp_path / "straight")
    run_train(cfg(2), tmp_path / "resumed")
    run_train(cfg(4), tmp_path / "resumed", resume=True)
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
