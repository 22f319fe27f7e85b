"""Load a user's VLM: a local folder or a Hub id, ``AutoModelForImageTextToText`` + ``AutoProcessor``.

``local_files_only`` follows ``HF_HUB_OFFLINE`` (and is always on for a local folder); ``trust_remote_code`` stays
off unless the caller asks for it; ``dtype="auto"`` is bfloat16 on a CUDA GPU with bf16 support, float32 elsewhere.
A path that looks local but does not exist, or a folder without ``config.json``, fails before anything is built.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["check_model_source", "hub_offline", "load_vlm", "load_for_inference", "load_processor", "model_skeleton",
           "resolve_dtype"]


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` asks for cached files only."""
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() not in ("", "0", "false", "no")


def check_model_source(name_or_path: str, what: str = "model_path") -> bool:
    """Validate a model source before any work; True for a local folder, False for a Hub id.

    Raises ``FileNotFoundError`` naming ``what`` for a local-looking path that is missing or is not a model folder.
    """
    from mmalign.data import is_hub_id

    if not name_or_path:
        raise ValueError(f"{what} is empty")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{what}={name_or_path!r} is a folder without config.json: not a saved model "
                                    "(save one with save_pretrained, or pass a Hub id)")
        return True
    if path.exists() or not is_hub_id(name_or_path) or name_or_path.count("/") > 1:
        raise FileNotFoundError(f"{what}={name_or_path!r}: no such model folder (a Hub id looks like owner/name)")
    return False


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be one of auto/float32/bfloat16/float16, got {dtype!r}")
    if dtype == "auto":
        use_bf16 = device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if use_bf16 else torch.float32
    return getattr(torch, dtype)


def load_processor(name_or_path: str, *, trust_remote_code: bool = False, revision: str | None = None) -> Any:
    """The model's ``AutoProcessor`` (cheap: loaded before the model so data can be validated first)."""
    from transformers import AutoProcessor

    local = check_model_source(name_or_path)
    return AutoProcessor.from_pretrained(name_or_path, local_files_only=local or hub_offline(),
                                         trust_remote_code=trust_remote_code, revision=revision)


def model_skeleton(name_or_path: str, *, trust_remote_code: bool = False, revision: str | None = None) -> Any:
    """The model built from its config on the meta device: its config and forward signature, no weights (instant).

    Enough to encode data exactly as training will (image token ids, processor) before the weights are loaded."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    local = check_model_source(name_or_path)
    config = AutoConfig.from_pretrained(name_or_path, local_files_only=local or hub_offline(),
                                        trust_remote_code=trust_remote_code, revision=revision)
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config, trust_remote_code=trust_remote_code)


def load_vlm(name_or_path: str, *, dtype: str = "auto", device: str | None = None, lora: dict | None = None,
             local_files_only: bool | None = None, trust_remote_code: bool = False,
             revision: str | None = None) -> tuple[Any, Any]:
    """``(model, processor)`` from a local folder or a Hub id through ``AutoModelForImageTextToText``.

    ``lora`` holds :func:`mmalign.train.lora.add_lora` keyword arguments. ``local_files_only`` None: True for a
    local folder or under ``HF_HUB_OFFLINE``, else the Hub is asked.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    local = check_model_source(name_or_path)
    if local_files_only is None:
        local_files_only = local or hub_offline()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForImageTextToText.from_pretrained(
        name_or_path, dtype=resolve_dtype(dtype, device), local_files_only=local_files_only,
        trust_remote_code=trust_remote_code, revision=revision,
    ).to(device)
    processor = AutoProcessor.from_pretrained(name_or_path, local_files_only=local_files_only,
                                              trust_remote_code=trust_remote_code, revision=revision)
    if lora:
        from mmalign.train.lora import add_lora

        model = add_lora(model, **lora)
    return model, processor


def load_for_inference(name_or_path: str, *, base_model: str = "", dtype: str = "auto", device: str | None = None,
                       trust_remote_code: bool = False) -> tuple[Any, Any]:
    """``(model, processor)`` of a full model folder / Hub id, or of a PEFT adapter folder on its base model.

    An adapter folder (``adapter_config.json``) loads onto ``base_model``, by default the base its config names;
    its processor comes from the adapter folder when saved there (``vlm train`` does), else from the base.
    """
    path = Path(name_or_path).expanduser()
    if not (path / "adapter_config.json").is_file():
        return load_vlm(name_or_path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    import json

    from peft import PeftModel

    base = base_model or json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path") or ""
    if not base:
        raise ValueError(f"{path}/adapter_config.json names no base model: pass base_model=<folder or Hub id>")
    check_model_source(base, "base_model")
    model, processor = load_vlm(base, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    model = PeftModel.from_pretrained(model, str(path)).eval()
    if (path / "processor_config.json").is_file() or (path / "preprocessor_config.json").is_file():
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(str(path), local_files_only=True,
                                                  trust_remote_code=trust_remote_code)
    return model, processor
