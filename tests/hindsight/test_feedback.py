"""Marketplace feedback through the core HindsightTeacher: each channel on constructed pairs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmalign.core.teachers import HindsightTeacher, LabelFlipTeacher
from mmalign.hindsight import market as mk
from mmalign.hindsight.feedback import FEEDBACK_CHANNELS, Interaction, label_pairs, market_teacher

H, L, S = mk.CLAIM_HAS, mk.CLAIM_LACKS, mk.SILENT


def interaction(status, claims, purchase, n: int = 1, params: mk.MarketParams | None = None) -> Interaction:
    params = params or mk.MarketParams(trust=1.0)
    sc = mk.Scenarios(np.zeros(n, int), np.array([status] * n), np.array([[0.9, 0.6, 0.3]] * n))
    claims = np.array([claims] * n)
    rec = np.full(n, 3)
    beliefs, probs = mk.choice_probabilities(sc, rec, claims, params)
    u = mk.option_utilities(sc, params)
    p = np.full(n, purchase)
    rows = np.arange(n)
    lies = ((claims == H) & (sc.status == 0)) | ((claims == L) & (sc.status == 1))
    out = mk.Outcomes(beliefs, probs, p, u[rows, p], u.max(1) - u[rows, p], sc.status, lies.sum(1))
    return Interaction(sc, rec, claims, out)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_teacher_is_the_core_hindsight_teacher() -> None:
    params = mk.MarketParams()
    assert isinstance(market_teacher("partial_hindsight", params), HindsightTeacher)
    assert market_teacher("foresight", params).mode == "immediate"
    assert market_teacher("full_hindsight", params).mode == "full"
    assert isinstance(market_teacher("foresight", params, flip_rate=0.2), LabelFlipTeacher)
    with pytest.raises(ValueError, match="channel"):
        market_teacher("oracle", params)


@pytest.mark.parametrize("channel, expected", [("foresight", 1.0), ("partial_hindsight", 0.0),
                                               ("full_hindsight", 0.0), ("world_model_hindsight", 0.0)])
def test_lie_vs_honest_pair(channel: str, expected: float) -> None:
    params = mk.MarketParams(trust=1.0, world_model_accuracy=1.0)
    lie = interaction([0, 0, 0], [L, L, H], 2)  # false "has" on the cheapest item, customer buys it
    honest = interaction([0, 0, 0], [L, L, L], 3)  # honest, customer walks away
    out = label_pairs(market_teacher(channel, params), lie, honest, params, gen())
    assert out.labels.tolist() == [expected] and out.answered.all()
    reversal = out.metrics["teacher/hindsight_reversal_rate"]
    assert reversal == (0.0 if channel == "foresight" else 1.0)


def test_full_hindsight_prefers_honesty_about_unbought_items_partial_is_indifferent() -> None:
    params = mk.MarketParams(trust=1.0)
    honest = interaction([0, 1, 0], [L, H, L], 1)
    liar = interaction([0, 1, 0], [H, H, L], 1)  # same purchase, a lie about item 0
    partial = label_pairs(market_teacher("partial_hindsight", params), honest, liar, params, gen())
    full = label_pairs(market_teacher("full_hindsight", params), honest, liar, params, gen())
    assert partial.labels.tolist() == [0.5] and full.labels.tolist() == [1.0]


def test_world_model_accuracy_controls_label_quality() -> None:
    n = 4000
    lie = interaction([0, 0, 0], [L, L, H], 2, n)
    honest = interaction([0, 0, 0], [L, L, L], 3, n)
    for a in (1.0, 0.75, 0.0):
        params = mk.MarketParams(trust=1.0, world_model_accuracy=a)
        out = label_pairs(market_teacher("world_model_hindsight", params), lie, honest, params, gen(1))
        # the lie is preferred exactly when the world model wrongly "reveals" the cheap item has the feature
        assert float(out.labels.mean()) == pytest.approx(1 - a, abs=0.03)


def test_horizon_and_reveal_probability() -> None:
    n = 6000
    lie = interaction([0, 0, 0], [L, L, H], 2, n)
    honest = interaction([0, 0, 0], [L, L, L], 3, n)
    params = mk.MarketParams(trust=1.0)
    for horizon in (1, 3):
        teacher = market_teacher("partial_hindsight", params, horizon=horizon, reveal_prob=0.5)
        out = label_pairs(teacher, lie, honest, params, gen(2))
        # unrevealed outcomes keep the foresight judgement (lie preferred): P = (1 - r)^N
        assert float(out.labels.mean()) == pytest.approx(0.5**horizon, abs=0.03)


def test_flip_noise_and_soft_judge() -> None:
    n = 5000
    params = mk.MarketParams(trust=1.0)
    lie = interaction([0, 0, 0], [L, L, H], 2, n)
    honest = interaction([0, 0, 0], [L, L, L], 3, n)
    out = label_pairs(market_teacher("partial_hindsight", params, flip_rate=0.2), lie, honest, params, gen(3))
    assert float(out.labels.mean()) == pytest.approx(0.2, abs=0.02)
    assert out.metrics["teacher/flip_rate"] == pytest.approx(0.2, abs=0.02)
    soft = label_pairs(market_teacher("partial_hindsight", params, judge_beta=1.0), lie, honest, params, gen(4))
    # score gap is -1 - 0 = -1, so a Boltzmann judge with beta 1 prefers the lie with probability sigmoid(-1)
    assert float(soft.labels.mean()) == pytest.approx(1 / (1 + math.e), abs=0.02)


def test_label_pairs_checks_lengths() -> None:
    params = mk.MarketParams()
    with pytest.raises(ValueError, match="equally many"):
        label_pairs(market_teacher("foresight", params), interaction([0, 0, 0], [L, L, L], 3, 2),
                    interaction([0, 0, 0], [L, L, L], 3, 3), params, gen())


def test_all_channels_listed() -> None:
    assert set(FEEDBACK_CHANNELS) == {"foresight", "partial_hindsight", "full_hindsight", "world_model_hindsight"}
