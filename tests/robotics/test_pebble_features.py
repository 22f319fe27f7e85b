"""PEBBLE reward-model inputs: action standardisation (normalize_act, rm_act_weight) and squared actions."""

import math

import numpy as np
import pytest
import torch

from mmalign.robotics.pebble import FeedbackState, PebbleConfig
from mmalign.robotics.segments import Segments

OBS, ACT, H = 5, 3, 10


def _control_cost_segments(n: int, seed: int) -> Segments:
    """Segments whose true reward is mostly a quadratic control cost (as on Reacher/Pusher), actions in [-2, 2]."""
    rng = np.random.default_rng(seed)
    obs = rng.standard_normal((n, H, OBS)).astype(np.float32)
    act = rng.uniform(-2, 2, (n, H, ACT)).astype(np.float32)
    return Segments(obs, act, (0.2 * obs[..., 0] - 0.5 * (act**2).sum(-1)).astype(np.float32))


def _state(**kw) -> FeedbackState:
    base = dict(label_budget=200, initial_labels=200, rm_batch_size=32, rm_epochs=30, rm_hidden=32, rm_lr=3e-3,
                candidate_factor=1, device="cpu")
    base.update(kw)
    return FeedbackState(PebbleConfig(**base), OBS, ACT, torch.device("cpu"))


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="rm_act_weight"):
        PebbleConfig(normalize_act=True, rm_act_weight=-1.0)
    with pytest.raises(ValueError, match="rm_act_weight must be a finite number > 0"):
        PebbleConfig(normalize_act=True, rm_act_weight=0.0)  # no sentinel: automatic is null
    with pytest.raises(ValueError, match="rm_act_weight.*normalize_act"):
        PebbleConfig(rm_act_weight=2.0)  # a weight on unstandardised actions would be silently ignored
    PebbleConfig(normalize_act=True, rm_act_weight=2.0, rm_action_squares=True)  # valid


def test_defaults_keep_the_plain_reward_nets():
    state = _state()
    keys = set(state.ensemble.state_dict())
    assert not any("input_" in k for k in keys)  # checkpoints of default runs are unchanged
    assert state.ensemble.members[0].net[0].in_features == OBS + ACT


def test_action_stats_are_frozen_at_the_first_round_with_the_balanced_weight():
    torch.manual_seed(0)
    state = _state(normalize_act=True, rm_action_squares=True, initial_labels=100, labels_per_round=100)
    first = _control_cost_segments(300, 0)
    state.feedback_round(first)
    member = state.ensemble.members[0]
    assert member.net[0].in_features == OBS + 2 * ACT
    flat = first.act.reshape(-1, ACT)
    assert np.allclose(member.input_mean[OBS:].numpy(), flat.mean(0), atol=1e-5)
    assert np.allclose(member.input_std[OBS:].numpy(), flat.std(0), atol=1e-4)
    assert math.isclose(float(member.input_act_weight), math.sqrt(OBS / ACT), rel_tol=1e-6)
    later = _control_cost_segments(300, 1)
    later.act *= 0.1  # a later round with very different actions must not move the stored statistics
    state.feedback_round(later)
    assert np.allclose(member.input_mean[OBS:].numpy(), flat.mean(0), atol=1e-5)
    explicit = _state(normalize_act=True, rm_act_weight=0.5)
    explicit.feedback_round(first)
    assert float(explicit.ensemble.members[0].input_act_weight) == 0.5


def _action_dependence(state: FeedbackState, test: Segments) -> tuple[float, float]:
    """(corr of learned segment return with the control cost, accuracy on random test pairs)."""
    learned = state.trainer.member_rewards(test.obs, test.act).mean(0).sum(-1).numpy()
    ctrl = -(test.act**2).sum(-1).sum(-1)
    ret = test.true_rewards.sum(1)
    i, j = np.arange(0, len(test), 2), np.arange(1, len(test), 2)
    return float(np.corrcoef(learned, ctrl)[0, 1]), float(np.mean((learned[i] > learned[j]) == (ret[i] > ret[j])))


def test_squared_actions_let_the_first_round_learn_the_control_cost():
    torch.manual_seed(0)
    train, test = _control_cost_segments(400, 0), _control_cost_segments(600, 1)
    gaps = []
    for seed in range(3):  # the accuracy gap of one ensemble seed is noisy (0.00-0.16), its mean is not
        plain, feat = _state(seed=seed), _state(seed=seed, normalize_act=True, rm_action_squares=True)
        plain.feedback_round(train)
        feat.feedback_round(train)
        corr_plain, acc_plain = _action_dependence(plain, test)
        corr_feat, acc_feat = _action_dependence(feat, test)
        assert corr_feat > 0.7 and acc_feat > 0.75
        gaps.append(acc_feat - acc_plain)
    assert np.mean(gaps) > 0.05
