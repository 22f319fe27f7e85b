"""mmalign vs `imitation`'s PreferenceComparisons on Reacher: same label budget, env steps, teacher, learner (PPO).

Run through scripts/compare_imitation.sh (which builds imitation's own venv). ``--impl imitation`` must run in that
venv (gymnasium 0.29 → Reacher-v4), ``--impl mmalign`` in mmalign's venv (gymnasium 1.x → Reacher-v5; same
dynamics and reward formula, v5 drops a constant observation entry). Both use an oracle synthetic teacher
(imitation: ``SyntheticGatherer(temperature=0)``; mmalign: B-Pref ``oracle``), 25-step fragments, PPO with
``n_steps=1024``, and are evaluated on 10 deterministic episodes of the true reward. Each writes one JSON file.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

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


def run_mmalign(steps: int, labels: int, seed: int, algo: str, threads: int) -> dict:
    import gymnasium
    import torch

    from mmalign.robotics.pebble import PebbleConfig, train_agent

    if threads > 0:
        torch.set_num_threads(threads)
    first = 1024
    cfg = PebbleConfig(env_id="Reacher-v5", algo=algo, total_steps=steps, seed=seed, teacher="oracle",
                       label_budget=labels, initial_labels=max(64, labels // 4),
                       labels_per_round=max(1, (labels - max(64, labels // 4)) // 4), first_feedback=first,
                       feedback_every=max(1024, (steps - first) // 5), ppo_n_steps=1024, batch_size=64 if algo == "ppo"
                       else 128, eval_every=10 * steps, eval_episodes=1, save_reward_model=False)
    t0 = time.perf_counter()
    c0 = time.process_time()
    res = train_agent(cfg)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    mean, std = evaluate(lambda o: res["model"].predict(o, deterministic=True)[0], gymnasium.make("Reacher-v5"))
    return {"impl": f"mmalign PbRL + {algo.upper()} (Reacher-v5)", "true_return": mean, "std": std, "wall_s": wall,
            "cpu_s": cpu, "queries": res["labels"]["labels/queries"]}


def summarize(out: Path) -> str:
    """Per-run rows and a mean ± std (over seeds) row per implementation, as Markdown."""
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("result_*.json"))]
    lines = ["| implementation | steps | labels | seed | true return (10 episodes) | wall s | CPU s |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["impl"], r["seed"])):
        lines.append(f"| {r['impl']} | {r['steps']} | {r['labels']} | {r['seed']} | {r['true_return']:.2f} ± "
                     f"{r['std']:.2f} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} |")
    lines += ["", "| implementation | seeds | true return (mean ± std over seeds) | wall s (mean ± std) | "
              "CPU s (mean ± std) |", "|---|---|---|---|---|"]
    for impl in sorted({r["impl"] for r in rows}):
        group = [r for r in rows if r["impl"] == impl]
        ret, wall, cpu = (np.array([r[k] for r in group]) for k in ("true_return", "wall_s", "cpu_s"))
        lines.append(f"| {impl} | {', '.join(str(r['seed']) for r in group)} | {ret.mean():.2f} ± {ret.std():.2f} | "
                     f"{wall.mean():.0f} ± {wall.std():.0f} | {cpu.mean():.0f} ± {cpu.std():.0f} |")
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
    p.add_argument("--summarize", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.summarize:
        summarize(out)
        return
    res = run_imitation(args.steps, args.labels, args.seed, args.threads) if args.impl == "imitation" else run_mmalign(
        args.steps, args.labels, args.seed, args.algo, args.threads)
    res.update({"steps": args.steps, "labels": args.labels, "seed": args.seed, "threads": args.threads})
    name = args.impl if args.impl == "imitation" else f"mmalign_{args.algo}"
    (out / f"result_{name}_s{args.seed}.json").write_text(json.dumps(res, indent=1))
    print(res)


if __name__ == "__main__":
    main()
