"""Online preference-based RL (PEBBLE-style): ``mmalign robotics pebble``, built on the parts of the PbRL loop.

Loop (Lee et al. 2021, arXiv 2106.05091; B-Pref teachers, arXiv 2111.03026): the agent acts in vectorised envs
whose reward is replaced by a learned reward ensemble (:class:`~mmalign.robotics.wrappers.RewardVecEnvWrapper`).
Every ``feedback_every`` env steps :class:`~mmalign.robotics.callbacks.PreferenceFeedbackCallback` cuts candidate
segment pairs from the agent's own buffer (off-policy: replay buffer, on-policy: rollout buffer), a query selector
from :mod:`mmalign.core.query` picks the queries, a teacher from ``mmalign.registry.TEACHERS`` labels them, the
ensemble is refitted on all labels so far (:mod:`mmalign.robotics.feedback`) and, for off-policy agents, **the whole
replay buffer is relabelled in place** with the new reward. Optional unsupervised pre-training rewards state
entropy (k-NN particle estimate, as PEBBLE/APT) before the first query.

This module holds the job's config (:class:`PebbleConfig`), builds the parts from it (:func:`build_feedback`) and
runs them (:func:`train_agent`); heavy libraries (gymnasium, stable-baselines3) are imported inside functions.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import time
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch

from mmalign.config import Config, check_choice, check_nonnegative, check_positive, check_range, option
from mmalign.core.reward_models import resolve_device

__all__ = ["PebbleConfig", "run", "train_agent", "check_setup", "build_feedback", "build_teacher", "FeedbackState",
           "knn_entropy_bonus"]

ProgressFn = Callable[[str], None]


@dataclasses.dataclass
class PebbleConfig(Config):
    """Online preference-based RL on one MuJoCo task (``robotics.pebble``)."""

    env_id: str = option("Reacher-v5", "gymnasium id of the task, or 'module:Id' (the module is imported first and "
                                       "registers Id); the true reward is hidden from the agent")
    algo: str = option("sac", "stable-baselines3 learner: sac, td3 (Box actions), dqn (Discrete), ppo or a2c; "
                              "off-policy learners have their replay buffer relabelled after every round")
    reward: Literal["learned", "true"] = option("learned", "learn from preferences, or train on the true reward")
    total_steps: int = option(12000, "env steps of agent training")
    seed: int = option(0, "seed of the env, agent, teacher and reward model")
    n_envs: int = option(1, "number of vectorised envs")
    vec_env: Literal["dummy", "subproc"] = option("dummy", "dummy: envs stepped in this process; subproc: one "
                                                           "process per env (SB3 SubprocVecEnv)")
    frame_stack: int = option(0, "stack this many frames of image observations (0 = off)")
    obs_key: str = option("", "dict observations: the entry the reward model sees (an image or a vector); the agent "
                              "sees them all (SB3 MultiInputPolicy)")
    teacher: str | dict[str, Any] = option(
        "oracle", "teacher by name from mmalign.registry.TEACHERS (oracle, stochastic, mistake, skip, myopic, equal, "
                  "...), with per-field overrides teacher.<field>=value (e.g. teacher.eps_mistake=0.2)")
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
        "query selector from mmalign.registry.QUERY_SELECTORS: uniform, disagreement, entropy, or routing (the teacher "
        "answers the most uncertain candidates within the budget, the reward ensemble pseudo-labels the confident "
        "ones)")
    candidate_factor: int = option(4, "candidate pairs per query for the selector (1 = no selection)")
    routing_confidence: float = option(
        0.9, "routing only: the ensemble pseudo-labels a candidate when its member-mean label entropy is at most "
             "that of P=routing_confidence (1 = never); pseudo-labels are redrawn every round, never counted as "
             "queries")
    recent_window: int = option(0, "draw candidate segments from the last this-many env steps only (0 = whole buffer)")
    reward_norm: bool = option(False, "standardise each member's learned reward over the replay buffer after every "
                                      "refit (mean 0, std 1) before relabelling and acting")
    reward_model: str | dict[str, Any] = option(
        "mlp", "reward-model member by name from mmalign.registry.REWARD_MODELS (mlp for vector observations, cnn for "
               "images), with per-field overrides reward_model.<field>=value passed to its constructor")
    ensemble_size: int = option(3, "reward ensemble members")
    rm_hidden: int = option(64, "mlp only: hidden width of each reward MLP (two hidden layers)")
    rm_lr: float = option(3e-4, "reward model learning rate (Adam)")
    rm_epochs: int = option(50, "passes over all labels per feedback round")
    rm_batch_size: int = option(64, "pairs per reward-model gradient step")
    rm_label_smoothing: float = option(
        0.0, "fit the reward model to y(1-e)+e/2 instead of y (hard 0/1 labels push the tanh rewards into saturation)")
    normalize_obs: bool = option(True, "standardise reward-model inputs with obs stats frozen at the first round")
    normalize_act: bool = option(
        False, "standardise the reward model's action inputs with stats frozen at the first round (kept in the "
               "reward nets' buffers, saved with the model) and weight them by rm_act_weight")
    rm_act_weight: float | None = option(
        None, "normalize_act only: factor (> 0) on the standardised actions; null = sqrt(obs_dim/act_dim), which "
              "gives the action block the same total input variance as the observation block")
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
    save_reward_model: bool = option(True, "write the learned reward to the run folder: reward_model/ (config.json + "
                                           "model.safetensors, for LearnedReward-v0) and reward_model.safetensors")

    def __post_init__(self) -> None:
        for name in ("total_steps", "n_envs", "label_budget", "initial_labels", "labels_per_round",
                     "feedback_every", "segment_length", "candidate_factor", "ensemble_size", "rm_hidden",
                     "rm_epochs", "rm_batch_size", "net_width", "batch_size", "ppo_n_steps", "eval_every",
                     "eval_episodes", "relabel_batch"):
            check_positive(name, getattr(self, name))
        for name in ("unsup_steps", "learning_starts", "first_feedback", "recent_window", "frame_stack"):
            check_nonnegative(name, getattr(self, name))
        if self.rm_act_weight is not None:
            check_positive("rm_act_weight", self.rm_act_weight)
        check_positive("rm_lr", self.rm_lr)
        check_positive("learning_rate", self.learning_rate)
        check_range("gamma", self.gamma, 0.0, 1.0, low_open=True)
        from mmalign.registry import QUERY_SELECTORS, REWARD_MODELS, TEACHERS

        check_choice("algo", self.algo, ("sac", "td3", "ppo", "a2c", "dqn"))
        check_choice("reward", self.reward, ("learned", "true"))
        check_choice("selector", self.selector, QUERY_SELECTORS.names())
        check_part("teacher", self.teacher, TEACHERS)
        check_part("reward_model", self.reward_model, REWARD_MODELS)
        if self.selector == "disagreement" and self.candidate_factor > 1 and self.ensemble_size < 2:
            raise ValueError(f"ensemble_size must be >= 2 for selector='disagreement' (the std over members), got "
                             f"{self.ensemble_size}")
        check_range("rm_label_smoothing", self.rm_label_smoothing, 0.0, 1.0, high_open=True)
        check_range("routing_confidence", self.routing_confidence, 0.5, 1.0, low_open=True)
        if self.recent_window and self.recent_window < self.segment_length:
            raise ValueError(f"recent_window must be 0 or >= segment_length={self.segment_length}, "
                             f"got {self.recent_window}")
        check_choice("device", self.device, ("auto", "cpu", "cuda"))
        if self.reward == "learned" and self.label_budget < self.rm_batch_size:
            raise ValueError(
                f"label_budget must be >= rm_batch_size={self.rm_batch_size} (one reward-model batch), "
                f"got {self.label_budget}"
            )
        if self.rm_act_weight is not None and not self.normalize_act:
            raise ValueError(f"rm_act_weight needs normalize_act=True (it weights standardised actions), "
                             f"got rm_act_weight={self.rm_act_weight} with normalize_act=False")
        if self.initial_labels > self.label_budget:
            raise ValueError(f"initial_labels must be <= label_budget={self.label_budget} (the budget is smaller than "
                             f"the first query batch), got {self.initial_labels}")
        if self.unsup_steps > self.first_feedback:
            raise ValueError(
                f"unsup_steps must be <= first_feedback={self.first_feedback} (pre-training ends at the first "
                f"query), got {self.unsup_steps}"
            )


def part_spec(value: str | dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``"mistake"`` or ``{"name": "mistake", "eps_mistake": 0.2}`` -> ``("mistake", {"eps_mistake": 0.2})``."""
    if isinstance(value, str):
        return value, {}
    fields = dict(value)
    return fields.pop("name", ""), fields


def check_part(field: str, value: str | dict[str, Any], registry: Any) -> None:
    """A registry name (with optional per-field overrides) that exists and whose overrides its constructor takes."""
    if not isinstance(value, (str, dict)):
        raise ValueError(f"{field} must be a name or a mapping with 'name', got {value!r}")
    name, fields = part_spec(value)
    if not name:
        raise ValueError(f"{field} needs a name ({field}=<name>) besides its fields {sorted(fields)}")
    if name not in registry:
        raise ValueError(f"{field} must be a registered {registry.kind}, one of {registry.names()}, got {name!r}")
    try:
        params = inspect.signature(registry.get(name)).parameters
    except (TypeError, ValueError):  # no introspectable signature: the constructor checks when it is built
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    for key in fields:
        if key not in params:
            allowed = [k for k, p in params.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL]
            raise ValueError(f"{field}.{key} is not a field of {registry.kind} {name!r}; allowed: {allowed}")


#: constructor fields that take another teacher (``LabelFlipTeacher.base``, ``HindsightTeacher.judge``): given by name
#: or as a mapping with ``name``, they are built first
_TEACHER_FIELDS = ("base", "judge")


def build_teacher(value: str | dict[str, Any]) -> Any:
    """The ``TEACHERS`` entry named in ``value``, built with its per-field overrides; a wrapped teacher is named like
    any other, e.g. ``{"name": "label_flip", "base": "oracle", "flip_rate": 0.2}``."""
    from mmalign.core.teachers.base import Teacher
    from mmalign.registry import TEACHERS

    name, fields = part_spec(value)
    for key in _TEACHER_FIELDS:
        if isinstance(fields.get(key), (str, dict)) and not isinstance(fields[key], Teacher):
            fields[key] = build_teacher(fields[key])
    try:
        return TEACHERS.get(name)(**fields)
    except (TypeError, ValueError, KeyError) as err:  # KeyError: an unknown name (a wrapped teacher's)
        raise ValueError(f"teacher {name!r} with {fields}: {err}") from None


def check_setup(cfg: PebbleConfig) -> None:
    """Checks that need gymnasium, all before any training: a known env id (``module:Id`` imports the module), a
    segment no longer than an episode, Box or Discrete actions, vector or image observations, an algorithm that fits
    the action space, a buildable teacher that has the true reward it needs, a reward model for the observations."""
    from gymnasium import spaces

    from mmalign.robotics.loop import check_teacher_env, observation_kind, resolve_env
    from mmalign.robotics.wrappers import check_action_space

    env = resolve_env(cfg.env_id)()
    try:
        spec = env.spec
        if spec is not None and spec.max_episode_steps is not None and cfg.segment_length > spec.max_episode_steps:
            raise ValueError(f"segment_length must be <= the episode length of {cfg.env_id} "
                             f"({spec.max_episode_steps}), got {cfg.segment_length}")
        check_action_space(env.action_space, f"env_id {cfg.env_id!r}")
        kind = observation_kind(env.observation_space, cfg.obs_key or None)
        if cfg.unsup_steps and isinstance(env.observation_space, spaces.Dict):
            raise ValueError("unsup_steps (state-entropy pre-training) needs Box observations, got a Dict space")
        discrete = isinstance(env.action_space, spaces.Discrete)
        if discrete and cfg.algo in ("sac", "td3"):
            raise ValueError(f"algo {cfg.algo!r} needs a Box action space, but {cfg.env_id} has {env.action_space}; "
                             f"use dqn, ppo or a2c")
        if not discrete and cfg.algo == "dqn":
            raise ValueError(f"algo 'dqn' needs a Discrete action space, but {cfg.env_id} has {env.action_space}")
        name, _ = part_spec(cfg.reward_model)
        if cfg.reward == "learned":
            if kind == "image" and name == "mlp":
                raise ValueError(f"{cfg.env_id} has image observations {env.observation_space.shape}: use "
                                 f"reward_model=cnn")
            if name != "mlp" and (cfg.normalize_act or cfg.rm_action_squares):
                raise ValueError(f"normalize_act and rm_action_squares need reward_model=mlp, got {name!r}")
            # the routing selector's rounds pass no simulator states to the teacher
            check_teacher_env(build_teacher(cfg.teacher), _MetaView(env), cfg.env_id,
                              states=cfg.selector != "routing")
        if cfg.frame_stack and kind != "image":
            raise ValueError(f"frame_stack is for image observations; {cfg.env_id} has {env.observation_space}")
    finally:
        env.close()


class _MetaView:
    """One gymnasium env seen through the VecEnv attribute interface ``check_teacher_env`` uses."""

    def __init__(self, env: Any) -> None:
        self.metadata = env.metadata


def build_feedback(cfg: PebbleConfig, observation_space: Any, action_space: Any,
                   device: torch.device | str = "cpu") -> Any:
    """The loop's parts from the config: schedule, selector, teacher, reward trainer -> ``PreferenceFeedback``."""
    from mmalign.core.reward_models import RewardEnsemble
    from mmalign.registry import REWARD_MODELS
    from mmalign.robotics.feedback import FeedbackSchedule, PairSelector, PreferenceFeedback
    from mmalign.robotics.loop import observation_kind
    from mmalign.robotics.pebble_routing import RoutingSelector
    from mmalign.robotics.reward_trainer import RewardTrainer
    from mmalign.robotics.wrappers import action_dim

    name, fields = part_spec(cfg.reward_model)
    act = action_dim(action_space)
    key = cfg.obs_key or None
    kind = observation_kind(observation_space, key)
    shape = (observation_space.spaces[key] if key else observation_space).shape
    if kind == "image":  # channels first (make_venv transposes)
        kw: dict[str, Any] = {"in_channels": shape[0], "image_size": shape[1], "act_dim": act}
    else:
        kw = {"obs_dim": int(np.prod(shape)), "act_dim": act}
        if name == "mlp":
            kw.update(hidden=(cfg.rm_hidden,) * 2, input_norm=cfg.normalize_act, action_squares=cfg.rm_action_squares)
    cls = REWARD_MODELS.get(name)
    kw.update(fields)
    try:
        ensemble = RewardEnsemble.build(lambda: cls(**kw), size=cfg.ensemble_size, seed=cfg.seed)
    except (TypeError, ValueError) as err:
        raise ValueError(f"reward_model {name!r} with {fields}: {err}") from None
    trainer = RewardTrainer(ensemble, device=device, normalize_obs=cfg.normalize_obs, normalize_act=cfg.normalize_act,
                            act_weight=cfg.rm_act_weight, reward_norm=cfg.reward_norm,
                            label_smoothing=cfg.rm_label_smoothing, epochs=cfg.rm_epochs,
                            batch_size=cfg.rm_batch_size, lr=cfg.rm_lr, seed=cfg.seed, obs_key=key)
    schedule = FeedbackSchedule(cfg.label_budget, cfg.initial_labels, cfg.labels_per_round,
                                first_feedback=cfg.first_feedback, feedback_every=cfg.feedback_every)
    if cfg.selector == "routing":
        selector: Any = RoutingSelector(cfg.label_budget, cfg.routing_confidence, cfg.candidate_factor)
    else:
        selector = PairSelector(cfg.selector, cfg.candidate_factor)
    return PreferenceFeedback(schedule, selector, build_teacher(cfg.teacher), trainer, seed=cfg.seed,
                              teacher_shift_rewards=cfg.teacher_shift_rewards)


def FeedbackState(cfg: PebbleConfig, obs_dim: int, act_dim: int, device: torch.device | str = "cpu") -> Any:
    """:func:`build_feedback` for a flat ``obs_dim`` observation and ``act_dim`` Box action (tests, scripts)."""
    from gymnasium import spaces

    return build_feedback(cfg, spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32),
                          spaces.Box(-1.0, 1.0, (act_dim,), np.float32), device)


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


def _model_kwargs(cfg: PebbleConfig) -> dict[str, Any]:
    """The SB3 constructor arguments the config sets for ``cfg.algo``."""
    kw: dict[str, Any] = dict(learning_rate=cfg.learning_rate, gamma=cfg.gamma, device="cpu", verbose=0,
                              policy_kwargs=dict(net_arch=[cfg.net_width, cfg.net_width]))
    if cfg.algo in ("sac", "td3", "dqn"):
        kw.update(batch_size=cfg.batch_size, learning_starts=cfg.learning_starts,
                  buffer_size=max(cfg.total_steps, 1000))
    elif cfg.algo == "ppo":
        kw.update(n_steps=cfg.ppo_n_steps, batch_size=cfg.batch_size)
    else:  # a2c: one update per rollout of n_steps
        kw.update(n_steps=cfg.ppo_n_steps)
    return kw


def _eval_fn(cfg: PebbleConfig) -> tuple[Callable[[Any], tuple[float, float]], Callable[[], None]]:
    """Deterministic-policy true return over ``eval_episodes`` seeded episodes; ``(eval_fn, close)``."""
    from mmalign.robotics.loop import make_venv, resolve_env

    seeds = [10_000 * (cfg.seed + 1) + k for k in range(cfg.eval_episodes)]
    env = resolve_env(cfg.env_id)()
    from mmalign.robotics.loop import _needs_transpose

    image = _needs_transpose(env.observation_space) or cfg.frame_stack > 0
    if image:  # the agent sees transposed (and stacked) frames: evaluate through the same VecEnv wrappers
        env.close()
        env = make_venv(cfg.env_id, 1, seed=seeds[0], frame_stack=cfg.frame_stack)

    def eval_fn(model: Any) -> tuple[float, float]:
        returns = []
        for s in seeds:
            if image:
                env.seed(s)
                obs, done, total = env.reset(), False, 0.0
                while not done:
                    obs, r, dones, _ = env.step(model.predict(obs, deterministic=True)[0])
                    total, done = total + float(r[0]), bool(dones[0])
            else:
                obs, _ = env.reset(seed=s)
                done, total = False, 0.0
                while not done:
                    action, _ = model.predict(obs, deterministic=True)
                    obs, r, term, trunc, _ = env.step(action)
                    total += float(r)
                    done = term or trunc
            returns.append(total)
        return float(np.mean(returns)), float(np.std(returns))

    return eval_fn, env.close


def train_agent(cfg: PebbleConfig, run_dir: Path | None = None, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Train one agent (learned or true reward); returns curve, final metrics, label stats and the models."""
    from stable_baselines3.common.callbacks import CallbackList

    from mmalign.robotics.callbacks import PreferenceFeedbackCallback, TrueReturnCallback
    from mmalign.robotics.loop import build_model, make_venv
    from mmalign.robotics.segments import SegmentSampler
    from mmalign.robotics.wrappers import RewardVecEnvWrapper

    check_setup(cfg)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    venv = make_venv(cfg.env_id, cfg.n_envs, cfg.seed, subprocess=cfg.vec_env == "subproc",
                     frame_stack=cfg.frame_stack)
    feedback = (build_feedback(cfg, venv.observation_space, venv.action_space, device)
                if cfg.reward == "learned" else None)
    reward_fn = None
    if feedback is not None:
        reward_fn = _entropy_reward_fn(cfg, device) if cfg.unsup_steps else feedback.reward_fn
    venv = RewardVecEnvWrapper(venv, reward_fn)
    eval_fn, close_eval = _eval_fn(cfg)
    model = build_model(cfg.algo, venv, seed=cfg.seed, **_model_kwargs(cfg))
    callbacks: list[Any] = []
    fb_cb = None
    if feedback is not None:
        sampler = SegmentSampler(cfg.segment_length, recent=cfg.recent_window or None, obs_key=cfg.obs_key or None)
        fb_cb = PreferenceFeedbackCallback(feedback, sampler, candidate_factor=cfg.candidate_factor,
                                           relabel_batch=cfg.relabel_batch, progress=progress)
        callbacks.append(fb_cb)
    curve = TrueReturnCallback(eval_fn, cfg.eval_every, feedback=feedback, total_steps=cfg.total_steps,
                               progress=progress)
    callbacks.append(curve)
    t0 = time.perf_counter()
    model.learn(total_timesteps=cfg.total_steps, callback=CallbackList(callbacks))
    wall = time.perf_counter() - t0
    if curve.curve[-1]["step"] < model.num_timesteps:
        curve.evaluate()
    close_eval()
    result: dict[str, Any] = {
        "curve": curve.curve,
        "final_true_return": curve.curve[-1]["eval/true_return"],
        "wall_s": wall,
        "relabel_s": fb_cb.relabel_s if fb_cb is not None else 0.0,
        "record_s": fb_cb.record_s if fb_cb is not None else 0.0,
        "model": model,
        "state": feedback,
    }
    if feedback is not None:
        result["labels"] = feedback.label_stats()
        result["feedback_history"] = feedback.history
        result["feedback_s"] = float(sum(h.get("time/feedback_s", 0.0) for h in feedback.history))
        result["feedback_cpu_s"] = float(sum(h.get("time/feedback_cpu_s", 0.0) for h in feedback.history))
        if run_dir is not None and cfg.save_reward_model:
            from mmalign.robotics.reward_io import save_reward_model

            trainer = feedback.trainer
            if not trainer.pixels:  # the single-file checkpoint of earlier runs (vector observations only)
                save_reward_model(trainer.ensemble, Path(run_dir) / "reward_model.safetensors", cfg.env_id,
                                  trainer.obs_dim, trainer.act_dim, obs_mean=trainer.obs_mean,
                                  obs_std=trainer.obs_std)
            # the artifact: gymnasium.make("mmalign/LearnedReward-v0", env_id=..., reward_model=<run>/reward_model)
            trainer.save_pretrained(Path(run_dir) / "reward_model", env_id=cfg.env_id)
    return result


def validate(cfg: PebbleConfig, resume: bool = False) -> None:
    """Before the CLI makes a run folder: ``--resume`` refused, env id, spaces, teacher and reward model checked."""
    if resume:
        raise ValueError("resume=True is not supported by robotics.pebble (SB3 runs are short); start a new run")
    check_setup(cfg)


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

    plot_curves({f"{cfg.algo.upper()} ({cfg.reward} reward)": result["curve"]}, run_dir / "curve.png",
                title=cfg.env_id)
    summary = {"eval/true_return": result["final_true_return"], "time/wall_s": result["wall_s"],
               "time/relabel_s": result["relabel_s"]}
    summary.update(result.get("labels", {}))
    return summary
