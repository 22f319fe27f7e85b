"""A small facade over the PbRL parts: any gymnasium env, any SB3 algorithm, a teacher, a learned reward.

::

    from stable_baselines3 import SAC
    from mmalign.registry import TEACHERS
    from mmalign.robotics.loop import PreferenceLoop, make_venv

    venv = make_venv("Reacher-v5", n_envs=1, seed=0)
    loop = PreferenceLoop(SAC("MlpPolicy", venv, seed=0), TEACHERS.get("mistake")(), label_budget=200,
                          initial_labels=50, labels_per_round=25)
    loop.learn(5000)
    loop.save_reward_model("reward_model")      # reload with RewardEnsemble.from_pretrained / LearnedReward-v0

The parts (all public): :class:`~mmalign.robotics.wrappers.RewardVecEnvWrapper` (reward swap),
:class:`~mmalign.robotics.callbacks.PreferenceFeedbackCallback` (feedback rounds + relabelling),
:class:`~mmalign.robotics.segments.SegmentSampler` (fragmenter), :class:`~mmalign.robotics.feedback.PairSelector`
(query selection), a :class:`~mmalign.core.teachers.Teacher`, :class:`~mmalign.robotics.reward_trainer.RewardTrainer`
and :class:`~mmalign.robotics.feedback.FeedbackSchedule`. :class:`PreferenceLoop` only wires them; every one can be
passed in instead of built.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable

import numpy as np

__all__ = ["PreferenceLoop", "ALGORITHMS", "make_venv", "build_model", "resolve_env", "observation_kind",
           "default_reward_trainer"]

#: Algorithm names accepted where a model may be given by name (SB3 classes, imported on use).
ALGORITHMS = {"sac": "SAC", "td3": "TD3", "ppo": "PPO", "a2c": "A2C", "dqn": "DQN"}


def resolve_env(env: Any) -> Callable[[], Any]:
    """A constructor of one gymnasium env from a registered id, ``"module:Id"`` (the module is imported first, as
    ``gymnasium.make`` does), or a zero-argument callable returning an env. Unknown ids fail here, before any work."""
    import gymnasium

    if callable(env):
        return env
    if not isinstance(env, str) or not env:
        raise ValueError(f"env must be a gymnasium id, 'module:Id' or an env constructor, got {env!r}")
    module, _, name = env.rpartition(":")
    if module:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ValueError(f"env {env!r}: cannot import module {module!r} ({err})") from None
    if name not in gymnasium.registry:
        close = difflib.get_close_matches(name, list(gymnasium.registry), n=5, cutoff=0.6)
        raise ValueError(f"env_id {env!r} is not a registered gymnasium id (similar: {close})")
    return lambda: gymnasium.make(name)


def observation_kind(space: Any, obs_key: str | None = None) -> str:
    """``"vector"`` (flat Box) or ``"image"`` (uint8 Box ``[H, W, C]`` or ``[C, H, W]``) of the observations the
    reward model sees: for a Dict space the ``obs_key`` entry. Anything else is refused."""
    from gymnasium import spaces

    if isinstance(space, spaces.Dict):
        if obs_key not in space.spaces:
            raise ValueError(f"dict observations need obs_key naming the entry the reward model sees, one of "
                             f"{list(space.spaces)}, got {obs_key!r}")
        space = space.spaces[obs_key]
    elif obs_key:
        raise ValueError(f"obs_key={obs_key!r} is only for dict observations, got {space}")
    if isinstance(space, spaces.Box) and space.dtype == np.uint8 and len(space.shape) == 3:
        return "image"
    if isinstance(space, spaces.Box):
        return "vector"
    raise ValueError(f"observation space must be a Box (vector), a uint8 image Box or a Dict of them (with obs_key), "
                     f"got {space}")


def _needs_transpose(space: Any) -> bool:
    from gymnasium import spaces
    from stable_baselines3.common.preprocessing import is_image_space, is_image_space_channels_first

    subspaces = space.spaces.values() if isinstance(space, spaces.Dict) else [space]
    return any(is_image_space(s, check_channels=False) and not is_image_space_channels_first(s) for s in subspaces)


def make_venv(env: Any, n_envs: int = 1, seed: int = 0, *, subprocess: bool = False, frame_stack: int = 0) -> Any:
    """An SB3 ``VecEnv`` of ``n_envs`` copies of ``env`` (:func:`resolve_env`), seeded ``seed, seed+1, ...``;
    ``subprocess`` uses ``SubprocVecEnv``; ``frame_stack > 0`` stacks that many frames (image observations)."""
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecFrameStack, VecTransposeImage

    if n_envs < 1:
        raise ValueError(f"n_envs must be >= 1, got {n_envs}")
    make = resolve_env(env)  # unknown ids and modules fail here with a clear message
    env_id = env if isinstance(env, str) and ":" not in env else make
    venv = make_vec_env(env_id, n_envs=n_envs, seed=seed, vec_env_cls=SubprocVecEnv if subprocess else DummyVecEnv)
    if frame_stack:
        venv = VecFrameStack(venv, frame_stack, channels_order="last")
    if _needs_transpose(venv.observation_space):
        # channels first here, so the agent's buffer and the reward wrapper see the same [C, H, W] frames (SB3 would
        # otherwise transpose outside the reward wrapper)
        venv = VecTransposeImage(venv)
    return venv


def build_model(algo: Any, venv: Any, *, seed: int = 0, **kwargs: Any) -> Any:
    """An SB3 model: ``algo`` a name in :data:`ALGORITHMS` (``"MlpPolicy"``, or ``"CnnPolicy"`` for images) built on
    ``venv`` with ``kwargs``, or an SB3 model object (returned as is)."""
    from stable_baselines3.common.base_class import BaseAlgorithm

    if isinstance(algo, BaseAlgorithm):
        return algo
    if not isinstance(algo, str) or algo.lower() not in ALGORITHMS:
        raise ValueError(f"algo must be one of {sorted(ALGORITHMS)} or a stable-baselines3 model, got {algo!r}")
    import stable_baselines3

    cls = getattr(stable_baselines3, ALGORITHMS[algo.lower()])
    from gymnasium import spaces

    if algo.lower() == "dqn" and not isinstance(venv.action_space, spaces.Discrete):
        raise ValueError(f"algo 'dqn' needs a Discrete action space, got {venv.action_space}")
    if algo.lower() in ("sac", "td3") and not isinstance(venv.action_space, spaces.Box):
        raise ValueError(f"algo {algo!r} needs a Box action space, got {venv.action_space}; use ppo, a2c or dqn")
    if isinstance(venv.observation_space, spaces.Dict):
        policy = "MultiInputPolicy"
    else:
        policy = "CnnPolicy" if observation_kind(venv.observation_space) == "image" else "MlpPolicy"
    return cls(policy, venv, seed=seed, **kwargs)


def default_reward_trainer(venv: Any, *, reward_model: str = "mlp", ensemble_size: int = 3, seed: int = 0,
                           device: str = "cpu", model_kwargs: dict[str, Any] | None = None, obs_key: str | None = None,
                           **trainer_kwargs: Any) -> Any:
    """A :class:`RewardTrainer` over a ``REWARD_MODELS[reward_model]`` ensemble sized from ``venv``'s spaces
    (``mlp`` for vector observations, ``cnn`` for images; ``model_kwargs`` go to the member constructor; ``obs_key``:
    the entry of dict observations the reward model sees)."""
    from mmalign.core.reward_models import RewardEnsemble
    from mmalign.registry import REWARD_MODELS
    from mmalign.robotics.reward_trainer import RewardTrainer
    from mmalign.robotics.wrappers import action_dim

    kind = observation_kind(venv.observation_space, obs_key)
    space = venv.observation_space.spaces[obs_key] if obs_key else venv.observation_space
    shape = space.shape
    act = action_dim(venv.action_space)
    cls = REWARD_MODELS.get(reward_model)
    kw = dict(model_kwargs or {})
    if reward_model == "mlp":
        kw.setdefault("hidden", (64, 64))  # the pebble job's width (MLPRewardModel's own default is 3x256)
    if kind == "image":
        channels_first = shape[0] <= 16 and shape[-1] > 16  # SB3 transposes HWC to CHW for its CNN policies
        c, size = (shape[0], shape[1]) if channels_first else (shape[-1], shape[0])
        kw = {"in_channels": c, "image_size": size, "act_dim": act, **kw}
    else:
        kw = {"obs_dim": int(np.prod(shape)), "act_dim": act, **kw}
    try:
        ensemble = RewardEnsemble.build(lambda: cls(**kw), size=ensemble_size, seed=seed)
    except TypeError as err:
        raise ValueError(f"reward model {reward_model!r} cannot be built for {kind} observations {shape} with "
                         f"{sorted(kw)}: {err}") from None
    return RewardTrainer(ensemble, device=device, seed=seed, obs_key=obs_key, **trainer_kwargs)


class PreferenceLoop:
    """Train an SB3 agent on a reward learned online from a teacher's preferences.

    Args:
        model: an SB3 model (its env is wrapped in a reward-swapping wrapper unless it already is one).
        teacher: any :class:`~mmalign.core.teachers.Teacher`.
        reward: a :class:`RewardTrainer` (default: :func:`default_reward_trainer` for the env's spaces).
        label_budget, initial_labels, labels_per_round, first_feedback, feedback_every: the
            :class:`FeedbackSchedule` (or pass ``schedule``).
        selector: a query-selector name (``QUERY_SELECTORS``) or a selector object; ``candidate_factor`` candidate
            pairs per query.
        segment_length: steps per segment (or pass a ``sampler``).
        seed: seeds sampling, selection and the teacher.
    """

    def __init__(self, model: Any, teacher: Any, *, reward: Any = None, schedule: Any = None,
                 label_budget: int = 500, initial_labels: int = 100, labels_per_round: int = 50,
                 first_feedback: int = 1000, feedback_every: int = 1000, selector: Any = "disagreement",
                 candidate_factor: int = 4, segment_length: int = 25, sampler: Any = None, seed: int = 0,
                 feedback: Any = None, progress: Callable[[str], None] | None = None, **callback_kwargs: Any) -> None:
        from mmalign.robotics.callbacks import PreferenceFeedbackCallback
        from mmalign.robotics.feedback import FeedbackSchedule, PairSelector, PreferenceFeedback
        from mmalign.robotics.segments import SegmentSampler
        from mmalign.robotics.wrappers import RewardVecEnvWrapper, check_action_space, find_reward_wrapper

        venv = model.get_env()
        if venv is None:
            raise ValueError("model has no env: build it with an env (or use build_model(algo, venv))")
        check_action_space(venv.action_space, "the model's env")
        if feedback is None:
            schedule = schedule or FeedbackSchedule(label_budget, initial_labels, labels_per_round,
                                                    first_feedback=first_feedback, feedback_every=feedback_every)
            if isinstance(selector, str):
                selector = PairSelector(selector, candidate_factor)
            reward = reward if reward is not None else default_reward_trainer(venv, seed=seed)
            feedback = PreferenceFeedback(schedule, selector, teacher, reward, seed=seed)
        self.feedback = feedback
        check_teacher_env(feedback.teacher, venv)
        wrapper = find_reward_wrapper(venv)
        if wrapper is None:
            model.set_env(RewardVecEnvWrapper(venv, feedback.reward_fn))
        self.model = model
        observation_kind(venv.observation_space, feedback.trainer.obs_key)
        self.sampler = sampler or SegmentSampler(segment_length, obs_key=feedback.trainer.obs_key)
        check_segment_length(self.sampler.length, venv)
        self.callback = PreferenceFeedbackCallback(feedback, self.sampler, candidate_factor=getattr(
            feedback.selector, "candidate_factor", candidate_factor), progress=progress, **callback_kwargs)

    @property
    def reward_trainer(self) -> Any:
        return self.feedback.trainer

    def learn(self, total_timesteps: int, callback: Any = None, **learn_kwargs: Any) -> "PreferenceLoop":
        """``model.learn`` with the feedback callback first in a ``CallbackList`` (then ``callback``)."""
        from stable_baselines3.common.callbacks import CallbackList

        extra = [] if callback is None else (list(callback) if isinstance(callback, (list, tuple)) else [callback])
        self.model.learn(total_timesteps=total_timesteps, callback=CallbackList([self.callback, *extra]),
                         **learn_kwargs)
        return self

    def save_reward_model(self, folder: Any, **meta: Any) -> Any:
        """Write the learned reward as a folder (config JSON + safetensors); see ``RewardEnsemble.from_pretrained``."""
        return self.feedback.trainer.save_pretrained(folder, **meta)


def check_teacher_env(teacher: Any, venv: Any, env_id: str = "", states: bool = True) -> None:
    """A teacher that labels from the true reward needs an env that has one (``metadata["has_true_reward"]``); a
    teacher that shows people clips (``wants_states``, e.g. ``human``) needs a MuJoCo task, the run's own, and when
    the run passes no simulator states (``states=False``) a task drawn from its observations."""
    if getattr(teacher, "wants_states", False):
        from mmalign.robotics.render import check_obs_renderable, mujoco_sizes

        shown = getattr(teacher, "env_id", "")
        if env_id and shown != env_id:
            raise ValueError(f"teacher.env_id={shown!r} but the run trains on {env_id!r}: people would watch clips "
                             f"drawn as another task; set teacher.env_id={env_id}")
        try:
            mujoco_sizes(shown)
            if not states:
                check_obs_renderable(shown)
        except ValueError as err:
            raise ValueError(f"teacher.env_id: the {type(teacher).__name__} shows MuJoCo segments as clips"
                             f"{'' if states else ' from observations (this run passes no simulator states)'}: "
                             f"{err}") from None
    if not getattr(teacher, "needs_true_reward", True):
        return
    metadata = venv.get_attr("metadata", [0])[0] if hasattr(venv, "get_attr") else getattr(venv, "metadata", {})
    if isinstance(metadata, dict) and metadata.get("has_true_reward", True) is False:
        raise ValueError(f"teacher {type(teacher).__name__} labels from the true reward, but the env declares "
                         f"metadata['has_true_reward']=False; use a teacher that does not need it (e.g. a human "
                         f"labeller) or an env with a reward")


def check_segment_length(length: int, venv: Any) -> None:
    """Segments never cross an episode end, so they cannot be longer than an episode."""
    specs = venv.get_attr("spec", [0]) if hasattr(venv, "get_attr") else [None]
    spec = specs[0]
    limit = getattr(spec, "max_episode_steps", None)
    if limit is not None and length > limit:
        raise ValueError(f"segment_length must be <= the episode length of {spec.id} ({limit}), got {length}")
