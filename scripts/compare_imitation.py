"""mmalign vs `imitation`'s PreferenceComparisons on Reacher: same label budget, env steps, teacher, learner (PPO).

Run through scripts/compare_imitation.sh (which builds imitation's own venv). ``--impl imitation`` must run in that
venv (gymnasium 0.29 → Reacher-v4), ``--impl mmalign`` in mmalign's venv (gymnasium 1.x → Reacher-v5; same
dynamics and reward formula, v5 drops a constant observation entry). Both use an oracle synthetic teacher
(imitation: ``SyntheticGatherer(temperature=0)``; mmalign: B-Pref ``oracle``), 25-step fragments, PPO with
``n_steps=1024``, and are evaluated on 10 deterministic episodes of the true reward. Each writes one JSON file.

The issue fixes task, label budget and env steps only; ``--set key=value`` changes any other field of mmalign's
:class:`~mmalign.robotics.pebble.PebbleConfig` (e.g. ``n_envs=8 ppo_n_steps=128``), ``--tag`` names such a
configuration in file names and tables. mmalign runs also record where their process CPU time went
(:func:`cpu_breakdown`): PPO update, reward-model fitting, the rest of the feedback rounds, per-step learned-reward
inference, and the remainder (rollout: policy forward passes, env steps, buffers).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np


def evaluate(predict, env, episodes: int = 10, seed: int = 10_000) -> tuple[float, float]:
    returns = []
    for k in range(episodes):
        obs, _ = env.reset(seed=seed + k)
        done, total = False, 0.0
        while not done:
            obs, r, term, trunc, _ = env.step(predict(obs))
            total += float(r)
            done = term or trunc
        returns.append(total)
    return float(np.mean(returns)), float(np.std(returns))


def run_imitation(steps: int, labels: int, seed: int, threads: int) -> dict:
    import gymnasium
    from imitation.algorithms import preference_comparisons as pc
    from imitation.policies.base import FeedForward32Policy, NormalizeFeaturesExtractor
    from imitation.rewards.reward_nets import BasicRewardNet
    from imitation.util.networks import RunningNorm
    from imitation.util.util import make_vec_env
    import torch
    from stable_baselines3 import PPO

    if threads > 0:  # default 1, as the mmalign side: compare single-thread CPU and wall time
        torch.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    venv = make_vec_env("Reacher-v4", rng=rng, n_envs=1)
    reward_net = BasicRewardNet(venv.observation_space, venv.action_space, normalize_input_layer=RunningNorm)
    agent = PPO(policy=FeedForward32Policy, env=venv, seed=seed, n_steps=1024, batch_size=64,
                policy_kwargs=dict(features_extractor_class=NormalizeFeaturesExtractor,
                                   features_extractor_kwargs=dict(normalize_class=RunningNorm)))
    trainer = pc.AgentTrainer(algorithm=agent, reward_fn=reward_net, venv=venv, exploration_frac=0.05, rng=rng)
    algo = pc.PreferenceComparisons(
        trainer, reward_net, num_iterations=5, fragmenter=pc.RandomFragmenter(warning_threshold=0, rng=rng),
        preference_gatherer=pc.SyntheticGatherer(temperature=0, rng=rng),
        reward_trainer=pc.BasicRewardTrainer(pc.PreferenceModel(reward_net), pc.CrossEntropyRewardLoss(), epochs=3,
                                             rng=rng),
        fragment_length=25, transition_oversampling=1, initial_comparison_frac=0.1, initial_epoch_multiplier=4,
        query_schedule="hyperbolic", allow_variable_horizon=False,
    )
    t0 = time.perf_counter()
    c0 = time.process_time()
    algo.train(total_timesteps=steps, total_comparisons=labels)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    env = gymnasium.make("Reacher-v4")
    mean, std = evaluate(lambda o: agent.predict(o, deterministic=True)[0], env)
    return {"impl": "imitation 1.0.1 PreferenceComparisons + PPO (Reacher-v4)", "true_return": mean, "std": std,
            "wall_s": wall, "cpu_s": cpu}


# Fixed by the issue (task, label budget, env steps) or by the comparison (teacher, seed, learner): not settable.
FIXED = ("env_id", "algo", "reward", "total_steps", "seed", "teacher", "label_budget")
BREAKDOWN = ("cpu_ppo_update_s", "cpu_reward_fit_s", "cpu_feedback_other_s", "cpu_reward_inference_s",
             "cpu_rollout_other_s")


def mmalign_config(steps: int, labels: int, seed: int, algo: str, overrides: list[str]) -> Any:
    """The mmalign side's PebbleConfig: the first comparison's settings, then ``key=value`` overrides."""
    from mmalign.config import parse_overrides
    from mmalign.robotics.pebble import PebbleConfig

    first = 1024
    base = dict(env_id="Reacher-v5", algo=algo, total_steps=steps, seed=seed, teacher="oracle",
                label_budget=labels, initial_labels=max(64, labels // 4),
                labels_per_round=max(1, (labels - max(64, labels // 4)) // 4), first_feedback=first,
                feedback_every=max(1024, (steps - first) // 5), ppo_n_steps=1024,
                batch_size=64 if algo == "ppo" else 128, eval_every=10 * steps, eval_episodes=1,
                save_reward_model=False)
    extra = parse_overrides(overrides)
    fixed = sorted(set(extra) & set(FIXED))
    if fixed:
        raise ValueError(f"--set may not change {fixed}: task, labels, steps, seed, teacher and learner are fixed "
                         f"by the comparison (use --steps/--labels/--seed/--algo)")
    return PebbleConfig.from_dict({**base, **extra})


@contextlib.contextmanager
def cpu_breakdown() -> Iterator[dict[str, float]]:
    """Accumulate process CPU seconds of PPO updates, reward fitting, feedback rounds and learned-reward calls.

    Wraps the methods for the duration of the block (class attributes, restored afterwards), at two
    ``process_time`` reads per call: far below cProfile's overhead, so the split can be recorded on every run.
    The dict holds raw totals (``ppo_update``, ``reward_fit``, ``feedback``, ``reward_inference``).
    """
    from stable_baselines3 import PPO

    from mmalign.robotics import feedback, reward_io

    totals = {"ppo_update": 0.0, "reward_fit": 0.0, "feedback": 0.0, "reward_inference": 0.0}

    def timed(fn: Callable[..., Any], key: str) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            c0 = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[key] += time.process_time() - c0
        return wrapper

    patches = [(PPO, "train", "ppo_update"), (reward_io, "fit_ensemble", "reward_fit"),
               (feedback.PreferenceFeedback, "feedback_round", "feedback"),
               (feedback.PreferenceFeedback, "reward_fn", "reward_inference")]
    saved = [(owner, name, owner.__dict__[name]) for owner, name, _ in patches]
    try:
        for owner, name, key in patches:
            setattr(owner, name, timed(getattr(owner, name), key))
        yield totals
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def split_cpu(total: float, raw: dict[str, float]) -> dict[str, float]:
    """Disjoint parts of ``total``: fitting is inside the feedback rounds, everything else is the rollout."""
    return {"cpu_ppo_update_s": raw["ppo_update"], "cpu_reward_fit_s": raw["reward_fit"],
            "cpu_feedback_other_s": raw["feedback"] - raw["reward_fit"],
            "cpu_reward_inference_s": raw["reward_inference"],
            "cpu_rollout_other_s": total - raw["ppo_update"] - raw["feedback"] - raw["reward_inference"]}


def run_mmalign(steps: int, labels: int, seed: int, algo: str, threads: int, overrides: list[str] | None = None,
                tag: str = "") -> dict:
    import gymnasium
    import torch

    from mmalign.robotics.pebble import train_agent

    if threads > 0:
        torch.set_num_threads(threads)
    cfg = mmalign_config(steps, labels, seed, algo, list(overrides or []))
    with cpu_breakdown() as raw:
        t0 = time.perf_counter()
        c0 = time.process_time()
        res = train_agent(cfg)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    mean, std = evaluate(lambda o: res["model"].predict(o, deterministic=True)[0], gymnasium.make("Reacher-v5"))
    label = f"mmalign PbRL + {algo.upper()} (Reacher-v5{', ' + tag if tag else ''})"
    out = {"impl": label, "true_return": mean, "std": std, "wall_s": wall, "cpu_s": cpu,
           "queries": res["labels"]["labels/queries"], "overrides": list(overrides or [])}
    out.update(split_cpu(cpu, raw))
    return out


def summarize(out: Path, plan: Any) -> str:
    """Per-run rows, then per implementation the mean ± 95% t half-width over the plan's seeds, and each mmalign
    configuration paired with imitation on the same seeds (return difference, CPU-time ratio), as Markdown."""
    from mmalign.robotics.protocol import fmt_ci, mean_ci, paired_diff

    rows = [r for r in (json.loads(p.read_text()) for p in sorted(out.glob("result_*.json")))
            if r["seed"] in plan.seeds]
    lines = [f"Seeds: {plan.describe()}; ± over seeds = 95% t half-width.", "",
             "| implementation | steps | labels | seed | true return (10 episodes, ± over episodes) | wall s | CPU s |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["impl"], r["seed"])):
        lines.append(f"| {r['impl']} | {r['steps']} | {r['labels']} | {r['seed']} | {r['true_return']:.2f} ± "
                     f"{r['std']:.2f} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} |")
    lines += ["", "| implementation | seeds | true return | wall s | CPU s | paired with imitation: return "
              "difference | paired: imitation CPU s / this CPU s |", "|---|---|---|---|---|---|---|"]
    # one row per (implementation, steps, labels): runs with another budget in the same folder are not averaged in
    groups = {}
    for r in rows:
        groups.setdefault((r["impl"], r["steps"], r["labels"]), []).append(r)
    budgets = {impl: {(st, lb) for i, st, lb in groups if i == impl} for impl, _, _ in groups}
    for (impl, steps, labels), group in sorted(groups.items()):
        name = impl if len(budgets[impl]) == 1 else f"{impl} ({steps} steps, {labels} labels)"
        # imitation's runs record their full name ("imitation 1.0.1 PreferenceComparisons + PPO ...")
        ref = {r["seed"]: r for r in rows
               if r["impl"].startswith("imitation") and (r["steps"], r["labels"]) == (steps, labels)}
        paired = ["-", "-"]
        if not impl.startswith("imitation") and ref:
            mine = {r["seed"]: r for r in group}
            paired[0] = str(paired_diff({s: r["true_return"] for s, r in mine.items()},
                                        {s: r["true_return"] for s, r in ref.items()}))
            ratios = [ref[s]["cpu_s"] / mine[s]["cpu_s"] for s in sorted(set(mine) & set(ref))]
            m, h, n = mean_ci(ratios)
            paired[1] = f"{m:.2f} ± {h:.2f} (n={n})"
        lines.append(f"| {name} | {', '.join(str(r['seed']) for r in sorted(group, key=lambda r: r['seed']))} | "
                     + " | ".join(fmt_ci([r[k] for r in group], ".2f" if k == "true_return" else ".0f")
                                  for k in ("true_return", "wall_s", "cpu_s"))
                     + f" | {paired[0]} | {paired[1]} |")
    split = [r for r in rows if all(k in r for k in BREAKDOWN)]
    if split:
        lines += ["", "| implementation | seeds | PPO update | reward fit | other feedback | reward inference | "
                  "rollout (rest) | total CPU s |", "|---|---|---|---|---|---|---|---|"]
        for impl, steps, labels in sorted({(r["impl"], r["steps"], r["labels"]) for r in split}):
            group = [r for r in split if (r["impl"], r["steps"], r["labels"]) == (impl, steps, labels)]
            name = impl if len(budgets[impl]) == 1 else f"{impl} ({steps} steps, {labels} labels)"
            cells = " | ".join(f"{np.mean([r[k] for r in group]):.1f}" for k in BREAKDOWN)
            lines.append(f"| {name} | {', '.join(str(r['seed']) for r in group)} | {cells} | "
                         f"{np.mean([r['cpu_s'] for r in group]):.1f} |")
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    print(text)
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", choices=["imitation", "mmalign"], default="mmalign")
    p.add_argument("--algo", choices=["ppo", "sac"], default="ppo", help="mmalign learner")
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--labels", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default, all cores)")
    p.add_argument("--out", default="runs/compare_imitation")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="mmalign only: override a PebbleConfig field (repeatable), e.g. --set n_envs=8")
    p.add_argument("--tag", default="", help="mmalign only: name of the configuration (file names and tables)")
    p.add_argument("--summarize", action="store_true", help="write the table of the seeds given by --dev-seeds (a "
                   "development run) or --report-seeds (a reported table, disjoint from --dev-seeds)")
    p.add_argument("--check-seeds", action="store_true",
                   help="only check --dev-seeds/--report-seeds (compare_imitation.sh calls it before any run)")
    # the protocol's flags written out (not mmalign.robotics.protocol.add_seed_args): this script also runs in
    # imitation's own venv, which cannot import mmalign
    p.add_argument("--dev-seeds", type=int, nargs="*", default=list(range(10)),
                   help="seeds on which settings were chosen (development; default 0-9)")
    p.add_argument("--report-seeds", type=int, nargs="*", default=[],
                   help="seeds of the reported table: disjoint from --dev-seeds, at least 5 unless --sized-down")
    p.add_argument("--sized-down", default="", help="reason a reported table has fewer than 5 reporting seeds")
    args = p.parse_args()
    if args.summarize or args.check_seeds:
        from mmalign.robotics.protocol import seed_plan

        try:
            plan = seed_plan(args.dev_seeds, args.report_seeds, args.sized_down)
        except ValueError as err:
            p.error(str(err))
        if args.check_seeds:
            print(plan.describe())
            return
    if args.tag and not args.tag.replace("-", "").replace("_", "").isalnum():
        p.error(f"--tag must be letters, digits, '-' or '_', got {args.tag!r}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.summarize:
        summarize(out, plan)
        return
    if args.impl == "imitation":
        res = run_imitation(args.steps, args.labels, args.seed, args.threads)
    else:
        res = run_mmalign(args.steps, args.labels, args.seed, args.algo, args.threads, args.set, args.tag)
    res.update({"steps": args.steps, "labels": args.labels, "seed": args.seed, "threads": args.threads,
                "platform": platform.platform(), "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())})
    name = args.impl if args.impl == "imitation" else f"mmalign_{args.algo}" + (f"_{args.tag}" if args.tag else "")
    (out / f"result_{name}_s{args.seed}.json").write_text(json.dumps(res, indent=1))
    print(res)


if __name__ == "__main__":
    main()
