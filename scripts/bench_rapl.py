"""Benchmark RAPL vs BT-on-pixels at matched preference budgets: does RAPL with N/2 triplets reach BT with N?

Trains each reward on preference triplets from the point-pusher embodiment (PushAvoidPoint-v0) and measures the
Spearman correlation between predicted and true returns on held-out rollouts of the same embodiment and of the
2-link arm (PushAvoidArm-v0). Each (seed, method, budget) is its own run directory with a metrics.json, written as
soon as it finishes, so a partial sweep still yields numbers and a rerun skips finished runs. Writes the sections
``bench_rapl`` (budget comparison) and ``bench_rapl_sensitivity`` (training length) of docs/benchmarks/visuomotor.md.

    MUJOCO_GL=egl python scripts/bench_rapl.py --seeds 0 1 2 --prefs 50 100 200 --epochs 32 \
        --sensitivity-epochs 8 16 64 --sensitivity-seeds 0 --sensitivity-budget 200
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch

from mmalign.robotics.rapl import RaplConfig, run
from doc_sections import machine, now, visuomotor_section as write_section

Key = tuple[str, int, str, int]  # (length tag, seed, method, #triplets)


def _tag(length: str, value: float) -> str:
    return f"epochs{value:g}" if length == "epochs" else f"steps{int(value)}"


def plan(args: argparse.Namespace) -> list[Key]:
    """Runs in execution order: main comparison first (RAPL@N/2 and BT@N, per seed), then the sensitivity runs."""
    main_tag = _tag(args.train_length, args.epochs if args.train_length == "epochs" else args.train_steps)
    jobs: list[Key] = []
    for seed in args.seeds:
        for n in args.prefs:
            jobs += [(main_tag, seed, "rapl", n // 2), (main_tag, seed, "bt", n)]
            if args.grid:
                jobs += [(main_tag, seed, "rapl", n), (main_tag, seed, "bt", n // 2)]
    for n in args.sensitivity_budget:
        for seed in args.sensitivity_seeds:
            for e in args.sensitivity_epochs:
                jobs += [(_tag("epochs", e), seed, "rapl", n // 2), (_tag("epochs", e), seed, "bt", n)]
    return list(dict.fromkeys(jobs))


def run_one(key: Key, args: argparse.Namespace, out: Path) -> dict:
    tag, seed, method, n = key
    length = "epochs" if tag.startswith("epochs") else "steps"
    value = float(tag[len(length):])
    cfg = RaplConfig(seed=seed, num_prefs=n, train_length=length, train_epochs=value if length == "epochs" else 1.0,
                     train_steps=int(value) if length == "steps" else 1, n_train_traj=args.n_train,
                     n_eval_traj=args.n_eval, data_cache=args.cache, run_rapl=method == "rapl",
                     run_bt_baseline=method == "bt", embed_norm=not args.no_embed_norm)
    return run(cfg, out / tag / f"seed{seed}_{method}{n}")


def load(out: Path, old: Path | None) -> dict[Key, dict]:
    """All finished runs under ``out``; plus the fixed-100-step runs of the earlier script (one run held both
    methods: ``old/seed{s}_prefs{n}``), if ``old`` is given."""
    res: dict[Key, dict] = {}
    for f in out.glob("*/seed*_*/metrics.json"):
        seed, rest = f.parent.name[4:].split("_", 1)
        method = "rapl" if rest.startswith("rapl") else "bt"
        res[(f.parent.parent.name, int(seed), method, int(rest[len(method):]))] = json.loads(f.read_text())
    for f in (old.glob("seed*_prefs*/metrics.json") if old else []):
        seed, n = f.parent.name[4:].split("_prefs")
        m = json.loads(f.read_text())
        for method in ("rapl", "bt"):
            res[("old_steps100", int(seed), method, int(n))] = m
    return res


def _ms(vals: list[float], fmt: str = "+.2f") -> str:
    return f"{np.mean(vals):{fmt}} ± {np.std(vals):.2f} (n={len(vals)})" if vals else "not run"


def comparison_rows(res: dict[Key, dict], tag: str, prefs: list[int], split: str, seeds: list[int]) -> list[str]:
    rows = []
    for n in prefs:
        ss = [s for s in seeds if (tag, s, "rapl", n // 2) in res and (tag, s, "bt", n) in res]
        r = [res[(tag, s, "rapl", n // 2)][f"{split}/spearman_rapl"] for s in ss]
        b = [res[(tag, s, "bt", n)][f"{split}/spearman_bt_pixels"] for s in ss]
        if not ss:
            rows.append(f"| {n // 2} vs {n} | not run | | | | | |")
            continue
        d = [x - y for x, y in zip(r, b)]
        acc_r = [res[(tag, s, "rapl", n // 2)].get("rapl/final_pref_accuracy", float("nan")) for s in ss]
        acc_b = [res[(tag, s, "bt", n)].get("bt/final_pref_accuracy", float("nan")) for s in ss]
        steps = (res[(tag, ss[0], "rapl", n // 2)].get("train/steps"), res[(tag, ss[0], "bt", n)].get("train/steps"))
        verdict = "**met**" if np.mean(r) >= np.mean(b) else "**not met**"
        rows.append(f"| {n // 2} vs {n} | {_ms(r)} | {_ms(b)} | {' / '.join(f'{x:+.2f}' for x in d)} "
                    f"({sum(x >= 0 for x in d)}/{len(d)} seeds ≥ 0) | {verdict} | "
                    f"{_ms(acc_r, '.2f')} / {_ms(acc_b, '.2f')} | {steps[0]:.0f} / {steps[1]:.0f} |")
    return rows


def budget_rows(res: dict[Key, dict], tag: str, seeds: list[int]) -> list[str]:
    """Each method at every budget it was run at (the learning curves behind the pairwise comparison)."""
    budgets = sorted({k[3] for k in res if k[0] == tag and k[1] in seeds})
    rows = []
    for n in budgets:
        cells = []
        for split in ("heldout", "cross"):
            for method, key in (("rapl", "rapl"), ("bt", "bt_pixels")):
                cells.append(_ms([res[(tag, s, method, n)][f"{split}/spearman_{key}"] for s in seeds
                                  if (tag, s, method, n) in res]))
        rows.append(f"| {n} | " + " | ".join(cells) + " |")
    return rows


def main_section(res: dict[Key, dict], args: argparse.Namespace, tag: str) -> str:
    what = (f"{args.epochs:g} epochs (passes over the labelled triplets; steps = ceil({args.epochs:g} · N / 8), "
            "shuffled batches without replacement)" if args.train_length == "epochs"
            else f"a fixed {args.train_steps} steps at every budget")
    # the unaligned-OT and task-reward scores do not depend on the budget: take them from the smallest RAPL runs
    ref = [m for k, m in res.items() if k[0] == tag and k[1] in args.seeds and k[2] == "rapl"
           and k[3] == min(args.prefs) // 2]
    head = ("| RAPL vs BT triplets | RAPL@N/2 ρ | BT@N ρ | RAPL − BT per seed | must-show | final train pref. acc. "
            "RAPL / BT | steps RAPL / BT |")
    norm = ("without embedding normalisation (`embed_norm=false`, RAPL's code)" if args.no_embed_norm
            else "with embedding normalisation (`embed_norm=true`)")
    lines = [
        f"## RAPL vs BT-on-pixels at matched preference budgets, RAPL {norm} (`scripts/bench_rapl.py`)",
        "",
        f"Command: `MUJOCO_GL=egl python scripts/bench_rapl.py {args.cmdline}`; seeds {args.seeds}; {now()}; "
        f"{machine()}; shared {os.cpu_count()}-core CPU ({args.load}; each run single-threaded); every (seed, method, "
        f"budget) is one run with its own metrics.json under "
        f"`{args.out}/{tag}/`.",
        "",
        f"Setup: {args.n_train} scripted PushAvoidPoint-v0 rollouts (30 frames, 64x64) for triplets, {args.n_eval} "
        f"held-out rollouts per embodiment; tiny random-init CNN encoder (32-d head) {norm}, OT with cosine cost, "
        "reg 0.05, 50 Sinkhorn iterations, every 2nd frame; 6 preferred demos (top true return); noiseless simulated "
        "human. "
        f"**Training length: {what}, identical rule for RAPL and the BT pixel reward model (core CNNRewardModel), "
        "Adam 1e-3, batch 8.** Equal epochs rather than early stopping because early stopping needs a labelled "
        "validation split carved out of the same preference budget (5 of 25 triplets at the smallest budget, too "
        "few to pick a stopping step reliably), and equal passes per triplet is the reference code's rule (100 "
        "epochs); the sensitivity section below checks that the verdict does not hinge on the epoch count. "
        "ρ = Spearman correlation of predicted vs true return, mean ± population std (ddof 0) over the seeds that "
        "have both runs (n); must-show met when the mean RAPL@N/2 ρ ≥ the mean BT@N ρ. Train acc. = mean batch "
        "preference accuracy of the last 20 steps.",
        "",
        "### Held-out rollouts, same embodiment (point pusher)",
        "",
        head,
        "|---|---|---|---|---|---|---|",
        *comparison_rows(res, tag, args.prefs, "heldout", args.seeds),
        "",
        "### Cross-embodiment: reward trained on the point pusher scores the 2-link arm",
        "",
        head,
        "|---|---|---|---|---|---|---|",
        *comparison_rows(res, tag, args.prefs, "cross", args.seeds),
        "",
        "Each method at every budget it was run at (ρ, mean ± std over seeds; `not run` = not in the plan):",
        "",
        "| #triplets | RAPL held-out | BT held-out | RAPL cross | BT cross |",
        "|---|---|---|---|---|",
        *budget_rows(res, tag, args.seeds),
        "",
        "Reference rewards at the same seeds (independent of the budget): "
        + "; ".join(f"{split} unaligned-OT ρ {_ms([m[f'{split}/spearman_unaligned_ot'] for m in ref])}, hand-written "
                    f"task reward ρ {_ms([m[f'{split}/spearman_task_reward'] for m in ref])}"
                    for split in ("heldout", "cross")) + ".",
    ]
    return "\n".join(lines)


def sensitivity_section(res: dict[Key, dict], args: argparse.Namespace) -> str:
    lines = [
        "## RAPL vs BT: sensitivity to the training length (`scripts/bench_rapl.py`)",
        "",
        "Same command and setup as above; RAPL@N/2 vs BT@N triplets, held-out ρ, both trained for E epochs "
        "(steps = ceil(E · N / 8)). Row `fixed 100 steps` = the earlier benchmark (2026-11-24 03:21 UTC, one run "
        "per seed trained both methods for 100 steps of with-replacement batches, i.e. 800 / N epochs). "
        "Mean ± std over the seeds run; a row appears only where both runs of a seed finished (the plan may be run "
        "in parts, e.g. `--sensitivity-epochs 8 64 --sensitivity-budget 100` as its own process).",
    ]
    for n in args.sensitivity_budget:
        lines += ["", *sensitivity_rows(res, args, n)]
    return "\n".join(lines)


def sensitivity_rows(res: dict[Key, dict], args: argparse.Namespace, n: int) -> list[str]:
    tags = ["old_steps100"] + [_tag("epochs", e) for e in sorted({*args.sensitivity_epochs, args.epochs})]
    lines = [
        f"| training length | RAPL@{n // 2} ρ | BT@{n} ρ | RAPL − BT per seed | train acc. RAPL / BT "
        "| steps RAPL / BT |",
        "|---|---|---|---|---|---|",
    ]
    for tag in tags:
        ss = sorted(s for (t, s, m, k) in res if t == tag and m == "rapl" and k == n // 2 and (t, s, "bt", n) in res)
        if not ss:
            continue
        r = [res[(tag, s, "rapl", n // 2)]["heldout/spearman_rapl"] for s in ss]
        b = [res[(tag, s, "bt", n)]["heldout/spearman_bt_pixels"] for s in ss]
        acc = ([res[(tag, s, "rapl", n // 2)].get("rapl/final_pref_accuracy", np.nan) for s in ss],
               [res[(tag, s, "bt", n)].get("bt/final_pref_accuracy", np.nan) for s in ss])
        steps = "100 / 100" if tag == "old_steps100" else " / ".join(
            f"{res[(tag, ss[0], m, k)]['train/steps']:.0f}" for m, k in (("rapl", n // 2), ("bt", n)))
        label = "fixed 100 steps" if tag == "old_steps100" else f"{tag[6:]} epochs"
        bt_acc = "n/a" if tag == "old_steps100" else _ms(acc[1], ".2f")
        diffs = " / ".join(f"{x - y:+.2f}" for x, y in zip(r, b))
        lines.append(f"| {label} (seeds {ss}) | {_ms(r)} | {_ms(b)} | {diffs} | {_ms(acc[0], '.2f')} / {bt_acc} "
                     f"| {steps} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="seeds of the main comparison")
    ap.add_argument("--prefs", type=int, nargs="+", default=[50, 100, 200],
                    help="BT budgets N; RAPL is trained on N/2 triplets")
    ap.add_argument("--grid", action="store_true", help="also RAPL@N and BT@N/2 (full method x budget grid)")
    ap.add_argument("--train-length", choices=("epochs", "steps"), default="epochs")
    ap.add_argument("--epochs", type=float, default=32.0, help="passes over the triplets (--train-length epochs)")
    ap.add_argument("--train-steps", type=int, default=100, help="fixed steps (--train-length steps)")
    ap.add_argument("--sensitivity-epochs", type=float, nargs="*", default=[])
    ap.add_argument("--sensitivity-seeds", type=int, nargs="*", default=[])
    ap.add_argument("--sensitivity-budget", type=int, nargs="+", default=[200],
                    help="BT budgets N of the sensitivity runs (RAPL at N/2)")
    ap.add_argument("--n-train", type=int, default=160)
    ap.add_argument("--n-eval", type=int, default=80)
    ap.add_argument("--out", default="runs/bench_rapl_budget")
    ap.add_argument("--cache", default="runs/bench_rapl/cache", help="rendered-rollout cache (shared across runs)")
    ap.add_argument("--old-runs", default="runs/bench_rapl", help="fixed-100-step runs of the earlier benchmark")
    ap.add_argument("--no-write", action="store_true", help="do not write the docs sections")
    ap.add_argument("--from-runs", action="store_true", help="only rebuild the docs from finished runs under --out")
    ap.add_argument("--cmdline", default="", help="command line to print in the docs (default: this one)")
    ap.add_argument("--no-embed-norm", action="store_true",
                    help="RAPL encoder without embedding normalisation (RaplConfig.embed_norm=False, RAPL's code)")
    ap.add_argument("--section", default="bench_rapl", help="docs section key of the budget comparison")
    ap.add_argument("--load", default="load not recorded", help="machine-load note printed in the docs")
    args = ap.parse_args()
    if args.epochs <= 0 or args.train_steps <= 0 or any(e <= 0 for e in args.sensitivity_epochs):
        ap.error(f"epochs and steps must be > 0, got --epochs {args.epochs} --train-steps {args.train_steps} "
                 f"--sensitivity-epochs {args.sensitivity_epochs}")
    torch.set_num_threads(1)
    out = Path(args.out)
    if not args.from_runs:
        for key in plan(args):
            if (out / key[0] / f"seed{key[1]}_{key[2]}{key[3]}" / "metrics.json").is_file():
                continue
            m = run_one(key, args, out)
            print(key, json.dumps({k: round(v, 3) for k, v in m.items()}), flush=True)
    old = Path(args.old_runs) if args.old_runs and Path(args.old_runs).is_dir() else None
    res = load(out, old)
    (out / "results.json").write_text(json.dumps({"_".join(map(str, k)): m for k, m in res.items()}, indent=1))
    if args.no_write:
        return
    import sys

    args.cmdline = args.cmdline or " ".join(a for a in sys.argv[1:] if a not in ("--from-runs", "--no-write"))
    tag = _tag(args.train_length, args.epochs if args.train_length == "epochs" else args.train_steps)
    write_section(args.section, main_section(res, args, tag))
    if args.sensitivity_epochs:
        write_section("bench_rapl_sensitivity", sensitivity_section(res, args))


if __name__ == "__main__":
    main()
