"""SB3 callbacks of online preference-based RL: feedback rounds with buffer relabelling, and true-return curves.

Both are ordinary ``BaseCallback`` s, so they sit in a ``CallbackList`` next to a user's own callbacks (an
``EvalCallback``, a checkpoint callback ...)::

    venv = RewardVecEnvWrapper(make_vec_env("Reacher-v5"), reward_fn=feedback.reward_fn)
    model = SAC("MlpPolicy", venv)
    model.learn(10_000, callback=CallbackList([PreferenceFeedbackCallback(feedback, sampler), EvalCallback(...)]))

:class:`PreferenceFeedbackCallback` keeps the true rewards and episode ends of every stored transition beside the
agent's buffer (the buffer's own rewards are learned ones) — and, for a teacher that draws segments
(``teacher.wants_states``, people in the labelling app), the MuJoCo ``qpos``/``qvel`` before each transition —, runs a
:class:`~mmalign.robotics.feedback.PreferenceFeedback` round on the schedule (off-policy agents: after a step;
on-policy agents: at the end of a rollout), and for off-policy agents **relabels the whole replay buffer in place**
with the refitted reward. Rounds stop when the label budget is spent, and a round due when training has already
reached ``total_timesteps`` is not asked: no later step would use its labels.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm

from mmalign.robotics.feedback import PreferenceFeedback
from mmalign.robotics.segments import SegmentSampler
from mmalign.robotics.wrappers import action_features, find_reward_wrapper

__all__ = ["PreferenceFeedbackCallback", "TrueReturnCallback", "buffer_action_features"]

ProgressFn = Callable[[str], None]


def buffer_action_features(model: BaseAlgorithm) -> Callable[[np.ndarray], np.ndarray]:
    """Map actions as ``model`` stores them in its buffer to the reward model's action features.

    Off-policy Box agents store actions scaled to ``[-1, 1]`` (unscaled back to env units); on-policy agents store
    the raw policy output (clipped to the box, as the env applied it); Discrete actions become one-hot.
    """
    from gymnasium import spaces

    space = model.action_space
    if isinstance(space, spaces.Box) and isinstance(model, OffPolicyAlgorithm):
        unscale = model.policy.unscale_action
        return lambda a: unscale(a)
    return lambda a: action_features(space, a)


class PreferenceFeedbackCallback(BaseCallback):
    """Feedback rounds on the agent's own experience; the env must be wrapped in a
    :class:`~mmalign.robotics.wrappers.RewardVecEnvWrapper`.

    Args:
        feedback: budget, selector, teacher and reward trainer (:class:`PreferenceFeedback`).
        sampler: cuts candidate segments from the agent's buffer (:class:`~mmalign.robotics.segments.SegmentSampler`).
        candidate_factor: segments sampled per round = ``2 × round size × candidate_factor``.
        relabel_batch: rows per reward-model call when relabelling the replay buffer.
        reward_norm_rows: off-policy agents with ``trainer.reward_norm``: buffer rows the reward is standardised on.
        progress: optional ``print``-like function for one line per round.
    """

    def __init__(self, feedback: PreferenceFeedback, sampler: SegmentSampler, *, candidate_factor: int = 1,
                 relabel_batch: int = 8192, reward_norm_rows: int = 20_000, progress: ProgressFn | None = None,
                 verbose: int = 0) -> None:
        super().__init__(verbose)
        self.feedback, self.sampler = feedback, sampler
        self.candidate_factor, self.relabel_batch = candidate_factor, relabel_batch
        self.reward_norm_rows = reward_norm_rows
        self.progress = progress
        self.next_feedback = feedback.schedule.first_feedback
        self.relabel_s = 0.0  # process CPU seconds (robust on a shared machine)
        self.record_s = 0.0
        self.pending_row: int | None = None  # off-policy: buffer row of the transition in flight at a round
        self.skipped_after_end = 0  # rounds due at the last step (never asked: no step would learn from them)
        self.record_states = bool(getattr(feedback.teacher, "wants_states", False))
        self.qpos: np.ndarray | None = None  # [buffer_size, n_envs, nq] when recorded
        self.qvel: np.ndarray | None = None

    @property
    def off_policy(self) -> bool:
        return isinstance(self.model, OffPolicyAlgorithm)

    def _buffer(self) -> Any:
        return self.model.replay_buffer if self.off_policy else self.model.rollout_buffer

    def _init_callback(self) -> None:
        self.wrapper = find_reward_wrapper(self.training_env)
        if self.wrapper is None:
            raise ValueError("PreferenceFeedbackCallback needs the agent's env wrapped in RewardVecEnvWrapper "
                             "(it reads the true reward from info['true_reward'] and swaps in the learned one)")
        self.to_features = buffer_action_features(self.model)

    def _on_training_start(self) -> None:
        buf = self._buffer()
        shape = (buf.buffer_size, buf.n_envs)
        self.true_rewards = np.zeros(shape, np.float32)
        self.ends = np.zeros(shape, bool)
        if self.record_states:  # the state the env is in now is the one of the first stored observation
            self.last_state = self._read_states()
            self.qpos = np.zeros((*shape, self.last_state[0].shape[1]), np.float32)
            self.qvel = np.zeros((*shape, self.last_state[1].shape[1]), np.float32)

    def _on_step(self) -> bool:
        t0 = time.process_time()
        buf = self._buffer()
        pos = buf.pos  # index the coming transition will be written to (on_step runs before storing)
        infos, dones = self.locals["infos"], self.locals["dones"]
        if pos < buf.buffer_size:
            self.true_rewards[pos] = [info.get("true_reward", 0.0) for info in infos]
            self.ends[pos] = dones
            if self.qpos is not None and self.qvel is not None:
                self.qpos[pos], self.qvel[pos] = self.last_state
        if self.record_states:  # after the step (and any auto-reset): the state of the next stored observation
            self.last_state = self._read_states()
        self.record_s += time.process_time() - t0
        if self.off_policy and self.num_timesteps >= self.next_feedback:
            self._feedback()
            # SB3 stores this step's transition after on_step, with the reward computed before the refit (or the
            # pre-training reward): its row is relabelled once stored, at _on_rollout_end (before any update)
            self.pending_row = pos
        return True

    def _on_rollout_end(self) -> None:
        if self.pending_row is not None:
            self._relabel_rows(self.pending_row, self.pending_row + 1)
            self.pending_row = None
        if not self.off_policy and self.num_timesteps >= self.next_feedback:
            self._feedback()

    def _feedback(self) -> None:
        fb = self.feedback
        self.next_feedback += fb.schedule.feedback_every
        if fb.round_size() == 0:
            return
        if self.num_timesteps >= self.model._total_timesteps:
            # training ends with this step (rollout): no later action would be chosen under the refitted reward, so
            # the round's labels would be spent for nothing
            self.skipped_after_end += 1
            return
        buf = self._buffer()
        num = 2 * fb.round_size() * self.candidate_factor
        segs = self.sampler.from_buffer(buf, self.true_rewards, self.ends, num, fb.rng, self.to_features,
                                        qpos=self.qpos, qvel=self.qvel)
        metrics = fb.feedback_round(segs)
        if fb.trainer.reward_norm:
            size = buf.buffer_size if getattr(buf, "full", False) else buf.pos
            rows = fb.rng.choice(size, size=min(size, self.reward_norm_rows), replace=False)
            stored = self._observations(buf)
            obs = stored[rows].reshape(-1, *stored.shape[2:])
            act = self.to_features(buf.actions[rows]).reshape(len(rows) * buf.n_envs, -1)
            fb.trainer.fit_reward_norm(obs, act)
        self.wrapper.reward_fn = fb.reward_fn  # from the first round on, the agent sees the learned reward
        if self.off_policy:
            self.relabel()
        for k, v in metrics.items():
            self.logger.record(k, v)
        if self.progress is not None:
            self.progress(f"step {self.num_timesteps:>7}: feedback round {fb.rounds}, queries "
                          f"{fb.queries_used}/{fb.schedule.label_budget}, reward-model accuracy "
                          f"{metrics.get('train/pref_accuracy', float('nan')):.3f}")

    def _read_states(self) -> tuple[np.ndarray, np.ndarray]:
        """``(qpos [n_envs, nq], qvel [n_envs, nv])`` of every env now (``env.unwrapped.data``)."""
        try:
            data = self.training_env.get_attr("data")
        except AttributeError:
            raise ValueError(f"teacher {type(self.feedback.teacher).__name__} draws segments from MuJoCo states, but "
                             f"the env has no MuJoCo data (env.unwrapped.data)") from None
        return np.stack([d.qpos for d in data]), np.stack([d.qvel for d in data])

    def _observations(self, buf: Any) -> Any:
        """The buffer's observations as the reward model sees them (the ``obs_key`` entry of dict observations)."""
        obs = buf.observations
        return obs[self.sampler.obs_key] if isinstance(obs, dict) else obs

    def relabel(self) -> int:
        """Overwrite the replay buffer's rewards with the current learned reward, in batches; rows relabelled.

        The transition of the step that triggered the round is not stored yet; :meth:`_on_rollout_end` relabels its
        row once SB3 has stored it.
        """
        buf = self._buffer()
        size = buf.buffer_size if buf.full else buf.pos
        self._relabel_rows(0, size)
        return size

    def _relabel_rows(self, start: int, stop: int) -> None:
        """Relabel replay-buffer rows ``start:stop`` (all envs) with the current learned reward, in batches."""
        t0 = time.process_time()
        buf = self._buffer()
        n_envs = buf.n_envs
        for a in range(start, stop, self.relabel_batch):
            b = min(stop, a + self.relabel_batch)
            act = self.to_features(buf.actions[a:b])
            obs = self._observations(buf)[a:b]
            if n_envs == 1 or obs.ndim == act.ndim:
                buf.rewards[a:b] = self.feedback.reward_fn(obs, act)
            else:  # [rows, n_envs, ...] flattened for the reward model's batch of single steps
                flat = self.feedback.reward_fn(obs.reshape(-1, *obs.shape[2:]), act.reshape(-1, act.shape[-1]))
                buf.rewards[a:b] = flat.reshape(b - a, n_envs)
        self.relabel_s += time.process_time() - t0


class TrueReturnCallback(BaseCallback):
    """Evaluate ``eval_fn(model) -> (mean, std)`` of the true return every ``eval_every`` env steps (and at the
    start); rows go to :attr:`curve` (with the queries used so far when ``feedback`` is given)."""

    def __init__(self, eval_fn: Callable[[Any], tuple[float, float]], eval_every: int, *,
                 feedback: PreferenceFeedback | None = None, total_steps: int | None = None,
                 progress: ProgressFn | None = None, verbose: int = 0) -> None:
        super().__init__(verbose)
        self.eval_fn, self.eval_every, self.feedback = eval_fn, eval_every, feedback
        self.total_steps, self.progress = total_steps, progress
        self.curve: list[dict[str, float]] = []
        self.next_eval = 0
        self.t_start = time.perf_counter()

    def _on_training_start(self) -> None:
        self.evaluate()

    def evaluate(self) -> None:
        mean, std = self.eval_fn(self.model)
        row = {"step": float(self.num_timesteps), "eval/true_return": mean, "eval/true_return_std": std,
               "time/elapsed_s": time.perf_counter() - self.t_start}
        fb = self.feedback
        if fb is not None:
            row["feedback/queries_used"] = float(fb.queries_used)
        self.curve.append(row)
        self.next_eval += self.eval_every
        if self.progress is not None:
            q = f", queries {fb.queries_used}/{fb.schedule.label_budget}" if fb is not None else ""
            total = self.total_steps if self.total_steps is not None else self.model._total_timesteps
            self.progress(f"step {self.num_timesteps:>7}/{total}: true return {mean:8.2f} ± {std:.2f}{q}")

    def _on_step(self) -> bool:
        if self.num_timesteps >= self.next_eval:
            self.evaluate()
        return True
