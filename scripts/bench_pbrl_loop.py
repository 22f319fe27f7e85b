"""Throughput of the PbRL loop's parts on SB3 SAC: env steps/s with n_envs = 1 and 2 worker processes, and the
loop's overhead over plain SB3 with the same algorithm, env count and vectorisation.

Four systems, run interleaved (A, B, C, D, A, B, C, D, ...) so that drift on a shared machine hits each alike:
  plain-1   plain SB3 ``SAC.learn`` on the true reward, 1 env (DummyVecEnv)
  loop-1    ``train_agent`` learning from an oracle teacher (reward wrapper, feedback callback with segment sampling,
            teacher, reward fitting and replay-buffer relabelling, true-return curve at start and end), 1 env
  plain-2   as plain-1 with 2 envs in SubprocVecEnv worker processes
  loop-2    as loop-1 with 2 envs in SubprocVecEnv worker processes
Reported: wall-clock env steps/s of ``learn`` per run (mean ± std over repeats), and loop/plain wall-time ratios of
the runs paired within one repeat. With 2 envs SAC collects 2 transitions per gradient step (SB3's ``train_freq=1``
counts vector steps), so 2-env runs also do half the updates per env step.

    python scripts/bench_pbrl_loop.py --steps 2000 --repeats 2 --doc docs/benchmarks/robotics_pbrl_loop.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import Any

SAC_KW = dict(learning_rate=3e-4, batch_size=128, gamma=0.99, policy_kwargs=dict(net_arch=[64, 64]), device="cpu",
              verbose=0)


def plain(env_id: str, steps: int, seed: int, n_envs: int, learning_starts: int) -> float:
    from stable_baselines3 import SAC

    from mmalign.robotics.loop import make_venv

    venv = make_venv(env_id, n_envs, seed, subprocess=n_envs > 1)
    model = SAC("MlpPolicy", venv, seed=seed, learning_starts=learning_starts, buffer_size=max(steps, 1000),
                **SAC_KW)
    t0 = time.perf_counter()
    model.learn(steps)
    wall = time.perf_counter() - t0
    venv.close()
    return wall


def loop(env_id: str, steps: int, seed: int, n_envs: int, learning_starts: int) -> tuple[float, dict[str, Any]]:
    from mmalign.robotics.pebble import PebbleConfig, train_agent

    first = learning_starts
    cfg = PebbleConfig(env_id=env_id, total_steps=steps, seed=seed, n_envs=n_envs,
                       vec_env="subproc" if n_envs > 1 else "dummy", teacher="oracle", label_budget=200,
                       initial_labels=100, labels_per_round=50, first_feedback=first, feedback_every=first,
                       learning_starts=learning_starts, rm_epochs=30, eval_every=10 * steps, eval_episodes=1,
                       save_reward_model=False, device="cpu")
    res = train_agent(cfg)
    res["model"].get_env().close()
    return res["wall_s"], {"feedback_s": res["feedback_s"], "queries": res["labels"]["labels/queries"]}


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default="Reacher-v5")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--learning-starts", type=int, default=500)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--doc", default=None, help="write the results section into this Markdown file")
    args = p.parse_args()
    torch.set_num_threads(1)
    systems = [("plain-1", plain, 1), ("loop-1", loop, 1), ("plain-2", plain, 2), ("loop-2", loop, 2)]
    walls: dict[str, list[float]] = {name: [] for name, _, _ in systems}
    feedback: dict[str, list[float]] = {"loop-1": [], "loop-2": []}
    for r in range(args.repeats):
        for name, fn, n in systems:
            out = fn(args.env, args.steps, args.seed, n, args.learning_starts)
            wall = out[0] if isinstance(out, tuple) else out
            walls[name].append(wall)
            if isinstance(out, tuple):
                feedback[name].append(out[1]["feedback_s"])
            print(f"repeat {r} {name}: {wall:.1f} s, {args.steps / wall:.1f} env steps/s", flush=True)
    lines = [
        f"Command: `python scripts/bench_pbrl_loop.py --env {args.env} --steps {args.steps} --learning-starts "
        f"{args.learning_starts} --repeats {args.repeats} --seed {args.seed}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores ({platform.processor() or 'unknown CPU'}), shared "
        f"with other jobs (load average at the end {os.getloadavg()[0]:.1f}); torch threads 1; Python "
        f"{platform.python_version()}. Seed {args.seed}; runs interleaved, {args.repeats} repeats.",
        "",
        "| system | envs | env steps/s (mean ± std) | wall s per run | feedback rounds s |",
        "|---|---|---|---|---|",
    ]
    for name, _, n in systems:
        rates = [args.steps / w for w in walls[name]]
        sd = statistics.pstdev(rates) if len(rates) > 1 else 0.0
        fb = f"{statistics.mean(feedback[name]):.1f}" if name in feedback else "–"
        lines.append(f"| {name} | {n} | {statistics.mean(rates):.1f} ± {sd:.1f} | "
                     f"{', '.join(f'{w:.1f}' for w in walls[name])} | {fb} |")
    lines += ["", "| ratio (paired within a repeat) | per repeat | mean |", "|---|---|---|"]
    for a, b in (("loop-1", "plain-1"), ("loop-2", "plain-2"), ("loop-2", "loop-1"), ("plain-2", "plain-1")):
        ratios = [x / y for x, y in zip(walls[a], walls[b])]
        lines.append(f"| wall {a} / {b} | {', '.join(f'{q:.2f}' for q in ratios)} | {statistics.mean(ratios):.2f} |")
    for a, b in (("loop-1", "plain-1"), ("loop-2", "plain-2")):
        # the loop without its feedback rounds: reward wrapper, true-reward recording, relabelling, two evaluations
        ratios = [(x - f) / y for x, f, y in zip(walls[a], feedback[a], walls[b])]
        lines.append(f"| (wall − feedback rounds) {a} / {b} | {', '.join(f'{q:.2f}' for q in ratios)} | "
                     f"{statistics.mean(ratios):.2f} |")
    text = "\n".join(lines)
    print(text)
    if args.doc:
        path = args.doc
        head = open(path).read().split("<!-- results -->")[0] if os.path.exists(path) else ""
        with open(path, "w") as fh:
            fh.write(head + "<!-- results -->\n" + text + "\n")


if __name__ == "__main__":
    main()
