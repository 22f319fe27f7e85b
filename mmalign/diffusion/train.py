"""``mmalign diffusion train``: MaPO, Diffusion-DPO or SFT-on-chosen on a diffusers UNet through the generic trainer.

Model: the tiny pixel-space shapes UNet (optionally initialised from a pretrained reference file, e.g. the one the
benchmark writes) or a local diffusers checkpoint folder (``unet/`` + ``scheduler/`` subfolders, SD 1.x/2.x/SDXL).
Data: generated shape pairs of one benchmark setting, or a pair cache written by
:func:`mmalign.diffusion.data.save_pair_cache` (precomputed latents and prompt embeddings).
Diffusion-DPO's reference is the same network with LoRA disabled when ``trainer.lora.enabled``, else a frozen copy
of the initial model; ``ref_weights`` makes it a separate frozen network with other weights (e.g. an SFT-on-chosen
model, the reference the Diffusion-DPO paper fine-tunes before preference training). With a full pipeline folder and
``eval_prompts``, evaluation generates through that pipeline with the trained UNet (:mod:`mmalign.diffusion.pipeline`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmalign.config import Config, check_choice, check_nonnegative, check_positive, option
from mmalign.train.config import LoraOptions, TrainerConfig

__all__ = ["DiffusionTrainConfig", "load_unet_weights", "run"]


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
    init_weights: str = option("", "weights to start from: a full-weight UNet safetensors file (e.g. a benchmark "
                                   "reference or a previous run's model.safetensors) or a diffusers folder")
    ref_weights: str = option("", "diffusion_dpo only: weights of a reference distinct from the initial policy "
                                  "(same formats as init_weights, e.g. an SFT-on-chosen run); empty: the initial "
                                  "model (frozen copy, or LoRA disabled)")
    prediction_type: str = option("", "override the scheduler's prediction_type: epsilon or v_prediction")
    data: str = option("shapes:style_90", "shapes:<benchmark setting> (generated) or a pair-cache .safetensors")
    num_pairs: int = option(512, "generated pairs (shapes data only)")
    data_seed: int = option(0, "seed of the generated pairs (shapes data only)")
    image_size: int = option(16, "tiny model / shapes data: image side in pixels")
    eval_samples_per_class: int = option(8, "shapes data: samples per shape drawn for the end-of-run evaluation")
    eval_prompts: list[str] = option([], "model folder with a full pipeline: prompts to generate from at each "
                                         "evaluation through the pipeline (images saved under run_dir/samples)")
    eval_images_per_prompt: int = option(2, "pipeline evaluation: images per prompt (fixed seed)")
    eval_steps: int = option(20, "pipeline evaluation: denoising steps")
    eval_guidance: float = option(1.0, "pipeline evaluation: classifier-free guidance scale (> 1: CFG)")
    eval_clip_weights: str = option("", "pipeline evaluation: local open_clip weights file; logs eval/clip_score")
    eval_clip_model: str = option("ViT-B-32", "pipeline evaluation: open_clip architecture of eval_clip_weights")
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
        check_positive("eval_images_per_prompt", self.eval_images_per_prompt)
        check_positive("eval_steps", self.eval_steps)
        check_positive("eval_guidance", self.eval_guidance)
        if self.eval_prompts and (self.model == "tiny" or not (Path(self.model) / "model_index.json").is_file()):
            raise ValueError(f"eval_prompts needs model to be a full diffusers pipeline folder (with "
                             f"model_index.json), got model={self.model!r}")
        if self.eval_clip_weights and not Path(self.eval_clip_weights).is_file():
            raise ValueError(f"eval_clip_weights must be a local weights file, got {self.eval_clip_weights!r}")
        if self.data.startswith("shapes:"):
            setting = self.data.split(":", 1)[1]
            if setting != "safety" and not (setting.startswith("style_") and setting[6:].isdigit()):
                raise ValueError(f"data must be shapes:style_<degrees>, shapes:safety or a .safetensors pair cache, "
                                 f"got {self.data!r}")
        elif not self.data.endswith(".safetensors"):
            raise ValueError(f"data must be shapes:<setting> or a .safetensors pair cache, got {self.data!r}")
        if self.ref_weights and self.method != "diffusion_dpo":
            raise ValueError(f"ref_weights is only used by method diffusion_dpo, got method={self.method!r} with "
                             f"ref_weights={self.ref_weights!r}")
        for name in ("init_weights", "ref_weights"):
            path = getattr(self, name)
            if path and not (Path(path).is_dir() or (path.endswith(".safetensors") and Path(path).is_file())):
                raise ValueError(f"{name} must be an existing .safetensors file or diffusers folder, got {path!r}")
        if self.model != "tiny" and self.data.startswith("shapes:"):
            raise ValueError(f"shapes data only fits model=tiny, got model={self.model!r}; give a pair cache")


def _load_model(cfg: DiffusionTrainConfig) -> tuple[Any, Any]:
    import torch

    from mmalign.diffusion.benchmark import BenchmarkConfig, _scheduler, build_model

    if cfg.model == "tiny":
        torch.manual_seed(cfg.trainer.seed)
        unet = build_model(BenchmarkConfig(size=cfg.image_size))
        scheduler = _scheduler()
    else:
        from diffusers import DDPMScheduler, UNet2DConditionModel

        root = Path(cfg.model)
        if not (root / "unet").is_dir():
            raise ValueError(f"model must be 'tiny' or a local diffusers folder with a unet/ subfolder, got {cfg.model!r}")
        unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet")
        scheduler = DDPMScheduler.from_pretrained(root, subfolder="scheduler")
    if cfg.init_weights:
        load_unet_weights(unet, cfg.init_weights, "init_weights")
    if cfg.prediction_type:
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler.from_config(scheduler.config, prediction_type=cfg.prediction_type)
    return unet, scheduler


def load_unet_weights(unet: Any, path: str, name: str = "weights") -> Any:
    """Load full UNet weights into ``unet`` in place from a safetensors state dict or a diffusers folder.

    A folder may be a pipeline (with ``unet/``) or a UNet folder. Missing, unexpected or mis-shaped tensors (another
    architecture, or a LoRA run's adapter file) raise ``ValueError`` naming ``name`` and the path.
    """
    from safetensors.torch import load_file

    p = Path(path)
    if p.is_dir():
        from diffusers import UNet2DConditionModel

        state = UNet2DConditionModel.from_pretrained(p, subfolder="unet" if (p / "unet").is_dir() else None).state_dict()
    elif p.is_file() and p.suffix == ".safetensors":
        state = load_file(str(p))
    else:
        raise ValueError(f"{name} must be a .safetensors file or a diffusers folder, got {path!r}")
    if any("lora_" in k for k in state):
        raise ValueError(f"{name} {path!r} holds LoRA adapter weights (a LoRA run's file); give full UNet weights, "
                         "e.g. from a full-weight run or a merged pipeline folder")
    try:
        unet.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{name} {path!r} does not fit the model's UNet: {str(err)[:500]}") from err
    return unet


def _reference(cfg: DiffusionTrainConfig, unet: Any) -> Any:
    """Diffusion-DPO's frozen reference network, or None where LoRA-disabled forwards serve as the reference."""
    import copy

    if cfg.method != "diffusion_dpo" or (cfg.trainer.lora.enabled and not cfg.ref_weights):
        return None
    ref = copy.deepcopy(unet)
    if cfg.ref_weights:
        load_unet_weights(ref, cfg.ref_weights, "ref_weights")
    return ref.eval().requires_grad_(False)


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


def _with_prediction_type(pipe: Any, prediction_type: str) -> Any:
    """``pipe`` with its scheduler (same class and config) predicting ``prediction_type``, the trained UNet's."""
    sched = pipe.scheduler
    if "prediction_type" not in sched.config:
        raise ValueError(f"the pipeline's scheduler {type(sched).__name__} has no prediction_type setting; it cannot "
                         f"sample a UNet trained with prediction_type {prediction_type!r}")
    if sched.config.prediction_type != prediction_type:
        pipe.scheduler = type(sched).from_config(sched.config, prediction_type=prediction_type)
    return pipe


def _pipeline_eval_fn(cfg: DiffusionTrainConfig, run_dir: Path, prediction_type: str) -> Any:
    """Evaluation through the model folder's own pipeline (any class, e.g. SD or SDXL) with the trained UNet.

    The pipeline's scheduler keeps its class and settings but predicts ``prediction_type`` (the training
    scheduler's, e.g. ``v_prediction`` set by the ``prediction_type`` option).
    """
    import torch
    from diffusers import DiffusionPipeline

    from mmalign.diffusion.pipeline import evaluate_pipeline, with_unet

    base = DiffusionPipeline.from_pretrained(cfg.model, safety_checker=None, requires_safety_checker=False)
    base = _with_prediction_type(base, prediction_type)
    scorers = {}
    if cfg.eval_clip_weights:
        from mmalign.diffusion.scorers import ClipScorer

        scorers["clip_score"] = ClipScorer(cfg.eval_clip_model, pretrained=cfg.eval_clip_weights)

    def eval_fn(model: torch.nn.Module) -> dict[str, float]:
        from PIL import Image

        pipe = with_unet(base, model).to(next(model.parameters()).device)
        scores, images = evaluate_pipeline(pipe, cfg.eval_prompts, scorers, images_per_prompt=cfg.eval_images_per_prompt,
                                           seed=cfg.trainer.seed, num_inference_steps=cfg.eval_steps,
                                           guidance_scale=cfg.eval_guidance)
        out = run_dir / "samples"
        out.mkdir(parents=True, exist_ok=True)
        pixels = ((images + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for i, img in enumerate(pixels):
            Image.fromarray(img).save(out / f"prompt{i // cfg.eval_images_per_prompt}_{i % cfg.eval_images_per_prompt}.png")
        return {"eval/images": float(len(pixels)), **{f"eval/{k}": v for k, v in scores.items()}}

    return eval_fn


def run(cfg: DiffusionTrainConfig, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Train, evaluate on shapes data (exact pixel scorers), write the run folder, return the final metrics."""
    import torch

    from mmalign.diffusion.adapter import make_loss_fn
    from mmalign.train import Trainer

    unet, scheduler = _load_model(cfg)
    dataset, setting = _dataset(cfg)
    ref_model = _reference(cfg, unet)
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
            # sampled with the training scheduler's config: a v-prediction model needs a v-prediction sampler
            scores = evaluate(bcfg, model, setting, cfg.trainer.seed, scheduler=scheduler)
            return {f"eval/{k}": v for k, v in scores.items()}

    if cfg.eval_prompts:
        eval_fn = _pipeline_eval_fn(cfg, Path(run_dir), scheduler.config.prediction_type)
    trainer = Trainer(cfg.trainer, unet, dataset, loss_fn, Path(run_dir), eval_fn=eval_fn,
                      generators={"noise": generator})  # checkpointed, so --resume redraws the same noise
    if ref_model is not None:
        ref_model.to(trainer.accelerator.device)
    return trainer.train(resume=resume)
