"""B-Pref-style teacher sweep for online PbRL (SAC) on MuJoCo tasks, with true-reward SAC at equal env steps.

Each (task, seed) trains one true-reward SAC and one learned-reward SAC per teacher; results are appended to a
JSON-lines file as they finish (so a partial sweep is never lost) and summarised as Markdown (mean ± std over
seeds of the final true return and of ``learned / true`` normalised by the random policy) plus a plot per task.

    .venv/bin/python scripts/bench_pbrl.py --tasks Reacher-v5 --teachers oracle mistake --seeds 0 1 2 \\
        --steps 10000 --labels 400 --out runs/bench_pbrl
    .venv/bin/python scripts/bench_pbrl.py --summarize runs/bench_pbrl   # table + plots from finished runs only
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

TASK_DEFAULTS = {
    # segment length, eval episodes, first feedback, feedback every
    "Reacher-v5": dict(segment_length=25, eval_episodes=10),
    "InvertedDoublePendulum-v5": dict(segment_length=25, eval_episodes=5),
    "HalfCheetah-v5": dict(segment_length=25, eval_episodes=2),
}


def random_return(env_id: str, episodes: int = 20, seed: int = 0) -> float:
    import gymnasium

    from mmalign.robotics.segments import collect_episodes

    env = gymnasium.make(env_id)
    env.action_space.seed(seed)
    eps = collect_episodes(env, lambda o: env.action_space.sample(), episodes, seed=123_000 + seed)
    return float(np.mean([ep["rew"].sum() for ep in eps]))


def run_sweep(args: argparse.Namespace) -> None:
    import torch

    from mmalign.robotics.pebble import PebbleConfig, train_agent

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "results.jsonl"
    done = set()
    if log.exists():
        done = {(r["task"], r["seed"], r["teacher"]) for r in map(json.loads, log.read_text().splitlines())}
    for task in args.tasks:
        for seed in args.seeds:
            for teacher in (["true"] if not args.no_true else []) + list(args.teachers):
                if (task, seed, teacher) in done:
                    continue
                extra = TASK_DEFAULTS.get(task, {})
                cfg = PebbleConfig(
                    env_id=task, seed=seed, total_steps=args.steps, reward="true" if teacher == "true" else "learned",
                    teacher="oracle" if teacher == "true" else teacher, label_budget=args.labels,
                    initial_labels=min(args.labels, max(64, args.labels // 4)),
                    labels_per_round=max(1, (args.labels - max(64, args.labels // 4)) // max(1, args.rounds - 1)),
                    eval_every=args.eval_every, save_reward_model=False, rm_epochs=30, **extra,
                )
                t0 = time.perf_counter()
                c0 = time.process_time()
                res = train_agent(cfg, progress=lambda m, t=teacher: print(f"[{task} s{seed} {t}] {m}", flush=True))
                row = {"task": task, "seed": seed, "teacher": teacher, "steps": args.steps,
                       "final_true_return": res["final_true_return"], "curve": res["curve"],
                       "labels": res.get("labels", {}), "wall_s": time.perf_counter() - t0,
                       "cpu_s": time.process_time() - c0}
                with open(log, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
    summarize(out, args.doc)


def summarize(out: Path, doc: str | None) -> str:
    from mmalign.robotics.report import markdown_table, plot_curves

    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    lines = []
    for task in sorted({r["task"] for r in rows}):
        rand = random_return(task)
        true_final = {r["seed"]: r["final_true_return"] for r in rows if r["task"] == task and r["teacher"] == "true"}
        table = []
        curves = {}
        for teacher in ["true", "oracle", "stochastic", "mistake", "skip", "equal", "myopic"]:
            sel = [r for r in rows if r["task"] == task and r["teacher"] == teacher]
            if not sel:
                continue
            finals = np.array([r["final_true_return"] for r in sel])
            norm = [(r["final_true_return"] - rand) / (true_final[r["seed"]] - rand) for r in sel
                    if r["seed"] in true_final and abs(true_final[r["seed"]] - rand) > 1e-8]
            agree = [r["labels"].get("labels/agreement_with_true_return", np.nan) for r in sel]
            table.append({"teacher": teacher, "seeds": ",".join(str(r["seed"]) for r in sel),
                          "final true return": f"{finals.mean():.2f} ± {finals.std():.2f}",
                          "(learned−rand)/(true−rand)": f"{np.mean(norm):.3f} ± {np.std(norm):.3f}" if norm else "-",
                          "queries": int(np.mean([r["labels"].get("labels/queries", 0) for r in sel])),
                          "label agreement": f"{np.nanmean(agree):.3f}" if teacher != "true" else "-",
                          "CPU s/run": f"{np.mean([r['cpu_s'] for r in sel]):.0f}"})
            steps = [p["step"] for p in sel[0]["curve"]]
            ys = np.array([[p["eval/true_return"] for p in r["curve"]][: len(steps)] for r in sel])
            curves[teacher] = [{"step": s, "eval/true_return": float(m), "eval/true_return_std": float(sd)}
                               for s, m, sd in zip(steps, ys.mean(0), ys.std(0))]
        plot_curves(curves, out / f"curves_{task}.png", title=f"{task}: true return, mean ± std over seeds")
        lines += [f"### {task} ({rows[0]['steps']} env steps, random policy {rand:.2f})", "",
                  markdown_table(table), "", f"Curves: `{out / f'curves_{task}.png'}`", ""]
    text = "\n".join(lines)
    (out / "summary.md").write_text(text)
    if doc:
        header = (f"## Online PbRL teacher sweep (scripts/bench_pbrl.py)\n\nMachine: {platform.platform()}, "
                  f"{platform.processor() or 'cpu'}; shared 2-core CPU with other jobs running (wall times are "
                  f"inflated; CPU s is process time). Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.\n\n")
        Path(doc).write_text(header + text)
    print(text)
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["Reacher-v5", "InvertedDoublePendulum-v5"])
    p.add_argument("--teachers", nargs="*", default=["oracle", "stochastic", "mistake", "skip", "equal", "myopic"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=10000)
    p.add_argument("--labels", type=int, default=400)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument("--no-true", action="store_true", help="skip the true-reward runs")
    p.add_argument("--out", default="runs/bench_pbrl")
    p.add_argument("--doc", default=None, help="also write the Markdown section to this file")
    p.add_argument("--summarize", default=None, help="only summarise the results in this folder")
    args = p.parse_args()
    if args.summarize:
        summarize(Path(args.summarize), args.doc)
    else:
        run_sweep(args)


if __name__ == "__main__":
    main()
