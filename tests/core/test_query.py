"""Query selectors (uniform / disagreement / entropy, PEBBLE oversampling) and uncertainty routing accounting."""

from __future__ import annotations

import pytest
import torch

from mmalign.core.query import (
    UncertaintyRouter,
    disagreement_selection,
    entropy_selection,
    pair_uncertainty,
    sample_candidate_pairs,
    select_pairs,
    uniform_selection,
)
from mmalign.core.reward_models import FeatureRewardHead, RewardEnsemble
from mmalign.core.teachers import RewardModelTeacher, SimulatedHuman
from mmalign.registry import QUERY_SELECTORS



def test_selectors_pick_documented_pairs() -> None:
    # Pair 0: members agree and are confident; pair 1: members disagree confidently; pair 2: all at P = 0.5.
    logits = torch.tensor([[5.0, 5.0, 0.0], [5.0, -5.0, 0.0]])
    assert disagreement_selection(logits, 1).tolist() == [1]
    assert entropy_selection(logits, 1).tolist() == [2]  # per-member entropy is low on pair 1
    idx = uniform_selection(logits, 3, rng=0)
    assert sorted(idx.tolist()) == [0, 1, 2]
    assert torch.equal(uniform_selection(logits, 2, rng=4), uniform_selection(logits, 2, rng=4))
    assert set(QUERY_SELECTORS.names()) >= {"uniform", "disagreement", "entropy"}
    with pytest.raises(ValueError, match="num_queries"):
        entropy_selection(logits, 4)
    with pytest.raises(ValueError, match="member_logits"):
        entropy_selection(torch.zeros(3), 1)


def test_candidate_pairs_are_distinct_segments() -> None:
    pairs = sample_candidate_pairs(5, 1000, rng=0)
    assert pairs.shape == (1000, 2) and (pairs[:, 0] != pairs[:, 1]).all() and pairs.max() < 5


def test_select_pairs_oversamples_and_keeps_most_uncertain() -> None:
    # Two members that disagree in sign on the first feature: the most disagreeing pairs have extreme feature gaps.
    ens = RewardEnsemble([FeatureRewardHead(1, layer_norm=False) for _ in range(2)])
    with torch.no_grad():
        for sign, m in zip((1.0, -1.0), ens.members):
            m.net[0].weight.fill_(sign)
            m.net[0].bias.zero_()
    obs = torch.linspace(-1, 1, 50).reshape(50, 1, 1)
    chosen = select_pairs(ens, obs, 10, selector="disagreement", large_batch=10, rng=0)
    random = select_pairs(ens, obs, 10, selector="uniform", large_batch=10, rng=0)
    gap = lambda p: (obs[p[:, 0], 0, 0] - obs[p[:, 1], 0, 0]).abs().mean()  # noqa: E731
    assert chosen.shape == (10, 2) and gap(chosen) > gap(random)


def _router_setup(n: int = 200):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(0)
    obs1, obs2 = torch.randn(n, 3, 2, generator=g), torch.randn(n, 3, 2, generator=g)
    true = lambda o: o[..., 0] + 0.5 * o[..., 1]  # noqa: E731
    cheap_model = FeatureRewardHead(2, layer_norm=False)
    with torch.no_grad():
        cheap_model.net[0].weight.copy_(torch.tensor([[1.0, 0.0]]))  # right in sign, wrong in detail
        cheap_model.net[0].bias.zero_()
    return obs1, obs2, true(obs1), true(obs2), RewardModelTeacher(cheap_model, hard=True)


def test_router_respects_budget_exactly_and_routes_uncertain_pairs() -> None:
    obs1, obs2, r1, r2, cheap = _router_setup()
    router = UncertaintyRouter(cheap, SimulatedHuman(), budget=70, max_costly_per_call=30)
    spent = []
    for call in range(4):
        out = router(r1[call * 50:(call + 1) * 50], r2[call * 50:(call + 1) * 50], rng=call,
                     obs_first=obs1[call * 50:(call + 1) * 50], obs_second=obs2[call * 50:(call + 1) * 50])
        spent.append(int(out.costly.sum()))
        assert out.metrics["routing/costly_queries"] == spent[-1]
    assert spent == [30, 30, 10, 0] and router.spent == 70 and router.remaining == 0
    # The costly pairs are the ones the cheap model is least sure about.
    out_u = UncertaintyRouter(cheap, SimulatedHuman(), budget=20)(r1, r2, rng=0, obs_first=obs1, obs_second=obs2)
    assert out_u.metrics["routing/uncertainty_costly"] > out_u.metrics["routing/uncertainty_cheap"]
    oracle = SimulatedHuman()(r1, r2).labels
    assert torch.equal(out_u.labels[out_u.costly], oracle[out_u.costly])


def test_uncertainty_routing_beats_random_routing_in_label_accuracy() -> None:
    obs1, obs2, r1, r2, cheap = _router_setup(400)
    oracle = SimulatedHuman()(r1, r2).labels
    acc = {}
    for strategy in ("uncertainty", "random"):
        router = UncertaintyRouter(cheap, SimulatedHuman(), budget=80, strategy=strategy)
        out = router(r1, r2, rng=1, obs_first=obs1, obs_second=obs2)
        assert router.spent == 80 and int(out.costly.sum()) == 80
        acc[strategy] = (out.labels == oracle).double().mean().item()
    assert acc["uncertainty"] > acc["random"]


def test_router_threshold_and_skips_count_as_spent() -> None:
    obs1, obs2, r1, r2, cheap = _router_setup()
    u = pair_uncertainty(cheap.member_logits(
        __import__("mmalign.core.teachers", fromlist=["SegmentPairBatch"]).SegmentPairBatch.build(
            r1, r2, obs_first=obs1, obs_second=obs2)))
    thr = float(u.quantile(0.9))
    router = UncertaintyRouter(cheap, SimulatedHuman(eps_skip=10.0, return_scale=100.0), budget=1000, threshold=thr)
    out = router(r1, r2, rng=0, obs_first=obs1, obs_second=obs2)
    assert int(out.costly.sum()) == int((u >= thr).sum()) == router.spent
    assert not out.answered[out.costly].any()  # the costly teacher skipped them all; still paid for
    assert out.answered[~out.costly].all()
    with pytest.raises(ValueError, match="budget"):
        UncertaintyRouter(cheap, SimulatedHuman(), budget=-1)


def test_cheap_labeller_abstains_above_its_uncertainty_cap() -> None:
    obs1, obs2, r1, r2, cheap = _router_setup()
    router = UncertaintyRouter(cheap, SimulatedHuman(), budget=10, cheap_max_uncertainty=0.3)
    out = router(r1, r2, rng=0, obs_first=obs1, obs_second=obs2)
    u = pair_uncertainty(cheap.last_member_logits)
    abstained = ~out.answered
    assert abstained.any() and not (abstained & out.costly).any()
    assert torch.equal(abstained, (u >= 0.3) & ~out.costly)
    assert torch.isnan(out.labels[abstained]).all()
    assert out.metrics["routing/unanswered_fraction"] == pytest.approx(float(abstained.double().mean()))


def test_bench_routing_script_smoke(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "bench_routing.py"
    out = tmp_path / "routing.md"
    monkeypatch.setattr(sys, "argv", [str(script), "--seeds", "1", "--budgets", "20", "--pool", "200",
                                      "--seed-labels", "30", "--out", str(out)])
    before = torch.get_num_threads()
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        torch.set_num_threads(before)
    text = out.read_text()
    assert "| 20 | uncertainty (entropy) |" in text and "| 20 | random |" in text
    assert "mean ± sample std (ddof 1) over seeds" in text  # the std is statistics.stdev: say so


def test_disagreement_needs_two_members() -> None:
    # one member's std is 0 for every pair: a top-k over it is an arbitrary order, so it is refused
    with pytest.raises(ValueError, match="K >= 2 members, got K=1"):
        disagreement_selection(torch.randn(1, 6), 2)
    assert disagreement_selection(torch.randn(1, 6), 0).numel() == 0
    assert disagreement_selection(torch.tensor([[0.0, 2.0, 0.0], [0.0, -2.0, 0.5]]), 1).tolist() == [1]
