"""Simulated-human teachers: documented label statistics on constructed segments, determinism, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmalign.core.teachers import (
    BPREF_PRESETS,
    HindsightTeacher,
    LabelFlipTeacher,
    RegretTeacher,
    RewardModelTeacher,
    SimulatedHuman,
    segment_return_scale,
)
from mmalign.registry import TEACHERS



def _pairs(n: int = 20000, h: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, h)).astype(np.float32), rng.normal(size=(n, h)).astype(np.float32)


def test_oracle_prefers_higher_return_and_ties_half() -> None:
    r1 = np.array([[1.0, 2.0], [0.0, 0.0], [5.0, -5.0]])
    r2 = np.array([[0.0, 0.0], [1.0, 0.0], [-5.0, 5.0]])
    out = SimulatedHuman()(r1, r2)
    assert out.labels.tolist() == [1.0, 0.0, 0.5]
    assert out.answered.all()
    assert out.metrics["teacher/label_entropy"] == pytest.approx(math.log(2) / 3)
    assert out.metrics["teacher/skip_rate"] == 0.0


def test_mistake_flips_about_eps_of_labels() -> None:
    r1, r2 = _pairs()
    oracle = SimulatedHuman()(r1, r2)
    out = SimulatedHuman.preset("mistake")(r1, r2, rng=0)
    flipped = (out.labels != oracle.labels).double().mean().item()
    assert abs(flipped - 0.1) < 4 * math.sqrt(0.1 * 0.9 / len(r1))
    assert out.metrics["teacher/mistake_rate"] == pytest.approx(flipped)
    assert out.metrics["teacher/label_entropy"] == pytest.approx(-(0.1 * math.log(0.1) + 0.9 * math.log(0.9)))


def test_skip_mask_is_exactly_the_below_threshold_pairs() -> None:
    r1, r2 = _pairs()
    teacher = SimulatedHuman.preset("skip")
    m = teacher.calibrate(np.abs(r1))
    out = teacher(r1, r2)
    expected = np.maximum(r1.sum(1), r2.sum(1)) > 0.1 * m
    assert torch.equal(out.answered, torch.as_tensor(expected))
    assert torch.isnan(out.labels[~out.answered]).all()  # never silently 0.5
    assert not torch.isnan(out.labels[out.answered]).any()
    assert out.metrics["teacher/skip_rate"] == pytest.approx(1 - expected.mean())


def test_equal_gives_half_exactly_where_return_gap_is_small() -> None:
    r1, r2 = _pairs()
    teacher = SimulatedHuman.preset("equal", return_scale=5.0)
    out = teacher(r1, r2)
    close = np.abs(r1.sum(1) - r2.sum(1)) < 0.5
    assert close.any() and (~close).any()
    assert torch.equal(out.labels == 0.5, torch.as_tensor(close))
    assert out.metrics["teacher/equal_rate"] == pytest.approx(close.mean())


def test_myopic_reverses_early_vs_late_preference() -> None:
    early = np.array([[3.0, 0.0, 0.0, 0.0, 0.0]])  # return 3, all early
    late = np.array([[0.0, 0.0, 0.0, 0.0, 2.5]])  # return 2.5, all at the end
    assert SimulatedHuman()(early, late).labels.item() == 1.0
    assert SimulatedHuman.preset("myopic")(early, late).labels.item() == 0.0  # 3·0.9⁴ = 1.97 < 2.5


def test_myopic_weights_count_valid_steps_after_t_with_padding() -> None:
    # The second segment is padded at the end: its last *valid* step must get weight 1 (2.1 > 2). The pad value is
    # negative so that neither an unmasked pad (2.1/2 - 99) nor weights counted over all steps (2.1/2) give label 0.
    r1 = np.array([[0.0, 0.0, 2.0]])
    r2 = np.array([[0.0, 2.1, -99.0]])
    mask2 = np.array([[True, True, False]])
    out = SimulatedHuman(gamma=0.5)(r1, r2, mask_second=mask2)
    assert out.labels.item() == 0.0


def test_stochastic_follows_boltzmann_probability() -> None:
    r1 = np.zeros((40000, 2), dtype=np.float32)
    r2 = np.full((40000, 2), -0.5, dtype=np.float32)  # return gap 1 -> P = σ(1)
    out = SimulatedHuman.preset("stochastic")(r1, r2, rng=3)
    p = 1 / (1 + math.exp(-1))
    assert out.labels.mean().item() == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / 40000))
    assert torch.allclose(out.probs, torch.full((40000,), p))
    soft = SimulatedHuman(beta=2.0, sample=False)(r1, r2)
    assert torch.allclose(soft.labels, torch.full((40000,), 1 / (1 + math.exp(-2))))


def test_presets_match_bpref_readme_and_compose() -> None:
    assert BPREF_PRESETS["myopic"] == {"gamma": 0.9} and BPREF_PRESETS["mistake"] == {"eps_mistake": 0.1}
    t = SimulatedHuman.preset("myopic", eps_mistake=0.2)
    assert (t.gamma, t.eps_mistake, t.beta) == (0.9, 0.2, math.inf)
    for name in BPREF_PRESETS:
        assert isinstance(TEACHERS.get(name)(), SimulatedHuman)
    assert segment_return_scale(1000.0, 50, 1000) == 50.0


def test_determinism_with_seed() -> None:
    r1, r2 = _pairs(2000)
    t = SimulatedHuman(beta=1.0, eps_mistake=0.2)
    a, b, c = t(r1, r2, rng=7), t(r1, r2, rng=7), t(r1, r2, rng=8)
    assert torch.equal(a.labels, b.labels) and not torch.equal(a.labels, c.labels)


def test_regret_teacher_uses_advantages_not_rewards() -> None:
    obs = torch.tensor([[[1.0], [1.0]], [[0.0], [0.0]]])
    act = torch.zeros(2, 2, 1)
    rewards_high, rewards_low = np.ones((2, 2)), np.zeros((2, 2))
    # Rewards favour the first segment; advantages (= obs) favour the second.
    t = RegretTeacher(lambda o, a: -o[..., 0])
    out = t(rewards_high, rewards_low, obs_first=obs, act_first=act, obs_second=obs.flip(0), act_second=act)
    assert out.labels.tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="obs_first"):
        t(rewards_high, rewards_low)
    stoch = RegretTeacher(lambda o, a: o[..., 0], beta=1.0, sample=False)
    out = stoch(rewards_high, rewards_low, obs_first=obs, act_first=act, obs_second=obs.flip(0), act_second=act)
    assert out.labels[0].item() == pytest.approx(1 / (1 + math.exp(-2)))


def test_regret_teacher_accepts_segments_of_unequal_length() -> None:
    # H = 2 vs H = 3 (allowed by the teacher interface): the second side's advantages are checked against its own
    # shape. Advantage = obs: first sums 2·1.0 = 2.0, second 3·0.5 = 1.5, so the first is preferred.
    obs1, obs2 = torch.ones(1, 2, 1), torch.full((1, 3, 1), 0.5)
    out = RegretTeacher(lambda o, a: o[..., 0])(
        np.zeros((1, 2)), np.zeros((1, 3)), obs_first=obs1, act_first=torch.zeros(1, 2, 1),
        obs_second=obs2, act_second=torch.zeros(1, 3, 1),
    )
    assert out.labels.tolist() == [1.0]


def test_label_flip_teacher_flips_known_rate_and_keeps_skips() -> None:
    r1, r2 = _pairs()
    base = SimulatedHuman.preset("skip", return_scale=3.0)
    clean = base(r1, r2)
    out = LabelFlipTeacher(base, 0.25)(r1, r2, rng=1)
    assert torch.equal(out.answered, clean.answered)
    ans = out.answered
    rate = (out.labels[ans] != clean.labels[ans]).double().mean().item()
    assert abs(rate - 0.25) < 4 * math.sqrt(0.25 * 0.75 / int(ans.sum()))
    with pytest.raises(ValueError, match="flip_rate"):
        LabelFlipTeacher(base, 0.5)


def _simulator(rewards, mask, obs, act, *, horizon, reveal, rng):  # type: ignore[no-untyped-def]
    # Consequences invert the segment's immediate reward; full hindsight also reveals a bonus of segments whose
    # immediate return exceeds 1.5.
    steps = horizon if horizon is not None else 4
    future = -rewards.sum(1, keepdim=True).repeat(1, steps)
    if reveal == "full":
        future = future + 100.0 * (rewards.sum(1, keepdim=True) > 1.5)
    return future


def test_hindsight_modes() -> None:
    r1 = np.array([[2.0, 0.0], [1.0, 0.0]])
    r2 = np.array([[0.0, 0.0], [0.0, 0.0]])
    judge = SimulatedHuman()
    imm = HindsightTeacher(judge, _simulator, mode="immediate")(r1, r2)
    assert imm.labels.tolist() == [1.0, 1.0]
    part = HindsightTeacher(judge, _simulator, mode="partial", horizon=2)(r1, r2, rng=0)
    assert part.labels.tolist() == [0.0, 0.0] and part.metrics["teacher/hindsight_reversal_rate"] == 1.0
    full = HindsightTeacher(judge, _simulator, mode="full")(r1, r2, rng=0)
    assert full.labels.tolist() == [1.0, 0.0]
    kept = HindsightTeacher(judge, _simulator, mode="partial", horizon=1, include_segment_rewards=True)(r1, r2, rng=0)
    assert kept.labels.tolist() == [0.5, 0.5]  # segment reward + one step of its negation cancel
    with pytest.raises(ValueError, match="horizon"):
        HindsightTeacher(judge, _simulator, mode="partial")


def test_reward_model_teacher() -> None:
    from mmalign.core.reward_models import FeatureRewardHead

    model = FeatureRewardHead(1, layer_norm=False)
    with torch.no_grad():
        model.net[0].weight.fill_(1.0)
        model.net[0].bias.zero_()
    obs1, obs2 = torch.ones(3, 2, 1), torch.zeros(3, 2, 1)
    out = RewardModelTeacher(model)(np.zeros((3, 2)), np.zeros((3, 2)), obs_first=obs1, obs_second=obs2)
    assert torch.allclose(out.labels, torch.full((3,), 1 / (1 + math.exp(-2))))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"beta": 0.0}, "beta"),
        ({"beta": -1.0}, "beta"),
        ({"gamma": 1.5}, "gamma"),
        ({"eps_mistake": 1.2}, "eps_mistake"),
        ({"eps_skip": -0.1}, "eps_skip"),
    ],
)
def test_bad_knobs_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SimulatedHuman(**kwargs)


def test_bad_inputs_raise() -> None:
    r = np.zeros((4, 3))
    with pytest.raises(ValueError, match="rewards_second"):
        SimulatedHuman()(r, np.zeros((5, 3)))
    with pytest.raises(ValueError, match="rewards_first"):
        SimulatedHuman()(np.array([[np.nan, 0, 0]] * 4), r)
    with pytest.raises(ValueError, match="rewards_second"):
        SimulatedHuman()(r, np.array([[np.inf, 0, 0]] * 4))
    with pytest.raises(ValueError, match="mask_first"):
        SimulatedHuman()(r, r, mask_first=np.ones((4, 2), dtype=bool))
    with pytest.raises(ValueError, match="return_scale"):
        SimulatedHuman.preset("skip")(r, r)
    with pytest.raises(ValueError, match="rng"):
        SimulatedHuman.preset("mistake")(r, r)
    with pytest.raises(ValueError, match="obs_first"):
        RegretTeacher(lambda o, a: o)(r, r, obs_first=np.zeros((4, 2, 1)))


def test_hindsight_pads_consequences_of_unequal_length() -> None:
    widths = iter([2, 4])

    def sim(rewards, mask, obs, act, *, horizon, reveal, rng):  # type: ignore[no-untyped-def]
        w = next(widths)
        return torch.full((rewards.shape[0], w), 1.0 if w == 2 else 0.75)  # totals 2 vs 3

    out = HindsightTeacher(SimulatedHuman(), sim, mode="full")(np.zeros((2, 3)), np.zeros((2, 3)), rng=0)
    assert out.labels.tolist() == [0.0, 0.0]


def test_reward_model_teacher_keeps_uint8_pixels_for_the_cnn() -> None:
    from mmalign.core.reward_models import CNNRewardModel

    torch.manual_seed(0)
    cnn = CNNRewardModel(3, 16, channels=(4,), hidden=(8,))
    frames = torch.randint(0, 256, (4, 2, 3, 16, 16), dtype=torch.uint8)
    out = RewardModelTeacher(cnn)(np.zeros((4, 2)), np.zeros((4, 2)), obs_first=frames, obs_second=frames.flip(0))
    expected = torch.sigmoid(cnn.segment_returns(frames) - cnn.segment_returns(frames.flip(0))).detach()
    assert torch.allclose(out.labels, expected)


def test_from_bpref_labels_converts_convention() -> None:
    from mmalign.core.teachers import from_bpref_labels

    labels, answered = from_bpref_labels(np.array([[0], [1], [-1]]))
    assert labels.tolist() == [1.0, 0.0, 0.5] and answered.all()
    with pytest.raises(ValueError, match="labels"):
        from_bpref_labels([2])


def test_bench_teachers_script_smoke(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "bench_teachers.py"
    out = tmp_path / "teachers.md"
    monkeypatch.setattr(sys, "argv", [str(script), "--pairs", "2000", "--repeats", "1", "--out", str(out)])
    before = torch.get_num_threads()
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        torch.set_num_threads(before)
    assert "| myopic | " in out.read_text()


def test_return_reference_makes_skip_and_equal_invariant_to_a_reward_offset() -> None:
    """B-Pref thresholds assume non-negative rewards; with ``reference='min'`` they are shift-invariant."""
    r1, r2 = _pairs(n=4000, h=10, seed=3)
    r1, r2 = np.abs(r1), np.abs(r2)  # non-negative: B-Pref's own regime
    knobs = {"skip": {"eps_skip": 0.7}, "equal": {}}  # 0.7: the skip threshold sits inside the return range
    for preset in ("skip", "equal"):
        base = SimulatedHuman.preset(preset, **knobs[preset])
        base.calibrate(np.concatenate([r1, r2]), reference="min")
        ref = base(r1, r2)
        shifted = SimulatedHuman.preset(preset, **knobs[preset])
        offset = -7.5  # every step reward lowered: all returns negative
        shifted.calibrate(np.concatenate([r1, r2]) + offset, reference="min")
        out = shifted(r1 + offset, r2 + offset)
        assert torch.equal(out.answered, ref.answered)
        assert torch.equal(out.labels.nan_to_num(-1), ref.labels.nan_to_num(-1))
        assert 0.0 < ref.metrics["teacher/skip_rate" if preset == "skip" else "teacher/tie_rate"] < 0.5
        # without a reference the negative-reward teacher degenerates (skips everything / never ties)
        plain = SimulatedHuman.preset(preset, **knobs[preset])
        plain.calibrate(np.concatenate([r1, r2]) + offset)
        deg = plain(r1 + offset, r2 + offset)
        if preset == "skip":
            assert deg.metrics["teacher/skip_rate"] == 1.0
        else:
            assert deg.metrics["teacher/tie_rate"] == 0.0


def test_return_reference_thresholds_by_hand() -> None:
    t = SimulatedHuman(eps_skip=0.5, eps_equal=0.1, return_scale=-10.0, return_reference=-30.0)
    assert t.skip_threshold == pytest.approx(-30.0 + 0.5 * 20.0)
    assert t.equal_threshold == pytest.approx(0.1 * 20.0)
    out = t(np.array([[-21.0], [-19.0], [-5.0]]), np.array([[-25.0], [-40.0], [-6.0]]))
    assert out.answered.tolist() == [False, True, True]  # max return -21 <= -20 is skipped
    assert out.labels[1:].tolist() == [1.0, 0.5]  # |-5 - -6| = 1 < 2 is a tie
    assert SimulatedHuman(eps_skip=0.1, return_scale=3.0).skip_threshold == pytest.approx(0.3)  # B-Pref default b=0


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda t: t.calibrate(np.ones((4, 3)), reference="max"), "reference must be 'zero', 'min' or a number"),
        (lambda t: t.set_return_scale(1.0, reference=2.0), "reference must be <= mean_segment_return=1.0"),
        (lambda t: t.set_return_scale(1.0, reference=math.nan), "reference"),
    ],
)
def test_return_reference_bad_input(call, match) -> None:
    with pytest.raises(ValueError, match=match):
        call(SimulatedHuman(eps_skip=0.1))


def test_registered_presets_expose_the_simulated_human_fields():
    """A config checks `teacher.<field>` overrides against the registered factory's signature before building it."""
    import inspect

    from mmalign.core.teachers import RewardModelTeacher, SimulatedHuman
    from mmalign.registry import TEACHERS

    params = inspect.signature(TEACHERS.get("mistake")).parameters
    assert "eps_mistake" in params and "beta" in params
    assert TEACHERS.get("mistake")(eps_mistake=0.3).eps_mistake == 0.3
    with pytest.raises(TypeError):
        TEACHERS.get("mistake")(eps_mistak=0.3)
    assert SimulatedHuman.needs_true_reward and not RewardModelTeacher.needs_true_reward
