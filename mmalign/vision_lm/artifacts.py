"""Artifacts that transformers and peft load: a PEFT adapter folder, a merged model, or a full ``save_pretrained``.

- LoRA: ``<out>/adapter`` holds ``adapter_config.json`` + ``adapter_model.safetensors`` (adapter weights only) and the
  processor; load with ``PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base), folder)``.
  The adapter config names the base model (the folder or Hub id it was loaded from).
- ``merge=True`` (LoRA): ``<out>/merged`` holds the merged model + processor for
  ``AutoModelForImageTextToText.from_pretrained``. Merging happens on the final model only.
- full fine-tuning: ``<out>/model`` = ``save_pretrained`` of the model + processor.
- ``push_to_hub``: the folder written last is uploaded to that repository id (``HfApi.upload_folder``).

Every folder is written under a temporary name and renamed into place, so a crash never leaves a half-written one
where a loader would look.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from mmalign.train.lora import is_peft_model

__all__ = ["save_artifacts"]


def _write(folder: Path, save: Any) -> Path:
    tmp = folder.with_name(f".{folder.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    save(tmp)
    old = folder.with_name(f".{folder.name}.old")
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    if old.exists():
        shutil.rmtree(old)
    return folder


def save_artifacts(model: Any, processor: Any, out_dir: Path, *, merge: bool = False,
                   push_to_hub: str = "", base_name: str | None = None,
                   state_dict: dict[str, Any] | None = None) -> dict[str, str]:
    """Write the artifacts of ``model`` into ``out_dir``; returns ``{kind: folder}`` (kinds: adapter, merged, model).

    ``base_name``: the base model's folder or Hub id recorded in the adapter config (default: what the model was
    loaded from). ``merge`` folds the LoRA weights into the model in place: call it on the final model only.
    ``state_dict``: the consolidated weights when the model's own parameters are sharded (FSDP2, ZeRO-3); merging
    needs whole parameters, so it is refused then.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}

    def with_processor(save_model: Any) -> Any:
        def save(folder: Path) -> None:
            save_model(folder)
            processor.save_pretrained(folder)
        return save

    if is_peft_model(model):
        if base_name:
            for cfg in model.peft_config.values():
                cfg.base_model_name_or_path = base_name
        written["adapter"] = str(_write(out_dir / "adapter", with_processor(
            lambda folder: model.save_pretrained(folder, state_dict=state_dict))))
        if merge and state_dict is not None:
            raise ValueError("merge=true needs whole parameters; the model was trained sharded (FSDP / ZeRO-3)")
        if merge:
            merged = model.merge_and_unload()
            written["merged"] = str(_write(out_dir / "merged", with_processor(merged.save_pretrained)))
    else:
        if merge:
            raise ValueError("merge=true needs LoRA (trainer.lora.enabled=true): a fully fine-tuned model is "
                             "already whole")
        written["model"] = str(_write(out_dir / "model", with_processor(
            lambda folder: model.save_pretrained(folder, state_dict=state_dict))))
    if push_to_hub:
        from huggingface_hub import HfApi

        last = written.get("merged") or written.get("adapter") or written["model"]
        api = HfApi()
        api.create_repo(push_to_hub, exist_ok=True)
        api.upload_folder(folder_path=last, repo_id=push_to_hub)
        written["hub"] = push_to_hub
    return written
