"""trainer.gradient_checkpointing: the same trajectory with less activation memory, on transformers and diffusers
models, with LoRA and with the update inside backward; a model without layer checkpointing is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmalign.train.config import TrainerConfig
from mmalign.train.trainer import Trainer, enable_gradient_checkpointing


def _llama(dropout: float = 0.0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=32, attention_dropout=dropout)
    return LlamaForCausalLM(cfg)


def _lm_loss(model: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict]:
    return model(input_ids=batch, labels=batch).loss, {}


def _train(run_dir: Path, dropout: float = 0.0, **trainer: object) -> dict[str, torch.Tensor]:
    data = [torch.randint(0, 64, (12,), generator=torch.Generator().manual_seed(i)) for i in range(16)]
    cfg = TrainerConfig.from_dict({"batch_size": 4, "lr": 1e-2, "max_steps": 3, "progress": False, "plots": False,
                                   "cpu": True, **trainer})
    t = Trainer(cfg, _llama(dropout), data, _lm_loss, run_dir)
    t.train()
    return {k: v.detach().clone() for k, v in t.unwrapped_model().state_dict().items()}


@pytest.mark.parametrize("extra", [{}, {"lora": {"enabled": True, "r": 4}},
                                   {"optimizer_in_backward": True, "max_grad_norm": 0.0}],
                         ids=["full", "lora", "in-backward"])
def test_checkpointing_keeps_the_trajectory_bitwise(tmp_path: Path, extra: dict) -> None:
    plain = _train(tmp_path / "plain", **extra)
    ckpt = _train(tmp_path / "ckpt", gradient_checkpointing=True, **extra)
    assert plain.keys() == ckpt.keys()
    for k in plain:
        assert torch.equal(plain[k], ckpt[k]), k


def test_checkpointing_replays_the_dropout_masks(tmp_path: Path) -> None:
    """With dropout the recomputed forward draws the same masks (other masks move the weights by more than 1e-3 here);
    the attention kernel may round differently, so equal up to float rounding rather than bitwise."""
    plain = _train(tmp_path / "plain", dropout=0.3)
    ckpt = _train(tmp_path / "ckpt", dropout=0.3, gradient_checkpointing=True)
    other = _train(tmp_path / "other", dropout=0.3, seed=1)
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], atol=2e-5, rtol=0)
    assert max((other[k] - plain[k]).abs().max().item() for k in plain) > 1e-3  # the masks matter


def test_checkpointing_recomputes_instead_of_keeping_activations() -> None:
    """Fewer tensors are saved for backward: the layers' activations are recomputed, not kept."""
    batch = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))

    def saved_bytes(model: torch.nn.Module) -> int:
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _lm_loss(model, batch)[0].backward()
        return total

    plain = saved_bytes(_llama())
    model = _llama()
    assert enable_gradient_checkpointing(model) == ["LlamaForCausalLM"]
    assert saved_bytes(model) < 0.6 * plain


def test_diffusers_unet_inside_a_wrapper_is_found() -> None:
    from mmalign.diffusion.benchmark import BenchmarkConfig, build_model

    wrapper = torch.nn.ModuleDict({"unet": build_model(BenchmarkConfig(size=8)), "head": torch.nn.Linear(2, 2)})
    assert enable_gradient_checkpointing(wrapper) == ["UNet2DConditionModel"]
    assert wrapper["unet"].is_gradient_checkpointing


def test_a_model_without_layer_checkpointing_is_refused(tmp_path: Path) -> None:
    cfg = TrainerConfig.from_dict({"batch_size": 2, "max_steps": 1, "progress": False, "plots": False, "cpu": True,
                                   "gradient_checkpointing": True})
    with pytest.raises(ValueError, match="Sequential holds no transformers or diffusers model"):
        Trainer(cfg, torch.nn.Sequential(torch.nn.Linear(2, 1)), [torch.zeros(2)] * 4,
                lambda m, b: (m(b).sum(), {}), tmp_path)
