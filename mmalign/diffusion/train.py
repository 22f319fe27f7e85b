"""``mmalign diffusion train``: a registered diffusion loss (MaPO, Diffusion-DPO, ...) or SFT-on-chosen on a UNet.

Model: the tiny pixel-space shapes UNet, or any diffusers pipeline by local folder or Hub id (SD 1.x/2.x with ε or
v prediction, SDXL; :mod:`mmalign.diffusion.models`), LoRA (``trainer.lora.enabled``) or full UNet; VAE and text
encoders stay frozen. Data: generated shape pairs (``shapes:<setting>``), a latent/pair cache ``.safetensors``, or
image-pair data through :mod:`mmalign.data.image_pairs` (Pick-a-Pic layout, mmalign's ``image`` kind or mapped
columns; JSONL, Parquet, a ``datasets`` folder or a Hub id), VAE-encoded on the fly or once into a latent cache.
Diffusion-DPO's reference is the same network with LoRA disabled when ``trainer.lora.enabled``, else a frozen copy of
the initial model; ``ref_weights`` makes it a separate frozen network with other weights. Artifacts
(:mod:`mmalign.diffusion.artifacts`): ``lora/`` (diffusers' LoRA format) or ``unet/`` (+ ``pipeline/`` with
``save_pipeline``); each can start a new run as ``init_weights``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mmalign.config import Config, check_choice, check_nonnegative, check_positive, option
from mmalign.train.config import LoraOptions, TrainerConfig

__all__ = ["DiffusionTrainConfig", "loss_options_of", "validate", "run"]


def _default_trainer() -> TrainerConfig:
    return TrainerConfig(max_steps=200, batch_size=16, lr=3e-4, log_every=20, progress=False,
                         lora=LoraOptions(r=8, alpha=8.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))


@dataclass
class DiffusionTrainConfig(Config):
    """Preference fine-tuning of a diffusion UNet (method: mapo, diffusion_dpo, sft or another registered loss)."""

    method: str = option("mapo", "mapo (reference-free), diffusion_dpo, sft (denoising loss on chosen only) or any "
                                 "loss registered in mmalign.registry.LOSSES that takes per-sample denoising errors")
    beta: float = option(5000.0, "Diffusion-DPO beta, official form -0.5*beta*(model_diff - ref_diff); "
                                 "diffusers' SD1.5 script's beta_dpo equals beta/2")
    mapo_c: float = option(0.5, "MaPO constant c of s(l) = c*l/(exp(c*l)-1) (official --snr_value)")
    mapo_temperature: float = option(1000.0, "MaPO multiplier T of the margin (official: num_train_timesteps)")
    mapo_margin_weight: float = option(0.1, "MaPO weight of the margin term (official --beta_mapo)")
    loss_options: dict[str, float] = option({}, "further keyword arguments of the loss, by its parameter names "
                                                "(a registered loss's own hyper-parameters)")
    model: str = option("tiny", "tiny (pixel-space shapes UNet), a diffusers pipeline folder, or a Hub id")
    init_weights: str = option("", "weights to start from: a run's lora/ (fused into the UNet), unet/ or pipeline/ "
                                   "folder, a diffusers UNet/pipeline folder, or a full-UNet .safetensors file")
    ref_weights: str = option("", "diffusion_dpo only: weights of a reference distinct from the initial policy "
                                  "(same formats as init_weights, e.g. an SFT-on-chosen run); empty: the initial "
                                  "model (frozen copy, or LoRA disabled)")
    prediction_type: str = option("", "override the scheduler's prediction_type: epsilon or v_prediction")
    data: str = option("shapes:style_90", "shapes:<benchmark setting> (generated), a pair/latent cache "
                                          ".safetensors, or image pairs: a .jsonl/.parquet file, a datasets folder "
                                          "or a Hub id (needs a pipeline model)")
    data_layout: str = option("auto", "image pairs: pickapic (caption, jpg_0, jpg_1, label_0), image (caption, "
                                      "chosen_image, rejected_image[, label]) or auto (pickapic if jpg_0 is a column)")
    columns: dict[str, str] = option({}, "image pairs: {field: column} for other column names, e.g. "
                                         "{caption: prompt, jpg_0: image_a}")
    split: str = option("", "image pairs from a Hub id or datasets folder: the split (empty: train, or the only one)")
    ties: str = option("drop", "pickapic label_0 = 0.5: drop (as Diffusion-DPO's script) or half (kept, trained "
                               "both ways with weight 0.5 each)")
    skip_invalid: bool = option(False, "image pairs: drop bad rows (counted and reported) instead of failing")
    allow_outside_paths: bool = option(False, "image pairs: let relative image paths leave the data folder")
    resolution: int = option(0, "image pairs: training resolution in pixels (0: the UNet's sample_size x the VAE's "
                                "scale factor)")
    random_crop: bool = option(False, "image pairs: random instead of centre crop")
    hflip: bool = option(True, "image pairs: flip both images horizontally with probability 0.5 (official default)")
    vae_batch_size: int = option(8, "image pairs: images per VAE encoder call")
    latent_cache: str = option("", "image pairs: a folder for a latent cache (VAE latents + prompt embeddings, "
                                   "keyed by data and VAE identity, centre crop, no flip); empty: encode on the fly")
    train_text_encoder: bool = option(False, "image pairs on a pipeline: train the text encoder(s) with the UNet "
                                             "(LoRA: adapters also on their q/k/v/out projections); prompts are "
                                             "encoded every step (no latent_cache)")
    save_pipeline: bool = option(False, "full fine-tuning of a pipeline: also write run_dir/pipeline (the whole "
                                        "pipeline with the trained UNet)")
    num_pairs: int = option(512, "generated pairs (shapes data only)")
    data_seed: int = option(0, "seed of the generated pairs (shapes data only)")
    image_size: int = option(16, "tiny model / shapes data: image side in pixels")
    eval_samples_per_class: int = option(8, "shapes data: samples per shape drawn for the end-of-run evaluation")
    eval_prompts: list[str] = option([], "pipeline model: prompts to generate from at each evaluation through the "
                                         "pipeline (images saved under run_dir/samples)")
    eval_images_per_prompt: int = option(2, "pipeline evaluation: images per prompt (fixed seed)")
    eval_steps: int = option(20, "pipeline evaluation: denoising steps")
    eval_guidance: float = option(1.0, "pipeline evaluation: classifier-free guidance scale (> 1: CFG)")
    eval_clip_weights: str = option("", "pipeline evaluation: local open_clip weights file; logs eval/clip_score")
    eval_clip_model: str = option("ViT-B-32", "pipeline evaluation: open_clip architecture of eval_clip_weights")
    trainer: TrainerConfig = option(factory=_default_trainer, help="generic trainer settings")

    def __post_init__(self) -> None:
        from mmalign.diffusion.adapter import SFT, diffusion_loss

        if self.method != SFT:
            diffusion_loss(self.method)
        check_positive("beta", self.beta)
        check_positive("mapo_c", self.mapo_c)
        check_positive("mapo_temperature", self.mapo_temperature)
        check_nonnegative("mapo_margin_weight", self.mapo_margin_weight)
        check_choice("prediction_type", self.prediction_type, ["", "epsilon", "v_prediction"])
        check_choice("data_layout", self.data_layout, ["auto", "pickapic", "image"])
        check_choice("ties", self.ties, ["drop", "half"])
        check_nonnegative("resolution", self.resolution)
        check_positive("vae_batch_size", self.vae_batch_size)
        check_positive("num_pairs", self.num_pairs)
        check_positive("image_size", self.image_size)
        check_nonnegative("eval_samples_per_class", self.eval_samples_per_class)
        check_positive("eval_images_per_prompt", self.eval_images_per_prompt)
        check_positive("eval_steps", self.eval_steps)
        check_positive("eval_guidance", self.eval_guidance)
        if self.eval_prompts and self.model == "tiny":
            raise ValueError("eval_prompts needs model to be a diffusers pipeline (folder or Hub id), got model='tiny'")
        if self.eval_clip_weights and not Path(self.eval_clip_weights).is_file():
            raise ValueError(f"eval_clip_weights must be a local weights file, got {self.eval_clip_weights!r}")
        if self.data.startswith("shapes:"):
            from mmalign.diffusion.shapes_eval import check_setting

            check_setting(self.data.split(":", 1)[1])
            if self.model != "tiny":
                raise ValueError(f"shapes data only fits model=tiny, got model={self.model!r}; give image pairs or "
                                 "a pair cache")
        elif not self.data.endswith(".safetensors") and self.model == "tiny":
            raise ValueError(f"image-pair data {self.data!r} needs a pipeline model (its VAE and text encoder encode "
                             "the pairs); model=tiny trains on shapes:<setting> or a pixel pair cache")
        if self.ref_weights and not loss_needs_reference_of(self.method):
            raise ValueError(f"ref_weights is only used by methods with a reference (e.g. diffusion_dpo), got "
                             f"method={self.method!r} with ref_weights={self.ref_weights!r}")
        for name in ("init_weights", "ref_weights"):
            path = getattr(self, name)
            if path and not (Path(path).is_dir() or (path.endswith(".safetensors") and Path(path).is_file())):
                raise ValueError(f"{name} must be an existing .safetensors file or folder (a run's lora/, unet/ or "
                                 f"pipeline/, or a diffusers folder), got {path!r}")
        if self.train_text_encoder and (self.model == "tiny" or self.data.startswith("shapes:")
                                        or self.data.endswith(".safetensors") or self.latent_cache):
            raise ValueError("train_text_encoder needs a pipeline model and image-pair data encoded on the fly (not "
                             "shapes data, a pair cache or latent_cache: those hold fixed prompt embeddings)")
        if self.save_pipeline and (self.model == "tiny" or self.trainer.lora.enabled):
            raise ValueError("save_pipeline writes a whole pipeline after full fine-tuning of a pipeline model; "
                             "with LoRA, load run_dir/lora into the base pipeline instead")


def loss_needs_reference_of(method: str) -> bool:
    from mmalign.diffusion.adapter import loss_needs_reference

    return loss_needs_reference(method)


def loss_options_of(cfg: DiffusionTrainConfig) -> dict[str, Any]:
    """The loss hyper-parameters of a config, by the loss functions' parameter names."""
    return {"beta": cfg.beta, "c": cfg.mapo_c, "temperature": cfg.mapo_temperature,
            "margin_weight": cfg.mapo_margin_weight, **cfg.loss_options}


def _reference(cfg: DiffusionTrainConfig, unet: Any) -> Any:
    """The frozen reference network, or None where LoRA-disabled forwards serve as the reference (or none needed)."""
    import copy

    from mmalign.diffusion.artifacts import load_unet_weights

    if not loss_needs_reference_of(cfg.method) or (cfg.trainer.lora.enabled and not cfg.ref_weights):
        return None
    ref = copy.deepcopy(unet)  # with train_text_encoder: the UNet and its text encoders
    if cfg.ref_weights:
        load_unet_weights(getattr(ref, "unet", ref), cfg.ref_weights, "ref_weights")
    return ref.eval().requires_grad_(False)


def _shapes_dataset(cfg: DiffusionTrainConfig) -> Any:
    import torch

    from mmalign.diffusion.data import CachedPairDataset
    from mmalign.diffusion.shapes import shapes_embeddings
    from mmalign.diffusion.shapes_eval import make_pairs

    setting = cfg.data.split(":", 1)[1]
    pairs = make_pairs(setting, cfg.num_pairs, torch.Generator().manual_seed(cfg.data_seed), cfg.image_size)
    emb = shapes_embeddings()
    return CachedPairDataset({"chosen": pairs["chosen"], "rejected": pairs["rejected"],
                              "encoder_hidden_states": emb[pairs["classes"]]})


def _with_prediction_type(pipe: Any, prediction_type: str) -> Any:
    """``pipe`` with its scheduler (same class and config) predicting ``prediction_type``, the trained UNet's."""
    sched = pipe.scheduler
    if "prediction_type" not in sched.config:
        raise ValueError(f"the pipeline's scheduler {type(sched).__name__} has no prediction_type setting; it cannot "
                         f"sample a UNet trained with prediction_type {prediction_type!r}")
    if sched.config.prediction_type != prediction_type:
        pipe.scheduler = type(sched).from_config(sched.config, prediction_type=prediction_type)
    return pipe


def _pipeline_eval_fn(cfg: DiffusionTrainConfig, base: Any, run_dir: Path, prediction_type: str) -> Any:
    """Evaluation through the model's own pipeline (any class, e.g. SD or SDXL) with the trained UNet.

    The pipeline's scheduler keeps its class and settings but predicts ``prediction_type`` (the training
    scheduler's, e.g. ``v_prediction`` set by the ``prediction_type`` option).
    """
    import torch

    from mmalign.diffusion.pipeline import evaluate_pipeline, save_images, with_unet

    base = _with_prediction_type(base, prediction_type)
    scorers = {}
    if cfg.eval_clip_weights:
        from mmalign.diffusion.scorers import ClipScorer

        scorers["clip_score"] = ClipScorer(cfg.eval_clip_model, pretrained=cfg.eval_clip_weights)

    def eval_fn(model: torch.nn.Module) -> dict[str, float]:
        pipe = with_unet(base, model).to(next(model.parameters()).device)
        scores, images = evaluate_pipeline(pipe, cfg.eval_prompts, scorers, images_per_prompt=cfg.eval_images_per_prompt,
                                           seed=cfg.trainer.seed, num_inference_steps=cfg.eval_steps,
                                           guidance_scale=cfg.eval_guidance)
        k = cfg.eval_images_per_prompt
        save_images(images, run_dir / "samples", [f"prompt{i // k}_{i % k}" for i in range(len(images))])
        return {"eval/images": float(len(images)), **{f"eval/{k}": v for k, v in scores.items()}}

    return eval_fn


def _shapes_eval_fn(cfg: DiffusionTrainConfig, scheduler: Any, ref_model: Any) -> Any:
    import torch

    from mmalign.diffusion.shapes_eval import ShapesEval, evaluate_shapes

    setting = cfg.data.split(":", 1)[1]
    spec = ShapesEval(size=cfg.image_size, samples_per_class=cfg.eval_samples_per_class)

    def eval_fn(model: torch.nn.Module) -> dict[str, float]:
        if ref_model is not None:
            ref_model.to(next(model.parameters()).device)
        # sampled with the training scheduler's config: a v-prediction model needs a v-prediction sampler
        scores = evaluate_shapes(spec, model, setting, cfg.trainer.seed, scheduler=scheduler)
        return {f"eval/{k}": v for k, v in scores.items()}

    return eval_fn


def _data(cfg: DiffusionTrainConfig, tm: Any, generator: Any) -> tuple[Any, Any]:
    """The training dataset and, for pixels encoded on the fly, the :class:`PairEncoder` the loss runs first."""
    from mmalign.diffusion.data import load_pair_cache

    if cfg.data.startswith("shapes:"):
        return _shapes_dataset(cfg), None
    if cfg.data.endswith(".safetensors"):
        return load_pair_cache(cfg.data, keep_ties=cfg.ties == "half"), None
    from mmalign.data.image_pairs import load_image_pairs
    from mmalign.diffusion.encoding import PairEncoder
    from mmalign.diffusion.latent_cache import cached_latents

    resolution = cfg.resolution or int(tm.unet.config.sample_size) * int(tm.pipe.vae_scale_factor)
    validated = _VALIDATED.pop(_data_key(cfg), None)
    if validated is not None:
        pairs = replace(validated, resolution=resolution, random_crop=cfg.random_crop, hflip=cfg.hflip)
    else:
        pairs = load_image_pairs(cfg.data, layout=cfg.data_layout, columns=cfg.columns or None,
                                 split=cfg.split or None, ties=cfg.ties, skip_invalid=cfg.skip_invalid,
                                 allow_outside=cfg.allow_outside_paths, resolution=resolution,
                                 random_crop=cfg.random_crop, hflip=cfg.hflip)
    encoder = PairEncoder(tm.pipe, generator=generator, vae_batch_size=cfg.vae_batch_size,
                          encode_text=not cfg.train_text_encoder)
    if cfg.latent_cache:
        return cached_latents(Path(cfg.latent_cache), pairs, encoder), None
    return pairs, encoder


def _encoded_loss(loss_fn: Any, encoder: Any) -> Any:
    """``loss_fn`` on batches encoded first (VAE latents and prompt embeddings, no gradient)."""

    def fn(model: Any, batch: dict[str, Any]) -> Any:
        encoded = encoder(batch, next(model.parameters()).device)  # captions stay text when the encoders train
        if "label" in batch:
            encoded["label"] = batch["label"]
        return loss_fn(model, encoded)

    return fn


def _save_artifacts(cfg: DiffusionTrainConfig, model: Any, pipe: Any, run_dir: Path) -> None:
    from mmalign.diffusion.artifacts import save_lora, save_pipeline, save_text_encoders, save_unet

    if cfg.trainer.lora.enabled:
        save_lora(model, run_dir / "lora", type(pipe) if pipe is not None else None)
        return
    save_unet(model, run_dir / "unet")
    save_text_encoders(model, run_dir)  # text_encoder/ (and text_encoder_2/) when they trained
    if cfg.save_pipeline:
        save_pipeline(pipe, model, run_dir / "pipeline")


def validate(cfg: DiffusionTrainConfig, resume: bool = False) -> None:
    """Checks before the CLI makes a run folder: the model folder, and every row of image-pair or cache data."""
    if cfg.model != "tiny" and Path(cfg.model).exists() and not (Path(cfg.model) / "model_index.json").is_file():
        raise ValueError(f"model {cfg.model!r} is a local path without model_index.json: give a diffusers pipeline "
                         "folder (pipe.save_pretrained) or a Hub id")
    if cfg.data.endswith(".safetensors"):
        from mmalign.diffusion.data import load_pair_cache

        load_pair_cache(cfg.data, keep_ties=cfg.ties == "half")
    elif not cfg.data.startswith("shapes:"):
        from mmalign.data.image_pairs import load_image_pairs

        # resolution does not change which rows are valid: run() reuses these rows at the model's resolution
        _VALIDATED[_data_key(cfg)] = load_image_pairs(
            cfg.data, resolution=8, layout=cfg.data_layout, columns=cfg.columns or None, split=cfg.split or None,
            ties=cfg.ties, skip_invalid=cfg.skip_invalid, allow_outside=cfg.allow_outside_paths)


_VALIDATED: dict[str, Any] = {}  # validate()'s image pairs, so that run() right after does not decode them again


def _data_key(cfg: DiffusionTrainConfig) -> str:
    import json

    fields = ("data", "data_layout", "columns", "split", "ties", "skip_invalid", "allow_outside_paths")
    return json.dumps({k: getattr(cfg, k) for k in fields}, sort_keys=True)


def _with_text_encoders(cfg: DiffusionTrainConfig, pipe: Any) -> tuple[Any, TrainerConfig, Any]:
    """The UNet with the pipeline's text encoder(s) as one trained module, the trainer settings (LoRA also on the
    text encoders' attention projections) and the per-step prompt embedder."""
    from mmalign.diffusion.text_training import TEXT_LORA_TARGETS, TextConditionedUNet, prompt_embedder

    stack = TextConditionedUNet.from_pipeline(pipe)
    trainer_cfg = cfg.trainer
    if trainer_cfg.lora.enabled:
        targets = [*trainer_cfg.lora.target_modules, *(t for t in TEXT_LORA_TARGETS
                                                       if t not in trainer_cfg.lora.target_modules)]
        trainer_cfg = replace(trainer_cfg, lora=replace(trainer_cfg.lora, target_modules=targets))
    else:
        for module in stack.text_encoders.values():
            module.train().requires_grad_(True)
    return stack, trainer_cfg, prompt_embedder(pipe)


def run(cfg: DiffusionTrainConfig, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Validate data and model, train, evaluate, write the run folder and its artifacts; return the final metrics."""
    import torch

    from mmalign.diffusion.adapter import make_loss_fn
    from mmalign.diffusion.models import load_training_model
    from mmalign.train import Trainer, seed_everything

    run_dir = Path(run_dir)
    tm = load_training_model(cfg.model, seed=cfg.trainer.seed, image_size=cfg.image_size,
                             prediction_type=cfg.prediction_type, init_weights=cfg.init_weights)
    vae_generator = torch.Generator().manual_seed(cfg.trainer.seed + 2)
    dataset, encoder = _data(cfg, tm, vae_generator)  # every row validated here, before any training
    model, trainer_cfg, embed = tm.unet, cfg.trainer, None
    if cfg.train_text_encoder:
        model, trainer_cfg, embed = _with_text_encoders(cfg, tm.pipe)
    ref_model = _reference(cfg, model)
    generator = torch.Generator().manual_seed(cfg.trainer.seed + 1)
    loss_fn = make_loss_fn(cfg.method, tm.scheduler, generator=generator, ref_model=ref_model,
                           options=loss_options_of(cfg), embed=embed)
    if encoder is not None:
        loss_fn = _encoded_loss(loss_fn, encoder)
    eval_fn = None
    if cfg.data.startswith("shapes:") and cfg.eval_samples_per_class > 0:
        eval_fn = _shapes_eval_fn(cfg, tm.scheduler, ref_model)
    if cfg.eval_prompts:
        eval_fn = _pipeline_eval_fn(cfg, tm.pipe, run_dir, tm.scheduler.config.prediction_type)
    # the global RNGs draw the image-pair flips/crops (num_workers=0): seeded, so that a fresh run repeats itself;
    # they and the generators are checkpointed, so --resume redraws the same flips, noise and VAE samples
    seed_everything(cfg.trainer.seed)
    trainer = Trainer(trainer_cfg, model, dataset, loss_fn, run_dir, eval_fn=eval_fn,
                      generators={"noise": generator, "vae": vae_generator})
    if ref_model is not None:
        ref_model.to(trainer.accelerator.device)
    metrics = trainer.train(resume=resume)
    if trainer.is_main:
        _save_artifacts(cfg, trainer.unwrapped_model(), tm.pipe, run_dir)
    return metrics
