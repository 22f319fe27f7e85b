"""Fixed-length trajectory segments and segment pairs, cut from rollouts or from SB3 buffers.

A segment is ``H`` consecutive transitions of one environment that never cross an episode end: observations
``[H, obs_dim]``, actions ``[H, act_dim]`` (in the env's action units), true rewards ``[H]`` (kept only for teachers
and evaluation, never shown to the learner) and optionally MuJoCo ``qpos``/``qvel`` per step (to render the segment).

Buffers are time-major ``[T, n_envs, ...]`` as in stable-baselines3 (``ReplayBuffer.observations``,
``RolloutBuffer.observations``). ``ends[t, e]`` marks that the episode of env ``e`` ended with transition ``t``
(terminated or truncated): a segment starting at ``t`` is valid iff none of ``t .. t+H-2`` is an end.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable

import numpy as np

__all__ = [
    "Segments",
    "valid_starts",
    "sample_segments",
    "segments_from_buffer",
    "segments_from_episodes",
    "collect_episodes",
    "random_pairs",
    "features",
    "SegmentSampler",
]


@dataclass
class Segments:
    """``N`` segments of ``H`` steps (numpy arrays; ``qpos``/``qvel`` only when recorded)."""

    obs: np.ndarray  # [N, H, obs_dim] float32
    act: np.ndarray  # [N, H, act_dim] float32
    true_rewards: np.ndarray  # [N, H] float32, hidden from the learner
    qpos: np.ndarray | None = None  # [N, H, nq]
    qvel: np.ndarray | None = None  # [N, H, nv]

    def __post_init__(self) -> None:
        n, h = self.true_rewards.shape
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and tuple(value.shape[:2]) != (n, h):
                raise ValueError(f"{f.name} must have leading shape [N, H]=({n}, {h}), got {tuple(value.shape)}")

    def __len__(self) -> int:
        return int(self.true_rewards.shape[0])

    @property
    def length(self) -> int:
        return int(self.true_rewards.shape[1])

    def take(self, index: np.ndarray) -> "Segments":
        """The segments at ``index`` (fancy indexing along N)."""
        return Segments(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index]
                           for f in fields(self)})

    @staticmethod
    def concat(parts: list["Segments"]) -> "Segments":
        out: dict[str, Any] = {}
        for f in fields(Segments):
            values = [getattr(p, f.name) for p in parts]
            out[f.name] = None if any(v is None for v in values) else np.concatenate(values, axis=0)
        return Segments(**out)

    def returns(self) -> np.ndarray:
        """True return of each segment, ``[N]``."""
        return self.true_rewards.sum(axis=1)


def features(obs: np.ndarray, act: np.ndarray) -> np.ndarray:
    """Reward-model input: flattened observation concatenated with the action, ``[..., obs_dim + act_dim]``."""
    lead = act.shape[:-1]
    return np.concatenate([obs.reshape(*lead, -1), act], axis=-1).astype(np.float32, copy=False)


def valid_starts(ends: np.ndarray, size: int, length: int, pos: int | None = None) -> np.ndarray:
    """Flat indices ``t * n_envs + e`` of every valid segment start among the first ``size`` rows.

    Args:
        ends: ``[T, n_envs]`` bool, episode ended with transition ``t``.
        size: number of filled rows (``buffer.size()``).
        length: segment length ``H``.
        pos: for a full circular buffer, the next write position: segments may not straddle it (they would join
            the newest and the oldest data).
    """
    if length <= 0:
        raise ValueError(f"length must be > 0, got {length}")
    if size < length:
        return np.zeros(0, dtype=np.int64)
    n_envs = ends.shape[1]
    e = ends[:size].astype(np.int64)
    # cum[t] = number of ends in rows < t; a start t is valid iff no end in rows t .. t+H-2.
    cum = np.concatenate([np.zeros((1, n_envs), np.int64), np.cumsum(e, axis=0)], axis=0)
    starts = np.arange(size - length + 1)
    inner = cum[starts + length - 1] - cum[starts]
    ok = inner == 0
    if pos is not None and 0 < pos < size:
        straddle = (starts < pos) & (starts + length > pos)
        ok &= ~straddle[:, None]
    t, env = np.nonzero(ok)
    return t * n_envs + env


def sample_segments(
    obs: np.ndarray,
    act: np.ndarray,
    rewards: np.ndarray,
    ends: np.ndarray,
    size: int,
    length: int,
    num: int,
    rng: np.random.Generator,
    *,
    pos: int | None = None,
    qpos: np.ndarray | None = None,
    qvel: np.ndarray | None = None,
    recent: int | None = None,
) -> Segments:
    """Sample ``num`` valid segments (with replacement) from time-major ``[T, n_envs, ...]`` arrays.

    ``recent`` keeps only segments lying entirely within the last ``recent`` stored rows (per env); the newest
    row is ``size − 1``, or ``pos − 1`` for a full circular buffer.
    """
    for name, a, ndim in (("obs", obs, 3), ("act", act, 3), ("rewards", rewards, 2), ("qpos", qpos, 3),
                          ("qvel", qvel, 3)):
        # [T, n_envs] leading axes like ``ends``: a flattened or squeezed array would be cut along the wrong axes
        # without any error (e.g. act [T, act_dim] gives [num, H] of the first action component).
        if a is not None and (a.ndim < ndim or tuple(a.shape[:2]) != tuple(ends.shape[:2])):
            raise ValueError(f"{name} must be time-major [T, n_envs{', ...' if ndim == 3 else ''}] with "
                             f"[T, n_envs]={tuple(ends.shape[:2])} as ends, got {tuple(a.shape)}")
    starts = valid_starts(ends, size, length, pos)
    if recent is not None:
        if recent < length:
            raise ValueError(f"recent must be >= length={length}, got {recent}")
        newest = (pos - 1) % size if pos is not None and 0 < pos < size else size - 1
        age = (newest - starts // ends.shape[1]) % size  # rows between a start and the newest row
        starts = starts[age < recent]
    if len(starts) == 0:
        raise ValueError(f"no valid segment of length {length} among {size} stored steps (episodes too short?)")
    chosen = rng.choice(starts, size=num, replace=True)
    n_envs = ends.shape[1]
    t0, env = chosen // n_envs, chosen % n_envs
    rows = t0[:, None] + np.arange(length)[None, :]  # [num, H]
    cols = env[:, None]

    def cut(a: np.ndarray | None) -> np.ndarray | None:
        if a is None:
            return None
        # pixels stay uint8 (a pixel reward model scales uint8 frames to [0, 1] itself)
        return np.asarray(a[rows, cols], dtype=np.uint8 if a.dtype == np.uint8 else np.float32)

    return Segments(cut(obs), cut(act), cut(rewards), cut(qpos), cut(qvel))  # type: ignore[arg-type]


def segments_from_buffer(
    buffer: Any,
    true_rewards: np.ndarray,
    ends: np.ndarray,
    length: int,
    num: int,
    rng: np.random.Generator,
    *,
    unscale_action: Callable[[np.ndarray], np.ndarray] | None = None,
    qpos: np.ndarray | None = None,
    qvel: np.ndarray | None = None,
    recent: int | None = None,
) -> Segments:
    """Segments from an SB3 ``ReplayBuffer`` or ``RolloutBuffer`` (``recent``: see :func:`sample_segments`).

    The buffer's own ``rewards`` may already be learned rewards, so true rewards and episode ends come from arrays
    kept beside it (same ``[buffer_size, n_envs]`` layout, filled by the
    :class:`mmalign.robotics.pebble.PreferenceCallback`).
    ``unscale_action`` maps SAC's stored ``[-1, 1]`` actions back to env units.
    """
    full = bool(getattr(buffer, "full", False))
    size = buffer.buffer_size if full else int(buffer.pos)
    obs, act = buffer.observations, buffer.actions
    if obs.ndim == 2:  # RolloutBuffer of a single env may be flattened; SB3 keeps [T, n_envs, ...]
        obs = obs[:, None]
        act = act[:, None] if act.ndim == 2 else act
    segs = sample_segments(
        obs, act, true_rewards, ends, size, length, num, rng,
        pos=int(buffer.pos) if full else None, qpos=qpos, qvel=qvel, recent=recent,
    )
    if unscale_action is not None:
        segs.act = np.asarray(unscale_action(segs.act), dtype=np.float32)
    return segs


class SegmentSampler:
    """The fragmenter of online PbRL: ``length``-step segments from an SB3 buffer, optionally only from the last
    ``recent`` stored rows (``None`` = the whole buffer)."""

    def __init__(self, length: int, recent: int | None = None, obs_key: str | None = None) -> None:
        if length <= 0:
            raise ValueError(f"segment length must be > 0, got {length}")
        if recent is not None and recent < length:
            raise ValueError(f"recent must be None or >= length={length}, got {recent}")
        self.length, self.recent, self.obs_key = length, recent, obs_key or None

    def from_buffer(self, buffer: Any, true_rewards: np.ndarray, ends: np.ndarray, num: int,
                    rng: np.random.Generator, action_features: Callable[[np.ndarray], np.ndarray] | None = None,
                    qpos: np.ndarray | None = None, qvel: np.ndarray | None = None) -> Segments:
        """``num`` segments (with replacement) of ``buffer`` (see :func:`segments_from_buffer`); ``qpos``/``qvel``:
        MuJoCo states kept beside the buffer (same ``[buffer_size, n_envs, ...]`` layout), cut with the segments."""
        if isinstance(buffer.observations, dict):
            if self.obs_key not in buffer.observations:
                raise ValueError(f"dict observations need obs_key, one of {list(buffer.observations)}, got "
                                 f"{self.obs_key!r}")
            buffer = _KeyView(buffer, self.obs_key)
        return segments_from_buffer(buffer, true_rewards, ends, self.length, num, rng,
                                    unscale_action=action_features, recent=self.recent, qpos=qpos, qvel=qvel)


class _KeyView:
    """A dict-observation buffer seen as one with ``observations = buffer.observations[key]``."""

    def __init__(self, buffer: Any, key: str) -> None:
        self.observations, self.actions = buffer.observations[key], buffer.actions
        self.buffer_size, self.pos, self.full = buffer.buffer_size, buffer.pos, getattr(buffer, "full", False)


def collect_episodes(
    env: Any,
    policy: Callable[[np.ndarray], np.ndarray],
    num_episodes: int,
    seed: int,
    *,
    record_state: bool = False,
    action_noise: float = 0.0,
    rng: np.random.Generator | None = None,
) -> list[dict[str, np.ndarray]]:
    """Roll out ``policy(obs) -> action`` in a gymnasium env; one dict of arrays per episode.

    Keys: ``obs [T, ...]``, ``act [T, act_dim]``, ``rew [T]`` (true), optional ``qpos``/``qvel`` (state *before*
    each action, for rendering). ``action_noise`` adds Gaussian noise (std in units of half the action range),
    clipped to the box — used to build datasets of mixed quality.
    """
    rng = rng if rng is not None else np.random.default_rng(seed)
    low, high = env.action_space.low, env.action_space.high
    episodes = []
    for k in range(num_episodes):
        obs, _ = env.reset(seed=seed + k)
        rec: dict[str, list[np.ndarray]] = {"obs": [], "act": [], "rew": [], "qpos": [], "qvel": []}
        done = False
        while not done:
            action = np.asarray(policy(obs), dtype=np.float32)
            if action_noise > 0:
                action = action + action_noise * (high - low) / 2 * rng.standard_normal(action.shape)
                action = np.clip(action, low, high).astype(np.float32)
            if record_state:
                data = env.unwrapped.data
                rec["qpos"].append(data.qpos.copy())
                rec["qvel"].append(data.qvel.copy())
            rec["obs"].append(np.asarray(obs, dtype=np.float32))
            rec["act"].append(action)
            obs, reward, terminated, truncated, _ = env.step(action)
            rec["rew"].append(np.float32(reward))
            done = terminated or truncated
        episodes.append({k2: np.stack(v) for k2, v in rec.items() if v})
    return episodes


def segments_from_episodes(
    episodes: list[dict[str, np.ndarray]],
    length: int,
    *,
    num: int | None = None,
    rng: np.random.Generator | None = None,
) -> Segments:
    """Cut segments from episodes: all non-overlapping ones (``num=None``) or ``num`` random valid windows."""
    usable = [ep for ep in episodes if len(ep["rew"]) >= length]
    if not usable:
        longest = max((len(ep["rew"]) for ep in episodes), default=0)
        raise ValueError(f"segment length {length} is longer than every episode (longest has {longest} steps)")
    keys = [k for k in ("obs", "act", "rew", "qpos", "qvel") if k in usable[0]]
    if num is None:
        picks = [(i, s) for i, ep in enumerate(usable) for s in range(0, len(ep["rew"]) - length + 1, length)]
    else:
        if rng is None:
            raise ValueError("rng must be a numpy Generator when num is given, got None")
        lens = np.array([len(ep["rew"]) - length + 1 for ep in usable])
        flat = rng.integers(0, lens.sum(), size=num)
        ep_idx = np.searchsorted(np.cumsum(lens), flat, side="right")
        offsets = flat - np.concatenate([[0], np.cumsum(lens)[:-1]])[ep_idx]
        picks = list(zip(ep_idx.tolist(), offsets.tolist()))
    out = {k: np.stack([usable[i][k][s:s + length] for i, s in picks]).astype(np.float32) for k in keys}
    return Segments(out["obs"], out["act"], out["rew"], out.get("qpos"), out.get("qvel"))


def random_pairs(num_segments: int, num_pairs: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``num_pairs`` index pairs ``(i, j)`` with ``i != j`` drawn uniformly from ``num_segments`` segments."""
    if num_segments < 2:
        raise ValueError(f"num_segments must be >= 2 to form pairs, got {num_segments}")
    first = rng.integers(0, num_segments, size=num_pairs)
    second = (first + rng.integers(1, num_segments, size=num_pairs)) % num_segments
    return first, second
