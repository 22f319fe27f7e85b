"""CPL vs BC, %BC and P-IQL with dense (and optionally sparse) regret labels, several seeds, one shared oracle.

    .venv/bin/python scripts/bench_cpl.py --task Reacher-v5 --report-seeds 10 11 12 13 14 --out runs/bench_cpl \\
        --densities dense sparse --doc docs/benchmarks/robotics_cpl.md

A (density, seed) whose ``results.json`` exists in ``--out`` is read, not re-run: densities or seeds run in separate
processes (same ``--out``, the oracle trained once or given with ``--oracle``) are summarised by one more call with
all of them.

The oracle SAC is trained once (seed 0, ``--oracle-steps``) and saved; each seed then draws its own rollouts,
labels and policy initialisation (``mmalign robotics cpl oracle_path=...``). Writes a table of mean ± 95% t
half-width over seeds and each method's paired difference to CPL. Seeds follow the robotics protocol
(docs/benchmarks/robotics_protocol.md): ``--dev-seeds`` for choices, ``--report-seeds`` (disjoint) for a table
written with ``--doc``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import numpy as np


def main() -> None:
    import torch

    from mmalign.robotics.cpl import CPLConfig, run
    from mmalign.robotics.protocol import add_seed_args, fmt_ci, paired_diff, seed_plan_from_args
    from mmalign.robotics.report import markdown_table

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="Reacher-v5")
    p.add_argument("--densities", nargs="+", default=["dense"])
    p.add_argument("--methods", nargs="+", default=["cpl", "bc", "pbc", "piql"],
                   help="CPLConfig.methods: cpl, bc, pbc (%%BC), piql (P-IQL)")
    p.add_argument("--oracle-steps", type=int, default=15000)
    p.add_argument("--noise-levels", nargs="+", type=float, default=None, help="override CPLConfig.noise_levels")
    p.add_argument("--action-bias", nargs="+", type=float, default=None, help="override CPLConfig.action_bias")
    p.add_argument("--oracle", default=None, help="reuse this oracle SAC (.safetensors, or an SB3 .zip) instead of training one in --out")
    p.add_argument("--out", default="runs/bench_cpl")
    p.add_argument("--doc", default=None)
    p.add_argument("--key", default="bench_cpl", help="marker of the section written in --doc (one per task)")
    add_seed_args(p, dev_default=(0, 1, 2))
    args = p.parse_args()
    try:
        plan = seed_plan_from_args(args)
    except ValueError as err:
        p.error(str(err))
    if args.doc and not plan.reporting:
        p.error("--doc writes a reported table: give --report-seeds (disjoint from --dev-seeds)")
    args.seeds = list(plan.seeds)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    oracle = Path(args.oracle) if args.oracle else out / "oracle_sac.safetensors"
    overrides = {k: tuple(v) for k, v in (("noise_levels", args.noise_levels), ("action_bias", args.action_bias))
                 if v is not None}
    base = CPLConfig(env_id=args.task, oracle_steps=args.oracle_steps, methods=tuple(args.methods), **overrides)
    if not oracle.exists():
        from mmalign.robotics.cpl import train_oracle
        from mmalign.robotics.sb3_io import save_sb3_policy

        save_sb3_policy(train_oracle(base, print), oracle, base.env_id)
    results = {}
    for density in args.densities:
        for seed in args.seeds:
            run_dir = out / f"{density}_seed{seed}"
            if (run_dir / "results.json").exists():
                results[(density, seed)] = json.loads((run_dir / "results.json").read_text())
                continue
            run_dir.mkdir(exist_ok=True)
            cfg = dataclasses.replace(base, seed=seed, density=density, oracle_path=str(oracle))
            c0 = time.process_time()
            run(cfg, run_dir)
            res = json.loads((run_dir / "results.json").read_text())
            res["cpu_s"] = time.process_time() - c0  # the whole run: data, labels, every method, evaluations
            (run_dir / "results.json").write_text(json.dumps(res, indent=1))
            results[(density, seed)] = res
    table = []
    for density in args.densities:
        methods = [r["method"] for r in results[(density, args.seeds[0])]["rows"]]
        for m in methods:
            vals = {s: next(r["true_return"] for r in results[(density, s)]["rows"] if r["method"] == m)
                    for s in args.seeds}
            cpl = {s: next(r["true_return"] for r in results[(density, s)]["rows"] if r["method"] == "CPL")
                   for s in args.seeds} if "CPL" in methods else {}
            cpu = [r.get("train_cpu_s") for s in args.seeds for r in results[(density, s)]["rows"] if r["method"] == m]
            cpu = [c for c in cpu if c is not None]
            table.append({"labels": density, "method": m, "true return": fmt_ci(list(vals.values()), ".2f"),
                          "CPL − method (paired)": str(paired_diff(cpl, vals)) if cpl and m != "CPL" else "-",
                          "per seed": ", ".join(f"{v:.2f}" for v in vals.values()),
                          "train CPU s": f"{np.mean(cpu):.0f}" if cpu else "-"})
    agree = [results[k]["label_return_agreement"] for k in results]
    run_cpu = [results[k]["cpu_s"] for k in results if "cpu_s" in results[k]]
    text = "\n".join([
        f"## Offline CPL vs BC, %BC and P-IQL on {args.task} (scripts/bench_cpl.py)", "",
        f"Command: `.venv/bin/python scripts/bench_cpl.py --task {args.task} "
        f"{'--report' if plan.reporting else '--dev'}-seeds {' '.join(map(str, args.seeds))} "
        f"--densities {' '.join(args.densities)} --oracle-steps {args.oracle_steps}"
        + (f" --oracle {args.oracle}" if args.oracle else "")
        + "".join(f" --{k.replace('_', '-')} {' '.join(f'{x:g}' for x in v)}" for k, v in overrides.items())
        + f" --methods {' '.join(args.methods)}`. Data levels (noise, bias): "
        f"{list(zip(base.noise_levels, base.action_bias or [0.0] * len(base.noise_levels)))}"
        f" × {base.episodes_per_level} episodes + {base.random_episodes} random episodes. One oracle SAC "
        f"({args.oracle_steps} steps, seed 0{', loaded with --oracle' if args.oracle else ''}); per seed: own "
        f"rollouts, regret labels, policy init. Other fields: `CPLConfig` defaults. Machine: {platform.platform()}, "
        f"shared 2-core CPU with other jobs running. "
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. {plan.describe()}; ± = 95% t half-width "
        "over seeds; paired = per-seed difference CPL − method, mean ± 95% t half-width (seeds where CPL is "
        "higher). "
        + (f"CPU time: {sum(run_cpu):.0f} s over {len(run_cpu)} runs (one per density and seed; the oracle SAC "
           "not included); `train CPU s` = mean training time of the method per run." if run_cpu else ""), "",
        markdown_table(table), "",
        f"Regret labels agree with the true partial-return order on {np.mean(agree):.3f} of decisive pairs "
        f"(they are not the same preference model: that is the point of the regret teacher).", "",
    ])
    (out / "summary.md").write_text(text)
    if args.doc:
        from doc_sections import write_marked_section

        # only the generated block: the hand-written reading around it survives a re-run
        write_marked_section(args.doc, args.key, text)
    print(text)


if __name__ == "__main__":
    main()
