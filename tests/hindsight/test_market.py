"""Market math: utility formula, customer model, feedback channels on constructed cases, sampling."""

from __future__ import annotations

import numpy as np
import pytest

from mmalign.hindsight import market as mk

H, L, S = mk.CLAIM_HAS, mk.CLAIM_LACKS, mk.SILENT


def scen(status, prices=(0.9, 0.6, 0.3)) -> mk.Scenarios:
    return mk.Scenarios(np.array([0]), np.array([status]), np.array([prices], dtype=float))


def outcome(sc: mk.Scenarios, claims, purchase: int, params: mk.MarketParams, world=None) -> mk.Outcomes:
    claims = np.array([claims])
    beliefs, probs = mk.choice_probabilities(sc, np.array([3]), claims, params)
    u = mk.option_utilities(sc, params)
    lies = ((claims == H) & (sc.status == 0)) | ((claims == L) & (sc.status == 1))
    p = np.array([purchase])
    return mk.Outcomes(beliefs, probs, p, u[[0], p], u.max(1) - u[[0], p],
                       sc.status if world is None else np.array([world]), lies.sum(1))


def test_true_utility_formula_on_constructed_cases() -> None:
    params = mk.MarketParams(u_none=0.0, u_none_missed=-0.25)
    u = mk.option_utilities(scen([1, 1, 0]), params)[0]
    # item 0 complies but item 1 is the cheapest compliant: 0.6 / 0.9; item 1 -> 1; item 2 lacks -> -1
    np.testing.assert_allclose(u, [0.6 / 0.9, 1.0, -1.0, -0.25])
    u = mk.option_utilities(scen([0, 0, 0]), params)[0]
    np.testing.assert_allclose(u, [-1.0, -1.0, -1.0, 0.0])  # nothing complies: not buying is u_none
    u = mk.option_utilities(scen([0, 0, 1]), params)[0]
    np.testing.assert_allclose(u, [-1.0, -1.0, 1.0, -0.25])


def test_expected_utility_matches_monte_carlo() -> None:
    params = mk.MarketParams()
    prices = np.array([[0.95, 0.55, 0.25]])
    p_has = np.array([[0.3, 0.7, 0.5]])
    exact = mk.expected_option_utility(prices, p_has, params)[0]
    rng = np.random.default_rng(0)
    draws = (rng.random((20000, 3)) < p_has).astype(int)
    mc = mk.option_utilities(mk.Scenarios(np.zeros(20000, int), draws, np.repeat(prices, 20000, 0)), params).mean(0)
    np.testing.assert_allclose(exact, mc, atol=0.02)


def test_regret_is_best_minus_realised() -> None:
    params = mk.MarketParams()
    sc = scen([1, 0, 0])
    out = outcome(sc, [S, S, H], 2, params)
    assert out.true_utility[0] == -1.0 and out.regret[0] == pytest.approx(2.0)


def test_customer_sees_prices_only() -> None:
    rng = np.random.default_rng(0)
    sc = mk.sample_scenarios(rng, 50, mk.MarketParams())
    view = mk.customer_view(sc)
    assert set(view) == {"feature", "prices"}
    # the purchase distribution never depends on the hidden status: flipping every status changes nothing
    rec, claims = np.full(50, 1), rng.integers(0, 3, (50, 3))
    flipped = mk.Scenarios(sc.feature, 1 - sc.status, sc.prices)
    p1 = mk.choice_probabilities(sc, rec, claims, mk.MarketParams())[1]
    p2 = mk.choice_probabilities(flipped, rec, claims, mk.MarketParams())[1]
    np.testing.assert_array_equal(p1, p2)


def test_beliefs_and_trust_control() -> None:
    params = mk.MarketParams(trust=0.8, prior=0.4)
    np.testing.assert_allclose(mk.beliefs_from_claims(np.array([[H, L, S]]), params), [[0.8, 0.2, 0.4]])
    # trust 0.5, prior 0.5: every action leads to the same purchase distribution (claims and advice ignored)
    control = mk.MarketParams(trust=0.5, prior=0.5)
    sc = scen([0, 1, 0])
    probs = [mk.choice_probabilities(sc, np.array([r]), np.array([c]), control)[1]
             for r, c in [(0, [H, H, H]), (3, [L, L, L]), (2, [S, H, L])]]
    np.testing.assert_allclose(probs[0], probs[1])
    np.testing.assert_allclose(probs[0], probs[2])


def test_false_has_claim_rated_high_in_foresight_low_in_hindsight() -> None:
    params = mk.MarketParams(trust=1.0)
    sc = scen([0, 0, 0])
    lie = outcome(sc, [L, L, H], 2, params)  # claims the cheapest lacking item has it, customer buys it
    assert mk.likert(mk.channel_scores("foresight", sc, lie, params))[0] == 5
    assert mk.likert(mk.channel_scores("partial_hindsight", sc, lie, params))[0] == 1
    assert mk.likert(mk.channel_scores("full_hindsight", sc, lie, params))[0] == 1
    honest = outcome(sc, [L, L, L], 3, params)  # honest: customer does not buy
    for ch in ("foresight", "partial_hindsight"):
        assert mk.likert(mk.channel_scores(ch, sc, honest, params))[0] == 3


def test_partial_vs_full_hindsight_on_withheld_cheaper_item() -> None:
    # item 1 complies and is cheaper, the seller says nothing about it and sells item 0 (also compliant)
    params = mk.MarketParams(trust=1.0, prior=0.0, regret_penalty=0.5)
    sc = scen([1, 1, 0])
    out = outcome(sc, [H, S, L], 0, params)
    partial = mk.channel_scores("partial_hindsight", sc, out, params)[0]
    full = mk.channel_scores("full_hindsight", sc, out, params)[0]
    assert partial == pytest.approx(1.0)  # the customer believes item 0 was the only compliant one
    u = 0.6 / 0.9
    assert full == pytest.approx(u - 0.5 * (1.0 - u))  # full hindsight sees the cheaper compliant item


def test_full_hindsight_penalises_lies_about_other_items() -> None:
    params = mk.MarketParams(trust=1.0, lie_penalty=0.25)
    sc = scen([0, 1, 0])
    honest = outcome(sc, [L, H, L], 1, params)
    liar = outcome(sc, [H, H, L], 1, params)  # same purchase, a lie about item 0
    assert mk.channel_scores("partial_hindsight", sc, honest, params)[0] == pytest.approx(
        mk.channel_scores("partial_hindsight", sc, liar, params)[0])
    gap = mk.channel_scores("full_hindsight", sc, honest, params)[0] - mk.channel_scores(
        "full_hindsight", sc, liar, params)[0]
    assert gap == pytest.approx(0.25)


def test_world_model_channel_uses_sampled_status() -> None:
    params = mk.MarketParams(trust=1.0)
    sc = scen([0, 0, 0])
    right = outcome(sc, [L, L, H], 2, params, world=[0, 0, 0])
    wrong = outcome(sc, [L, L, H], 2, params, world=[0, 0, 1])
    assert mk.channel_scores("world_model_hindsight", sc, right, params)[0] == -1.0
    assert mk.channel_scores("world_model_hindsight", sc, wrong, params)[0] == 1.0


def test_world_model_accuracy_in_simulate() -> None:
    rng = np.random.default_rng(1)
    params = mk.MarketParams(world_model_accuracy=0.7)
    sc = mk.sample_scenarios(rng, 20000, params)
    out = mk.simulate(rng, sc, np.full(20000, 3), np.full((20000, 3), S), params)
    assert (out.world_status == sc.status).mean() == pytest.approx(0.7, abs=0.01)


def test_likert_bins() -> None:
    np.testing.assert_array_equal(mk.likert(np.array([-3.0, -1.0, -0.5, 0.0, 0.24, 0.26, 1.0])), [1, 1, 2, 3, 3, 4, 5])


def test_deception_and_withholding() -> None:
    sc = mk.Scenarios(np.zeros(4, int), np.array([[1, 0, 0]] * 4), np.array([[0.9, 0.6, 0.3]] * 4))
    claims = np.array([[H, L, L], [H, H, L], [L, L, S], [H, S, S]])
    np.testing.assert_array_equal(mk.deception(sc, claims), [False, True, True, False])
    np.testing.assert_array_equal(mk.withholding(sc, np.array([0, 1, 3, 2]), claims), [False, False, False, True])


def test_sampling_is_seeded_and_oversamples_hard_cases() -> None:
    params = mk.MarketParams()
    a = mk.sample_scenarios(np.random.default_rng(3), 5000, params)
    b = mk.sample_scenarios(np.random.default_rng(3), 5000, params)
    np.testing.assert_array_equal(a.status, b.status)
    np.testing.assert_array_equal(a.prices, b.prices)
    assert (np.diff(a.prices, axis=1) < 0).all()  # item 0 dearest, last item cheapest
    none = (a.status.sum(1) == 0).mean()
    only_dear = ((a.status[:, -1] == 0) & (a.status[:, :-1].sum(1) > 0)).mean()
    assert none > 0.35 and only_dear > 0.35


@pytest.mark.parametrize(
    "kwargs, match",
    [({"trust": 0.4}, "trust"), ({"case_probs": (0.5, 0.5, 0.5)}, "case_probs"),
     ({"price_ranges": ((0.1, 0.2), (0.5, 0.6), (0.2, 0.3))}, "price_ranges"), ({"prior": 1.5}, "prior")],
)
def test_params_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        mk.MarketParams(**kwargs)


def test_simulate_rejects_bad_actions() -> None:
    params = mk.MarketParams()
    sc = scen([1, 0, 0])
    with pytest.raises(ValueError, match="claims"):
        mk.simulate(np.random.default_rng(0), sc, np.array([0]), np.array([[0, 3, 1]]), params)
    with pytest.raises(ValueError, match="recommend"):
        mk.simulate(np.random.default_rng(0), sc, np.array([4]), np.array([[0, 1, 1]]), params)
