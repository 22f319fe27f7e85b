"""Benchmark PEARL cross-task preference transfer on PushAvoid (up layout -> rotated, resized "right" layout).

For each seed: accuracy of GW-transferred labels against the target task's true preferences (landmark and raw
trajectory metrics), Spearman correlation of the learned target rewards with the true return on held-out target
rollouts, and the true return of target-task policies learned with each reward (zero target labels for PEARL; true
target labels; the source reward applied without transfer; the true reward; behaviour cloning without reward):
offline AWR on the unlabelled target rollouts (the paper's offline setting) and online PPO. Writes a section of
docs/benchmarks/pearl_transfer.md.

    MUJOCO_GL=egl python scripts/bench_pearl.py --dev-seeds 0 1 2 --report-seeds 10 11 12 13 14 --out runs/pearl_rep

Seeds follow the robotics protocol (docs/benchmarks/robotics_protocol.md): ``--dev-seeds`` for choices,
``--report-seeds`` (disjoint) for the written table; cells are mean ± 95% t half-width over seeds.

By default three variants run: offline policies with landmark and with raw-state GW descriptors, and PPO (``ppo``:
the landmark pipeline again, same seeds, hence the same rewards). ``--variants`` picks what to run (the GW solver
variants ``landmark/exact`` and ``landmark/batched(3)`` only when named), ``--reuse`` loads runs whose metrics.json
exists. ``--flips`` runs the label-noise sweep instead (section ``bench_pearl_noise``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from mmalign.robotics.pearl import PearlConfig, run
from mmalign.robotics.protocol import add_seed_args, fmt_ci, paired_diff, seed_plan_from_args
from doc_sections import PEARL, machine, now, write_marked_section


def write_section(name: str, body: str) -> None:
    """Write section ``name`` of docs/benchmarks/pearl_transfer.md."""
    write_marked_section(PEARL, name, body, "# Cross-task preference transfer: PEARL\n")


def timed_run(cfg: PearlConfig, run_dir: Path) -> dict:
    """``run`` with its process CPU time (``time/cpu_s``) added to the metrics.json it writes."""
    c0 = time.process_time()
    m = run(cfg, run_dir)
    m["time/cpu_s"] = time.process_time() - c0
    (run_dir / "metrics.json").write_text(json.dumps(m, indent=2))
    return m


def noise_sweep(args: argparse.Namespace, plan) -> None:  # noqa: ANN001
    """Gaussian (PEARL's RRL) vs BT reward under label flips, per GW descriptor: section ``bench_pearl_noise``."""
    out = Path(args.out)
    res: dict[tuple[str, float, int], dict] = {}
    for desc in args.descriptors:
        for flip in args.flips:
            for seed in plan.seeds:
                run_dir = out / f"noise_{desc}_flip{flip:g}" / f"seed{seed}"
                if (run_dir / "metrics.json").is_file():
                    res[(desc, flip, seed)] = json.loads((run_dir / "metrics.json").read_text())
                    continue
                if args.from_runs:
                    continue
                m = timed_run(PearlConfig(seed=seed, gw_features=desc, gw_solver="entropic", label_flip=flip),
                              run_dir)
                res[(desc, flip, seed)] = m
                print(desc, flip, seed, json.dumps({k: round(v, 3) for k, v in m.items() if "spearman" in k
                                                    or "accuracy" in k}), flush=True)
    rows = []
    for desc in args.descriptors:
        for flip in args.flips:
            ms = {s: res[(desc, flip, s)] for s in plan.seeds if (desc, flip, s) in res}
            if not ms:
                continue
            col = lambda k: {s: m[k] for s, m in ms.items()}  # noqa: E731
            rows.append(f"| {desc} | {flip:g} | {fmt_ci(list(col('pearl/label_accuracy').values()), '.3f')} | "
                        f"{fmt_ci(list(col('reward/spearman_pearl').values()))} | "
                        f"{fmt_ci(list(col('reward/spearman_pearl_bt').values()))} | "
                        f"{paired_diff(col('reward/spearman_pearl'), col('reward/spearman_pearl_bt'))} | "
                        f"{fmt_ci(list(col('reward/spearman_true_labels').values()))} | "
                        f"{fmt_ci(list(col('reward/spearman_true_labels_bt').values()))} | "
                        f"{paired_diff(col('reward/spearman_true_labels'), col('reward/spearman_true_labels_bt'))} | "
                        f"{fmt_ci(list(col('reward/spearman_no_transfer').values()))} |")
    print("\n".join(rows))
    if args.no_write or not plan.reporting:
        return
    cpu_h = sum(m.get("time/cpu_s", 0.0) for m in res.values()) / 3600
    cfg = PearlConfig()
    cmd = " ".join(a for a in sys.argv[1:] if a != "--from-runs")
    lines = [
        "## PEARL: Gaussian reward vs BT under label noise, descriptors that are not reward ingredients "
        "(`scripts/bench_pearl.py --flips`)",
        "",
        f"Command: `MUJOCO_GL=egl OMP_NUM_THREADS=1 nice -n 10 python scripts/bench_pearl.py {cmd}`; "
        f"{plan.describe()}; {now()}; {machine()}; shared {os.cpu_count()}-core CPU (1-min load average "
        f"{os.getloadavg()[0]:.1f} when written); CPU time of this table {cpu_h:.2f} h ({len(res)} runs).",
        "",
        f"Task pair as in Setup above; sizes ({cfg.n_source} source / {cfg.n_target} target rollouts, "
        f"{cfg.num_source_prefs} source pairs, {cfg.num_target_pairs} target pairs, entropic GW, "
        f"{cfg.reward_steps} reward steps). `raw` GW descriptors = effector and puck xy every {cfg.feature_stride} "
        "steps (state, no reward ingredient); `landmark` = distances to the goal and the forbidden zone (the "
        "reward's ingredients, hand-picked). A flip rate ε flips each simulated-human label with probability ε: "
        "on the source pairs (then transferred) and on the target pairs of the true-label rewards. Gaussian = "
        f"core `gaussian_bt_loss` (prior std {cfg.prior_std}, KL {cfg.kl_coef}); BT = plain Bradley–Terry, same "
        f"net and steps. ρ = Spearman correlation with the true return on {cfg.n_eval} held-out target rollouts; "
        "mean ± 95% t half-width; Gaussian − BT paired over seeds.",
        "",
        "| GW descriptor | flip rate | transferred-label accuracy | PEARL Gaussian ρ | PEARL BT ρ | Gaussian − BT "
        "(transferred) | true labels, Gaussian ρ | true labels, BT ρ | Gaussian − BT (true labels) | no transfer ρ |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    write_section("bench_pearl_noise", "\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flips", type=float, nargs="+", default=None,
                    help="run the label-noise sweep at these flip rates instead of the transfer/policy variants")
    ap.add_argument("--descriptors", nargs="+", default=["raw"], choices=("raw", "landmark"),
                    help="GW descriptors of the label-noise sweep")
    ap.add_argument("--offline-steps", type=int, default=2000, help="AWR gradient steps (0 = no offline policies)")
    ap.add_argument("--policy-timesteps", type=int, default=10000, help="PPO timesteps (0 = no PPO policies)")
    ap.add_argument("--variants", nargs="+", default=None, help="variants to run (default: all)")
    ap.add_argument("--reuse", action="store_true", help="load a variant/seed from its metrics.json when present")
    ap.add_argument("--note", default="", help="appended to the command line in the docs section")
    ap.add_argument("--out", default="runs/bench_pearl")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--from-runs", action="store_true",
                    help="only rebuild the docs section from the metrics.json files already under --out")
    add_seed_args(ap, dev_default=(0, 1, 2))
    args = ap.parse_args()
    try:
        plan = seed_plan_from_args(args)
    except ValueError as err:
        ap.error(str(err))
    args.seeds = list(plan.seeds)
    warnings.simplefilter("ignore")  # POT's inner-Sinkhorn convergence warnings (iterations are capped on purpose)
    torch.set_num_threads(1)
    if args.flips is not None:
        noise_sweep(args, plan)
        return
    out = Path(args.out)
    res: dict[str, list[dict]] = {}
    variants = {
        "landmark/entropic": dict(gw_features="landmark", gw_solver="entropic",
                                  offline_policy_steps=args.offline_steps),
        "raw/entropic": dict(gw_features="raw", gw_solver="entropic", offline_policy_steps=args.offline_steps),
        "ppo": dict(gw_features="landmark", gw_solver="entropic", policy_timesteps=args.policy_timesteps),
        # GW solver variants (development comparisons; run only when named in --variants)
        "landmark/exact": dict(gw_features="landmark", gw_solver="exact"),
        "landmark/batched(3)": dict(gw_features="landmark", gw_solver="batched"),
    }
    default = ("landmark/entropic", "raw/entropic", "ppo")
    unknown = sorted(set(args.variants or ()) - set(variants))
    if unknown:
        ap.error(f"--variants: unknown {unknown}; expected some of {sorted(variants)}")
    for name, kw in variants.items():
        for seed in args.seeds:
            run_dir = out / name.replace("/", "_").replace("(3)", "") / f"seed{seed}"
            selected = name in (args.variants or default)
            if args.from_runs or not selected or (args.reuse and (run_dir / "metrics.json").is_file()):
                if (run_dir / "metrics.json").is_file():
                    m = json.loads((run_dir / "metrics.json").read_text())
                    res.setdefault(name, []).append({**m, "seed": seed})
                continue
            m = timed_run(PearlConfig(seed=seed, **kw), run_dir)
            res.setdefault(name, []).append({**m, "seed": seed})
            print(name, seed, json.dumps({k: round(v, 3) for k, v in m.items()}), flush=True)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    if args.no_write or not plan.reporting:
        return  # a development run is never written as the reported table

    def ms(name: str, key: str) -> str:
        v = [m[key] for m in res.get(name, []) if key in m]
        return fmt_ci(v, "+.2f" if "spearman" in key or "return" in key else ".2f" if "moved" in key else ".3f")

    def per_seed(name: str, key: str) -> dict[int, float]:
        return {m["seed"]: m[key] for m in res.get(name, []) if key in m}

    cfg = PearlConfig()
    cpu_h = sum(m.get("time/cpu_s", 0.0) for runs in res.values() for m in runs) / 3600
    cmd = " ".join(a for a in sys.argv[1:] if a != "--from-runs")
    lines = [
        "## PEARL target-task policies (`scripts/bench_pearl.py`)",
        "",
        f"Command: `MUJOCO_GL=egl OMP_NUM_THREADS=1 python scripts/bench_pearl.py {cmd}`{args.note}; "
        f"{plan.describe()}; {now()}; {machine()}; shared {os.cpu_count()}-core CPU with other jobs running (1-min "
        f"load average {os.getloadavg()[0]:.1f} when written); n = seeds per cell; ± = 95% t half-width; CPU time "
        f"of this table {cpu_h:.2f} h ({sum(map(len, res.values()))} runs).",
        "",
        f"Task pair, sizes and rewards as in the label-noise table (no flips). Offline (the paper's setting): "
        f"advantage-weighted regression ({args.offline_steps} steps of value and policy net, beta {cfg.awr_beta}, "
        f"2x256 MLPs) on the {cfg.n_target} + {cfg.offline_rollouts} unlabelled scripted target rollouts relabelled "
        f"with each (standardised) reward; true return of the policy over {cfg.policy_eval_episodes} deterministic "
        "evaluation episodes (higher is better; a policy that never touches the puck scores about -12) and the "
        "fraction of them in which the puck moved.",
        "",
        "| GW descriptor | transferred-label accuracy | reward ρ | PEARL policy (0 target labels) | "
        "true target labels | source reward, no transfer | true reward | behaviour cloning | PEARL − no transfer "
        "(paired) | PEARL − BC (paired) | PEARL − true labels (paired) | puck moved (PEARL) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("landmark/entropic", "raw/entropic"):
        if not res.get(name) or "offline/true_return_pearl" not in res[name][0]:
            continue
        pearl = per_seed(name, "offline/true_return_pearl")
        diffs = [str(paired_diff(pearl, per_seed(name, f"offline/true_return_{k}")))
                 for k in ("no_transfer", "bc", "true_labels")]
        lines.append(
            f"| {name.split('/')[0]} | {ms(name, 'pearl/label_accuracy')} | {ms(name, 'reward/spearman_pearl')} | "
            + " | ".join(ms(name, f"offline/true_return_{k}")
                         for k in ("pearl", "true_labels", "no_transfer", "true_reward", "bc"))
            + f" | {' | '.join(diffs)} | {ms(name, 'offline/puck_moved_pearl')} |")
    ppo = res.get("ppo", [])
    if ppo and "policy/true_return_pearl" in ppo[0]:
        rows = (("pearl", "PEARL (landmark descriptors, 0 target labels)"),
                ("true_labels", "reward from true target labels"), ("no_transfer", "source reward, no transfer"),
                ("true_reward", "true reward (oracle)"))
        lines += ["", f"Online PPO ({args.policy_timesteps} steps, state observations, 30-step episodes, SB3 "
                  "defaults with n_steps 256), same rewards and evaluation:", "",
                  "| reward | true return | puck moved |", "|---|---|---|"]
        for key, label in rows:
            lines.append(f"| {label} | {ms('ppo', f'policy/true_return_{key}')} | "
                         f"{ms('ppo', f'policy/puck_moved_{key}')} |")
    for name in ("landmark/exact", "landmark/batched(3)"):
        if res.get(name):
            lines += ["", f"GW solver {name}: label accuracy {ms(name, 'pearl/label_accuracy')}, valid pairs "
                      f"{ms(name, 'pearl/label_valid_fraction')}, PEARL ρ {ms(name, 'reward/spearman_pearl')}."]
    write_section("bench_pearl", "\n".join(lines))


if __name__ == "__main__":
    main()
