"""``mmalign diffusion train``: MaPO, Diffusion-DPO or SFT-on-chosen on a diffusers UNet through the generic trainer.

Model: the tiny pixel-space shapes UNet (optionally initialised from a pretrained reference file, e.g. the one the
benchmark writes) or a local diffusers checkpoint folder (``unet/`` + ``scheduler/`` subfolders, SD 1.x/2.x/SDXL).
Data: generated shape pairs of one benchmark setting, or a pair cache written by
:func:`mmalign.diffusion.data.save_pair_cache` (precomputed latents and prompt embeddings).
Diffusion-DPO's reference is the same network with LoRA disabled when ``trainer.lora.enabled``, else a frozen copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmalign.config import Config, check_choice, check_nonnegative, check_positive, option
from mmalign.train.config import LoraOptions, TrainerConfig

__all__ = ["DiffusionTrainConfig", "run"]


def _default_trainer() -> TrainerConfig:
    return TrainerConfig(max_steps=200, batch_size=16, lr=3e-4, log_every=20, progress=False,
                         lora=LoraOptions(r=8, alpha=8.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))


@dataclass
class DiffusionTrainConfig(Config):
    """Preference fine-tuning of a diffusion UNet (method: mapo, diffusion_dpo or sft)."""

    method: str = option("mapo", "mapo (reference-free), diffusion_dpo, or sft (denoising loss on chosen only)")
    beta: float = option(5000.0, "Diffusion-DPO beta, official form -0.5*beta*(model_diff - ref_diff); "
                                 "diffusers' SD1.5 script's beta_dpo equals beta/2")
    mapo_c: float = option(0.5, "MaPO constant c of s(l) = c*l/(exp(c*l)-1) (official --snr_value)")
    mapo_temperature: float = option(1000.0, "MaPO multiplier T of the margin (official: num_train_timesteps)")
    mapo_margin_weight: float = option(0.1, "MaPO weight of the margin term (official --beta_mapo)")
    model: str = option("tiny", "tiny (pixel-space shapes UNet) or a local diffusers pipeline folder")
    init_weights: str = option("", "tiny model only: safetensors file to start from (e.g. a benchmark reference)")
    prediction_type: str = option("", "override the scheduler's prediction_type: epsilon or v_prediction")
    data: str = option("shapes:style_90", "shapes:<benchmark setting> (generated) or a pair-cache .safetensors")
    num_pairs: int = option(512, "generated pairs (shapes data only)")
    data_seed: int = option(0, "seed of the generated pairs (shapes data only)")
    image_size: int = option(16, "tiny model / shapes data: image side in pixels")
    eval_samples_per_class: int = option(8, "shapes data: samples per shape drawn for the end-of-run evaluation")
    trainer: TrainerConfig = option(factory=_default_trainer, help="generic trainer settings")

    def __post_init__(self) -> None:
        check_choice("method", self.method, ["mapo", "diffusion_dpo", "sft"])
        check_positive("beta", self.beta)
        check_positive("mapo_c", self.mapo_c)
        check_positive("mapo_temperature", self.mapo_temperature)
        check_nonnegative("mapo_margin_weight", self.mapo_margin_weight)
        check_choice("prediction_type", self.prediction_type, ["", "epsilon", "v_prediction"])
        check_positive("num_pairs", self.num_pairs)
        check_positive("image_size", self.image_size)
        check_nonnegative("eval_samples_per_class", self.eval_samples_per_class)
        if self.data.startswith("shapes:"):
            setting = self.data.split(":", 1)[1]
            if setting != "safety" and not (setting.startswith("style_") and setting[6:].isdigit()):
                raise ValueError(f"data must be shapes:style_<degrees>, shapes:safety or a .safetensors pair cache, "
                                 f"got {self.data!r}")
        elif not self.data.endswith(".safetensors"):
            raise ValueError(f"data must be shapes:<setting> or a .safetensors pair cache, got {self.data!r}")
        if self.model != "tiny" and self.data.startswith("shapes:"):
            raise ValueError(f"shapes data only fits model=tiny, got model={self.model!r}; give a pair cache")


def _load_model(cfg: DiffusionTrainConfig) -> tuple[Any, Any]:
    import torch

    from mmalign.diffusion.benchmark import BenchmarkConfig, _scheduler, build_model

    if cfg.model == "tiny":
        torch.manual_seed(cfg.trainer.seed)
        unet = build_model(BenchmarkConfig(size=cfg.image_size))
        if cfg.init_weights:
            from safetensors.torch import load_file

            unet.load_state_dict(load_file(cfg.init_weights))
        scheduler = _scheduler()
    else:
        from diffusers import DDPMScheduler, UNet2DConditionModel

        root = Path(cfg.model)
        if not (root / "unet").is_dir():
            raise ValueError(f"model must be 'tiny' or a local diffusers folder with a unet/ subfolder, got {cfg.model!r}")
        unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet")
        scheduler = DDPMScheduler.from_pretrained(root, subfolder="scheduler")
    if cfg.prediction_type:
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler.from_config(scheduler.config, prediction_type=cfg.prediction_type)
    return unet, scheduler


def _dataset(cfg: DiffusionTrainConfig) -> tuple[Any, str | None]:
    import torch

    from mmalign.diffusion.benchmark import BenchmarkConfig, _embeddings, make_pairs
    from mmalign.diffusion.data import CachedPairDataset, load_pair_cache

    if not cfg.data.startswith("shapes:"):
        return load_pair_cache(cfg.data), None
    setting = cfg.data.split(":", 1)[1]
    pairs = make_pairs(setting, cfg.num_pairs, torch.Generator().manual_seed(cfg.data_seed), cfg.image_size)
    emb = _embeddings(BenchmarkConfig(size=cfg.image_size))
    return CachedPairDataset({"chosen": pairs["chosen"], "rejected": pairs["rejected"],
                              "encoder_hidden_states": emb[pairs["classes"]]}), setting


def run(cfg: DiffusionTrainConfig, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Train, evaluate on shapes data (exact pixel scorers), write the run folder, return the final metrics."""
    import copy

    import torch

    from mmalign.diffusion.adapter import make_loss_fn
    from mmalign.train import Trainer

    unet, scheduler = _load_model(cfg)
    dataset, setting = _dataset(cfg)
    ref_model = None
    if cfg.method == "diffusion_dpo" and not cfg.trainer.lora.enabled:
        ref_model = copy.deepcopy(unet).eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(cfg.trainer.seed + 1)
    loss_fn = make_loss_fn(cfg.method, scheduler, generator=generator, ref_model=ref_model, beta=cfg.beta,
                           mapo_c=cfg.mapo_c, mapo_temperature=cfg.mapo_temperature,
                           mapo_margin_weight=cfg.mapo_margin_weight)
    eval_fn = None
    if setting is not None and cfg.eval_samples_per_class > 0:
        from mmalign.diffusion.benchmark import BenchmarkConfig, evaluate

        bcfg = BenchmarkConfig(size=cfg.image_size, samples_per_class=cfg.eval_samples_per_class)

        def eval_fn(model: torch.nn.Module) -> dict[str, float]:
            if ref_model is not None:
                ref_model.to(next(model.parameters()).device)
            return {f"eval/{k}": v for k, v in evaluate(bcfg, model, setting, cfg.trainer.seed).items()}

    trainer = Trainer(cfg.trainer, unet, dataset, loss_fn, Path(run_dir), eval_fn=eval_fn,
                      generators={"noise": generator})  # checkpointed, so --resume redraws the same noise
    if ref_model is not None:
        ref_model.to(trainer.accelerator.device)
    return trainer.train(resume=resume)
