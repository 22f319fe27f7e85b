"""Online preference-based RL (PEBBLE-style) on stable-baselines3 SAC and PPO with simulated humans.

Loop (Lee et al. 2021, arXiv 2106.05091; B-Pref teachers, arXiv 2111.03026): the agent acts in vectorised envs
whose reward is replaced by a learned reward ensemble (:func:`wrap_vec_env`). Every ``feedback_every`` env
steps :class:`PreferenceCallback` cuts candidate segment pairs from the agent's own buffer (SAC: replay buffer, PPO:
rollout buffer), a query selector from :mod:`mmalign.core.query` picks the queries, a teacher from
:mod:`mmalign.core.teachers` labels them, the ensemble is refitted on all labels so far and, for SAC, **the whole
replay buffer is relabelled in place** with the new reward. Optional unsupervised pre-training rewards state
entropy (k-NN particle estimate, as PEBBLE/APT) before the first query.

The config class lives here, heavy libraries (gymnasium, stable-baselines3) are imported inside functions.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch

from mmalign.config import Config, check_choice, check_nonnegative, check_positive, check_range, option

__all__ = ["PebbleConfig", "run", "train_agent", "check_setup", "FeedbackState"]

ProgressFn = Callable[[str], None]


@dataclasses.dataclass
class PebbleConfig(Config):
    """Online preference-based RL on one MuJoCo task (``robotics.pebble``)."""

    env_id: str = option("Reacher-v5", "gymnasium id of the task (true reward is hidden from the agent)")
    algo: Literal["sac", "ppo"] = option("sac", "stable-baselines3 learner: sac (relabels its replay buffer) or ppo")
    reward: Literal["learned", "true"] = option("learned", "learn from preferences, or train on the true reward")
    total_steps: int = option(12000, "env steps of agent training")
    seed: int = option(0, "seed of the env, agent, teacher and reward model")
    n_envs: int = option(1, "number of vectorised envs (DummyVecEnv)")
    teacher: str = option("oracle", "B-Pref teacher preset: oracle, stochastic, mistake, skip, myopic, equal")
    teacher_beta: float = option(0.0, "override the teacher's rationality beta (0 = keep the preset)")
    teacher_eps_mistake: float = option(-1.0, "override the teacher's label-flip probability (-1 = keep the preset)")
    teacher_shift_rewards: bool = option(
        True, "skip/equal teachers measure returns from the poorest candidate segment's (core teacher "
              "calibrate(reference='min')); B-Pref's thresholds eps*mean-return assume non-negative rewards, and "
              "oracle/stochastic/myopic/mistake labels do not depend on it")
    label_budget: int = option(500, "total number of queries asked (skipped ones count), at most this many")
    initial_labels: int = option(100, "queries in the first feedback round")
    labels_per_round: int = option(50, "queries in every later round")
    feedback_every: int = option(1000, "env steps between feedback rounds")
    first_feedback: int = option(1000, "env step of the first feedback round (after random/unsupervised steps)")
    segment_length: int = option(25, "steps per segment shown to the teacher")
    selector: str = option(
        "disagreement",
        "query selector from mmalign.core.query: uniform, disagreement, entropy, or routing (the teacher answers the "
        "most uncertain candidates within the budget, the reward ensemble pseudo-labels the confident ones)")
    candidate_factor: int = option(4, "candidate pairs per query for the selector (1 = no selection)")
    routing_confidence: float = option(
        0.9, "routing only: the ensemble pseudo-labels a candidate when its member-mean label entropy is at most "
             "that of P=routing_confidence (1 = never); pseudo-labels are redrawn every round, never counted as "
             "queries")
    recent_window: int = option(0, "draw candidate segments from the last this-many env steps only (0 = whole buffer)")
    reward_norm: bool = option(False, "standardise each member's learned reward over the replay buffer after every "
                                      "refit (mean 0, std 1) before relabelling and acting")
    ensemble_size: int = option(3, "reward ensemble members")
    rm_hidden: int = option(64, "hidden width of each reward MLP (two hidden layers)")
    rm_lr: float = option(3e-4, "reward model learning rate (Adam)")
    rm_epochs: int = option(50, "passes over all labels per feedback round")
    rm_batch_size: int = option(64, "pairs per reward-model gradient step")
    rm_label_smoothing: float = option(
        0.0, "fit the reward model to y(1-e)+e/2 instead of y (hard 0/1 labels push the tanh rewards into saturation)")
    normalize_obs: bool = option(True, "standardise reward-model inputs with obs stats frozen at the first round")
    normalize_act: bool = option(
        False, "standardise the reward model's action inputs with stats frozen at the first round (kept in the "
               "reward nets' buffers, saved with the model) and weight them by rm_act_weight")
    rm_act_weight: float = option(
        0.0, "normalize_act only: factor on the standardised actions; 0 = sqrt(obs_dim/act_dim), which gives the "
             "action block the same total input variance as the observation block")
    rm_action_squares: bool = option(
        False, "append the squared (standardised) actions to the reward model's input, so a quadratic control cost "
               "is linear in the features (the first-round reward otherwise ignores the action; see "
               "docs/methods/pebble.md)")
    unsup_steps: int = option(0, "steps of state-entropy pre-training before the first query (0 = off)")
    learning_starts: int = option(1000, "SAC random-action steps before gradient updates")
    net_width: int = option(64, "hidden width of the agent's actor and critic (two layers)")
    batch_size: int = option(128, "SAC minibatch / PPO minibatch size")
    learning_rate: float = option(3e-4, "agent learning rate")
    gamma: float = option(0.99, "agent discount")
    ppo_n_steps: int = option(1024, "PPO rollout length per env")
    eval_every: int = option(1000, "env steps between evaluations of true return")
    eval_episodes: int = option(5, "episodes per evaluation (deterministic policy, true reward)")
    relabel_batch: int = option(8192, "rows per reward-model call when relabelling the replay buffer")
    device: str = option("auto", "reward-model device: auto (cuda if present), cpu or cuda")
    save_reward_model: bool = option(True, "write reward_model.safetensors + .json to the run folder")

    def __post_init__(self) -> None:
        for name in ("total_steps", "n_envs", "label_budget", "initial_labels", "labels_per_round",
                     "feedback_every", "segment_length", "candidate_factor", "ensemble_size", "rm_hidden",
                     "rm_epochs", "rm_batch_size", "net_width", "batch_size", "ppo_n_steps", "eval_every",
                     "eval_episodes", "relabel_batch"):
            check_positive(name, getattr(self, name))
        for name in ("unsup_steps", "learning_starts", "first_feedback", "teacher_beta", "recent_window",
                     "rm_act_weight"):
            check_nonnegative(name, getattr(self, name))
        check_positive("rm_lr", self.rm_lr)
        check_positive("learning_rate", self.learning_rate)
        check_range("gamma", self.gamma, 0.0, 1.0, low_open=True)
        check_choice("algo", self.algo, ("sac", "ppo"))
        check_choice("reward", self.reward, ("learned", "true"))
        check_choice("teacher", self.teacher, ("oracle", "stochastic", "mistake", "skip", "myopic", "equal"))
        check_choice("selector", self.selector, ("uniform", "disagreement", "entropy", "routing"))
        if self.selector == "disagreement" and self.candidate_factor > 1 and self.ensemble_size < 2:
            raise ValueError(f"ensemble_size must be >= 2 for selector='disagreement' (the std over members), got "
                             f"{self.ensemble_size}")
        check_range("rm_label_smoothing", self.rm_label_smoothing, 0.0, 1.0, high_open=True)
        check_range("routing_confidence", self.routing_confidence, 0.5, 1.0, low_open=True)
        if self.recent_window and self.recent_window < self.segment_length:
            raise ValueError(f"recent_window must be 0 or >= segment_length={self.segment_length}, "
                             f"got {self.recent_window}")
        check_choice("device", self.device, ("auto", "cpu", "cuda"))
        if self.teacher_eps_mistake != -1.0:
            check_range("teacher_eps_mistake", self.teacher_eps_mistake, 0.0, 1.0)
        if self.reward == "learned" and self.label_budget < self.rm_batch_size:
            raise ValueError(
                f"label_budget must be >= rm_batch_size={self.rm_batch_size} (one reward-model batch), "
                f"got {self.label_budget}"
            )
        if self.rm_act_weight and not self.normalize_act:
            raise ValueError(f"rm_act_weight needs normalize_act=True (it weights standardised actions), "
                             f"got rm_act_weight={self.rm_act_weight} with normalize_act=False")
        if self.initial_labels > self.label_budget:
            raise ValueError(f"initial_labels must be <= label_budget={self.label_budget}, got {self.initial_labels}")
        if self.unsup_steps > self.first_feedback:
            raise ValueError(
                f"unsup_steps must be <= first_feedback={self.first_feedback} (pre-training ends at the first "
                f"query), got {self.unsup_steps}"
            )


def check_setup(cfg: PebbleConfig) -> None:
    """Checks that need gymnasium: known env id, segment no longer than an episode, Box spaces."""
    import gymnasium

    if cfg.env_id not in gymnasium.registry:
        close = [k for k in gymnasium.registry if cfg.env_id.split("-")[0].lower() in k.lower()][:5]
        raise ValueError(f"env_id {cfg.env_id!r} is not a registered gymnasium id (similar: {close})")
    spec = gymnasium.spec(cfg.env_id)
    if spec.max_episode_steps is not None and cfg.segment_length > spec.max_episode_steps:
        raise ValueError(
            f"segment_length must be <= the episode length of {cfg.env_id} ({spec.max_episode_steps}), "
            f"got {cfg.segment_length}"
        )
    env = gymnasium.make(cfg.env_id)
    try:
        if not isinstance(env.action_space, gymnasium.spaces.Box):
            raise ValueError(f"env_id must have a continuous (Box) action space, got {env.action_space}")
    finally:
        env.close()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but CUDA is not available")
    return torch.device(name)


def make_teacher(cfg: PebbleConfig) -> Any:
    """The B-Pref preset named in the config, with the optional beta / mistake overrides."""
    from mmalign.core.teachers import SimulatedHuman

    overrides: dict[str, Any] = {}
    if cfg.teacher_beta > 0:
        overrides["beta"] = cfg.teacher_beta
    if cfg.teacher_eps_mistake >= 0:
        overrides["eps_mistake"] = cfg.teacher_eps_mistake
    return SimulatedHuman.preset(cfg.teacher, **overrides)


# ------------------------------------------------------------------------------------------------ reward swap


def wrap_vec_env(venv: Any, reward_fn: Callable[[np.ndarray, np.ndarray], np.ndarray] | None) -> Any:
    """Wrap ``venv`` so that it hands out ``reward_fn(obs_before, action)`` (``None`` = true reward)."""
    from stable_baselines3.common.vec_env import VecEnvWrapper

    class _Swap(VecEnvWrapper):
        def __init__(self, venv: Any) -> None:
            super().__init__(venv)
            self.reward_fn = reward_fn
            self._obs: np.ndarray | None = None
            self._act: np.ndarray | None = None

        def reset(self) -> Any:
            self._obs = self.venv.reset()
            return self._obs

        def step_async(self, actions: np.ndarray) -> None:
            self._act = np.clip(actions, self.action_space.low, self.action_space.high)
            self.venv.step_async(actions)

        def step_wait(self) -> Any:
            obs, rew, dones, infos = self.venv.step_wait()
            for info, r in zip(infos, rew):
                info["true_reward"] = float(r)
            if self.reward_fn is not None:
                assert self._obs is not None and self._act is not None
                rew = np.asarray(self.reward_fn(self._obs, self._act), dtype=np.float32).reshape(rew.shape)
            self._obs = obs
            return obs, rew, dones, infos

    return _Swap(venv)


# ------------------------------------------------------------------------------------------------ feedback


class FeedbackState:
    """Labels gathered so far, the reward ensemble and the teacher: one feedback round at a time.

    Stores labelled pairs as ``(obs, act)`` segments of both sides and labels ``P(first ≻ second)``; skipped
    queries are counted against the budget but kept out of training (never labelled 0.5).
    """

    def __init__(self, cfg: PebbleConfig, obs_dim: int, act_dim: int, device: torch.device) -> None:
        from mmalign.robotics.reward_io import build_ensemble

        self.cfg = cfg
        self.device = device
        self.ensemble = build_ensemble(obs_dim, act_dim, cfg.ensemble_size, cfg.rm_hidden, seed=cfg.seed,
                                       input_norm=cfg.normalize_act, action_squares=cfg.rm_action_squares).to(device)
        self.act_weight = cfg.rm_act_weight or math.sqrt(obs_dim / act_dim)
        self.teacher = make_teacher(cfg)
        self.rng = np.random.default_rng(cfg.seed + 7919)
        self.teacher_rng = torch.Generator().manual_seed(cfg.seed + 104729)
        self.queries_used = 0
        self.rounds = 0
        self.pairs: dict[str, list[np.ndarray]] = {"obs1": [], "act1": [], "obs2": [], "act2": [], "y": []}
        self.true_returns: list[np.ndarray] = []  # [n, 2] true segment returns of answered pairs (for the report)
        self.history: list[dict[str, float]] = []
        # Reward-model input standardisation (small-scale features such as Reacher's fingertip-target vector are
        # otherwise hard to learn from a few hundred labels); frozen at the first round so the reward stays fixed
        # between refits.
        self.obs_mean = np.zeros(obs_dim, np.float32)
        self.obs_std = np.ones(obs_dim, np.float32)
        self.router: Any = None  # selector="routing": the core UncertaintyRouter, built on first use
        self.pseudo: dict[str, np.ndarray] = {}  # this round's confident ensemble labels (routing only)
        self.pseudo_total = self.pseudo_agree = self.pseudo_decisive = 0

    def _norm(self, obs: np.ndarray) -> np.ndarray:
        return (np.asarray(obs, np.float32) - self.obs_mean) / self.obs_std

    @property
    def budget_left(self) -> int:
        return self.cfg.label_budget - self.queries_used

    def round_size(self) -> int:
        want = self.cfg.initial_labels if self.rounds == 0 else self.cfg.labels_per_round
        return max(0, min(want, self.budget_left))

    @torch.no_grad()
    def member_rewards(self, obs: np.ndarray, act: np.ndarray, normalize: bool = False) -> torch.Tensor:
        """Per-member per-step rewards ``[K, *lead]`` for numpy ``obs [*lead, obs_dim]``, ``act [*lead, act_dim]``.

        ``normalize`` applies each member's stored reward standardisation (:meth:`fit_reward_norm`).
        """
        o = torch.as_tensor(self._norm(obs), dtype=torch.float32, device=self.device)
        a = torch.as_tensor(act, dtype=torch.float32, device=self.device)
        if o.dim() == 2:  # a batch of single steps: add a length-1 time axis for the [N, H] reward-model API
            return self.ensemble.step_rewards(o[:, None], a[:, None], normalize=normalize)[..., 0]
        return self.ensemble.step_rewards(o, a, normalize=normalize)

    def reward_fn(self, obs: np.ndarray, act: np.ndarray) -> np.ndarray:
        """Mean ensemble reward for a batch of single steps (the learned reward the agent sees)."""
        return self.member_rewards(obs, act, normalize=self.cfg.reward_norm).mean(0).cpu().numpy()

    @torch.no_grad()
    def fit_reward_norm(self, obs: np.ndarray, act: np.ndarray) -> None:
        """Standardise every member's per-step reward over ``obs [M, obs_dim]``, ``act [M, act_dim]`` (the buffer).

        A tanh ensemble fitted to confident labels has an arbitrary scale and offset (Bradley–Terry only fixes
        differences of segment returns); SAC's entropy temperature is tuned against the reward scale, so the scale
        is fixed to 1 here (B-Pref / PEBBLE leave it unnormalised).
        """
        o = torch.as_tensor(self._norm(obs), dtype=torch.float32, device=self.device)
        a = torch.as_tensor(act, dtype=torch.float32, device=self.device)
        self.ensemble.fit_normalization(o[:, None], a[:, None])

    def _candidates(self, segs: Any, num: int) -> tuple[np.ndarray, np.ndarray]:
        """``candidate_factor * num`` random candidate pairs, less those showing one window twice.

        Segments are drawn with replacement, so a pair can show one window twice: a guaranteed tie whose logit is 0
        for every member, i.e. maximal entropy, which the entropy selector and the router would pick first. Such
        pairs are dropped (unless fewer than ``num`` candidates would remain).
        """
        from mmalign.robotics.segments import random_pairs

        first, second = random_pairs(len(segs), num * self.cfg.candidate_factor, self.rng)
        same = ((segs.obs[first] == segs.obs[second]).all(axis=(1, 2))
                & (segs.act[first] == segs.act[second]).all(axis=(1, 2)))
        if (~same).sum() >= num:
            first, second = first[~same], second[~same]
        return first, second

    def select(self, segs: Any, num: int) -> tuple[np.ndarray, np.ndarray]:
        """Choose ``num`` query pairs among the random candidate pairs of :meth:`_candidates`."""
        from mmalign.robotics.reward_io import select_pairs

        first, second = self._candidates(segs, num)
        n_cand = len(first)
        if self.cfg.candidate_factor == 1 or self.cfg.selector == "uniform":
            keep = self.rng.choice(n_cand, size=num, replace=False)
        else:
            ret = self.member_rewards(segs.obs, segs.act).sum(-1)  # [K, N] segment returns per member
            keep = select_pairs(self.cfg.selector, ret[:, first], ret[:, second], num,
                                seed=int(self.rng.integers(2**31)))
        return first[keep], second[keep]

    def feedback_round(self, segs: Any) -> dict[str, float]:
        """Ask ``round_size()`` queries about pairs from ``segs``, refit the ensemble; returns round metrics."""
        from mmalign.robotics.reward_io import fit_ensemble

        num = self.round_size()
        if num == 0:
            return {}
        t0, c0 = time.perf_counter(), time.process_time()
        if self.rounds == 0 and self.cfg.normalize_obs:
            flat = segs.obs.reshape(-1, segs.obs.shape[-1])
            self.obs_mean = flat.mean(0).astype(np.float32)
            self.obs_std = np.maximum(flat.std(0), 1e-3).astype(np.float32)
        if self.rounds == 0 and self.cfg.normalize_act:
            o = torch.as_tensor(self._norm(segs.obs), dtype=torch.float32, device=self.device)
            a = torch.as_tensor(segs.act, dtype=torch.float32, device=self.device)
            from mmalign.core.reward_models import MLPRewardModel

            for member in self.ensemble._models():
                if isinstance(member, MLPRewardModel):  # always true here: built with input_norm in __init__
                    member.fit_input_normalization(o, a, act_weight=self.act_weight)
        raw = segs.true_rewards
        if self.teacher.eps_skip > 0 or self.teacher.eps_equal > 0:
            # thresholds measured from the poorest candidate segment's return (invariant to a constant reward offset)
            self.teacher.calibrate(raw, reference="min" if self.cfg.teacher_shift_rewards else "zero")
        extra: dict[str, float] = {}
        if self.cfg.selector == "routing":
            from mmalign.robotics.pebble_routing import route_round

            i, j, routed, extra = route_round(self, segs, num)
            costly = routed.costly.cpu()
            ok = routed.answered.cpu()[costly].numpy()
            y = routed.labels.cpu()[costly].numpy()
            # label statistics of the costly (teacher) labels only, like the other selectors report
            teacher_metrics = {"teacher/answered_fraction": float(ok.mean()) if ok.size else math.nan}
        else:
            i, j = self.select(segs, num)
            out = self.teacher(
                segs.true_rewards[i], segs.true_rewards[j], obs_first=segs.obs[i], obs_second=segs.obs[j],
                act_first=segs.act[i], act_second=segs.act[j], rng=self.teacher_rng,
            )
            ok = out.answered.cpu().numpy()
            y = out.labels.cpu().numpy()
            teacher_metrics = {k: float(v) for k, v in out.metrics.items()}
        self.queries_used += num
        self.rounds += 1
        self.pairs["obs1"].append(segs.obs[i][ok])
        self.pairs["act1"].append(segs.act[i][ok])
        self.pairs["obs2"].append(segs.obs[j][ok])
        self.pairs["act2"].append(segs.act[j][ok])
        self.pairs["y"].append(y[ok].astype(np.float32))
        self.true_returns.append(np.stack([raw[i][ok].sum(1), raw[j][ok].sum(1)], 1))
        train = {k: np.concatenate(v + ([self.pseudo[k]] if self.pseudo else [])) for k, v in self.pairs.items()}
        eps = self.cfg.rm_label_smoothing
        train["y"] = (train["y"] * (1.0 - eps) + 0.5 * eps).astype(np.float32)
        data = {k: torch.as_tensor(self._norm(v) if k.startswith("obs") else v, device=self.device)
                for k, v in train.items()}
        fit: dict[str, float] = {}
        if len(data["y"]):  # a skipping teacher may leave a round without any label: keep the ensemble as it is
            fit = fit_ensemble(
                self.ensemble, data["obs1"], data["act1"], data["obs2"], data["act2"], data["y"],
                epochs=self.cfg.rm_epochs, batch_size=self.cfg.rm_batch_size, lr=self.cfg.rm_lr,
                seed=self.cfg.seed + self.rounds,
            )
        metrics = dict(teacher_metrics)
        metrics.update(extra)
        metrics.update(fit)
        metrics.update({"feedback/queries_used": float(self.queries_used), "feedback/round": float(self.rounds),
                        "feedback/labels_train": float(len(data["y"])),
                        "time/feedback_s": time.perf_counter() - t0,
                        "time/feedback_cpu_s": time.process_time() - c0})
        self.history.append(metrics)
        return metrics

    def label_stats(self) -> dict[str, float]:
        """Totals over all rounds: queries, answered, ties, teacher agreement with the true-return order."""
        y = np.concatenate(self.pairs["y"]) if self.pairs["y"] else np.zeros(0)
        tr = np.concatenate(self.true_returns) if self.true_returns else np.zeros((0, 2))
        decisive = (y != 0.5) & (tr[:, 0] != tr[:, 1])
        agree = ((y > 0.5) == (tr[:, 0] > tr[:, 1]))[decisive]
        out = {
            "labels/queries": float(self.queries_used),
            "labels/answered": float(len(y)),
            "labels/skipped": float(self.queries_used - len(y)),
            "labels/ties": float((y == 0.5).sum()),
            "labels/first_preferred": float((y > 0.5).sum()),
            "labels/agreement_with_true_return": float(agree.mean()) if agree.size else math.nan,
            "labels/rounds": float(self.rounds),
        }
        if self.router is not None:
            out["labels/costly_spent"] = float(self.router.spent)  # == labels/queries: the router's own count
            out["labels/pseudo_total"] = float(self.pseudo_total)
            out["labels/pseudo_agreement_with_true_return"] = (
                self.pseudo_agree / self.pseudo_decisive if self.pseudo_decisive else math.nan)
        return out


def knn_entropy_bonus(states: torch.Tensor, reference: torch.Tensor, k: int = 5,
                      self_in_reference: bool = False) -> torch.Tensor:
    """State-entropy bonus ``log(1 + ||s − s_kNN||)`` against a reference sample (APT / PEBBLE pre-training).

    ``s_kNN`` is the ``k``-th nearest reference point (fewer when the reference is smaller).
    ``self_in_reference``: ``reference`` holds ``states`` themselves (at distance 0), so the ``k+1``-th nearest is
    taken.
    """
    d = torch.cdist(states, reference)
    n = reference.shape[0]
    if self_in_reference:
        kth = min(k, n - 1) + 1 if n > 1 else 1
    else:
        kth = min(k, n)
    return torch.log1p(d.kthvalue(kth, dim=1).values)


def _make_callback(cfg: PebbleConfig, state: FeedbackState | None, eval_fn: Callable[[Any], tuple[float, float]],
                   progress: ProgressFn | None) -> Any:
    """The SB3 callback that records true rewards, runs feedback rounds, relabels and evaluates."""
    from stable_baselines3.common.callbacks import BaseCallback

    from mmalign.robotics.segments import segments_from_buffer

    class PreferenceCallback(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.curve: list[dict[str, float]] = []
            self.next_feedback = cfg.first_feedback
            self.next_eval = 0
            self.relabel_s = 0.0  # process CPU seconds (robust on a shared machine)
            self.pending_row: int | None = None  # SAC: buffer row of the transition in flight at a feedback round
            self.record_s = 0.0
            self.t_start = time.perf_counter()

        def _buffer(self) -> Any:
            return self.model.replay_buffer if cfg.algo == "sac" else self.model.rollout_buffer

        def _on_training_start(self) -> None:
            buf = self._buffer()
            shape = (buf.buffer_size, buf.n_envs)
            self.true_rewards = np.zeros(shape, np.float32)
            self.ends = np.zeros(shape, bool)
            self._evaluate()

        def _evaluate(self) -> None:
            mean, std = eval_fn(self.model)
            row = {"step": float(self.num_timesteps), "eval/true_return": mean, "eval/true_return_std": std,
                   "time/elapsed_s": time.perf_counter() - self.t_start}
            if state is not None:
                row["feedback/queries_used"] = float(state.queries_used)
            self.curve.append(row)
            self.next_eval += cfg.eval_every
            if progress is not None:
                q = f", queries {state.queries_used}/{cfg.label_budget}" if state is not None else ""
                progress(f"step {self.num_timesteps:>7}/{cfg.total_steps}: true return {mean:8.2f} ± {std:.2f}{q}")

        def _on_step(self) -> bool:
            t0 = time.process_time()
            buf = self._buffer()
            pos = buf.pos  # index the coming transition will be written to (on_step runs before storing)
            infos, dones = self.locals["infos"], self.locals["dones"]
            if pos < buf.buffer_size:
                self.true_rewards[pos] = [info.get("true_reward", 0.0) for info in infos]
                self.ends[pos] = dones
            self.record_s += time.process_time() - t0
            if state is not None and cfg.algo == "sac" and self.num_timesteps >= self.next_feedback:
                self._feedback()
                # SB3 stores this step's transition after on_step, with the reward computed before the refit (or
                # the entropy bonus): its row is relabelled once stored, at _on_rollout_end (before any update)
                self.pending_row = pos
            if self.num_timesteps >= self.next_eval:
                self._evaluate()
            return True

        def _on_rollout_end(self) -> None:
            if self.pending_row is not None:
                self._relabel_rows(self.pending_row, self.pending_row + 1)
                self.pending_row = None
            if state is not None and cfg.algo == "ppo" and self.num_timesteps >= self.next_feedback:
                self._feedback()

        def _feedback(self) -> None:
            self.next_feedback += cfg.feedback_every
            if state is None or state.round_size() == 0:
                return
            buf = self._buffer()
            num = 2 * state.round_size() * cfg.candidate_factor
            low, high = self.model.action_space.low, self.model.action_space.high
            if cfg.algo == "sac":
                unscale = self.model.policy.unscale_action
            else:
                def unscale(a: np.ndarray) -> np.ndarray:
                    return np.clip(a, low, high)
            segs = segments_from_buffer(buf, self.true_rewards, self.ends, cfg.segment_length, num, state.rng,
                                        unscale_action=unscale, recent=cfg.recent_window or None)
            metrics = state.feedback_round(segs)
            if cfg.reward_norm:
                size = buf.buffer_size if getattr(buf, "full", False) else buf.pos
                rows = state.rng.choice(size, size=min(size, 20_000), replace=False)
                obs = buf.observations[rows].reshape(-1, buf.observations.shape[-1])
                act = unscale(buf.actions[rows]).reshape(-1, buf.actions.shape[-1])
                state.fit_reward_norm(obs, act)
            if cfg.unsup_steps:
                self.training_env.reward_fn = state.reward_fn  # pre-training over: learned reward from now on
            if cfg.algo == "sac":
                self.relabel()
            for k, v in metrics.items():
                self.logger.record(k, v)
            if progress is not None:
                progress(f"step {self.num_timesteps:>7}: feedback round {state.rounds}, queries "
                         f"{state.queries_used}/{cfg.label_budget}, reward-model accuracy "
                         f"{metrics.get('train/pref_accuracy', float('nan')):.3f}")

        def relabel(self) -> int:
            """Overwrite the replay buffer's rewards with the current ensemble mean, in batches; rows relabelled.

            The transition of the step that triggered the round is not stored yet; :meth:`_on_rollout_end`
            relabels its row once SB3 has stored it.
            """
            buf = self._buffer()
            size = buf.buffer_size if buf.full else buf.pos
            self._relabel_rows(0, size)
            return size

        def _relabel_rows(self, start: int, stop: int) -> None:
            """Relabel replay-buffer rows ``start:stop`` (all envs) with the current ensemble mean, in batches."""
            assert state is not None
            t0 = time.process_time()
            buf = self._buffer()
            for a in range(start, stop, cfg.relabel_batch):
                b = min(stop, a + cfg.relabel_batch)
                act = self.model.policy.unscale_action(buf.actions[a:b])
                buf.rewards[a:b] = state.reward_fn(buf.observations[a:b], act)
            self.relabel_s += time.process_time() - t0

    return PreferenceCallback()


def train_agent(cfg: PebbleConfig, run_dir: Path | None = None, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Train one agent (learned or true reward); returns curve, final metrics, label stats and the models."""
    import gymnasium
    from stable_baselines3 import PPO, SAC
    from stable_baselines3.common.env_util import make_vec_env

    check_setup(cfg)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    probe = gymnasium.make(cfg.env_id)
    obs_dim = int(np.prod(probe.observation_space.shape))
    act_dim = int(np.prod(probe.action_space.shape))
    probe.close()
    state = FeedbackState(cfg, obs_dim, act_dim, device) if cfg.reward == "learned" else None
    venv = make_vec_env(cfg.env_id, n_envs=cfg.n_envs, seed=cfg.seed)
    reward_fn = None
    if state is not None:
        reward_fn = state.reward_fn
        if cfg.unsup_steps:
            reward_fn = _entropy_reward_fn(cfg, device)
    venv = wrap_vec_env(venv, reward_fn)
    eval_env = gymnasium.make(cfg.env_id)

    def eval_fn(model: Any) -> tuple[float, float]:
        returns = []
        for k in range(cfg.eval_episodes):
            obs, _ = eval_env.reset(seed=10_000 * (cfg.seed + 1) + k)
            done, total = False, 0.0
            while not done:
                action, _ = model.predict(obs, deterministic=True)
                obs, r, term, trunc, _ = eval_env.step(action)
                total += float(r)
                done = term or trunc
            returns.append(total)
        return float(np.mean(returns)), float(np.std(returns))

    net = dict(net_arch=[cfg.net_width, cfg.net_width])
    if cfg.algo == "sac":
        model = SAC("MlpPolicy", venv, learning_rate=cfg.learning_rate, batch_size=cfg.batch_size,
                    learning_starts=cfg.learning_starts, gamma=cfg.gamma, policy_kwargs=net, seed=cfg.seed,
                    buffer_size=max(cfg.total_steps, 1000), device="cpu", verbose=0)
    else:
        model = PPO("MlpPolicy", venv, learning_rate=cfg.learning_rate, n_steps=cfg.ppo_n_steps,
                    batch_size=cfg.batch_size, gamma=cfg.gamma, policy_kwargs=net, seed=cfg.seed, device="cpu",
                    verbose=0)
    callback = _make_callback(cfg, state, eval_fn, progress)
    t0 = time.perf_counter()
    model.learn(total_timesteps=cfg.total_steps, callback=callback)
    wall = time.perf_counter() - t0
    if callback.curve[-1]["step"] < model.num_timesteps:
        callback._evaluate()
    eval_env.close()
    result: dict[str, Any] = {
        "curve": callback.curve,
        "final_true_return": callback.curve[-1]["eval/true_return"],
        "wall_s": wall,
        "relabel_s": callback.relabel_s,
        "record_s": callback.record_s,
        "model": model,
        "state": state,
    }
    if state is not None:
        result["labels"] = state.label_stats()
        result["feedback_history"] = state.history
        result["feedback_s"] = float(sum(h.get("time/feedback_s", 0.0) for h in state.history))
        result["feedback_cpu_s"] = float(sum(h.get("time/feedback_cpu_s", 0.0) for h in state.history))
        if run_dir is not None and cfg.save_reward_model:
            from mmalign.robotics.reward_io import save_reward_model

            save_reward_model(state.ensemble, Path(run_dir) / "reward_model.safetensors", cfg.env_id, obs_dim, act_dim,
                              obs_mean=state.obs_mean, obs_std=state.obs_std)
    return result


def _entropy_reward_fn(cfg: PebbleConfig, device: torch.device) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Unsupervised pre-training reward: k-NN state entropy against the states seen so far (kept on ``device``)."""
    seen: list[torch.Tensor] = []

    def fn(obs: np.ndarray, act: np.ndarray) -> np.ndarray:
        s = torch.as_tensor(obs, dtype=torch.float32, device=device).reshape(len(obs), -1)
        ref = torch.cat(seen[-cfg.unsup_steps:]) if seen else s
        bonus = knn_entropy_bonus(s, ref, self_in_reference=not seen)
        seen.append(s)
        return bonus.cpu().numpy()

    return fn


def run(cfg: PebbleConfig, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    """``mmalign robotics pebble``: train one agent, write ``curve.jsonl``, ``summary`` metrics and a curve plot."""
    run_dir = Path(run_dir)
    if resume:
        raise ValueError("resume=True is not supported by robotics.pebble (SB3 runs are short); start a new run")
    result = train_agent(cfg, run_dir, progress=lambda m: print(m, flush=True))
    with open(run_dir / "curve.jsonl", "w") as fh:
        for row in result["curve"]:
            fh.write(json.dumps(row) + "\n")
    if "feedback_history" in result:
        (run_dir / "feedback.json").write_text(json.dumps(result["feedback_history"], indent=1))
    from mmalign.robotics.report import plot_curves

    plot_curves({f"SAC ({cfg.reward} reward)" if cfg.algo == "sac" else f"PPO ({cfg.reward} reward)": result["curve"]},
                run_dir / "curve.png", title=cfg.env_id)
    summary = {"eval/true_return": result["final_true_return"], "time/wall_s": result["wall_s"],
               "time/relabel_s": result["relabel_s"]}
    summary.update(result.get("labels", {}))
    return summary
