"""Segments: valid starts never cross episode ends or the circular-buffer write position; pairs; episode cuts."""

import numpy as np
import pytest

from mmalign.robotics.segments import (
    Segments,
    features,
    random_pairs,
    sample_segments,
    segments_from_episodes,
    valid_starts,
)


def _buffer(T=40, E=2, obs_dim=3):
    # obs[t, e] = (t, e, t*10+e): lets a test read back where each segment step came from
    t, e = np.meshgrid(np.arange(T), np.arange(E), indexing="ij")
    obs = np.stack([t, e, t * 10 + e], -1).astype(np.float32)
    act = np.zeros((T, E, 1), np.float32)
    rew = (t * 10 + e).astype(np.float32)
    return obs, act, rew


def test_valid_starts_respects_episode_ends():
    ends = np.zeros((10, 1), bool)
    ends[4, 0] = True  # episode ends with transition 4: steps 0..4 and 5..9
    starts = sorted(valid_starts(ends, 10, 3).tolist())
    # H=3: start t valid iff no end in t..t+1 -> 0,1,2 (2..4 ends at last step: fine), 5,6,7
    assert starts == [0, 1, 2, 5, 6, 7]


def test_valid_starts_full_buffer_does_not_straddle_pos():
    ends = np.zeros((10, 1), bool)
    starts = sorted(valid_starts(ends, 10, 3, pos=4).tolist())
    assert 2 not in starts and 3 not in starts and 1 in starts and 4 in starts


def test_valid_starts_none_when_too_short():
    assert valid_starts(np.zeros((5, 1), bool), 2, 3).size == 0
    with pytest.raises(ValueError, match="length"):
        valid_starts(np.zeros((5, 1), bool), 5, 0)


def test_sample_segments_are_contiguous_single_env_and_inside_episodes():
    obs, act, rew = _buffer()
    ends = np.zeros((40, 2), bool)
    ends[[9, 19, 29], 0] = True
    ends[[14, 27], 1] = True
    segs = sample_segments(obs, act, rew, ends, 40, 5, 300, np.random.default_rng(0))
    assert segs.obs.shape == (300, 5, 3) and segs.true_rewards.shape == (300, 5)
    t, env = segs.obs[..., 0], segs.obs[..., 1]
    assert np.all(np.diff(t, axis=1) == 1)  # consecutive steps
    assert np.all(env == env[:, :1])  # one env per segment
    for row_t, row_e in zip(t.astype(int), env[:, 0].astype(int)):
        assert not ends[row_t[:-1], row_e].any()  # no episode end before the last step
    np.testing.assert_array_equal(segs.true_rewards, segs.obs[..., 2])


def test_sample_segments_error_when_no_valid_start():
    obs, act, rew = _buffer(T=6, E=1)
    ends = np.ones((6, 1), bool)
    with pytest.raises(ValueError, match="no valid segment"):
        sample_segments(obs, act, rew, ends, 6, 3, 4, np.random.default_rng(0))


def test_segments_from_episodes_all_and_random():
    eps = [{"obs": np.arange(10, dtype=np.float32)[:, None], "act": np.zeros((10, 1), np.float32),
            "rew": np.arange(10, dtype=np.float32)} for _ in range(2)]
    eps.append({"obs": np.zeros((3, 1), np.float32), "act": np.zeros((3, 1), np.float32), "rew": np.zeros(3, np.float32)})
    segs = segments_from_episodes(eps, 4)  # non-overlapping: starts 0, 4 per long episode; short one unused
    assert len(segs) == 4
    np.testing.assert_array_equal(segs.returns(), [6, 22, 6, 22])
    rnd = segments_from_episodes(eps, 4, num=50, rng=np.random.default_rng(1))
    assert len(rnd) == 50 and np.all(np.diff(rnd.obs[..., 0], axis=1) == 1)
    with pytest.raises(ValueError, match="longer than every episode"):
        segments_from_episodes(eps, 11)


def test_random_pairs_distinct_and_features_shape():
    i, j = random_pairs(5, 1000, np.random.default_rng(0))
    assert np.all(i != j) and i.max() < 5 and j.max() < 5 and set(i) == set(range(5))
    x = features(np.zeros((2, 3, 4)), np.ones((2, 3, 2)))
    assert x.shape == (2, 3, 6) and x.dtype == np.float32


def test_segments_shape_check_and_take():
    with pytest.raises(ValueError, match="leading shape"):
        Segments(np.zeros((2, 3, 1)), np.zeros((2, 4, 1)), np.zeros((2, 3)))
    s = Segments(np.zeros((3, 2, 1)), np.zeros((3, 2, 1)), np.arange(6, dtype=np.float32).reshape(3, 2))
    assert len(s.take(np.array([2]))) == 1 and s.take(np.array([2])).true_rewards[0, 0] == 4


def test_segments_from_flattened_single_env_buffer_keep_every_action_dimension():
    """A flattened single-env RolloutBuffer ([T, dim] arrays): actions are cut like observations, not [N, H]."""
    from types import SimpleNamespace

    from mmalign.robotics.segments import segments_from_buffer

    t = np.arange(12, dtype=np.float32)
    buf = SimpleNamespace(full=True, buffer_size=12, pos=12, observations=np.stack([t, t + 100], -1),
                          actions=np.stack([t + 0.5, -t], -1))
    ends = np.zeros((12, 1), bool)
    segs = segments_from_buffer(buf, t[:, None] * 10, ends, 4, 20, np.random.default_rng(0))
    assert segs.act.shape == (20, 4, 2)
    steps = segs.obs[..., 0]
    np.testing.assert_array_equal(segs.act[..., 0], steps + 0.5)
    np.testing.assert_array_equal(segs.act[..., 1], -steps)
    np.testing.assert_array_equal(segs.true_rewards, steps * 10)


def test_sample_segments_refuses_arrays_that_are_not_time_major():
    obs, act, rew = _buffer(T=20, E=1)
    ends = np.zeros((20, 1), bool)
    with pytest.raises(ValueError, match=r"act must be time-major.*got \(20, 1\)"):
        sample_segments(obs, act[..., 0], rew, ends, 20, 4, 3, np.random.default_rng(0))
    with pytest.raises(ValueError, match="obs must be time-major"):
        sample_segments(obs.reshape(10, 2, 3), act, rew, ends, 20, 4, 3, np.random.default_rng(0))
