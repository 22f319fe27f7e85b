"""``mmalign diffusion sample``: images from a pipeline plus an optional trained artifact, one PNG each and a grid.

The pipeline is a local folder or a Hub id; ``weights`` is a run's ``lora/`` folder (loaded with
``pipe.load_lora_weights``, as a user would in diffusers), its ``unet/`` folder, or a pipeline folder's UNet. Every
prompt is drawn once per seed (``torch.Generator().manual_seed(seed)``); ``compare=true`` also draws the base
pipeline with the same seeds and puts its row beside the tuned one in the grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmalign.config import Config, check_choice, check_nonnegative, check_positive, option

__all__ = ["SampleConfig", "read_prompts", "load_weights_into", "validate", "run"]


@dataclass
class SampleConfig(Config):
    """Sample images from a diffusers pipeline, optionally with a trained LoRA or UNet artifact."""

    model: str = option("", "diffusers pipeline: a local folder or a Hub id (the base model of the run)")
    weights: str = option("", "trained artifact: a run's lora/ folder, its unet/ folder, or a pipeline folder; "
                              "empty: the base model")
    prompts: list[str] = option([], "prompts to draw")
    prompts_file: str = option("", "a text file with one prompt per line (added after prompts)")
    seeds: list[int] = option([0], "one image per prompt and seed")
    steps: int = option(30, "denoising steps")
    guidance_scale: float = option(7.5, "classifier-free guidance scale (1: none)")
    height: int = option(0, "image height in pixels (0: the pipeline's default)")
    width: int = option(0, "image width in pixels (0: the pipeline's default)")
    prediction_type: str = option("", "the trained model's prediction type when the run overrode the pipeline's "
                                      "(epsilon or v_prediction); empty: the pipeline's scheduler as saved")
    compare: bool = option(False, "also draw the base model with the same seeds (grid rows: base, tuned)")

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ValueError("seeds must list at least one seed")
        check_positive("steps", self.steps)
        check_positive("guidance_scale", self.guidance_scale)
        check_choice("prediction_type", self.prediction_type, ["", "epsilon", "v_prediction"])
        check_nonnegative("height", self.height)
        check_nonnegative("width", self.width)
        if self.compare and not self.weights:
            raise ValueError("compare=true compares the base model with trained weights: give weights")


def read_prompts(cfg: SampleConfig) -> list[str]:
    prompts = list(cfg.prompts)
    if cfg.prompts_file:
        lines = Path(cfg.prompts_file).read_text(encoding="utf-8").splitlines()
        prompts += [line.strip() for line in lines if line.strip()]
    if not prompts or any(not p.strip() for p in prompts):
        raise ValueError(f"prompts must be non-empty strings, got {prompts!r}")
    return prompts


def load_weights_into(pipe: Any, weights: str) -> Any:
    """``pipe`` with a trained artifact: LoRA via ``load_lora_weights``, a UNet folder via ``from_pretrained``."""
    from diffusers import UNet2DConditionModel

    from mmalign.diffusion.artifacts import LORA_FILE

    path = Path(weights)
    if (path / LORA_FILE).is_file() or path.suffix == ".safetensors":
        pipe.load_lora_weights(str(path))
        return pipe
    sub = "unet" if (path / "unet").is_dir() else None
    if not (path / (sub or "") / "config.json").is_file():
        raise ValueError(f"weights {weights!r} is neither a LoRA folder ({LORA_FILE}) nor a diffusers UNet or "
                         "pipeline folder")
    pipe.unet = UNet2DConditionModel.from_pretrained(path, subfolder=sub).to(pipe.device, pipe.unet.dtype)
    return pipe


def validate(cfg: SampleConfig, resume: bool = False) -> None:
    """Prompts readable before a run folder is made; resuming is meaningless (sampling is one pass)."""
    if resume:
        raise ValueError("diffusion sample has nothing to resume: run it again with a new output folder")
    # required inputs are checked here, not in __post_init__, so the config builds from its defaults (--help, docs)
    if not cfg.model:
        raise ValueError("model must name a diffusers pipeline (a local folder or a Hub id)")
    if cfg.weights and not Path(cfg.weights).exists():
        raise ValueError(f"weights {cfg.weights!r} does not exist (a run's lora/ or unet/ folder)")
    if cfg.prompts_file and not Path(cfg.prompts_file).is_file():
        raise ValueError(f"prompts_file {cfg.prompts_file!r} is not a file")
    if not cfg.prompts and not cfg.prompts_file:
        raise ValueError("give prompts (prompts=[...]) or a prompts_file with one prompt per line")
    read_prompts(cfg)


def _draw(pipe: Any, prompts: list[str], cfg: SampleConfig) -> Any:
    import torch

    from mmalign.diffusion.pipeline import generate

    size = {k: v for k, v in (("height", cfg.height), ("width", cfg.width)) if v}
    out = []
    for prompt in prompts:
        for seed in cfg.seeds:
            out.append(generate(pipe, [prompt], num_inference_steps=cfg.steps, guidance_scale=cfg.guidance_scale,
                                generator=torch.Generator().manual_seed(seed), **size))
    return torch.cat(out)


def run(cfg: SampleConfig, run_dir: Path) -> dict[str, Any]:
    """Write ``images/<tag>_p<prompt>_s<seed>.png`` and ``grid.png`` (one row per prompt, per model) into run_dir."""
    import torch

    from mmalign.diffusion.models import load_pipeline
    from mmalign.diffusion.pipeline import image_grid, save_images

    run_dir = Path(run_dir)
    prompts = read_prompts(cfg)
    pipe = load_pipeline(cfg.model)
    if cfg.prediction_type:  # the base model draws with its own prediction type in compare mode
        base_scheduler = pipe.scheduler
        tuned_scheduler = type(base_scheduler).from_config(base_scheduler.config, prediction_type=cfg.prediction_type)
    pipe.to("cuda" if torch.cuda.is_available() else "cpu")
    names = [f"p{i}_s{seed}" for i in range(len(prompts)) for seed in cfg.seeds]
    rows: list[Any] = []
    if cfg.compare:
        base = _draw(pipe, prompts, cfg)
        save_images(base, run_dir / "images", [f"base_{n}" for n in names])
        rows.append(base)
    tag = "tuned" if cfg.weights else "base"
    if cfg.weights:
        load_weights_into(pipe, cfg.weights)
    if cfg.prediction_type:
        pipe.scheduler = tuned_scheduler
    images = _draw(pipe, prompts, cfg)
    save_images(images, run_dir / "images", [f"{tag}_{n}" for n in names])
    rows.append(images)
    # grid: per prompt, the base row (with compare) above the tuned row; one column per seed
    per = len(cfg.seeds)
    ordered = torch.cat([r[i * per:(i + 1) * per] for i in range(len(prompts)) for r in rows])
    save_images(image_grid(ordered, rows=len(prompts) * len(rows))[None], run_dir, ["grid"])
    (run_dir / "prompts.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    return {"images": float(sum(r.shape[0] for r in rows)), "prompts": float(len(prompts)),
            "seeds": float(per)}
