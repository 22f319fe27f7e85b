"""Validation helpers and the loss registry."""

from __future__ import annotations

import pytest
import torch

from mmalign.core import validation as V
from mmalign.core.losses import LOSS_FUNCTIONS
from mmalign.registry import LOSSES


def test_scalar_checks_name_value_and_expectation() -> None:
    with pytest.raises(ValueError, match=r"^beta must be a finite number > 0, got -1$"):
        V.check_beta(-1)
    with pytest.raises(ValueError, match=r"^eps must be in \[0.0, 0.5\), got 0.5$"):
        V.check_eps(0.5)
    with pytest.raises(ValueError, match="flag must be a finite number >= 0, got True"):
        V.check_nonnegative("flag", True)
    with pytest.raises(ValueError, match="reduction must be one of"):
        V.check_reduction("avg")
    V.check_eps(0.0)
    V.check_beta(1e-3)


def test_tensor_checks() -> None:
    a = torch.zeros(3)
    with pytest.raises(ValueError, match=r"b must be the same shape as a \(3,\), got tensor of shape \(4,\)"):
        V.check_same_shape({"a": a, "b": torch.zeros(4)})
    with pytest.raises(ValueError, match="x must be a torch.Tensor, got \\[1, 2\\]"):
        V.check_tensor("x", [1, 2])
    with pytest.raises(ValueError, match="x must be a floating-point tensor"):
        V.check_tensor("x", torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="y must be finite everywhere"):
        V.check_all_finite({"x": a, "y": torch.tensor([1.0, float("nan")])})
    with pytest.raises(ValueError, match="y must be finite everywhere"):
        V.check_finite("y", torch.tensor([float("-inf")]))
    # Large but finite values must not trip the fused check (float64 accumulation).
    V.check_all_finite({"big": torch.full((10,), 3e38, dtype=torch.float32)})
    with pytest.raises(ValueError, match="m must be a boolean tensor or one holding only 0 and 1"):
        V.check_mask("m", torch.tensor([0.0, 2.0]), (2,))
    V.check_mask("m", torch.tensor([0.0, 1.0]), (2,))
    with pytest.raises(ValueError, match=r"labels must be P\(first preferred\)"):
        V.check_labels("labels", torch.tensor([0.5, float("nan")]))
    V.check_labels("labels", torch.tensor([0.0, 0.5, 1.0]))


def test_reduce_loss_with_weight() -> None:
    loss = torch.tensor([1.0, 2.0, 3.0])
    w = torch.tensor([1.0, 0.0, 1.0])
    assert V.reduce_loss(loss, "mean", w).item() == 2.0
    assert V.reduce_loss(loss, "sum", w).item() == 4.0
    assert V.reduce_loss(loss, "none", w).tolist() == [1.0, 0.0, 3.0]
    assert V.reduce_loss(loss, "mean", torch.zeros(3)).item() == 0.0


def test_all_losses_registered() -> None:
    expected = {"bradley_terry", "dpo", "ipo", "cdpo", "robust_dpo", "cpl", "diffusion_dpo", "mapo", "rrpo",
                "realign", "gaussian_bt"}
    assert expected <= set(LOSSES.names())
    for name, fn in LOSS_FUNCTIONS.items():
        assert LOSSES.get(name) is fn
        assert fn.__doc__ and "Limit case" in fn.__doc__, name
