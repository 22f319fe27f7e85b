"""Offline Contrastive Preference Learning (CPL) on MuJoCo, with BC and %BC baselines (``robotics.cpl``).

Recipe (Hejna et al., ICLR 2024, arXiv 2310.13639; official jhejna/cpl, ``add_pref_labels.py``):

1. **Oracle**: SAC trained on the true reward. Its critic gives ``A*(s, a) = Q(s, a) − V(s)`` with
   ``V(s) = E_{a'~π}[Q(s, a')]`` estimated from ``value_samples`` policy actions (min of the twin critics).
2. **Data of mixed quality**: episodes from the oracle with Gaussian action noise of several sizes, optionally a
   constant action offset per level (``action_bias``: a systematically wrong demonstrator, so that BC on all data
   is sub-optimal — zero-mean noise alone averages out under BC), and from a uniformly random policy, cut into
   ``segment_length``-step segments.
3. **Labels**: :class:`mmalign.core.teachers.RegretTeacher` (β = ∞: ``1[Σ A*(σ¹) > Σ A*(σ²)]``, 0.5 on ties).
   *Dense*: every batch pairs segments at random from all segments (``pairs_per_segment`` labelled pairs per
   segment are drawn up front); *sparse*: fixed disjoint pairs, each segment in exactly one comparison.
4. **Policies** (deterministic actor, log-likelihood ``−‖μ(s) − a‖²`` up to constants, as the official code):
   CPL = BC pre-training, then :func:`mmalign.core.losses.cpl_loss` with ``bc_coef`` (CPL-BC) and bias λ;
   BC on all data; %BC on the top ``percent_bc``% of episodes by true return; P-IQL (the paper's baseline) =
   a Bradley–Terry reward from the same labels, then IQL on the same segments (:mod:`mmalign.robotics.piql`).
5. Evaluation: deterministic true return over ``eval_episodes`` episodes.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
from torch import nn

from mmalign.config import Config, check_choice, check_nonnegative, check_positive, check_range, option

__all__ = ["CPLConfig", "run", "validate", "has_progress", "build_dataset", "train_policy", "oracle_advantage_fn",
           "evaluate_policy"]

ORACLE_FILE = "oracle_sac.safetensors"


@dataclasses.dataclass
class CPLConfig(Config):
    """Offline CPL vs BC vs %BC from regret-labelled segments of mixed-quality MuJoCo rollouts."""

    env_id: str = option("Reacher-v5", "gymnasium MuJoCo task")
    seed: int = option(0, "seed of the oracle, data, labels and policies")
    oracle_steps: int = option(15000, "SAC steps on the true reward for the oracle")
    oracle_path: str = option("", "load the oracle SAC from this file instead of training one ('' = train): an "
                              "oracle_sac.safetensors written by an earlier run, or an SB3 .zip (read without "
                              "unpickling unless allow_pickle)")
    allow_pickle: bool = option(False, "read an SB3 .zip oracle_path with SB3's own loader, which unpickles it and "
                                "can run code in it: only for a file you trust")
    episodes_per_level: int = option(40, "episodes per data-quality level")
    noise_levels: tuple[float, ...] = option((0.0, 0.3, 0.6, 1.0), "oracle action-noise stds (units of half range)")
    action_bias: tuple[float, ...] = option((), "constant action offset per noise level (units of half range, added "
                                            "to every action dimension); () = no offset")
    random_episodes: int = option(40, "episodes of a uniformly random policy added to the data")
    segment_length: int = option(25, "steps per segment")
    density: Literal["dense", "sparse"] = option("dense", "dense: many random pairs per segment; sparse: disjoint pairs")
    pairs_per_segment: int = option(8, "labelled pairs per segment in dense mode")
    value_samples: int = option(16, "policy actions per state to estimate V(s) for the advantage")
    hidden: int = option(128, "policy MLP width (two hidden layers)")
    bc_steps: int = option(2000, "BC pre-training steps of CPL (also the BC / %BC training length)")
    cpl_steps: int = option(2000, "CPL steps after BC pre-training")
    batch_size: int = option(64, "segment pairs (CPL) or segments (BC) per step")
    lr: float = option(1e-3, "Adam learning rate (reset after BC pre-training, as the official code)")
    alpha: float = option(0.1, "CPL temperature α")
    bias: float = option(0.5, "CPL conservative bias λ in (0, 1]")
    bc_coef: float = option(0.0, "weight of the BC regulariser during CPL (CPL-BC)")
    percent_bc: float = option(10.0, "%BC: clone the top this-many percent of episodes by true return")
    eval_episodes: int = option(10, "evaluation episodes per policy")
    methods: tuple[str, ...] = option(("cpl", "bc", "pbc"), "which of cpl, bc, pbc (%BC), piql (P-IQL) to train")
    piql_steps: int = option(4000, "P-IQL: IQL steps (value, critics and AWR policy) on the learned reward")
    piql_expectile: float = option(0.7, "P-IQL: expectile τ of the value loss (CPL paper: 0.7)")
    piql_beta: float = option(1 / 3, "P-IQL: AWR temperature β, policy weights exp(A/β) (CPL paper: 0.3333)")
    piql_discount: float = option(0.99, "P-IQL: discount γ of the critic targets")
    piql_tau: float = option(0.005, "P-IQL: Polyak rate of the target critics")
    piql_lr: float = option(3e-4, "P-IQL: learning rate of the reward model, critics and value (CPL paper: 3e-4)")
    piql_reward_epochs: int = option(50, "P-IQL: Bradley–Terry epochs over the labelled pairs")
    piql_reward_ensemble: int = option(3, "P-IQL: reward ensemble members")
    piql_reward_hidden: int = option(64, "P-IQL: reward MLP width (two hidden layers)")

    def __post_init__(self) -> None:
        for name in ("oracle_steps", "episodes_per_level", "segment_length", "pairs_per_segment", "value_samples",
                     "hidden", "bc_steps", "batch_size", "eval_episodes", "piql_steps", "piql_reward_epochs",
                     "piql_reward_ensemble", "piql_reward_hidden"):
            check_positive(name, getattr(self, name))
        for name in ("random_episodes", "cpl_steps"):  # 0 = none; negative ones used to pass silently
            check_nonnegative(name, getattr(self, name))
        check_positive("lr", self.lr)
        check_positive("alpha", self.alpha)
        check_range("piql_expectile", self.piql_expectile, 0.0, 1.0, low_open=True, high_open=True)
        check_positive("piql_beta", self.piql_beta)
        check_range("piql_discount", self.piql_discount, 0.0, 1.0, high_open=True)
        check_range("piql_tau", self.piql_tau, 0.0, 1.0, low_open=True)
        check_positive("piql_lr", self.piql_lr)
        check_range("bias", self.bias, 0.0, 1.0, low_open=True)
        check_range("bc_coef", self.bc_coef, 0.0, 1e6)
        check_range("percent_bc", self.percent_bc, 0.0, 100.0, low_open=True)
        check_choice("density", self.density, ("dense", "sparse"))
        for m in self.methods:
            check_choice("methods", m, ("cpl", "bc", "pbc", "piql"))
        for s in self.noise_levels:
            check_range("noise_levels", s, 0.0, 10.0)
        if self.action_bias and len(self.action_bias) != len(self.noise_levels):
            raise ValueError(f"action_bias must be empty or have one entry per noise level "
                             f"({len(self.noise_levels)}), got {len(self.action_bias)} entries")
        for b in self.action_bias:
            check_range("action_bias", b, -2.0, 2.0)


# ------------------------------------------------------------------------------------------------ oracle + data


def train_oracle(cfg: CPLConfig, progress: Callable[[str], None] | None = None) -> Any:
    """SAC on the true reward (the oracle whose critic defines the regret labels)."""
    from stable_baselines3 import SAC

    from mmalign.robotics.pebble import PebbleConfig, check_setup

    check_setup(PebbleConfig(env_id=cfg.env_id, segment_length=cfg.segment_length, reward="true"))
    import gymnasium

    model = SAC("MlpPolicy", gymnasium.make(cfg.env_id), seed=cfg.seed, learning_starts=1000, batch_size=128,
                policy_kwargs=dict(net_arch=[64, 64]), device="cpu", verbose=0)
    t0 = time.perf_counter()
    model.learn(cfg.oracle_steps)
    if progress:
        progress(f"oracle SAC trained for {cfg.oracle_steps} steps in {time.perf_counter() - t0:.0f}s")
    return model


def oracle_advantage_fn(model: Any, value_samples: int, seed: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``A*(s, a) = min_i Q_i(s, a) − mean_{a'~π(s)} min_i Q_i(s, a')`` of an SB3 SAC, on ``[N, H, ·]`` tensors."""
    policy = model.policy
    gen = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def adv(obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        lead = obs.shape[:2]
        o = obs.reshape(-1, obs.shape[-1]).float()
        a = policy.scale_action(act.reshape(-1, act.shape[-1]).cpu().numpy())
        a = torch.as_tensor(a, dtype=torch.float32)
        q = torch.min(torch.cat(policy.critic(o, a), dim=1), dim=1).values
        mean, log_std, _ = policy.actor.get_action_dist_params(o)
        std = log_std.exp()
        o_rep = o.repeat(value_samples, 1)
        noise = torch.randn((value_samples * len(o), mean.shape[1]), generator=gen)
        a_rep = torch.tanh(mean.repeat(value_samples, 1) + std.repeat(value_samples, 1) * noise)
        v = torch.min(torch.cat(policy.critic(o_rep, a_rep), dim=1), dim=1).values.reshape(value_samples, -1).mean(0)
        return (q - v).reshape(lead)

    return adv


def build_dataset(cfg: CPLConfig, oracle: Any, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Episodes of mixed quality, segments, regret labels (dense or sparse pairs) and the %BC subset."""
    import gymnasium

    from mmalign.core.teachers import RegretTeacher
    from mmalign.robotics.segments import collect_episodes, random_pairs, segments_from_episodes

    env = gymnasium.make(cfg.env_id)
    env.action_space.seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    low, high = env.action_space.low, env.action_space.high
    episodes: list[dict[str, np.ndarray]] = []
    biases = cfg.action_bias or (0.0,) * len(cfg.noise_levels)
    for k, (noise, bias) in enumerate(zip(cfg.noise_levels, biases)):
        offset = bias * (high - low) / 2

        def behaviour(o: np.ndarray, offset: np.ndarray = offset) -> np.ndarray:
            return np.clip(oracle.predict(o, deterministic=True)[0] + offset, low, high)

        episodes += collect_episodes(env, behaviour, cfg.episodes_per_level, seed=cfg.seed * 100_000 + 1000 * k,
                                     action_noise=noise, rng=rng)
    episodes += collect_episodes(env, lambda o: env.action_space.sample(), cfg.random_episodes,
                                 seed=cfg.seed * 100_000 + 99_000)
    env.close()
    segs = segments_from_episodes(episodes, cfg.segment_length)
    n = len(segs)
    if cfg.density == "dense":
        i, j = random_pairs(n, n * cfg.pairs_per_segment, rng)
    else:
        perm = rng.permutation(n - n % 2)
        i, j = perm[0::2], perm[1::2]
    teacher = RegretTeacher(oracle_advantage_fn(oracle, cfg.value_samples, cfg.seed))
    labels = teacher(segs.true_rewards[i], segs.true_rewards[j], obs_first=segs.obs[i], obs_second=segs.obs[j],
                     act_first=segs.act[i], act_second=segs.act[j])
    ep_returns = np.array([ep["rew"].sum() for ep in episodes])
    top = np.argsort(-ep_returns)[: max(1, int(round(len(episodes) * cfg.percent_bc / 100)))]
    pbc_obs = np.concatenate([episodes[t]["obs"] for t in top])
    pbc_act = np.concatenate([episodes[t]["act"] for t in top])
    # How often the regret label agrees with the true partial-return order (a sanity number for the report).
    ret_i, ret_j = segs.returns()[i], segs.returns()[j]
    y = labels.labels.numpy()
    decisive = (y != 0.5) & (ret_i != ret_j)
    agree = float(((y > 0.5) == (ret_i > ret_j))[decisive].mean()) if decisive.any() else float("nan")
    per_level = np.split(ep_returns[: cfg.episodes_per_level * len(cfg.noise_levels)], len(cfg.noise_levels))
    level_returns = {f"noise {n:g}, bias {b:g}": float(r.mean())
                     for n, b, r in zip(cfg.noise_levels, biases, per_level)}
    if cfg.random_episodes:
        level_returns["random"] = float(ep_returns[len(ep_returns) - cfg.random_episodes:].mean())
    if progress:
        progress("mean episode return per data level: " + ", ".join(f"{k}: {v:.1f}" for k, v in level_returns.items()))
        progress(f"data: {len(episodes)} episodes, {n} segments, {len(i)} {cfg.density} pairs; regret labels agree "
                 f"with true-return order on {agree:.3f}")
    return {
        "segments": segs, "first": i, "second": j, "labels": torch.as_tensor(y, dtype=torch.float32),
        "episode_returns": ep_returns, "pbc_obs": pbc_obs, "pbc_act": pbc_act,
        "label_return_agreement": agree, "num_episodes": len(episodes), "level_returns": level_returns,
    }


# ------------------------------------------------------------------------------------------------ policies


class DeterministicActor(nn.Module):
    """``μ(s) = tanh(MLP(s))`` scaled to the action box; ``log π(a|s) = −‖μ(s) − a‖²`` (unit-variance Gaussian)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, low: np.ndarray, high: np.ndarray) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(obs_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, act_dim))
        self.register_buffer("center", torch.as_tensor((high + low) / 2, dtype=torch.float32))
        self.register_buffer("act_scale", torch.as_tensor((high - low) / 2, dtype=torch.float32))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.center + self.act_scale * torch.tanh(self.net(obs))

    def log_prob(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """Per-step ``−‖(μ(s) − a)/half‖²`` over the last axis (actions normalised to [-1, 1])."""
        return -(((self(obs) - act) / self.act_scale) ** 2).sum(-1)


def train_policy(
    method: str, cfg: CPLConfig, data: dict[str, Any], obs_dim: int, act_dim: int, low: np.ndarray,
    high: np.ndarray,
) -> tuple[DeterministicActor, list[dict[str, float]]]:
    """Train ``cpl`` (BC pre-training + CPL), ``bc`` (all segments), ``pbc`` (top-X% episodes) or ``piql``."""
    from mmalign.core.losses import cpl_loss
    from mmalign.core.rng import seeded_global_rng

    if method == "piql":
        from mmalign.robotics.piql import train_piql

        return train_piql(cfg, data, obs_dim, act_dim, low, high)

    with seeded_global_rng(cfg.seed):  # seeded init without reseeding the caller's global RNG
        actor = DeterministicActor(obs_dim, act_dim, cfg.hidden, low, high)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    segs = data["segments"]
    if method == "pbc":
        obs_all, act_all = torch.as_tensor(data["pbc_obs"]), torch.as_tensor(data["pbc_act"])
    else:
        obs_all = torch.as_tensor(segs.obs.reshape(-1, obs_dim))
        act_all = torch.as_tensor(segs.act.reshape(-1, act_dim))
    log: list[dict[str, float]] = []
    opt = torch.optim.Adam(actor.parameters(), lr=cfg.lr)
    bc_batch = cfg.batch_size * cfg.segment_length
    for step in range(cfg.bc_steps):
        idx = torch.randint(len(obs_all), (bc_batch,), generator=gen)
        loss = -actor.log_prob(obs_all[idx], act_all[idx]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 500 == 0:
            log.append({"step": float(step + 1), "train/bc_nll": float(loss.detach())})
    if method != "cpl":
        return actor, log
    opt = torch.optim.Adam(actor.parameters(), lr=cfg.lr)  # reset after pre-training, as the official code
    obs = torch.as_tensor(segs.obs)
    act = torch.as_tensor(segs.act)
    first, second = torch.as_tensor(data["first"]), torch.as_tensor(data["second"])
    labels = data["labels"]
    for step in range(cfg.cpl_steps):
        b = torch.randint(len(first), (cfg.batch_size,), generator=gen)
        i, j = first[b], second[b]
        lp1, lp2 = actor.log_prob(obs[i], act[i]), actor.log_prob(obs[j], act[j])
        loss, metrics = cpl_loss(lp1, lp2, labels[b], alpha=cfg.alpha, bias=cfg.bias, bc_coef=cfg.bc_coef)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 500 == 0:
            log.append({"step": float(cfg.bc_steps + step + 1), "train/loss": float(loss.detach()),
                        "train/pref_accuracy": float(metrics["train/pref_accuracy"])})
    return actor, log


@torch.no_grad()
def evaluate_policy(actor: nn.Module, env_id: str, episodes: int, seed: int) -> tuple[float, float]:
    """Mean and std of the true return of ``actor`` over ``episodes`` deterministic episodes."""
    import gymnasium

    env = gymnasium.make(env_id)
    returns = []
    for k in range(episodes):
        obs, _ = env.reset(seed=seed + k)
        done, total = False, 0.0
        while not done:
            a = actor(torch.as_tensor(obs, dtype=torch.float32)[None])[0].numpy()
            obs, r, term, trunc, _ = env.step(a)
            total += float(r)
            done = term or trunc
        returns.append(total)
    env.close()
    return float(np.mean(returns)), float(np.std(returns))


def validate(cfg: CPLConfig, resume: bool = False) -> None:
    """Everything checkable before work: resume support, the env (a Box-action task) and a given oracle file."""
    from mmalign.robotics.pebble import PebbleConfig, check_setup
    from mmalign.robotics.sb3_io import load_sb3_any

    if resume:
        raise ValueError("--resume is not supported by robotics.cpl (its phases are not checkpointed); start a new "
                         "run in a new --output-dir")
    check_setup(PebbleConfig(env_id=cfg.env_id, segment_length=cfg.segment_length, reward="true"))
    if cfg.oracle_path:
        path = Path(cfg.oracle_path)
        if not path.is_file():
            raise FileNotFoundError(f"oracle_path {cfg.oracle_path!r} does not exist (or is not a file)")
        if path.suffix == ".safetensors" or (path.suffix == ".zip" and not cfg.allow_pickle):
            load_sb3_any(path, env_id=cfg.env_id, algo="SAC")  # reads and checks it all, without unpickling
        elif path.suffix != ".zip":
            raise ValueError(f"oracle_path {cfg.oracle_path!r} must be a .safetensors policy written by "
                             f"robotics.cpl (oracle_sac.safetensors) or an SB3 .zip")


def has_progress(run_dir: Path) -> bool:
    """A run that trained its oracle keeps its folder when a later phase fails (see :mod:`mmalign.train.run_folder`).

    The oracle is the expensive part (``oracle_steps`` of SAC); a new run reuses it with ``oracle_path``. The file is
    written atomically, so one that exists is complete.
    """
    from mmalign.train.run_folder import has_progress as has_saved_rows

    return (Path(run_dir) / ORACLE_FILE).is_file() or has_saved_rows(run_dir)


def run(cfg: CPLConfig, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    """``mmalign robotics cpl``: oracle, dataset, CPL/BC/%BC, evaluation; writes ``results.json`` and a table."""
    from mmalign.robotics.sb3_io import load_sb3_any, save_sb3_policy

    validate(cfg, resume)
    torch.set_num_threads(1)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

    if cfg.oracle_path:
        oracle = load_sb3_any(cfg.oracle_path, env_id=cfg.env_id, algo="SAC", allow_pickle=cfg.allow_pickle)
        say(f"oracle loaded from {cfg.oracle_path}")
    else:
        oracle = train_oracle(cfg, say)
        save_sb3_policy(oracle, run_dir / ORACLE_FILE, cfg.env_id)
    try:
        return _after_oracle(cfg, oracle, run_dir, say, t0)
    except BaseException:
        if not cfg.oracle_path and (run_dir / ORACLE_FILE).is_file():
            print(f"[mmalign] robotics.cpl failed after training its oracle; the run folder {run_dir} is kept: a new "
                  f"run can start from that oracle with oracle_path={run_dir / ORACLE_FILE}", file=sys.stderr)
        raise


def _after_oracle(cfg: CPLConfig, oracle: Any, run_dir: Path, say: Callable[[str], None], t0: float) -> dict[str, Any]:
    """Data, policies, evaluation and the results files of a run with its oracle in hand."""
    import gymnasium

    from mmalign.robotics.report import markdown_table

    oracle_ret = evaluate_policy(_SB3Actor(oracle), cfg.env_id, cfg.eval_episodes, 77_000)
    say(f"oracle true return {oracle_ret[0]:.2f} ± {oracle_ret[1]:.2f}")
    data = build_dataset(cfg, oracle, say)
    env = gymnasium.make(cfg.env_id)
    low, high = env.action_space.low, env.action_space.high
    obs_dim, act_dim = int(np.prod(env.observation_space.shape)), int(np.prod(env.action_space.shape))
    env.close()
    rows = [{"method": "oracle SAC", "true_return": oracle_ret[0], "std": oracle_ret[1]},
            {"method": "data (mean episode)", "true_return": float(data["episode_returns"].mean()),
             "std": float(data["episode_returns"].std())}]
    logs = {}
    for method in cfg.methods:
        c0 = time.process_time()  # training CPU time per method (CPL vs P-IQL compute, as the paper's Table 2)
        actor, log = train_policy(method, cfg, data, obs_dim, act_dim, low, high)
        train_cpu_s = time.process_time() - c0
        mean, std = evaluate_policy(actor, cfg.env_id, cfg.eval_episodes, 77_000)
        name = {"cpl": "CPL", "bc": "BC (all data)", "pbc": f"%BC (top {cfg.percent_bc:g}%)", "piql": "P-IQL"}[method]
        rows.append({"method": name, "true_return": mean, "std": std, "train_cpu_s": train_cpu_s})
        logs[method] = log
        say(f"{name}: true return {mean:.2f} ± {std:.2f}")
    table = markdown_table(rows, ["method", "true_return", "std", "train_cpu_s"])
    (run_dir / "results.md").write_text(f"# CPL and baselines on {cfg.env_id} ({cfg.density}, seed {cfg.seed})\n\n"
                                        f"{table}\n")
    (run_dir / "results.json").write_text(json.dumps({"rows": rows, "logs": logs,
                                                      "label_return_agreement": data["label_return_agreement"],
                                                      "level_returns": data["level_returns"]}, indent=1))
    summary = {f"eval/true_return_{r['method']}": r["true_return"] for r in rows}
    summary["data/label_return_agreement"] = data["label_return_agreement"]
    summary["time/wall_s"] = time.perf_counter() - t0
    return summary


class _SB3Actor(nn.Module):
    """Deterministic SB3 policy as a torch callable on a batch of observations (for :func:`evaluate_policy`)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self.model.predict(obs.numpy(), deterministic=True)[0])
