"""RAPL: align a frame encoder with a (simulated) user's preferences, then reward by OT to preferred demos.

Tian et al., "What Matters to You? Towards Visual Representation Alignment for Robot Learning" (ICLR 2024) and
arXiv 2412.04835. Preference triplets (anchor, first, second) with label ``P(first ≻ second | anchor)`` fine-tune the
encoder through a Bradley–Terry model over OT similarities to the anchor; the dense reward of a rollout is the
per-frame OT reward against its nearest preferred demonstration (:mod:`mmalign.robotics.ot`). Baselines trained on
the same triplets: a BT reward model on pixels (plain RLHF, the core :class:`CNNRewardModel`) and OT with the
unaligned encoder. The job ``robotics.rapl`` measures the Spearman correlation of each learned reward with the true
reward on held-out rollouts of the training embodiment and of a second embodiment, and optionally trains an SB3
policy on the RAPL reward through :class:`OTRewardWrapper`.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmalign.config import Config, check_choice, check_nonnegative, check_positive, option

__all__ = ["RaplConfig", "num_train_steps", "rapl_triplet_loss", "train_rapl_encoder", "train_bt_pixels", "embed",
           "OTRewardModel", "OTRewardWrapper", "spearman", "validate", "run"]


@dataclass
class RaplConfig(Config):
    """RAPL vs RLHF-on-pixels vs unaligned OT on the PushAvoid task (one seed)."""

    env_id: str = option("mmalign/PushAvoidPoint-v0", "embodiment whose preferences train the reward")
    cross_env_id: str = option("mmalign/PushAvoidArm-v0", "other embodiment scored by the same reward ('' = skip)")
    n_train_traj: int = option(160, "scripted rollouts the triplets are drawn from")
    n_eval_traj: int = option(80, "held-out rollouts for the correlation metrics (per embodiment)")
    steps: int = option(30, "frames per rollout")
    image_size: int = option(64, "rendered frame size (pixels)")
    frame_stride: int = option(2, "use every k-th frame in OT/BT (compute saver)")
    num_prefs: int = option(150, "number of labelled triplets")
    anchor_pool: int = option(6, "anchors are drawn from this many best rollouts; also the number of demos")
    teacher_beta: float = option(float("inf"), "simulated-human rationality (inf = always picks the better one)")
    encoder: str = option("tiny_cnn", "tiny_cnn | resnet18 | open_clip")
    weights_path: str = option("", "local pretrained encoder weights ('' = random init)")
    embed_dim: int = option(32, "projection-head output size")
    pretrain_steps: int = option(0, "time-contrastive pre-training steps of the encoder on unlabelled frames of both "
                                 "embodiments before any preference (0 = align the random init; rapl_pretrain.py)")
    pretrain_cross_traj: int = option(80, "rollouts of cross_env_id (not the held-out ones) whose frames join the "
                                      "training rollouts' frames in pre-training (0 = training embodiment only)")
    pretrain_window: int = option(2, "pre-training positives are 1..window steps from their anchor")
    pretrain_temperature: float = option(0.1, "InfoNCE temperature of the pre-training loss")
    pretrain_batch: int = option(64, "frame pairs per pre-training step")
    bt_model: str = option("cnn", "BT pixel baseline: 'cnn' (core CNNRewardModel) or 'encoder' (a linear per-frame "
                           "reward head on the RAPL encoder, pretrained when pretrain_steps > 0)")
    embed_norm: bool = option(True, "standardise each embedding dimension (batch stats in training, stats of the "
                              "training frames afterwards); False = RAPL's code (see encoders.FrameEncoder)")
    reg: float = option(0.05, "entropic regularisation of the Sinkhorn plan (RAPL code: 1.0)")
    sinkhorn_iters: int = option(50, "unrolled Sinkhorn iterations")
    similarity_scale: float = option(20.0, "BT temperature: logit = scale * (sim_first - sim_second)")
    train_length: str = option(
        "epochs",
        "how long RAPL and the BT baseline train. 'epochs': train_epochs passes over the labelled triplets, i.e. "
        "ceil(train_epochs * num_prefs / batch_size) steps on shuffled batches drawn without replacement, so every "
        "preference budget and both methods see each triplet equally often (the reference code trains 100 epochs). "
        "'steps': exactly train_steps steps of batches drawn with replacement at every budget (the old behaviour; "
        "larger budgets then see each triplet fewer times)")
    train_epochs: float = option(32.0, "passes over the triplets when train_length='epochs' (may be fractional)")
    train_steps: int = option(200, "gradient steps for the encoder and for the BT baseline when train_length='steps'")
    batch_size: int = option(8, "triplets per step")
    lr: float = option(1e-3, "Adam learning rate")
    run_rapl: bool = option(True, "train and score the RAPL encoder and the unaligned-OT baseline (False: only "
                            "the BT baseline and the task reward, e.g. for preference-budget sweeps)")
    run_bt_baseline: bool = option(True, "also train the BT-on-pixels reward model")
    policy_timesteps: int = option(0, "SB3 PPO timesteps on the RAPL reward (0 = skip the policy)")
    seed: int = option(0, "seed of data, triplets, init and training")
    data_cache: str = option("", "folder to cache rendered rollouts in ('' = no cache)")

    def __post_init__(self) -> None:
        for name in ("n_train_traj", "n_eval_traj", "steps", "image_size", "frame_stride", "num_prefs",
                     "anchor_pool", "embed_dim", "sinkhorn_iters", "train_steps", "batch_size", "pretrain_window",
                     "pretrain_batch"):
            check_positive(name, getattr(self, name))
        check_choice("encoder", self.encoder, ("tiny_cnn", "resnet18", "open_clip"))
        check_choice("train_length", self.train_length, ("epochs", "steps"))
        check_choice("bt_model", self.bt_model, ("cnn", "encoder"))
        check_nonnegative("pretrain_steps", self.pretrain_steps)
        check_nonnegative("pretrain_cross_traj", self.pretrain_cross_traj)
        check_positive("train_epochs", self.train_epochs)
        for name in ("reg", "similarity_scale", "lr", "teacher_beta", "pretrain_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        check_nonnegative("policy_timesteps", self.policy_timesteps)
        if not (self.run_rapl or self.run_bt_baseline):
            raise ValueError("run_rapl and run_bt_baseline are both False: nothing to train")
        if self.policy_timesteps and not self.run_rapl:
            raise ValueError(f"policy_timesteps={self.policy_timesteps} needs run_rapl=True (the policy uses the "
                             "RAPL reward)")
        if self.n_train_traj < self.anchor_pool + 2:
            raise ValueError(f"n_train_traj must be >= anchor_pool + 2, got {self.n_train_traj}")


def rapl_triplet_loss(sim_first: Any, sim_second: Any, labels: Any, scale: float) -> tuple[Any, dict]:
    """Bradley–Terry loss over OT similarities to the anchor (RAPL Eq. 3 with -log P instead of 1 - P).

    ``sim_first``/``sim_second`` ``(B,)`` are ``-<plan, C>`` of each candidate vs the anchor; ``labels`` ``(B,)`` are
    ``P(first ≻ second | anchor)``. The reference code minimises ``1 - P``; we use the cross-entropy (the BT log
    likelihood), which the core :func:`bradley_terry_loss` provides, with a temperature ``scale``.
    """
    from mmalign.core.losses.preference import bradley_terry_loss

    return bradley_terry_loss(scale * sim_first, scale * sim_second, labels)


def num_train_steps(num_items: int, cfg: RaplConfig) -> int:
    """Gradient steps on ``num_items`` labelled triplets under ``cfg.train_length`` (see :class:`RaplConfig`)."""
    if num_items < 1:
        raise ValueError(f"num_items must be >= 1, got {num_items!r}")
    if cfg.train_length == "steps":
        return cfg.train_steps
    # float slack so that e.g. 0.3 * 10 / 1 does not round up to 4 steps
    return max(1, math.ceil(cfg.train_epochs * num_items / min(cfg.batch_size, num_items) - 1e-9))


def _batches(num_items: int, cfg: RaplConfig, gen: Any) -> Iterator[Any]:
    """Index batches of one training run. 'steps' keeps the original with-replacement draws (same RNG stream as
    before the option existed, so old runs reproduce); 'epochs' walks concatenated random permutations in chunks
    of ``batch_size``, so each triplet is used ``train_epochs`` times up to one batch of rounding."""
    import torch

    size = min(cfg.batch_size, num_items)
    steps = num_train_steps(num_items, cfg)
    if cfg.train_length == "steps":
        for _ in range(steps):
            yield torch.randint(num_items, (size,), generator=gen)
        return
    stream = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(stream) < size:
            stream = torch.cat([stream, torch.randperm(num_items, generator=gen)])
        yield stream[:size]
        stream = stream[size:]


def _frames_tensor(frames: np.ndarray, stride: int) -> Any:
    import torch

    return torch.from_numpy(np.ascontiguousarray(frames[..., ::stride, :, :, :]))


def embed(encoder: Any, frames: np.ndarray, stride: int = 1, chunk: int = 32) -> Any:
    """Embeddings ``(N, T', D)`` of rollouts ``frames (N, T, H, W, 3)`` without gradients."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(frames), chunk):
            out.append(encoder(_frames_tensor(frames[i : i + chunk], stride)))
    return torch.cat(out)


def train_rapl_encoder(
    encoder: Any, frames: np.ndarray, triplets: np.ndarray, labels: np.ndarray, cfg: RaplConfig
) -> list[dict[str, float]]:
    """Fine-tune ``encoder`` in place on labelled triplets; returns per-step metrics. The number of steps is
    :func:`num_train_steps` of the number of triplets. Leaves the encoder in ``eval()`` mode with its embedding
    normalisation (if any) calibrated on all of ``frames``.

    A small custom loop (not :class:`mmalign.train.Trainer`): each step draws triplet indices, and the frames of
    the unique rollouts in the batch are encoded once and shared, which the generic trainer's dataset view hides.
    """
    import torch

    from mmalign.robotics.encoders import calibrate_embedding_norm
    from mmalign.robotics.ot import ot_similarity

    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(encoder.parameters(), lr=cfg.lr)
    encoder.train()
    trip = torch.from_numpy(triplets)
    lab = torch.from_numpy(labels).float()
    log = []
    for step, idx in enumerate(_batches(len(trip), cfg, gen)):
        uniq, inv = torch.unique(trip[idx], return_inverse=True)
        z = encoder(_frames_tensor(frames[uniq.numpy()], cfg.frame_stride))
        za, z1, z2 = z[inv[:, 0]], z[inv[:, 1]], z[inv[:, 2]]
        sims = ot_similarity(torch.cat([z1, z2]), torch.cat([za, za]), cfg.reg, cfg.sinkhorn_iters)
        loss, metrics = rapl_triplet_loss(sims[: len(idx)], sims[len(idx) :], lab[idx], cfg.similarity_scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
        log.append({"step": step, "train/loss": loss.item(),
                    "train/pref_accuracy": float(metrics["train/pref_accuracy"])})
    calibrate_embedding_norm(encoder, _frames_tensor(frames, cfg.frame_stride))
    return log


def _bt_input(model: Any, frames: np.ndarray, stride: int) -> Any:
    """Frames as the BT model takes them: ``(N, T', 3, H, W)`` for the core CNN, uint8 ``(N, T', H, W, 3)`` for an
    :class:`~mmalign.robotics.rapl_pretrain.EncoderReward`."""
    from mmalign.robotics.rapl_pretrain import EncoderReward, base_encoder

    x = _frames_tensor(frames, stride)
    return x if isinstance(model, EncoderReward) else x.permute(0, 1, 4, 2, 3)


def train_bt_pixels(
    frames: np.ndarray, triplets: np.ndarray, labels: np.ndarray, cfg: RaplConfig, log: list | None = None,
    model: Any = None,
) -> Any:
    """Plain RLHF baseline: a pixel reward model (``model``, default the core CNN reward model) trained with BT on
    the triplets' two candidates, for the same number of steps as RAPL on the same triplets
    (:func:`num_train_steps`); per-step metrics go to ``log``. An
    :class:`~mmalign.robotics.rapl_pretrain.EncoderReward` is left in ``eval()`` mode with its embedding
    normalisation calibrated on all of ``frames``."""
    import torch

    from mmalign.core.losses.preference import bradley_terry_loss
    from mmalign.core.reward_models.nets import CNNRewardModel
    from mmalign.core.rng import seeded_global_rng

    if model is None:
        with seeded_global_rng(cfg.seed):  # seeded init without reseeding the caller's global RNG
            model = CNNRewardModel(image_size=cfg.image_size, channels=(16, 32, 32), hidden=(64,),
                                   output_activation=None)
    model.train()
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    pairs, lab = torch.from_numpy(triplets[:, 1:]), torch.from_numpy(labels).float()
    for step, idx in enumerate(_batches(len(pairs), cfg, gen)):
        ret = model.segment_returns(_bt_input(model, frames[pairs[idx].reshape(-1).numpy()],
                                              cfg.frame_stride)).reshape(-1, 2)
        loss, metrics = bradley_terry_loss(ret[:, 0], ret[:, 1], lab[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if log is not None:
            log.append({"step": step, "train/loss": loss.item(),
                        "train/pref_accuracy": float(metrics["train/pref_accuracy"])})
    from mmalign.robotics.rapl_pretrain import EncoderReward

    if isinstance(model, EncoderReward):
        from mmalign.robotics.encoders import calibrate_embedding_norm

        calibrate_embedding_norm(model.encoder, _frames_tensor(frames, cfg.frame_stride))
    model.eval()
    return model


def bt_returns(model: Any, frames: np.ndarray, stride: int, chunk: int = 32) -> np.ndarray:
    """Predicted returns ``(N,)`` of the BT pixel reward model."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(frames), chunk):
            out.append(model.segment_returns(_bt_input(model, frames[i : i + chunk], stride)))
    return torch.cat(out).numpy()


class OTRewardModel:
    """Dense OT reward against the nearest of ``demo_frames (K, T, H, W, 3)`` under ``encoder``."""

    def __init__(self, encoder: Any, demo_frames: np.ndarray, reg: float, num_iters: int, stride: int = 1) -> None:
        self.encoder, self.reg, self.num_iters, self.stride = encoder, reg, num_iters, stride
        self.demos = embed(encoder, demo_frames, stride)

    def rewards(self, frames: np.ndarray, chunk: int = 16) -> np.ndarray:
        """Per-frame rewards ``(N, T')`` of rollouts ``frames (N, T, H, W, 3)``."""
        import torch

        from mmalign.robotics.ot import nearest_demo_reward

        out = []
        with torch.no_grad():
            for i in range(0, len(frames), chunk):
                z = embed(self.encoder, frames[i : i + chunk], self.stride)
                out.append(nearest_demo_reward(z, self.demos, self.reg, self.num_iters)[0])
        return torch.cat(out).numpy()


def _make_wrapper_base() -> type:
    import gymnasium as gym

    class _Wrapper(gym.Wrapper):
        """Replaces the env reward by RAPL's OT reward of the newest frame (see :class:`OTRewardWrapper`)."""

        def __init__(self, env: gym.Env, encoder: Any, demo_frames: np.ndarray, reg: float = 0.05,
                     num_iters: int = 50, scale: float = 1.0) -> None:
            super().__init__(env)
            if env.render_mode != "rgb_array":
                raise ValueError(f"env must be made with render_mode='rgb_array', got {env.render_mode!r}")
            self.encoder, self.reg, self.num_iters, self.scale = encoder, reg, num_iters, scale
            self.demos = embed(encoder, demo_frames)
            self._z: list[Any] = []

        def reset(self, **kwargs: Any) -> tuple[Any, dict]:
            self._z = []
            return self.env.reset(**kwargs)

        def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
            import torch

            from mmalign.robotics.ot import ot_dense_reward

            obs, env_reward, terminated, truncated, info = self.env.step(action)
            with torch.no_grad():
                self._z.append(self.encoder(torch.from_numpy(self.env.render()[None]))[0])
                t = min(len(self._z), self.demos.shape[1])
                prefix = torch.stack(self._z[-t:])[None].expand(len(self.demos), -1, -1)
                dense = ot_dense_reward(prefix, self.demos[:, :t], self.reg, self.num_iters)
                best = dense.sum(dim=1).argmax()
                reward = float(dense[best, -1]) * t * self.scale
            info = {**info, "env_reward": env_reward, "ot_reward": reward}
            return obs, reward, terminated, truncated, info

    return _Wrapper


def OTRewardWrapper(env: Any, encoder: Any, demo_frames: np.ndarray, **kwargs: Any) -> Any:  # noqa: N802
    """Gymnasium wrapper serving RAPL's dense OT reward to any policy learner (e.g. SB3).

    RAPL scores a finished rollout; a step-wise env must answer at step ``t``, so the wrapper solves OT between the
    rollout prefix ``o_{1:t}`` and each demo's prefix of the same length (all demos in one batch), picks the
    closest demo and returns the newest frame's reward ``-sum_t' plan[t, t'] C[t, t']`` times ``t`` (so the scale
    does not shrink with the prefix length). Once the rollout is longer than the demos (``t > T_demo``), the last
    ``T_demo`` frames are matched against the whole demos (a sliding window, not the prefix). The env's own reward
    goes to ``info["env_reward"]``.
    """
    return _make_wrapper_base()(env, encoder, demo_frames, **kwargs)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation of two score vectors."""
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def _collect(env_id: str, n: int, seed: int, cfg: RaplConfig) -> Any:
    from mmalign.robotics.rapl_data import Trajectories, collect_trajectories

    path = None
    if cfg.data_cache:
        name = f"{env_id.replace('/', '_')}_n{n}_s{seed}_T{cfg.steps}_px{cfg.image_size}.npz"
        path = Path(cfg.data_cache) / name
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as d:
                    traj = Trajectories(d["frames"], d["positions"], d["true_rewards"], d["task_rewards"])
            except (OSError, ValueError, KeyError, EOFError) as err:  # corrupt/truncated file, object arrays, keys
                raise ValueError(f"data_cache file {path} is unreadable ({type(err).__name__}: {err}); delete it "
                                 f"to render the rollouts again") from None
            want = (n, cfg.steps, cfg.image_size, cfg.image_size, 3)
            if traj.frames.shape != want or traj.frames.dtype != np.uint8:
                raise ValueError(f"data_cache file {path} holds frames of shape {traj.frames.shape} "
                                 f"({traj.frames.dtype}), expected {want} (uint8); delete it to render again")
            return traj
    traj = collect_trajectories(env_id, n, seed, cfg.steps, render=True, image_size=cfg.image_size)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, frames=traj.frames, positions=traj.positions, true_rewards=traj.true_rewards,
                 task_rewards=traj.task_rewards)
    return traj


def train_policy(cfg: RaplConfig, encoder: Any, demo_frames: np.ndarray, timesteps: int) -> dict[str, float]:
    """SB3 PPO on state observations with the RAPL reward; returns mean true return over 10 eval episodes."""
    import gymnasium as gym
    from stable_baselines3 import PPO

    import mmalign.envs  # noqa: F401

    env = OTRewardWrapper(gym.make(cfg.env_id, episode_steps=cfg.steps, image_size=cfg.image_size,
                                   render_mode="rgb_array"),  # frames as the demos' (cfg.image_size)
                          encoder, demo_frames, reg=cfg.reg, num_iters=cfg.sinkhorn_iters)
    model = PPO("MlpPolicy", env, n_steps=max(cfg.steps * 4, 64), batch_size=64, seed=cfg.seed, verbose=0, device="cpu")
    model.learn(total_timesteps=timesteps)
    eval_env = gym.make(cfg.env_id, episode_steps=cfg.steps)
    returns = []
    for ep in range(10):
        obs, _ = eval_env.reset(seed=10_000 + ep)
        total, done = 0.0, False
        while not done:
            obs, _, term, trunc, info = eval_env.step(model.predict(obs, deterministic=True)[0])
            total += info["true_reward"]
            done = term or trunc
        returns.append(total)
    return {"policy/true_return": float(np.mean(returns))}


def _final_accuracy(log: list[dict[str, float]]) -> float:
    """Mean training-batch preference accuracy over the last 20 steps (all steps if fewer)."""
    return float(np.mean([r["train/pref_accuracy"] for r in log[-20:]]))


def validate(cfg: RaplConfig, resume: bool = False) -> None:
    """Checks before any work: ``--resume`` (refused), env ids, encoder weights (read safely), the cache folder."""
    from mmalign.robotics.encoders import _load_state_dict
    from mmalign.robotics.rapl_data import check_push_avoid_env

    if resume:
        raise ValueError("--resume is not supported by robotics.rapl (its phases are not checkpointed; rendered "
                         "rollouts are reused through data_cache); start a new run in a new --output-dir")
    check_push_avoid_env("env_id", cfg.env_id)
    if cfg.cross_env_id:
        check_push_avoid_env("cross_env_id", cfg.cross_env_id)
    if cfg.weights_path:
        try:
            _load_state_dict(cfg.weights_path)  # safetensors, or torch.load(weights_only=True): no code runs
        except ValueError:
            raise  # already names the field
        except Exception as err:  # SafetensorError, UnpicklingError (pickled objects beyond tensors), ...
            raise ValueError(f"weights_path {cfg.weights_path!r} is not a readable weights file (safetensors, or a "
                             f"tensors-only torch file): {type(err).__name__}: {str(err).splitlines()[0][:200]}") \
                from None
    if cfg.data_cache and Path(cfg.data_cache).exists() and not Path(cfg.data_cache).is_dir():
        raise ValueError(f"data_cache must be a folder, got the file {cfg.data_cache!r}")


def run(cfg: RaplConfig, run_dir: Path, resume: bool = False) -> dict[str, float]:
    """Collect rollouts, label triplets, train RAPL and baselines, measure reward correlations (and a policy)."""
    import torch
    from safetensors.torch import save_file

    validate(cfg, resume)

    from mmalign.core.rng import seeded_global_rng
    from mmalign.robotics.encoders import calibrate_embedding_norm
    from mmalign.robotics.rapl_data import label_triplets, make_triplets
    from mmalign.robotics.rapl_pretrain import EncoderReward, base_encoder

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    train = _collect(cfg.env_id, cfg.n_train_traj, cfg.seed, cfg)
    held = _collect(cfg.env_id, cfg.n_eval_traj, cfg.seed + 1000, cfg)
    rng = np.random.default_rng(cfg.seed)
    triplets = make_triplets(train.true_returns, cfg.num_prefs, rng, cfg.anchor_pool)
    labels = label_triplets(train.true_returns, triplets, rng, cfg.teacher_beta)
    demo_idx = np.argsort(-train.true_returns)[: cfg.anchor_pool]
    metrics: dict[str, float] = {"data/collect_s": time.time() - t0, "data/num_prefs": float(cfg.num_prefs),
                                 "train/steps": float(num_train_steps(len(triplets), cfg))}
    demos = train.frames[demo_idx]
    scorers: dict[str, OTRewardModel] = {}
    base = None
    if cfg.run_rapl or cfg.bt_model == "encoder":
        def pretrain_frames() -> np.ndarray:  # only rendered when the cache has no pre-trained weights
            cross = cfg.pretrain_cross_traj if cfg.cross_env_id else 0
            extra = [_collect(cfg.cross_env_id, cross, cfg.seed + 3000, cfg).frames] if cross else []
            return np.concatenate([train.frames, *extra])

        base = base_encoder(cfg, pretrain_frames, metrics)
    if cfg.run_rapl:
        unaligned = copy.deepcopy(base)
        calibrate_embedding_norm(unaligned, _frames_tensor(train.frames, cfg.frame_stride))
        aligned = copy.deepcopy(unaligned)
        t1 = time.time()
        log = train_rapl_encoder(aligned, train.frames, triplets, labels, cfg)
        metrics["rapl/train_s"] = time.time() - t1
        metrics["rapl/final_pref_accuracy"] = _final_accuracy(log)
        (run_dir / "rapl_train.jsonl").write_text("\n".join(json.dumps(r) for r in log) + "\n")
        save_file(aligned.state_dict(), str(run_dir / "rapl_encoder.safetensors"))
        scorers = {"rapl": OTRewardModel(aligned, demos, cfg.reg, cfg.sinkhorn_iters, cfg.frame_stride),
                   "unaligned_ot": OTRewardModel(unaligned, demos, cfg.reg, cfg.sinkhorn_iters, cfg.frame_stride)}
    bt_model = None
    if cfg.run_bt_baseline:
        t1, bt_log = time.time(), []
        model = None
        if cfg.bt_model == "encoder":
            with seeded_global_rng(cfg.seed):
                model = EncoderReward(copy.deepcopy(base))
        bt_model = train_bt_pixels(train.frames, triplets, labels, cfg, log=bt_log, model=model)
        metrics["bt/train_s"] = time.time() - t1
        metrics["bt/final_pref_accuracy"] = _final_accuracy(bt_log)
        (run_dir / "bt_train.jsonl").write_text("\n".join(json.dumps(r) for r in bt_log) + "\n")

    eval_sets = {"heldout": held}
    if cfg.cross_env_id:
        eval_sets["cross"] = _collect(cfg.cross_env_id, cfg.n_eval_traj, cfg.seed + 2000, cfg)
    for split, data in eval_sets.items():
        true = data.true_returns
        for name, scorer in scorers.items():
            metrics[f"{split}/spearman_{name}"] = spearman(scorer.rewards(data.frames).sum(axis=1), true)
        if bt_model is not None:
            metrics[f"{split}/spearman_bt_pixels"] = spearman(bt_returns(bt_model, data.frames, cfg.frame_stride), true)
        metrics[f"{split}/spearman_task_reward"] = spearman(data.task_rewards.sum(axis=1), true)
    if cfg.policy_timesteps:
        metrics.update(train_policy(cfg, aligned, demos, cfg.policy_timesteps))
    metrics["time/total_s"] = time.time() - t0
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
