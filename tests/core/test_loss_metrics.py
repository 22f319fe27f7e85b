"""The cheap validation and the lazy metrics shared by every core loss (mmalign/core/losses/_common.py).

Every loss validates its inputs with one reduction of an intermediate that involves every input; these tests inject
NaN, +inf and -inf into each tensor argument of each loss, for every reduction, and require a ``ValueError`` that
names that argument. The metrics are a :class:`LossMetrics` computed on first read; these tests pin down when it
computes, that it equals an eager computation, and that it refuses to read tensors modified in place.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import pytest
import torch

from mmalign.core import losses as L
from mmalign.core.losses._common import LossMetrics, _check_inputs_one_read, check_inputs_finite, read_scalars

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


def _stacked_read(witness: torch.Tensor, inputs: dict[str, torch.Tensor], labels: torch.Tensor | None = None, *,
                  label_name: str = "labels", positive: dict[str, torch.Tensor] | None = None) -> None:
    _check_inputs_one_read(witness, inputs, labels, label_name, positive)


@pytest.mark.parametrize("check", [check_inputs_finite, _stacked_read], ids=["per-scalar", "one-read"])
def test_check_inputs_finite_labels_lengths_and_zero_dim_witness(check: Callable[..., None]) -> None:
    # "one-read" is the CUDA path (every scalar stacked, one synchronisation), exercised here on CPU tensors
    check_inputs_finite = check
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 1.0])
    check_inputs_finite(a - b, {"a": a, "b": b}, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"labels.*\[0, 1\]"):
        check_inputs_finite(a - b, {"a": a, "b": b}, torch.tensor([0.0, 1.5]))
    with pytest.raises(ValueError, match="soft_targets"):
        check_inputs_finite(a - b, {"a": a, "b": b}, torch.tensor([-0.1, 0.5]), label_name="soft_targets")
    with pytest.raises(ValueError, match="rejected_lengths must be finite and > 0.*min 0"):
        check_inputs_finite(a - b, {"a": a, "b": b}, positive={"chosen_lengths": torch.tensor([1, 2]),
                                                              "rejected_lengths": torch.tensor([3, 0])})
    # a 0-d witness is used as is: an overflowed (but finite-input) value is tolerated, a NaN input is named
    huge = torch.tensor([3e38, 3e38])
    check_inputs_finite(huge.sum(), {"huge": huge})
    with pytest.raises(ValueError, match="b must be finite"):
        bad = torch.tensor([1.0, float("nan")])
        check_inputs_finite((a - bad).sum(), {"a": a, "b": bad})
    assert read_scalars([torch.tensor(1.5), torch.tensor(2, dtype=torch.int64)]) == [1.5, 2.0]
    check(torch.tensor([1.0, 2.0]), {}, positive={"n": torch.tensor([1.0, 3.0])})
    with pytest.raises(ValueError, match="n must be finite and > 0.*max inf"):
        check(torch.tensor([1.0, 2.0]), {}, positive={"n": torch.tensor([1.0, float("inf")])})


@pytest.mark.parametrize("check", [check_inputs_finite, _stacked_read], ids=["per-scalar", "one-read"])
def test_check_inputs_finite_edge_values(check: Callable[..., None]) -> None:
    """The clamp-and-compare range checks: exact edges pass, anything outside (or NaN) is named, dtypes kept."""
    w = torch.zeros(3)
    tiny = torch.finfo(torch.float32).tiny
    check(w, {}, torch.tensor([0.0, 0.5, 1.0]))
    check(w, {}, torch.tensor([0.0, 1.0, 0.5], dtype=torch.bfloat16))
    check(w, {}, torch.tensor([0.2, 0.3, 1.0], requires_grad=True))  # learnable soft labels
    check(w, {}, positive={"n": torch.tensor([tiny / 4, 1.0, 3e38])})  # a denormal count is > 0: allowed
    check(w, {}, positive={"n": torch.tensor([1, 7, 2**40])})  # integer token counts
    for bad, match in ((torch.tensor([0.2, float("nan"), 1.0]), "labels"),
                       (torch.tensor([0.2, 1.0 + 1e-6, 1.0], requires_grad=True), "labels"),
                       (torch.tensor([0.0, -0.0, -1e-30]), "labels")):
        with pytest.raises(ValueError, match=match):
            check(w, {}, bad)
    for bad in (torch.tensor([1.0, -0.0, 2.0]), torch.tensor([1.0, -3.0, 2.0]), torch.tensor([1.0, float("nan")]),
                torch.tensor([0, 4]), torch.tensor([-1, 4])):
        with pytest.raises(ValueError, match="n must be finite and > 0"):
            check(torch.zeros(bad.shape), {}, positive={"n": bad})


def test_ipo_uses_its_reduced_loss_as_witness_and_names_inputs() -> None:
    from mmalign.core.losses import ipo_loss

    x = [torch.randn(4, dtype=D64) for _ in range(4)]
    n = torch.full((4,), 3.0, dtype=D64)
    for value in (float("inf"), -float("inf"), float("nan")):
        bad = x[3].clone()
        bad[1] = value
        with pytest.raises(ValueError, match="ref_rejected_logps must be finite"):
            ipo_loss(x[0], x[1], x[2], bad, chosen_lengths=n, rejected_lengths=n)
        with pytest.raises(ValueError, match="ref_rejected_logps must be finite"):
            ipo_loss(x[0], x[1], x[2], bad, chosen_lengths=n, rejected_lengths=n, reduction="none")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_read_scalars_on_cuda_reads_once() -> None:
    values = read_scalars([torch.tensor(1.5, device="cuda"), torch.tensor(-2.0, device="cuda")])
    assert values == [1.5, -2.0]
