"""A LoRA run's checkpoints hold the adapters, not the frozen base; resuming needs the same base (fingerprint)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmalign.train.checkpoint import CheckpointError, latest_checkpoint, load_run_weights
from mmalign.train.config import TrainerConfig
from mmalign.train.lora import add_lora
from mmalign.train.trainer import Trainer

LORA = {"enabled": True, "r": 2, "alpha": 4.0, "target_modules": ["0", "2"]}


def _base(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    # 3,072 weights in the first layer: its fingerprint samples every third value (a strided view)
    return torch.nn.Sequential(torch.nn.Linear(3, 1024), torch.nn.Tanh(), torch.nn.Linear(1024, 1))


def _run(run_dir: Path, max_steps: int, resume: bool = False, base_seed: int = 0) -> Trainer:
    model = _base(base_seed)
    data = [torch.randn(3, generator=torch.Generator().manual_seed(i)) for i in range(16)]
    cfg = TrainerConfig.from_dict({"batch_size": 4, "lr": 0.05, "max_steps": max_steps, "save_every": 2,
                                   "progress": False, "plots": False, "log_every": 1, "cpu": True, "lora": LORA})
    trainer = Trainer(cfg, model, data, lambda m, b: ((m(b) - 1.0).pow(2).mean(), {}), run_dir)
    trainer.train(resume=resume)
    return trainer


def test_checkpoints_hold_the_adapters_and_resume_exactly(tmp_path: Path) -> None:
    whole = _run(tmp_path / "whole", 6)
    _run(tmp_path / "split", 4)
    saved = load_file(str(latest_checkpoint(tmp_path / "split" / "checkpoints") / "model.safetensors"))
    assert saved and all("lora_" in k for k in saved), sorted(saved)  # no base_layer weights
    resumed = _run(tmp_path / "split", 6, resume=True)
    a, b = whole.unwrapped_model().state_dict(), resumed.unwrapped_model().state_dict()
    assert any("base_layer" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the final weights file holds the adapters too, and loads back onto the same base
    final = tmp_path / "split" / "model.safetensors"
    assert load_file(str(final)).keys() == saved.keys()
    lora = {k: v for k, v in LORA.items() if k != "enabled"}
    model = load_run_weights(add_lora(_base(0), **lora), final)
    for k, v in model.state_dict().items():
        assert torch.equal(v, a[k]), k
    with pytest.raises(ValueError, match="not the base it was trained on"):
        load_run_weights(add_lora(_base(1), **lora), final)


def test_resuming_on_another_base_is_refused(tmp_path: Path) -> None:
    _run(tmp_path / "run", 2)
    with pytest.raises(CheckpointError, match="frozen base weights are not the ones it was trained on"):
        _run(tmp_path / "run", 4, resume=True, base_seed=1)


def test_a_checkpoint_holding_the_whole_model_still_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Checkpoints written with the base in them (by an earlier version) load whole, as before."""
    from mmalign.train import trainer as trainer_module

    whole = _run(tmp_path / "whole", 6)
    with monkeypatch.context() as m:
        m.setattr(trainer_module, "frozen_base", lambda model: None)
        _run(tmp_path / "split", 4)
    saved = load_file(str(latest_checkpoint(tmp_path / "split" / "checkpoints") / "model.safetensors"))
    assert any("base_layer" in k for k in saved)
    resumed = _run(tmp_path / "split", 6, resume=True)
    a, b = whole.unwrapped_model().state_dict(), resumed.unwrapped_model().state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
