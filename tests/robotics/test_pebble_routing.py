"""PEBBLE extensions: uncertainty routing (costly budget exact, pseudo-labels accounted apart), candidates from recent
data, reward standardisation, and B-Pref skip/equal thresholds on tasks with negative rewards."""

import numpy as np
import pytest
import torch

from mmalign.robotics.pebble import FeedbackState, PebbleConfig, train_agent
from mmalign.robotics.segments import Segments, sample_segments

OBS, ACT, H = 4, 2, 10


def _segments(n: int = 240, seed: int = 0, offset: float = 0.0) -> Segments:
    """Segments whose true reward is a linear function of the observation (learnable from a few labels)."""
    rng = np.random.default_rng(seed)
    obs = rng.standard_normal((n, H, OBS)).astype(np.float32)
    act = rng.uniform(-1, 1, (n, H, ACT)).astype(np.float32)
    return Segments(obs, act, (obs[..., 0] - 0.5 * obs[..., 1] + offset).astype(np.float32))


def _state(**kw) -> FeedbackState:
    base = dict(label_budget=30, initial_labels=12, labels_per_round=7, rm_batch_size=8, rm_epochs=20,
                candidate_factor=3, rm_hidden=16, rm_lr=3e-3, device="cpu")
    base.update(kw)
    return FeedbackState(PebbleConfig(**base), OBS, ACT, torch.device("cpu"))


def _count_costly(state: FeedbackState) -> list[int]:
    """Wrap the teacher so every pair it is asked about is counted."""
    asked: list[int] = []
    inner = state.teacher.label_batch

    def counting(batch, rng=None):
        asked.append(batch.num_pairs)
        return inner(batch, rng=rng)

    state.teacher.label_batch = counting
    return asked


def test_routing_spends_the_costly_budget_exactly_and_counts_pseudo_labels_apart():
    torch.manual_seed(0)
    state = _state(selector="routing", routing_confidence=0.7)
    asked = _count_costly(state)
    rounds = []
    for r in range(6):  # more rounds than the budget allows: the last ones must ask nothing
        rounds.append(state.feedback_round(_segments(seed=r)))
    assert asked == [12, 7, 7, 4]  # the teacher saw exactly the routed pairs, budget cut in the last round
    assert [m.get("routing/costly_queries") for m in rounds] == [12, 7, 7, 4, None, None]
    assert state.queries_used == state.selector.router.spent == 30 and state.schedule.budget_left == 0
    stats = state.label_stats()
    assert stats["labels/queries"] == stats["labels/costly_spent"] == 30
    assert stats["labels/answered"] == 30  # oracle answers all; pseudo-labels are not in the label count
    assert rounds[0]["routing/pseudo_labels"] == 0  # the untrained ensemble is never trusted
    pseudo = [m["routing/pseudo_labels"] for m in rounds[1:4]]
    assert sum(pseudo) == stats["labels/pseudo_total"] > 0
    # The round's fit uses every teacher label so far plus this round's pseudo-labels (not older ones).
    assert rounds[2]["feedback/labels_train"] == 12 + 7 + 7 + pseudo[1]
    # Confident pseudo-labels of a learnable reward mostly agree with the true order.
    assert stats["labels/pseudo_agreement_with_true_return"] > 0.7
    # The costly pairs are the most uncertain of each round's candidates.
    assert rounds[1]["routing/uncertainty_costly"] > rounds[1]["routing/uncertainty_cheap"]


def test_routing_never_asks_about_a_segment_compared_with_itself():
    segs = _segments(n=3, seed=4).take(np.array([0, 0, 0, 1, 1, 2]))  # drawn with replacement: repeated windows
    state = _state(selector="routing", label_budget=16, initial_labels=8, labels_per_round=8, candidate_factor=4)
    for _ in range(2):
        state.feedback_round(segs)
    obs1, obs2 = np.concatenate(state.labels.pairs["obs1"]), np.concatenate(state.labels.pairs["obs2"])
    assert len(obs1) == 16 and not (obs1 == obs2).all(axis=(1, 2)).any()


def test_routing_with_confidence_one_never_pseudo_labels():
    state = _state(selector="routing", routing_confidence=1.0, label_budget=19)
    for r in range(2):
        m = state.feedback_round(_segments(seed=r))
        assert m["routing/pseudo_labels"] == 0
    assert state.feedback_round(_segments(seed=2)) == {}  # budget spent: no round
    assert state.label_stats()["labels/pseudo_total"] == 0 and state.queries_used == 19


def test_skip_teacher_on_negative_rewards_needs_the_shift():
    """B-Pref skips a pair iff max return <= eps * mean return: with all-negative rewards that is nearly every pair."""
    segs = _segments(seed=3, offset=-5.0)
    shifted = _state(teacher="skip", selector="uniform", label_budget=60, initial_labels=60, rm_epochs=1)
    raw = _state(teacher="skip", selector="uniform", label_budget=60, initial_labels=60, teacher_shift_rewards=False,
                 rm_epochs=1)
    shifted.feedback_round(segs)
    raw.feedback_round(segs)
    s, r = shifted.label_stats(), raw.label_stats()
    assert s["labels/queries"] == r["labels/queries"] == 60
    assert r["labels/answered"] == 0
    assert s["labels/answered"] >= 50  # as on non-negative tasks, only pairs of two poor segments are skipped
    assert s["labels/agreement_with_true_return"] == 1.0  # the shift does not change the order
    # equal teacher: ties iff |R1 - R2| < eps * mean return; a negative mean means it never ties without the shift
    ties = []
    for shift in (True, False):
        st = _state(teacher="equal", selector="uniform", label_budget=60, initial_labels=60,
                    teacher_shift_rewards=shift, rm_epochs=1)
        st.feedback_round(segs)
        ties.append(st.label_stats()["labels/ties"])
    assert ties[0] > 0 and ties[1] == 0
    # the offset depends on the data only through the poorest segment: adding a constant changes nothing
    again = _state(teacher="equal", selector="uniform", label_budget=60, initial_labels=60, rm_epochs=1)
    again.feedback_round(_segments(seed=3, offset=+7.0))
    assert again.label_stats()["labels/ties"] == ties[0]


def test_reward_norm_standardises_each_member():
    state = _state(reward_norm=True)
    state.feedback_round(_segments())
    rng = np.random.default_rng(1)
    obs, act = rng.standard_normal((500, OBS)), rng.uniform(-1, 1, (500, ACT))
    before = state.trainer.member_rewards(obs, act)
    state.trainer.fit_reward_norm(obs, act)
    after = state.trainer.member_rewards(obs, act, normalize=True)
    assert torch.allclose(after.mean(1), torch.zeros(3), atol=1e-4)
    assert torch.allclose(after.std(1, unbiased=False), torch.ones(3), atol=1e-3)
    # order within each member is kept (an affine map with positive scale), and the agent sees the normalised mean
    assert torch.equal(before.argsort(1), after.argsort(1))
    np.testing.assert_allclose(state.reward_fn(obs, act), after.mean(0).numpy(), rtol=1e-5, atol=1e-6)


def test_recent_window_samples_only_the_newest_rows():
    t, length = 100, 10
    rows = np.arange(t, dtype=np.float32)[:, None, None].repeat(1, 1)  # obs = row index, one env
    ends = np.zeros((t, 1), bool)
    rng = np.random.default_rng(0)
    segs = sample_segments(rows, rows, rows[..., 0], ends, 80, length, 200, rng, recent=30)
    first = segs.obs[:, 0, 0]
    assert first.min() >= 50 and segs.obs[:, -1, 0].max() <= 79  # within rows 50..79 of the 80 stored
    # full circular buffer, next write at 20: newest row 19, window 30 = rows 90..99 and 0..19, never straddling
    segs = sample_segments(rows, rows, rows[..., 0], ends, t, length, 300, rng, pos=20, recent=30)
    first = segs.obs[:, 0, 0]
    assert set(np.unique(first)) <= set(range(90, 91)) | set(range(0, 11))
    with pytest.raises(ValueError, match="recent"):
        sample_segments(rows, rows, rows[..., 0], ends, 80, length, 5, rng, recent=5)


def test_config_rejects_bad_routing_and_window():
    with pytest.raises(ValueError, match="routing_confidence"):
        PebbleConfig(routing_confidence=0.5)
    with pytest.raises(ValueError, match="recent_window"):
        PebbleConfig(recent_window=10, segment_length=25)
    with pytest.raises(ValueError, match="selector"):
        PebbleConfig(selector="routed")
    with pytest.raises(ValueError, match="rm_label_smoothing"):
        PebbleConfig(rm_label_smoothing=1.0)


def test_sac_end_to_end_with_routing_recent_window_and_reward_norm():
    torch.set_num_threads(1)
    cfg = PebbleConfig(env_id="Reacher-v5", total_steps=260, learning_starts=60, first_feedback=100,
                       feedback_every=50, label_budget=17, initial_labels=8, labels_per_round=6, rm_batch_size=8,
                       rm_epochs=2, eval_every=130, eval_episodes=1, batch_size=16, segment_length=10,
                       candidate_factor=2, net_width=16, rm_hidden=16, save_reward_model=False,
                       selector="routing", routing_confidence=0.6, recent_window=60, reward_norm=True)
    res = train_agent(cfg)
    labels = res["labels"]
    assert labels["labels/queries"] == labels["labels/costly_spent"] == 17
    assert [h["routing/costly_queries"] for h in res["feedback_history"]] == [8, 6, 3]
    state, buf = res["state"], res["model"].replay_buffer
    assert all(float(m.reward_std) != 1.0 for m in state.ensemble.members)  # normalisation was fitted
    rows = 150
    act = res["model"].policy.unscale_action(buf.actions[:rows, 0])
    np.testing.assert_allclose(buf.rewards[:rows, 0], state.reward_fn(buf.observations[:rows, 0], act), rtol=1e-4,
                               atol=1e-5)
