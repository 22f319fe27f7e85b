"""Benchmark RAPL vs BT-on-pixels vs unaligned OT: reward correlation vs number of preferences, cross-embodiment.

Trains each reward on preference triplets from the point-pusher embodiment (PushAvoidPoint-v0) and measures the
Spearman correlation between predicted and true returns on held-out rollouts of the same embodiment and of the
2-link arm (PushAvoidArm-v0). Writes a section of docs/benchmarks/visuomotor.md.

    MUJOCO_GL=egl python scripts/bench_rapl.py --seeds 0 1 2 --prefs 25 50 100 200
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from mmalign.robotics.rapl import RaplConfig, run
from mmalign.robotics.rapl_report import machine, now, write_section

METHODS = ("rapl", "bt_pixels", "unaligned_ot", "task_reward")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--prefs", type=int, nargs="+", default=[25, 50, 100, 200])
    ap.add_argument("--train-steps", type=int, default=120)
    ap.add_argument("--n-train", type=int, default=160)
    ap.add_argument("--n-eval", type=int, default=80)
    ap.add_argument("--out", default="runs/bench_rapl")
    ap.add_argument("--no-write", action="store_true", help="do not write the docs section")
    ap.add_argument("--from-runs", action="store_true",
                    help="only rebuild the docs section from the metrics.json files already under --out")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    results: dict[tuple[int, int], dict] = {}
    for seed in args.seeds:
        for n in args.prefs:
            done = out / f"seed{seed}_prefs{n}" / "metrics.json"
            if args.from_runs:
                if done.is_file():
                    results[(seed, n)] = json.loads(done.read_text())
                continue
            cfg = RaplConfig(seed=seed, num_prefs=n, train_steps=args.train_steps, n_train_traj=args.n_train,
                             n_eval_traj=args.n_eval, data_cache=str(out / "cache"))
            results[(seed, n)] = run(cfg, out / f"seed{seed}_prefs{n}")
            print(seed, n, json.dumps({k: round(v, 3) for k, v in results[(seed, n)].items()}), flush=True)
    (out / "results.json").write_text(json.dumps({f"{s}_{n}": m for (s, n), m in results.items()}, indent=1))
    if args.no_write:
        return

    def cell(split: str, method: str, n: int) -> str:
        vals = [results[(s, n)][f"{split}/spearman_{method}"] for s in args.seeds if (s, n) in results]
        return f"{np.mean(vals):+.2f} ± {np.std(vals):.2f} (n={len(vals)})" if vals else "not run"

    lines = [
        "## RAPL reward quality (`scripts/bench_rapl.py`)",
        "",
        f"Command: `MUJOCO_GL=egl python scripts/bench_rapl.py --seeds {' '.join(map(str, args.seeds))} --prefs "
        f"{' '.join(map(str, args.prefs))} --train-steps {args.train_steps}`; seeds {args.seeds}; {now()}; "
        f"{machine()}; shared 2-core CPU with other jobs running (load average ~10-28 during the run); "
        f"{len(results)} of {len(args.seeds) * len(args.prefs)} (seed, #prefs) runs present; "
        f"n = seeds per cell.",
        "",
        f"Setup: {args.n_train} scripted PushAvoidPoint-v0 rollouts (30 frames, 64x64) for triplets, "
        f"{args.n_eval} held-out rollouts per embodiment; tiny random-init CNN encoder (32-d head), OT with "
        "cosine cost, reg 0.05, 50 Sinkhorn iterations, every 2nd frame; 6 preferred demos (top true return); "
        f"{args.train_steps} Adam steps of 8 triplets for both RAPL and the BT pixel reward model (core "
        "CNNRewardModel). Simulated human: noiseless (always prefers the higher true return). Cells: Spearman "
        "correlation of predicted vs true return, mean ± std over seeds. `task_reward` = the hand-written env "
        "reward (ignores the forbidden zone).",
        "",
    ]
    for split, title in (("heldout", "Held-out rollouts, same embodiment (point pusher)"),
                         ("cross", "Cross-embodiment: reward trained on the point pusher scores the 2-link arm")):
        lines += [f"### {title}", "", "| #prefs | " + " | ".join(METHODS) + " |",
                  "|---|" + "---|" * len(METHODS)]
        for n in args.prefs:
            lines.append(f"| {n} | " + " | ".join(cell(split, m, n) for m in METHODS) + " |")
        lines.append("")
    # Does RAPL with n/2 prefs reach BT with n prefs?
    lines += ["RAPL with half the preferences vs BT with all of them (held-out, mean over seeds):", ""]
    for n in args.prefs:
        seeds = [s for s in args.seeds if (s, n) in results and (s, n // 2) in results]
        if n // 2 in args.prefs and seeds:
            r = np.mean([results[(s, n // 2)]["heldout/spearman_rapl"] for s in seeds])
            b = np.mean([results[(s, n)]["heldout/spearman_bt_pixels"] for s in seeds])
            lines.append(f"- RAPL@{n // 2} = {r:+.2f} vs BT@{n} = {b:+.2f} (seeds {seeds}): "
                         f"{'reached' if r >= b else 'not reached'}")
    write_section("bench_rapl", "\n".join(lines))


if __name__ == "__main__":
    main()
