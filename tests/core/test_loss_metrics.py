"""The input check and the lazy metrics shared by every core loss (mmalign/core/losses/_common.py).

These tests inject NaN, +inf and -inf into each tensor argument of each loss, for every reduction, and require a
``ValueError`` that names that argument. The metrics are a :class:`LossMetrics` computed on first read; these tests
pin down when it computes, that it equals an eager computation, and that it refuses to read tensors modified in
place.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import pytest
import torch

from mmalign.core import losses as L
from mmalign.core.losses._common import LossMetrics, check_loss_inputs

D64 = torch.float64
B, T = 5, 4


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _vec(g: torch.Generator, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(B, generator=g, dtype=D64) + shift


def _mat(g: torch.Generator, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(B, T, generator=g, dtype=D64) + shift


def _labels(g: torch.Generator) -> torch.Tensor:
    return torch.rand(B, generator=g, dtype=D64)


# name -> (loss function, builder of (tensor kwargs, other kwargs))
Builder = Callable[[torch.Generator], tuple[dict[str, torch.Tensor], dict[str, Any]]]
CASES: dict[str, tuple[Callable[..., Any], Builder]] = {
    "bradley_terry": (L.bradley_terry_loss, lambda g: (
        {"reward_first": _vec(g), "reward_second": _vec(g), "labels": _labels(g)}, {})),
    "bradley_terry_hard_margin": (L.bradley_terry_loss, lambda g: (
        {"reward_first": _vec(g), "reward_second": _vec(g), "margin": _vec(g).abs()}, {})),
    "bradley_terry_centred": (L.bradley_terry_loss, lambda g: (
        {"reward_first": _vec(g), "reward_second": _vec(g), "labels": _labels(g)}, {"center_coef": 0.01})),
    "dpo": (L.dpo_loss, lambda g: (
        {"policy_chosen_logps": _vec(g, -5), "policy_rejected_logps": _vec(g, -5), "ref_chosen_logps": _vec(g, -5),
         "ref_rejected_logps": _vec(g, -5)}, {"beta": 0.1})),
    "ipo": (L.ipo_loss, lambda g: (
        {"policy_chosen_logps": _vec(g, -5), "policy_rejected_logps": _vec(g, -5), "ref_chosen_logps": _vec(g, -5),
         "ref_rejected_logps": _vec(g, -5), "chosen_lengths": torch.full((B,), 3.0, dtype=D64),
         "rejected_lengths": torch.full((B,), 4.0, dtype=D64)}, {"beta": 0.1})),
    "cdpo": (L.conservative_dpo_loss, lambda g: (
        {"policy_chosen_logps": _vec(g, -5), "policy_rejected_logps": _vec(g, -5), "ref_chosen_logps": _vec(g, -5),
         "ref_rejected_logps": _vec(g, -5)}, {"eps": 0.1})),
    "robust_dpo": (L.robust_dpo_loss, lambda g: (
        {"policy_chosen_logps": _vec(g, -5), "policy_rejected_logps": _vec(g, -5), "ref_chosen_logps": _vec(g, -5),
         "ref_rejected_logps": _vec(g, -5)}, {"eps": 0.2})),
    "cpl": (L.cpl_loss, lambda g: (
        {"logp_first": _mat(g, -1), "logp_second": _mat(g, -1), "labels": _labels(g)},
        {"bias": 0.5, "bc_coef": 0.1})),
    "cpl_discounted": (L.cpl_loss, lambda g: (
        {"logp_first": _mat(g, -1), "logp_second": _mat(g, -1)}, {"gamma": 0.9})),
    "diffusion_dpo": (L.diffusion_dpo_loss, lambda g: (
        {"model_err_chosen": _vec(g).abs(), "model_err_rejected": _vec(g).abs(), "ref_err_chosen": _vec(g).abs(),
         "ref_err_rejected": _vec(g).abs()}, {})),
    "mapo": (L.mapo_loss, lambda g: (
        {"model_err_chosen": _vec(g).abs() + 0.01, "model_err_rejected": _vec(g).abs() + 0.01}, {})),
    "visual_dpo": (L.visual_dpo_loss, lambda g: (
        {"policy_chosen_logps": _vec(g, -5), "policy_chosen_retrieved_logps": _vec(g, -5),
         "ref_chosen_logps": _vec(g, -5), "ref_chosen_retrieved_logps": _vec(g, -5)}, {})),
    "realign": (L.realign_loss, lambda g: (
        {"policy_chosen_logps": _vec(g, -5), "policy_rejected_logps": _vec(g, -5),
         "policy_chosen_retrieved_logps": _vec(g, -5), "ref_chosen_logps": _vec(g, -5),
         "ref_rejected_logps": _vec(g, -5), "ref_chosen_retrieved_logps": _vec(g, -5)}, {})),
    "rrpo": (L.rrpo_loss, lambda g: (
        {"policy_chosen_logps": _mat(g, -1), "policy_rejected_logps": _mat(g, -1), "ref_chosen_logps": _mat(g, -1),
         "ref_rejected_logps": _mat(g, -1), "chosen_token_kl": _mat(g).abs()},
        {"chosen_segment_ids": torch.tensor([[0, 1, 1, 0]] * B),
         "rejected_segment_ids": torch.tensor([[1, 0, 0, 0]] * B)})),
    "gaussian_bt": (L.gaussian_bt_loss, lambda g: (
        {"mean_first": _mat(g), "log_std_first": _mat(g, -1), "mean_second": _mat(g), "log_std_second": _mat(g, -1),
         "labels": _labels(g)}, {"noise": torch.randn(2, 2, B, T, generator=g, dtype=D64)})),
}
REDUCTIONS = ("mean", "sum", "none")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "+inf", "-inf"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_non_finite_input_is_named(case: str, bad: float, reduction: str) -> None:
    fn, build = CASES[case]
    tensors, kwargs = build(_gen())
    fn(**tensors, **kwargs, reduction=reduction)  # valid inputs pass
    for name in tensors:
        corrupted = dict(tensors)
        corrupted[name] = tensors[name].clone()
        corrupted[name].view(-1)[1] = bad
        expected = {"labels": r"\[0, 1\]", "chosen_lengths": "finite and > 0",
                    "rejected_lengths": "finite and > 0"}.get(name, "finite")
        with pytest.raises(ValueError, match=f"{name}.*{expected}"):
            fn(**corrupted, **kwargs, reduction=reduction)


@pytest.mark.parametrize("case", sorted(CASES))
def test_metrics_are_lazy_floats_equal_to_an_eager_read(case: str) -> None:
    fn, build = CASES[case]
    tensors, kwargs = build(_gen())
    leaves = {k: (v.requires_grad_(True) if v.is_floating_point() and k not in ("labels", "margin") else v)
              for k, v in tensors.items()}
    loss, metrics = fn(**leaves, **kwargs)
    assert isinstance(metrics, LossMetrics)
    assert metrics._values is None  # nothing computed yet
    loss.backward()
    values = dict(metrics)
    assert values and all(type(v) is float for v in values.values())
    assert metrics._tensors == ()  # the per-pair tensors are released once read
    # the same call read at once gives the same numbers (reading after backward changes nothing)
    _, again = fn(**{k: v.detach() for k, v in leaves.items()}, **kwargs)
    assert again.to_dict() == pytest.approx(values, nan_ok=True)
    assert {**metrics} == values and metrics == values and len(metrics) == len(values)
    json.dumps(metrics.to_dict())


def test_metrics_refuse_tensors_modified_in_place() -> None:
    r1 = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0], dtype=D64))
    r2 = torch.tensor([0.0, 2.5, 1.0], dtype=D64)
    loss, metrics = L.bradley_terry_loss(r1, r2)
    loss.backward()
    torch.optim.SGD([r1], lr=1.0).step()  # in place on an input the metrics depend on
    with pytest.raises(RuntimeError, match="modified in place"):
        metrics["rewards/chosen"]
    # read before the step: the values of the call, cached thereafter
    loss, metrics = L.bradley_terry_loss(r1, r2)
    chosen = metrics["rewards/chosen"]
    with torch.no_grad():
        r1.add_(10.0)
    assert metrics["rewards/chosen"] == chosen == pytest.approx(float(r1.detach().mean()) - 10.0)


def test_compute_runs_once_and_only_on_read() -> None:
    calls = []

    def compute(x: torch.Tensor, missing: None) -> dict[str, float]:
        calls.append(1)
        assert not x.requires_grad and missing is None and not torch.is_grad_enabled()
        return {"m": float(x.sum())}

    x = torch.ones(3, requires_grad=True) * 2.0
    metrics = LossMetrics(compute, x, None)
    assert calls == []
    assert metrics["m"] == 6.0 and list(metrics) == ["m"] and "m" in metrics
    assert calls == [1]
    assert "LossMetrics({'m': 6.0})" == repr(metrics)


def test_check_loss_inputs_labels_lengths_and_edges() -> None:
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 1.0])
    check_loss_inputs({"a": a, "b": b}, labels=torch.tensor([0.0, 1.0]))
    check_loss_inputs({"a": a}, labels=torch.tensor([0.0, 1.0], dtype=torch.bfloat16))
    check_loss_inputs({"a": a}, labels=torch.tensor([0.2, 1.0], requires_grad=True))  # learnable soft labels
    for bad in (torch.tensor([0.0, 1.5]), torch.tensor([-1e-30, 0.5]), torch.tensor([0.2, float("nan")])):
        with pytest.raises(ValueError, match=r"labels.*\[0, 1\]"):
            check_loss_inputs({"a": a, "b": b}, labels=bad)
    tiny = torch.finfo(torch.float32).tiny
    for good in (torch.tensor([tiny / 4, 3e38]), torch.tensor([1, 2**40])):  # denormal or integer counts: > 0
        check_loss_inputs({"a": a, "n": good}, positive={"n": good})
    for bad in (torch.tensor([1, 0]), torch.tensor([1.0, -0.0]), torch.tensor([1.0, float("nan")]),
                torch.tensor([1.0, float("inf")])):
        with pytest.raises(ValueError, match="rejected_lengths must be finite and > 0"):
            check_loss_inputs({"a": a, "rejected_lengths": bad}, positive={"rejected_lengths": bad})
    with pytest.raises(ValueError, match="b must be finite"):
        check_loss_inputs({"a": a, "b": torch.tensor([1.0, float("-inf")])})
    with pytest.raises(ValueError, match=r"b must be the same shape as a"):
        check_loss_inputs({"a": a, "b": torch.zeros(3)})
    with pytest.raises(ValueError, match="a must be a 1-D tensor"):
        check_loss_inputs({"a": torch.zeros(2, 2)})
    check_loss_inputs({"a": torch.zeros(2, 2)}, ndim=None)
