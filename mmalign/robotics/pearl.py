"""PEARL: zero-shot cross-task preference transfer by Gromov–Wasserstein, plus robust Gaussian reward learning.

Liu et al., "Zero-shot Cross-task Preference Alignment and Robust Reward Learning" (ICML 2024, arXiv 2306.03615).
Cross-task preference alignment (CPA): a Gromov–Wasserstein plan ``T (M, N)`` between source trajectories
``x_1..M`` (with some preference labels) and target trajectories ``y_1..N`` (none) is computed from the two
intra-task distance matrices only; each target pair gets the plan-weighted average of the source labels,

.. math::
    z(y_j, y_l) = \frac{\sum_{i,k} T_{ij} T_{kl} W_{ik} z(x_i, x_k)}{\sum_{i,k} T_{ij} T_{kl} W_{ik}},

where ``W`` masks the source pairs that carry a label. With every source pair labelled the denominator is
``v_j v_l`` (the target marginals), i.e. the normalised form ``diag(v)^-1 T^T Z T diag(v)^-1`` from the OpenReview
discussion (robotics.md 2.1); restricting to labelled pairs keeps labels in [0, 1] with a sparse budget.
Robust reward learning (RRL): a per-step Gaussian reward trained with the core :func:`gaussian_bt_loss` on the
transferred soft labels. The job ``robotics.pearl`` compares transferred-label accuracy, reward correlation and
target-task policy return against a reward from true target labels and against no transfer; target policies are
learned offline by advantage-weighted regression on the unlabelled target rollouts (the paper's offline setting)
and, optionally, online by PPO (which exploits the learned rewards off their data support, docs/methods/pearl.md).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmalign.config import Config, check_choice, check_nonnegative, check_positive, option
from mmalign.robotics.pearl_policy import _evaluate_policy, _mlp, _offline_return, _ppo_return, awr_policy  # noqa: F401

__all__ = ["PearlConfig", "distance_matrix", "gw_plan", "gw_plans_batched", "transfer_labels", "pair_label_matrix",
           "GaussianRewardNet", "train_reward", "awr_policy", "validate", "run"]


@dataclass
class PearlConfig(Config):
    """PEARL cross-task transfer on PushAvoid (source layout -> rotated target layout), one seed."""

    source_env_id: str = option("mmalign/PushAvoidPoint-v0", "task with preference labels")
    target_env_id: str = option("mmalign/PushAvoidPointRight-v0", "related task with zero labels")
    n_source: int = option(150, "source rollouts")
    n_target: int = option(150, "target rollouts (unlabelled; GW is solved between the two sets)")
    n_eval: int = option(100, "held-out target rollouts for reward correlation")
    steps: int = option(30, "steps per rollout")
    feature_stride: int = option(3, "subsample positions every k steps for the trajectory distance")
    num_source_prefs: int = option(1000, "labelled source pairs")
    num_target_pairs: int = option(1000, "target pairs the transferred labels are used on")
    gw_features: str = option("landmark", "GW trajectory metric: landmark (zone distances) | raw (xy)")
    gw_solver: str = option("entropic", "exact | entropic | batched (ot.batch.solve_gromov_batch on chunks)")
    gw_epsilon: float = option(1e-2, "entropic GW regularisation (distances are scaled to max 1)")
    gw_chunks: int = option(3, "number of independent GW problems for gw_solver=batched")
    reward_steps: int = option(1500, "reward-model gradient steps")
    batch_size: int = option(64, "pairs per reward-model step")
    lr: float = option(3e-3, "Adam learning rate of the reward model")
    kl_coef: float = option(0.01, "weight of the Gaussian variance-prior KL")
    prior_std: float = option(0.1, "prior std of the per-step reward")
    offline_policy_steps: int = option(0, "gradient steps of the offline AWR target policy (and its value net); "
                                       "0 = skip offline policies")
    offline_rollouts: int = option(450, "extra unlabelled target rollouts added to the offline policy dataset")
    awr_beta: float = option(1.0, "AWR temperature on standardised advantages")
    policy_timesteps: int = option(0, "online PPO timesteps per target policy (0 = skip PPO policies)")
    policy_eval_episodes: int = option(20, "deterministic evaluation episodes per target policy")
    label_flip: float = option(0.0, "probability that the simulated human's label of a pair is flipped (source "
                               "pairs, and the target pairs of the true-label rewards): label noise for the Gaussian "
                               "vs BT robustness comparison")
    seed: int = option(0, "seed of data, labels and training")

    def __post_init__(self) -> None:
        for name in ("n_source", "n_target", "n_eval", "steps", "feature_stride", "num_source_prefs",
                     "num_target_pairs", "gw_epsilon", "gw_chunks", "reward_steps", "batch_size", "lr", "prior_std",
                     "awr_beta", "policy_eval_episodes"):
            check_positive(name, getattr(self, name))
        check_choice("gw_solver", self.gw_solver, ("exact", "entropic", "batched"))
        check_choice("gw_features", self.gw_features, ("landmark", "raw"))
        check_nonnegative("kl_coef", self.kl_coef)
        check_nonnegative("policy_timesteps", self.policy_timesteps)
        check_nonnegative("offline_policy_steps", self.offline_policy_steps)
        check_nonnegative("offline_rollouts", self.offline_rollouts)
        if not 0.0 <= self.label_flip < 0.5:
            raise ValueError(f"label_flip must be in [0, 0.5), got {self.label_flip!r}")
        if self.gw_solver == "batched" and min(self.n_source, self.n_target) // self.gw_chunks < 2:
            raise ValueError(f"gw_chunks={self.gw_chunks} leaves fewer than 2 trajectories per GW problem "
                             f"(n_source={self.n_source}, n_target={self.n_target}); lower gw_chunks")


def distance_matrix(features: Any) -> Any:
    """Intra-task Euclidean distances ``(N, N)`` between trajectory features ``(N, F)``, scaled to max 1."""
    import torch

    x = torch.as_tensor(features, dtype=torch.float64)
    if x.dim() != 2:
        raise ValueError(f"features must have shape (N, F), got {tuple(x.shape)}")
    d = torch.cdist(x, x)
    return d / d.max().clamp_min(1e-12)


def gw_plan(
    c_source: Any, c_target: Any, solver: str = "entropic", epsilon: float = 1e-2, inner_iters: int = 200
) -> Any:
    """Gromov–Wasserstein plan ``(M, N)`` with uniform marginals and square loss (POT).

    ``"exact"``: ``ot.gromov.gromov_wasserstein`` (conditional gradient; NumPy, its LP runs on CPU).
    ``"entropic"``: ``ot.gromov.entropic_gromov_wasserstein`` on torch tensors (stays on their device).
    """
    import ot
    import torch

    check_choice("solver", solver, ("exact", "entropic"))
    if solver == "exact":
        plan = ot.gromov.gromov_wasserstein(np.asarray(c_source, dtype=np.float64),
                                            np.asarray(c_target, dtype=np.float64), loss_fun="square_loss")
        return torch.from_numpy(plan)
    c1, c2 = torch.as_tensor(c_source), torch.as_tensor(c_target)
    # Inner Sinkhorn capped: at small epsilon POT's default (1000 iterations per outer step) dominates the run time
    # while the outer projected-gradient loop converges anyway.
    return ot.gromov.entropic_gromov_wasserstein(c1, c2, loss_fun="square_loss", epsilon=epsilon, solver="PGD",
                                                 max_iter=100, tol=1e-7, numItermax=inner_iters, stopThr=1e-7)


def gw_plans_batched(c_source: Any, c_target: Any, epsilon: float = 1e-2) -> Any:
    """Entropic GW plans of many independent problems at once (POT ``ot.batch.solve_gromov_batch``).

    Shapes: ``c_source (B, n, n)``, ``c_target (B, m, m)`` -> plans ``(B, n, m)``.
    """
    import ot.batch

    res = ot.batch.solve_gromov_batch(c_source, c_target, reg=epsilon, loss="sqeuclidean", max_iter=200,
                                      max_iter_inner=100, grad="detach")
    return res.plan


def pair_label_matrix(n: int, pairs: np.ndarray, labels: np.ndarray) -> tuple[Any, Any]:
    """Dense ``(n, n)`` label matrix ``Z`` and mask ``W`` from labelled pairs (both orientations filled)."""
    import torch

    z = torch.zeros(n, n, dtype=torch.float64)
    w = torch.zeros(n, n, dtype=torch.float64)
    i, k = torch.as_tensor(pairs[:, 0]), torch.as_tensor(pairs[:, 1])
    lab = torch.as_tensor(labels, dtype=torch.float64)
    z[i, k], z[k, i] = lab, 1.0 - lab
    w[i, k] = w[k, i] = 1.0
    return z, w


def transfer_labels(plan: Any, z_source: Any, w_source: Any, min_mass: float = 1e-3) -> tuple[Any, Any]:
    """Target label matrix ``(N, N)`` and validity mask from a GW ``plan (M, N)`` and source labels (module doc).

    A target pair is valid when the plan puts at least ``min_mass`` of its ``v_j v_l`` mass on labelled source
    pairs; invalid pairs are masked, never labelled. Labels are convex combinations of source labels, so in [0, 1].
    """
    import torch

    plan = torch.as_tensor(plan, dtype=torch.float64)
    num = plan.T @ (z_source * w_source) @ plan
    den = plan.T @ w_source @ plan
    v = plan.sum(dim=0)
    valid = den > min_mass * torch.outer(v, v)
    labels = torch.where(valid, num / den.clamp_min(1e-300), torch.full_like(num, 0.5))
    return labels.clamp(0.0, 1.0), valid


def GaussianRewardNet(in_dim: int, hidden: int = 64) -> Any:  # noqa: N802
    """Per-step Gaussian reward ``(mean, log_std)`` MLP on state features (PEARL's RRL head)."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
            self.mean = nn.Linear(hidden, 1)
            self.log_std = nn.Linear(hidden, 1)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = self.body(x)
            return self.mean(h).squeeze(-1), self.log_std(h).squeeze(-1).clamp(-6.0, 2.0)

    return Net()


def train_reward(
    feats: np.ndarray, pairs: np.ndarray, labels: np.ndarray, cfg: PearlConfig, gaussian: bool, seed: int
) -> Any:
    """Fit a per-step reward on ``feats (N, T, F)`` from labelled pairs; Gaussian (RRL) or plain BT on the mean.

    A small custom loop (a 2-layer MLP on a few hundred pairs; the generic trainer's accelerate set-up would
    dominate the run time).
    """
    import torch

    from mmalign.core.losses.gaussian import gaussian_bt_loss
    from mmalign.core.losses.preference import bradley_terry_loss
    from mmalign.core.rng import seeded_global_rng

    with seeded_global_rng(seed):  # seeded init without reseeding the caller's global RNG
        net = GaussianRewardNet(feats.shape[-1])
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    x = torch.as_tensor(feats, dtype=torch.float32)
    p = torch.as_tensor(pairs)
    lab = torch.as_tensor(labels, dtype=torch.float32)
    for _ in range(cfg.reward_steps):
        idx = torch.randint(len(p), (min(cfg.batch_size, len(p)),), generator=gen)
        m1, s1 = net(x[p[idx, 0]])
        m2, s2 = net(x[p[idx, 1]])
        if gaussian:
            loss, _ = gaussian_bt_loss(m1, s1, m2, s2, lab[idx], generator=gen, prior_std=cfg.prior_std,
                                       kl_coef=cfg.kl_coef)
        else:
            loss, _ = bradley_terry_loss(m1.sum(-1), m2.sum(-1), lab[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


def reward_returns(net: Any, feats: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return net(torch.as_tensor(feats, dtype=torch.float32))[0].sum(-1).numpy()


def step_features(positions: np.ndarray) -> np.ndarray:
    """Per-step reward-model input: effector xy, puck xy (the target task's own coordinates)."""
    return positions.astype(np.float32)


def trajectory_features(positions: np.ndarray, stride: int, layout: Any = None) -> np.ndarray:
    """Trajectory descriptors ``(N, F)`` for the intra-task distance, from positions ``(N, T, 4)`` every ``stride``.

    Without ``layout``: the raw effector/puck xy. With a layout (``.goal``, ``.forbidden``): per step the distances
    of effector and puck to the goal and to the forbidden zone. Both are isometry-invariant across the two tasks,
    but the raw metric cannot tell a trajectory from its mirror image about the start-goal axis (the behaviour
    distribution is mirror-symmetric, the forbidden zone is not), so GW may match mirrored trajectories.
    """
    p = positions[:, ::stride]
    if layout is None:
        return p.reshape(len(p), -1)
    goal, forbidden = np.asarray(layout.goal), np.asarray(layout.forbidden)
    eff, puck = p[..., :2], p[..., 2:]
    feats = [np.linalg.norm(a - b, axis=-1) for a in (eff, puck) for b in (goal, forbidden)]
    return np.stack(feats, axis=-1).reshape(len(p), -1)


def _layout(env_id: str) -> Any:
    import gymnasium as gym

    import mmalign.envs  # noqa: F401
    from mmalign.envs.push_avoid_v0 import LAYOUTS

    return LAYOUTS[gym.spec(env_id).kwargs["layout"]]


def _random_pairs(n: int, count: int, rng: np.random.Generator) -> np.ndarray:
    a = rng.integers(n, size=count)
    b = (a + rng.integers(1, n, size=count)) % n
    return np.stack([a, b], axis=1)


def _true_labels(returns: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    d = returns[pairs[:, 0]] - returns[pairs[:, 1]]
    return np.where(d > 0, 1.0, np.where(d < 0, 0.0, 0.5))


def _flip(labels: np.ndarray, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Each label replaced by ``1 - label`` with probability ``rate`` (a tie stays a tie)."""
    return np.where(rng.random(len(labels)) < rate, 1.0 - labels, labels) if rate else labels


def _reward_stats(net: Any, feats: np.ndarray) -> tuple[float, float]:
    """Mean and std of the learned per-step mean reward over target rollouts ``feats (N, T, 4)``.

    BT rewards have an arbitrary offset and scale; every learned reward is standardised with these before policy
    learning so that the learners see the same reward scale (unnormalised, PPO did not move at all).
    """
    import torch

    with torch.no_grad():
        r = net(torch.as_tensor(feats, dtype=torch.float32))[0]
    return float(r.mean()), max(float(r.std()), 1e-6)


def validate(cfg: PearlConfig, resume: bool = False) -> None:
    """Checks before any work: ``--resume`` (refused: nothing is checkpointed) and both env ids."""
    from mmalign.robotics.rapl_data import check_push_avoid_env

    if resume:
        raise ValueError("--resume is not supported by robotics.pearl (its phases are not checkpointed and a run "
                         "takes minutes); start a new run in a new --output-dir")
    check_push_avoid_env("source_env_id", cfg.source_env_id)
    check_push_avoid_env("target_env_id", cfg.target_env_id)


def run(cfg: PearlConfig, run_dir: Path, resume: bool = False) -> dict[str, float]:
    """Transfer source labels to the target task by GW, learn target rewards, compare with true labels / none."""
    import torch

    validate(cfg, resume)

    from mmalign.robotics.rapl import spearman
    from mmalign.robotics.rapl_data import Trajectories, collect_trajectories

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    t0 = time.time()
    src = collect_trajectories(cfg.source_env_id, cfg.n_source, cfg.seed, cfg.steps, render=False)
    tgt = collect_trajectories(cfg.target_env_id, cfg.n_target, cfg.seed + 1, cfg.steps, render=False)
    ev = collect_trajectories(cfg.target_env_id, cfg.n_eval, cfg.seed + 2, cfg.steps, render=False)
    src_pairs = _random_pairs(cfg.n_source, cfg.num_source_prefs, rng)
    noise = np.random.default_rng(cfg.seed + 7919)  # own stream: label_flip=0 leaves every other draw as it was
    # simulated human on the source task only
    src_labels = _flip(_true_labels(src.true_returns, src_pairs), cfg.label_flip, noise)
    metrics: dict[str, float] = {"data/collect_s": time.time() - t0}

    t1 = time.time()
    landmark = cfg.gw_features == "landmark"
    c_src = distance_matrix(trajectory_features(src.positions, cfg.feature_stride,
                                                _layout(cfg.source_env_id) if landmark else None))
    c_tgt = distance_matrix(trajectory_features(tgt.positions, cfg.feature_stride,
                                                _layout(cfg.target_env_id) if landmark else None))
    if cfg.gw_solver == "batched":
        # Independent GW problems on random chunks of both sets, solved in one batched call; plans are placed
        # block-wise so transfer only happens within a chunk.
        ps, pt = rng.permutation(cfg.n_source), rng.permutation(cfg.n_target)
        k = min(cfg.n_source, cfg.n_target) // cfg.gw_chunks
        cs = torch.stack([c_src[ps[b * k:(b + 1) * k]][:, ps[b * k:(b + 1) * k]] for b in range(cfg.gw_chunks)])
        ct = torch.stack([c_tgt[pt[b * k:(b + 1) * k]][:, pt[b * k:(b + 1) * k]] for b in range(cfg.gw_chunks)])
        plans = gw_plans_batched(cs, ct, cfg.gw_epsilon)
        plan = torch.zeros(cfg.n_source, cfg.n_target, dtype=torch.float64)
        for b in range(cfg.gw_chunks):
            plan[np.ix_(ps[b * k:(b + 1) * k], pt[b * k:(b + 1) * k])] = plans[b].double() / cfg.gw_chunks
    else:
        plan = gw_plan(c_src, c_tgt, cfg.gw_solver, cfg.gw_epsilon)
    z_s, w_s = pair_label_matrix(cfg.n_source, src_pairs, src_labels)
    z_t, valid = transfer_labels(plan, z_s, w_s)
    metrics["pearl/gw_s"] = time.time() - t1

    tgt_pairs = _random_pairs(cfg.n_target, cfg.num_target_pairs, rng)
    keep = valid[tgt_pairs[:, 0], tgt_pairs[:, 1]].numpy()
    tgt_pairs = tgt_pairs[keep]
    transferred = z_t[tgt_pairs[:, 0], tgt_pairs[:, 1]].numpy()
    truth = _true_labels(tgt.true_returns, tgt_pairs)
    decided = truth != 0.5
    metrics["pearl/label_accuracy"] = float(((transferred > 0.5) == (truth > 0.5))[decided].mean())
    metrics["pearl/label_valid_fraction"] = float(keep.mean())
    metrics["pearl/label_mean_abs_margin"] = float(np.abs(transferred - 0.5).mean())
    noisy_truth = _flip(truth, cfg.label_flip, noise)  # what a noisy human would answer on the target pairs

    f_tgt, f_ev, f_src = step_features(tgt.positions), step_features(ev.positions), step_features(src.positions)
    nets = {
        "pearl": train_reward(f_tgt, tgt_pairs, transferred, cfg, gaussian=True, seed=cfg.seed),
        "pearl_bt": train_reward(f_tgt, tgt_pairs, transferred, cfg, gaussian=False, seed=cfg.seed),
        "true_labels": train_reward(f_tgt, tgt_pairs, noisy_truth, cfg, gaussian=True, seed=cfg.seed),
        "true_labels_bt": train_reward(f_tgt, tgt_pairs, noisy_truth, cfg, gaussian=False, seed=cfg.seed),
        "no_transfer": train_reward(f_src, src_pairs, src_labels, cfg, gaussian=True, seed=cfg.seed),
    }
    for name, net in nets.items():
        metrics[f"reward/spearman_{name}"] = spearman(reward_returns(net, f_ev), ev.true_returns)
    metrics["reward/spearman_task_reward"] = spearman(ev.task_rewards.sum(1), ev.true_returns)
    stats = {name: _reward_stats(net, f_tgt) for name, net in nets.items()}
    learned = ("pearl", "true_labels", "no_transfer")
    if cfg.offline_policy_steps:
        t2 = time.time()
        extra = collect_trajectories(cfg.target_env_id, cfg.offline_rollouts, cfg.seed + 3, cfg.steps, render=False)
        data = Trajectories(None, *(np.concatenate([getattr(tgt, k), getattr(extra, k)]) for k in
                                    ("positions", "true_rewards", "task_rewards", "observations", "actions")))
        runs = {name: (nets[name], stats[name], False) for name in learned}
        runs.update(true_reward=(None, None, True), bc=(None, None, False))
        for name, (net, st, true_r) in runs.items():
            ret, moved = _offline_return(cfg, data, net, st, true_reward=true_r)
            metrics[f"offline/true_return_{name}"], metrics[f"offline/puck_moved_{name}"] = ret, moved
        metrics["offline/data_true_return_mean"] = float(data.true_returns.mean())
        metrics["offline/data_true_return_best"] = float(data.true_returns.max())
        metrics["offline/time_s"] = time.time() - t2
    if cfg.policy_timesteps:
        t3 = time.time()
        for name in learned + ("true_reward",):
            net = nets.get(name)
            ret, moved = _ppo_return(cfg, net, stats.get(name))
            metrics[f"policy/true_return_{name}"], metrics[f"policy/puck_moved_{name}"] = ret, moved
        metrics["policy/time_s"] = time.time() - t3
    metrics["time/total_s"] = time.time() - t0
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
