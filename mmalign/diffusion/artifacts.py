"""Run artifacts diffusers loads: LoRA in diffusers' format, full UNets, whole pipelines; and loading them back.

A LoRA run writes ``run_dir/lora/pytorch_lora_weights.safetensors`` through the pipeline class's own
``save_lora_weights`` (with the adapter's rank and alpha as metadata), so ``pipe.load_lora_weights(run_dir/"lora")``
reproduces the trained model. A full fine-tuning run writes ``run_dir/unet`` (``unet.save_pretrained``) and, when
asked, ``run_dir/pipeline`` (the base pipeline with the trained UNet, ``DiffusionPipeline.from_pretrained`` loads it).
Every artifact can also start a new run (``init_weights``): a LoRA artifact is fused into the UNet's weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmalign.diffusion.pipeline import plain_unet

__all__ = ["LORA_FILE", "lora_state_dict", "save_lora", "save_unet", "save_text_encoders", "save_pipeline",
           "is_lora_artifact", "load_unet_weights", "plain_unet"]

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default LoRA weight name


def lora_state_dict(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The LoRA adapters of a peft-wrapped UNet in diffusers' key format, and the adapter config (rank, alpha...)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import get_peft_model_state_dict

    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    if not hasattr(model, "peft_config"):
        raise ValueError("model has no LoRA adapters (not a peft model): save it with save_unet")
    state = get_peft_model_state_dict(model)
    state = {k.removeprefix("base_model.model."): v.detach().float().cpu().contiguous() for k, v in state.items()}
    config = model.peft_config["default"].to_dict()
    return convert_state_dict_to_diffusers(state), config


def _lora_writer(pipeline_class: Any | None) -> Any:
    if pipeline_class is not None and hasattr(pipeline_class, "save_lora_weights"):
        return pipeline_class
    from diffusers import StableDiffusionPipeline  # a bare UNet (no pipeline): SD's UNet LoRA layout

    return StableDiffusionPipeline


_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def save_lora(model: torch.nn.Module, folder: str | Path, pipeline_class: Any | None = None) -> Path:
    """Write the adapters as ``folder/pytorch_lora_weights.safetensors`` that ``pipe.load_lora_weights`` reads
    (a UNet trained with its text encoders also writes their adapters, under diffusers' component prefixes)."""
    state, config = lora_state_dict(model)
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        comp = key.split(".", 1)[0]
        if comp in _COMPONENTS:  # a UNet trained with its text encoders: keys start with the component name
            parts.setdefault(comp, {})[key.split(".", 1)[1]] = value
        else:
            parts.setdefault("unet", {})[key] = value
    kwargs: dict[str, Any] = {}
    for comp, layers in parts.items():
        kwargs[f"{comp}_lora_layers"] = layers
        kwargs[f"{comp}_lora_adapter_metadata"] = config
    folder = Path(folder)
    _lora_writer(pipeline_class).save_lora_weights(folder, weight_name=LORA_FILE, **kwargs)
    return folder / LORA_FILE


def model_stack_or_none(model: torch.nn.Module) -> Any:
    """The UNet-with-text-encoders module inside ``model``, or None for a plain UNet."""
    from mmalign.diffusion.text_training import find_stack

    try:
        return find_stack(model)
    except ValueError:
        return None


def save_text_encoders(model: torch.nn.Module, run_dir: str | Path) -> list[Path]:
    """``text_encoder/`` (and ``text_encoder_2/``) of a UNet trained with its text encoders, via save_pretrained."""
    stack = model_stack_or_none(model)
    if stack is None:
        return []
    out = []
    for name, module in stack.text_encoders.items():
        module.save_pretrained(Path(run_dir) / name)
        out.append(Path(run_dir) / name)
    return out


def save_unet(model: torch.nn.Module, folder: str | Path) -> Path:
    """``unet.save_pretrained(folder)`` of the trained (full-weight) UNet; ``UNet2DConditionModel.from_pretrained``
    reads it back."""
    unet = plain_unet(model)
    if hasattr(unet, "peft_config"):
        raise ValueError("model holds LoRA adapters: save them with save_lora (or merge them first)")
    unet.save_pretrained(Path(folder))
    return Path(folder)


def save_pipeline(pipe: Any, model: torch.nn.Module, folder: str | Path) -> Path:
    """The base pipeline with the trained UNet as one folder ``DiffusionPipeline.from_pretrained`` loads."""
    from mmalign.diffusion.pipeline import with_unet

    with_unet(pipe, plain_unet(model)).save_pretrained(Path(folder))
    return Path(folder)


def is_lora_artifact(path: str | Path) -> bool:
    """Whether ``path`` is a LoRA artifact: a folder with ``pytorch_lora_weights.safetensors``, or such a file
    (or any safetensors file whose keys are LoRA adapters)."""
    p = Path(path)
    if p.is_dir():
        return (p / LORA_FILE).is_file()
    if p.is_file() and p.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="pt") as f:
                return any(".lora" in k or "lora_" in k for k in f.keys())
        except Exception as err:  # safetensors raises several error types for truncated/corrupt files
            raise ValueError(f"{str(p)!r} is corrupt or truncated ({type(err).__name__}: {err})") from None
    return False


def _fuse_lora(unet: torch.nn.Module, path: Path, name: str) -> None:
    from diffusers import StableDiffusionPipeline

    folder, weight = (path, LORA_FILE) if path.is_dir() else (path.parent, path.name)
    if path.is_file() and any(k.startswith("base_model.model.") for k in _keys(path)):
        raise ValueError(f"{name} {str(path)!r} is a LoRA run's model.safetensors (its adapters under peft's names); "
                         f"give the run's lora/ folder (diffusers format) instead")
    state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(folder, weight_name=weight,
                                                                      return_lora_metadata=True)
    if any(k.startswith("text_encoder") for k in state):
        raise ValueError(f"{name} {str(path)!r} also holds text-encoder adapters, which a run cannot start from; "
                         "load it with pipe.load_lora_weights, save that pipeline and give it as model")
    state = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    if metadata:  # the adapter config (rank, alpha) is saved per component, under the same prefix
        metadata = {k.removeprefix("unet."): v for k, v in metadata.items() if k.startswith("unet.")} or None
    if not state:
        raise ValueError(f"{name} {str(path)!r} holds no UNet LoRA weights")
    try:
        unet.load_lora_adapter(state, prefix=None, network_alphas=alphas, adapter_name="init",
                               metadata=metadata)
    except (ValueError, RuntimeError, KeyError) as err:
        raise ValueError(f"{name} {str(path)!r} does not fit the model's UNet: {str(err)[:400]}") from err
    unet.fuse_lora(adapter_names=["init"])
    unet.unload_lora()


def _keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def load_unet_weights(unet: torch.nn.Module, path: str | Path, name: str = "weights") -> torch.nn.Module:
    """Load weights into ``unet`` in place: a full UNet safetensors state dict, a diffusers pipeline or UNet
    folder (a run's ``unet/`` or ``pipeline/``), or a LoRA artifact (a run's ``lora/`` folder), which is fused.

    Missing, unexpected or mis-shaped tensors (another architecture) raise ``ValueError`` naming ``name`` and the path.
    """
    from mmalign.fileio import read_safetensors

    p = Path(path)
    if is_lora_artifact(p):
        _fuse_lora(unet, p, name)
        return unet
    if p.is_dir():
        from diffusers import UNet2DConditionModel

        if not ((p / "unet").is_dir() or (p / "config.json").is_file()):
            raise ValueError(f"{name} {str(p)!r} is neither a diffusers pipeline/UNet folder nor a LoRA folder "
                             f"(with {LORA_FILE})")
        try:  # safetensors only: a folder of pickled .bin weights is refused, never unpickled
            state = UNet2DConditionModel.from_pretrained(p, subfolder="unet" if (p / "unet").is_dir() else None,
                                                         use_safetensors=True).state_dict()
        except (OSError, EnvironmentError) as err:
            raise ValueError(f"{name} {str(p)!r}: cannot read the UNet folder's safetensors weights: "
                             f"{str(err)[:300]}") from None
    elif p.is_file() and p.suffix == ".safetensors":
        state = read_safetensors(p, name)
    else:
        raise ValueError(f"{name} must be a .safetensors file or a diffusers folder, got {str(path)!r}")
    try:
        unet.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{name} {str(path)!r} does not fit the model's UNet: {str(err)[:500]}") from err
    return unet
