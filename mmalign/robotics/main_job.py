"""The main job (``mmalign robotics main``): SAC learning a MuJoCo task from a noisy simulated human.

Runs, on the embedded defaults, three agents on the same task and seed and writes a report:

(a) SAC whose reward is a Bradley–Terry ensemble learned online from a B-Pref *mistake* teacher (10% flipped
    labels), PEBBLE-style with replay-buffer relabelling (:mod:`mmalign.robotics.pebble`);
(b) the same SAC on the true reward; (c) a uniformly random policy.

The run folder gets ``report.md`` + ``report.html`` (learning curves of true return, learned-vs-true reward scatter,
label statistics, a rendered query pair as GIF and frame strip), ``curves.json``, ``reward_model.safetensors`` and
``summary.json``. ``smoke=true`` shrinks every budget so that the whole pipeline runs in seconds (CI tests).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from mmalign.config import Config, check_positive, option
from mmalign.robotics.pebble import PebbleConfig

__all__ = ["MainConfig", "run", "SMOKE_OVERRIDES"]


#: What ``smoke=true`` changes (a few hundred steps, a couple of feedback rounds).
SMOKE_OVERRIDES: dict[str, Any] = dict(
    total_steps=400, learning_starts=100, first_feedback=150, feedback_every=100, label_budget=24,
    initial_labels=12, labels_per_round=6, rm_batch_size=8, rm_epochs=3, eval_every=200, eval_episodes=2,
    batch_size=32, candidate_factor=2,
)


@dataclasses.dataclass
class MainConfig(PebbleConfig):
    """The main job: learned-reward SAC (noisy simulated human) vs true-reward SAC vs a random policy.

    Every :class:`PebbleConfig` field configures the learned-reward agent (the true-reward agent copies it); the
    defaults below are the main job (Reacher-v5, mistake teacher, 10k steps, 400 queries).
    """

    env_id: str = option("Reacher-v5", "gymnasium id of the task (true reward is hidden from the agent)")
    total_steps: int = option(10000, "env steps of each SAC agent")
    teacher: str | dict[str, Any] = option(
        "mistake", "teacher by name from mmalign.registry.TEACHERS (B-Pref presets oracle, stochastic, mistake, skip, "
                   "myopic, equal, ...), with per-field overrides teacher.<field>=value")
    label_budget: int = option(400, "total number of queries asked (skipped ones count), at most this many")
    rm_epochs: int = option(30, "passes over all labels per feedback round")
    normalize_act: bool = option(
        True, "reward model sees standardised actions balanced against the observations (the reward-input fix of "
              "docs/methods/pebble.md; normalised score 0.96 with it vs 0.78 without over 3 seeds)")
    rm_action_squares: bool = option(True, "append the squared standardised actions to the reward model's input "
                                           "(so a quadratic control cost is learnable; part of the reward-input fix)")
    eval_episodes: int = option(10, "episodes per evaluation (deterministic policy, true reward)")
    smoke: bool = option(False, "tiny budgets for a seconds-long check of the whole pipeline (CI tests)")
    random_episodes: int = option(10, "episodes per evaluation point of the random policy")
    scatter_episodes: int = option(6, "episodes (half final policy, half random) for the reward scatter")
    render: bool = option(True, "render a query pair to GIF + frame strip (offscreen MuJoCo, egl then osmesa)")
    render_size: int = option(96, "rendered frame width and height in pixels")
    parallel: bool = option(True, "train the true-reward agent in a second process when the CPU has >= 2 cores")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("random_episodes", "scatter_episodes", "render_size"):
            check_positive(name, getattr(self, name))
        if self.reward != "learned" or self.algo != "sac":
            raise ValueError(f"reward must be 'learned' and algo 'sac' in the main job (the true-reward baseline is "
                             f"added), got reward={self.reward!r}, algo={self.algo!r}")

    def effective_agent(self) -> PebbleConfig:
        """The learned-reward agent's config actually run (smoke overrides applied)."""
        names = {f.name for f in dataclasses.fields(PebbleConfig)}
        values = {k: v for k, v in dataclasses.asdict(self).items() if k in names}
        if self.smoke:
            values.update(SMOKE_OVERRIDES)
        return PebbleConfig(**values)


class _Progress:
    def __init__(self, t0: float | None = None) -> None:
        self.t0 = time.perf_counter() if t0 is None else t0

    def __call__(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:6.1f}s] {msg}", flush=True)


def _train_true_agent(cfg: PebbleConfig, t0: float) -> dict[str, Any]:
    """The true-reward baseline (picklable results only, so it can run in a child process)."""
    import torch

    from mmalign.robotics.pebble import train_agent

    torch.set_num_threads(1)
    say = _Progress(t0)
    res = train_agent(cfg, None, progress=lambda m: say("  [true]    " + m))
    return {k: res[k] for k in ("curve", "final_true_return", "wall_s")}


def _random_curve(env_id: str, steps: list[float], episodes: int, seed: int) -> list[dict[str, float]]:
    import gymnasium

    from mmalign.robotics.segments import collect_episodes

    env = gymnasium.make(env_id)
    env.action_space.seed(seed)
    rows = []
    for k, step in enumerate(steps):
        eps = collect_episodes(env, lambda o: env.action_space.sample(), episodes, seed=50_000 + 1000 * k + seed)
        ret = [float(ep["rew"].sum()) for ep in eps]
        rows.append({"step": step, "eval/true_return": float(np.mean(ret)), "eval/true_return_std": float(np.std(ret))})
    env.close()
    return rows


def validate(cfg: MainConfig, resume: bool = False) -> None:
    """Before the CLI makes a run folder: ``--resume`` refused, the agent's env id, spaces and teacher checked."""
    from mmalign.robotics.pebble import check_setup

    if resume:
        raise ValueError("resume=True is not supported by robotics.main (it runs in minutes); start a new run")
    check_setup(cfg.effective_agent())


def run(cfg: MainConfig, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Train the three agents, evaluate, render and write the report; returns summary metrics."""
    import gymnasium
    import torch

    from mmalign.robotics.pebble import check_setup, train_agent
    from mmalign.robotics.report import markdown_table, plot_curves, plot_reward_scatter, write_report
    from mmalign.robotics.segments import collect_episodes, segments_from_episodes

    if resume:
        raise ValueError("resume=True is not supported by robotics.main (it runs in minutes); start a new run")
    run_dir = Path(run_dir)
    agent = cfg.effective_agent()
    check_setup(agent)
    torch.set_num_threads(1)  # tiny MLPs: threads cost more than they give on a shared CPU
    say = _Progress()
    t_start = time.perf_counter()
    say(f"main job: {agent.env_id}, {agent.total_steps} steps per agent, teacher '{agent.teacher}', "
        f"{agent.label_budget} queries{' (smoke mode)' if cfg.smoke else ''}")

    true_cfg = dataclasses.replace(agent, reward="true")
    pool = None
    if cfg.parallel and (os.cpu_count() or 1) >= 2:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        say("(b) SAC on the true reward: started in a second process")
        pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        future = pool.submit(_train_true_agent, true_cfg, say.t0)
    say("(a) SAC learning from the simulated human (learned reward ensemble)")
    learned = train_agent(agent, run_dir, progress=lambda m: say("  [learned] " + m))
    if pool is not None:
        true = future.result()
        pool.shutdown()
    else:
        say("(b) SAC on the true reward")
        true = _train_true_agent(true_cfg, say.t0)
    say("(c) random policy")
    steps = [row["step"] for row in true["curve"]]
    random_rows = _random_curve(agent.env_id, steps, cfg.random_episodes if not cfg.smoke else 2, agent.seed)
    curves = {
        f"SAC, learned reward ({agent.teacher} teacher, {int(learned['labels']['labels/queries'])} queries)":
            learned["curve"],
        "SAC, true reward": true["curve"],
        "random policy": random_rows,
    }
    plot_curves(curves, run_dir / "learning_curves.png", title=f"{agent.env_id}: true return (mean ± std)")
    (run_dir / "curves.json").write_text(json.dumps(curves, indent=1))

    say("reward scatter and rendering")
    env = gymnasium.make(agent.env_id)
    model, state = learned["model"], learned["state"]
    n_half = max(1, cfg.scatter_episodes // 2)
    eps_agent = collect_episodes(env, lambda o: model.predict(o, deterministic=True)[0], n_half,
                                 seed=90_000 + agent.seed, record_state=True)
    env.action_space.seed(91_000 + agent.seed)  # the random actions too, or the scatter differs run to run
    eps_random = collect_episodes(env, lambda o: env.action_space.sample(), n_half, seed=91_000 + agent.seed,
                                  record_state=True)
    env.close()
    all_eps = eps_agent + eps_random
    obs = np.concatenate([ep["obs"] for ep in all_eps])
    act = np.concatenate([ep["act"] for ep in all_eps])
    true_r = np.concatenate([ep["rew"] for ep in all_eps])
    learned_r = state.reward_fn(obs, act)
    corr = plot_reward_scatter(true_r, learned_r, run_dir / "reward_scatter.png", title="per step")
    seg_len = agent.segment_length
    segs = segments_from_episodes(all_eps, seg_len)
    seg_learned = state.reward_fn(segs.obs.reshape(-1, segs.obs.shape[-1]),
                                  segs.act.reshape(-1, segs.act.shape[-1])).reshape(len(segs), seg_len).sum(1)
    seg_corr = float(np.corrcoef(segs.returns(), seg_learned)[0, 1]) if len(segs) > 2 else math.nan

    video_md = _render_pair(cfg, agent, eps_agent[0], eps_random[0], run_dir, say)

    stats = learned["labels"]
    last_teacher = {k: v for k, v in (state.history[-1] if state.history else {}).items() if k.startswith("teacher/")}
    final = {name: rows[-1]["eval/true_return"] for name, rows in curves.items()}
    r_learned, r_true, r_random = (learned["final_true_return"], true["final_true_return"],
                                   random_rows[-1]["eval/true_return"])
    denom = r_true - r_random
    normalized = (r_learned - r_random) / denom if abs(denom) > 1e-8 else math.nan
    wall = time.perf_counter() - t_start
    summary = {
        "eval/true_return_learned": r_learned,
        "eval/true_return_true_reward": r_true,
        "eval/true_return_random": r_random,
        "eval/normalized_score": normalized,
        "rewards/pearson_step": corr,
        "rewards/pearson_segment": seg_corr,
        **stats,
        "time/wall_s": wall,
        "time/learned_agent_s": learned["wall_s"],
        "time/true_agent_s": true["wall_s"],
        "time/relabel_s": learned["relabel_s"],
        "time/feedback_s": learned["feedback_s"],
    }
    sections = [
        ("Setup", (
            f"Task `{agent.env_id}`, SAC ({agent.net_width}x{agent.net_width} MLPs), {agent.total_steps} env steps "
            f"per agent, seed {agent.seed}. Teacher: B-Pref `{agent.teacher}` preset (see docs/methods/pebble.md). "
            f"Queries: {agent.initial_labels} at step {agent.first_feedback}, then {agent.labels_per_round} every "
            f"{agent.feedback_every} steps, at most {agent.label_budget}; {seg_len}-step segments; selector "
            f"`{agent.selector}` over {agent.candidate_factor}x candidates; reward ensemble of {agent.ensemble_size} "
            f"MLPs, replay buffer relabelled after every round. Evaluation: {agent.eval_episodes} deterministic "
            f"episodes on the true reward.{' **Smoke mode: budgets are tiny, numbers mean nothing.**' if cfg.smoke else ''}"
        )),
        ("Learning curves (true return)", "![learning curves](learning_curves.png)\n\n" + markdown_table(
            [{"agent": k, "final true return": v} for k, v in final.items()])
         + f"\n\nNormalized score (learned − random) / (true − random): **{normalized:.3f}**"),
        ("Learned vs true reward", (
            f"![reward scatter](reward_scatter.png)\n\nPer-step Pearson r = {corr:.3f}; per-{seg_len}-step-segment "
            f"Pearson r = {seg_corr:.3f} (on {len(all_eps)} episodes: half final learned policy, half random)."
        )),
        ("Label statistics", markdown_table([{"statistic": k, "value": v} for k, v in {**stats, **last_teacher}.items()])
         + "\n\n`teacher/*` rows are from the last feedback round; `labels/agreement_with_true_return` is the share "
           "of answered, non-tied labels that agree with the true segment-return order (the mistake teacher flips "
           "10% on purpose)."),
        ("Segment video", video_md),
        ("Timing", markdown_table([{"part": k, "seconds": v} for k, v in summary.items() if k.startswith("time/")])),
    ]
    write_report(run_dir, f"mmalign main job: {agent.env_id} from a simulated human", sections)
    say(f"done in {wall:.1f}s: learned {r_learned:.2f}, true {r_true:.2f}, random {r_random:.2f}; "
        f"report: {run_dir / 'report.html'}")
    return summary


def _render_pair(cfg: MainConfig, agent: PebbleConfig, ep_a: dict[str, np.ndarray], ep_b: dict[str, np.ndarray],
                 run_dir: Path, say: Any) -> str:
    """Render one segment of the final agent next to one of the random policy; Markdown for the report."""
    if not cfg.render:
        return "Rendering was turned off (`render=false`)."
    from mmalign.robotics.render import frame_strip, render_states_isolated, save_video, side_by_side

    h = min(agent.segment_length, len(ep_a["rew"]), len(ep_b["rew"]))
    qpos = np.concatenate([ep_a["qpos"][:h], ep_b["qpos"][:h]])
    qvel = np.concatenate([ep_a["qvel"][:h], ep_b["qvel"][:h]])
    size = cfg.render_size if not cfg.smoke else 48
    try:
        frames, backend = render_states_isolated(agent.env_id, qpos, qvel, width=size, height=size)
    except RuntimeError as err:
        say(f"rendering skipped: {err}")
        return f"Rendering failed on this machine: {err}"
    pair = side_by_side(frames[:h], frames[h:])
    save_video(pair, run_dir / "query_pair.gif", fps=15)
    from PIL import Image

    Image.fromarray(frame_strip(frames[:h])).save(run_dir / "frames_learned.png")
    Image.fromarray(frame_strip(frames[h:])).save(run_dir / "frames_random.png")
    ra, rb = float(ep_a["rew"][:h].sum()), float(ep_b["rew"][:h].sum())
    return (
        f"A query as a labeller would see it (left: final learned-reward agent, true segment return {ra:.2f}; right: "
        f"random policy, {rb:.2f}); rendered offscreen with MUJOCO_GL={backend}, shadows/reflections/skybox off.\n\n"
        "![query pair](query_pair.gif)\n\nFrame strip, learned agent:\n\n![learned](frames_learned.png)\n\n"
        "Frame strip, random policy:\n\n![random](frames_random.png)"
    )
