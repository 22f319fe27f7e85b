"""MLPRewardModel's opt-in input processing: stored input standardisation and squared-action features."""

from __future__ import annotations

import pytest
import torch

from mmalign.core.reward_models import MLPRewardModel, RewardEnsemble, RewardFitConfig, SegmentPairs, fit_reward_model
from mmalign.core.teachers import SimulatedHuman


def test_defaults_leave_the_model_unchanged() -> None:
    m = MLPRewardModel(4, 2, hidden=(8,))
    assert set(m.state_dict()) == {"reward_mean", "reward_std", "net.0.weight", "net.0.bias", "net.2.weight",
                                   "net.2.bias"}
    assert m.net[0].in_features == 6


def test_input_norm_equals_a_plain_net_on_hand_standardised_inputs() -> None:
    torch.manual_seed(0)
    obs, act = torch.randn(20, 5, 4) * 3 + 2, torch.rand(20, 5, 2) * 4 - 2
    m = MLPRewardModel(4, 2, hidden=(8,), input_norm=True)
    plain = MLPRewardModel(4, 2, hidden=(8,))
    plain.net.load_state_dict(m.net.state_dict())
    assert torch.allclose(m.step_rewards(obs, act), plain.step_rewards(obs, act))  # identity before fitting
    m.fit_input_normalization(obs, act, act_weight=2.0)
    o_mean, o_std = obs.reshape(-1, 4).mean(0), obs.reshape(-1, 4).std(0, unbiased=False)
    a_mean, a_std = act.reshape(-1, 2).mean(0), act.reshape(-1, 2).std(0, unbiased=False)
    want = plain.step_rewards((obs - o_mean) / o_std, 2.0 * (act - a_mean) / a_std)
    assert torch.allclose(m.step_rewards(obs, act), want, atol=1e-5)
    assert float(m.input_act_weight) == 2.0


def test_action_squares_make_a_control_cost_linear() -> None:
    # hidden=() is a linear model: reward = w·[obs, act, act²] + b; hand-computed value
    m = MLPRewardModel(2, 3, hidden=(), output_activation=None, action_squares=True)
    assert m.net[0].in_features == 2 + 3 + 3
    with torch.no_grad():
        m.net[0].weight.copy_(torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, -0.1, -0.1, -0.1]]))
        m.net[0].bias.zero_()
    act = torch.tensor([[[1.0, -2.0, 0.5]]])
    r = m.step_rewards(torch.zeros(1, 1, 2), act)
    assert torch.allclose(r, torch.tensor([[-0.1 * (1 + 4 + 0.25)]]))


def test_squares_with_input_norm_use_standardised_actions() -> None:
    m = MLPRewardModel(1, 1, hidden=(), output_activation=None, input_norm=True, action_squares=True)
    with torch.no_grad():
        m.net[0].weight.copy_(torch.tensor([[0.0, 0.0, 1.0]]))
        m.net[0].bias.zero_()
    act = torch.tensor([[[1.0], [3.0]]])  # mean 2, std 1
    m.fit_input_normalization(torch.zeros(1, 2, 1), act, act_weight=3.0)
    # standardised action z = ±1, weighted 3z; squared block (3z)²/3 = 3
    assert torch.allclose(m.step_rewards(torch.zeros(1, 2, 1), act), torch.tensor([[3.0, 3.0]]))


def test_buffers_round_trip_through_state_dict() -> None:
    torch.manual_seed(1)
    obs, act = torch.randn(10, 3, 4), torch.randn(10, 3, 2)
    m = MLPRewardModel(4, 2, hidden=(8,), input_norm=True, action_squares=True)
    m.fit_input_normalization(obs * 5, act * 0.1, act_weight=1.5)
    again = MLPRewardModel(4, 2, hidden=(8,), input_norm=True, action_squares=True)
    again.load_state_dict(m.state_dict())
    assert torch.equal(m.step_rewards(obs, act), again.step_rewards(obs, act))


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="action_squares"):
        MLPRewardModel(4, 0, action_squares=True)
    with pytest.raises(ValueError, match="input_norm"):
        MLPRewardModel(4, 2).fit_input_normalization(torch.zeros(3, 4), torch.zeros(3, 2))
    m = MLPRewardModel(4, 2, hidden=(8,), input_norm=True)
    with pytest.raises(ValueError, match="act_weight"):
        m.fit_input_normalization(torch.zeros(3, 4), torch.zeros(3, 2), act_weight=0.0)
    with pytest.raises(ValueError, match="act must have shape"):
        m.fit_input_normalization(torch.zeros(3, 4), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="obs must end with"):
        m.fit_input_normalization(torch.zeros(3, 5), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="at least 2 rows"):
        m.fit_input_normalization(torch.zeros(1, 4), torch.zeros(1, 2))


def _control_cost_pairs(n: int, seed: int) -> SegmentPairs:
    """Segments whose true reward is a state term plus the quadratic control cost −0.5‖a‖² (uniform actions)."""
    g = torch.Generator().manual_seed(seed)
    o1, o2 = torch.randn(n, 10, 6, generator=g), torch.randn(n, 10, 6, generator=g)
    a1, a2 = torch.rand(n, 10, 4, generator=g) * 4 - 2, torch.rand(n, 10, 4, generator=g) * 4 - 2

    def reward(o: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return 0.3 * o[..., 0] - 0.5 * a.square().sum(-1)

    return SegmentPairs.from_teacher(SimulatedHuman()(reward(o1, a1), reward(o2, a2)), o1, o2, a1, a2)


def _fitted_accuracy(action_squares: bool, train: SegmentPairs, test: SegmentPairs) -> float:
    model = RewardEnsemble.build(
        lambda: MLPRewardModel(6, 4, hidden=(32, 32), input_norm=True, action_squares=action_squares), 2, seed=0)
    for member in model.members:
        member.fit_input_normalization(train.obs_first, train.act_first)
    fit_reward_model(model, train, config=RewardFitConfig(epochs=30, batch_size=32, lr=3e-3, device="cpu"))
    with torch.no_grad():
        logits = (model.segment_returns(test.obs_first, test.act_first)
                  - model.segment_returns(test.obs_second, test.act_second)).mean(0)
    return float(((logits > 0).float() == test.labels).float().mean())


def test_squared_features_learn_a_control_cost_from_few_labels() -> None:
    # 200 labelled pairs; the plain MLP reaches ~0.68 held-out accuracy here, the squared features ~0.85
    torch.manual_seed(0)
    train, test = _control_cost_pairs(200, 0), _control_cost_pairs(500, 1)
    with_squares, plain = _fitted_accuracy(True, train, test), _fitted_accuracy(False, train, test)
    assert with_squares > 0.8
    assert with_squares > plain + 0.08
