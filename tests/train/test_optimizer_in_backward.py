"""trainer.optimizer_in_backward: the same trajectory as a plain step, without the model's gradients ever coexisting."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmalign.train.config import TrainerConfig
from mmalign.train.trainer import Trainer

COMMON = {"batch_size": 4, "lr": 0.05, "max_grad_norm": 0.0, "progress": False, "plots": False, "log_every": 1,
          "cpu": True, "weight_decay": 0.01, "lr_schedule": "cosine", "warmup_steps": 2, "max_steps": 6}


def _data() -> list[torch.Tensor]:
    return [torch.randn(3, generator=torch.Generator().manual_seed(i)) for i in range(24)]


def _run(run_dir: Path, resume: bool = False, watch: list[int] | None = None, **overrides) -> Trainer:
    """A small MLP (shared weight used twice, as tied embeddings are) trained on a quadratic loss.

    ``watch`` receives, at every module's backward hook, how many parameters hold a gradient at that moment."""
    torch.manual_seed(0)
    first = torch.nn.Linear(3, 8)
    shared = torch.nn.Linear(8, 8)
    model = torch.nn.ModuleDict({"first": first, "shared": shared, "head": torch.nn.Linear(8, 1)})
    params = list(model.parameters())
    if watch is not None:
        for m in (shared, model["head"]):  # modules whose inputs require grad (their hooks fire at input grads)
            m.register_full_backward_hook(lambda *_: watch.append(sum(p.grad is not None for p in params)))

    def loss_fn(m: torch.nn.Module, b: torch.Tensor) -> tuple[torch.Tensor, dict]:
        h = torch.tanh(m["shared"](torch.tanh(m["shared"](torch.tanh(m["first"](b))))))
        return (m["head"](h) ** 2).mean(), {}

    cfg = TrainerConfig.from_dict({**COMMON, **overrides})
    trainer = Trainer(cfg, model, _data(), loss_fn, run_dir)
    trainer.train(resume=resume)
    return trainer


def _state(t: Trainer) -> tuple[dict, dict]:
    return t.unwrapped_model().state_dict(), t.optimizer.state_dict()["state"]


def test_updates_inside_backward_follow_the_plain_trajectory(tmp_path: Path) -> None:
    plain = _run(tmp_path / "plain")
    inside = _run(tmp_path / "inside", optimizer_in_backward=True)
    (wa, sa), (wb, sb) = _state(plain), _state(inside)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=0, rtol=0, msg=f"weight {k}")
    assert sa.keys() == sb.keys()
    for i in sa:  # AdamW's moments and step count per parameter, in the usual state-dict layout
        for k in sa[i]:
            torch.testing.assert_close(sa[i][k], sb[i][k], atol=0, rtol=0, msg=f"state {i}/{k}")
    assert plain.scheduler.get_last_lr() == inside.scheduler.get_last_lr()


def test_gradients_of_the_whole_model_never_coexist(tmp_path: Path) -> None:
    seen_plain: list[int] = []
    seen_inside: list[int] = []
    _run(tmp_path / "plain", watch=seen_plain, max_steps=2)
    _run(tmp_path / "inside", watch=seen_inside, max_steps=2, optimizer_in_backward=True)
    assert max(seen_plain) >= 4  # the watch does see accumulated gradients when they are kept
    assert seen_inside and max(seen_inside) == 0  # each gradient freed by its update before the next module's backward


def test_a_run_resumes_with_or_without_the_option(tmp_path: Path) -> None:
    """Checkpoints keep the usual optimizer layout and the option is not part of the settings a resume must keep."""
    whole = _run(tmp_path / "whole", lr_schedule="constant")
    _run(tmp_path / "split", lr_schedule="constant", max_steps=3, optimizer_in_backward=True)
    resumed = _run(tmp_path / "split", lr_schedule="constant", resume=True)
    (wa, _), (wb, _) = _state(whole), _state(resumed)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=0, rtol=0, msg=f"weight {k}")


@pytest.mark.parametrize("field,value,fix", [
    ("grad_accum_steps", 2, "set grad_accum_steps 1"),
    ("max_grad_norm", 1.0, "set max_grad_norm 0"),
    ("mixed_precision", "fp16", "use 'bf16'"),
    ("distributed", "fsdp", "use 'ddp'"),
])
def test_settings_it_cannot_honour_are_refused(field: str, value, fix: str) -> None:
    with pytest.raises(ValueError, match=f"optimizer_in_backward.*{field}.*{fix}"):
        TrainerConfig.from_dict({**COMMON, "optimizer_in_backward": True, field: value})
