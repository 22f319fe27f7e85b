"""Offline reference-mismatch benchmark (MaPO vs Diffusion-DPO β sweep vs SFT): run it, then write the table.

    python scripts/bench_diffusion.py --run-dir runs/diffusion-bench [--config configs/diffusion/benchmark.yaml]
        [--shards 2] [--report-only] [key=value ...]

Runs ``mmalign.diffusion.benchmark.run`` (``--shards N`` starts N worker processes on disjoint cells sharing one run
folder; rows already in results.jsonl are kept), then writes the "quality" section of docs/benchmarks/diffusion.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

from mmalign.config import load_config
from mmalign.diffusion.benchmark import BenchmarkConfig, pretrain_reference, run, unique_rows, write_markdown_section

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "diffusion.md"


def _ci(values: list[float]) -> str:
    """mean ± half-width of a 95% t-interval over seeds."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return f"{m:.2f}"
    t = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78}.get(len(values), 2.0)
    return f"{m:.2f} ± {t * statistics.stdev(values) / math.sqrt(len(values)):.2f}"


def table(rows: list[dict], cfg: BenchmarkConfig) -> str:
    settings = [s for s in cfg.settings if any(r["setting"] == s for r in rows)]
    methods = [m for m in ["reference", *cfg.methods] if any(r["method"] == m for r in rows)]
    cell = {}
    for r in rows:
        cell.setdefault((r["setting"], r["method"]), []).append(r)
    lines = []
    for metric, title in (("pref_score", "Preference score (style: fraction of samples within ±{tol:g}° of the "
                                         "chosen hue; safety: 1 − green rate), mean ± 95% CI over seeds"),
                          ("fidelity_iou", "Fidelity (IoU of the drawn foreground with the prompted shape's mask)"),
                          ("shape_acc", "Shape accuracy (prompted shape is the best-matching mask)")):
        lines += [f"**{title.format(tol=cfg.tolerance)}**", "", "| method | " + " | ".join(settings) + " |",
                  "|---|" + "---|" * len(settings)]
        for m in methods:
            vals = [_ci([r[metric] for r in cell[(s, m)]]) + f" (n={len(cell[(s, m)])})" if (s, m) in cell else "–"
                    for s in settings]
            lines.append(f"| {m} | " + " | ".join(vals) + " |")
        lines.append("")
    # the paper's claim: MaPO's advantage over the best Diffusion-DPO beta grows with the mismatch
    dpos = [m for m in methods if m.startswith("dpo_")]
    if not dpos or "mapo" not in methods:
        return "\n".join(lines)
    lines += ["**MaPO − best Diffusion-DPO β (per setting, preference score, mean over seeds)**", "",
              "| setting | MaPO | best DPO (β) | SFT | MaPO − best DPO |", "|---|---|---|---|---|"]
    for s in settings:
        mean = lambda m: statistics.fmean(r["pref_score"] for r in cell[(s, m)]) if (s, m) in cell else float("nan")  # noqa: E731
        if not dpos or (s, "mapo") not in cell:
            continue
        best = max(dpos, key=mean)
        lines.append(f"| {s} | {mean('mapo'):.2f} | {mean(best):.2f} ({best[4:]}) | {mean('sft'):.2f} | "
                     f"{mean('mapo') - mean(best):+.2f} |")
    return "\n".join(lines)


def _family_groups(rows: list[dict], cfg: BenchmarkConfig) -> dict[tuple[str, float], list[dict]]:
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in rows:
        if r["method"] != "reference":
            fam, _, lr = r["method"].partition("@")
            groups.setdefault((fam, float(lr) if lr else cfg.finetune_lr), []).append(r)
    return groups


def _joint(rs: list[dict]) -> float:
    return statistics.fmean(r["pref_score"] * r["shape_acc"] for r in rs)


def best_lrs(rows: list[dict], cfg: BenchmarkConfig) -> dict[str, float]:
    """Best learning rate per method family: the highest mean over cells of pref_score × shape_acc."""
    groups = _family_groups(rows, cfg)
    fams = {f for f, _ in groups}
    return {f: max((lr for g, lr in groups if g == f), key=lambda lr: _joint(groups[(f, lr)])) for f in fams}


def best_lr_table(rows: list[dict], cfg: BenchmarkConfig) -> str:
    """Each method family at its own best lr, per setting: pref score / fidelity / shape accuracy (mean over seeds)."""
    groups, best = _family_groups(rows, cfg), best_lrs(rows, cfg)
    settings = [s for s in cfg.settings if any(r["setting"] == s for r in rows)]
    mean = lambda rs, k: statistics.fmean(r[k] for r in rs) if rs else float("nan")  # noqa: E731
    fams = sorted(best, key=lambda f: ("sft", "mapo").index(f) if f in ("sft", "mapo") else 2)
    lines = ["**Each method at its own best lr: preference score / fidelity IoU / shape accuracy, mean over seeds**",
             "", "| method (best lr) | " + " | ".join(settings) + " | mean pref × shape |",
             "|---|" + "---|" * (len(settings) + 1)]
    ref = [r for r in rows if r["method"] == "reference"]
    if ref:
        lines.append("| reference | " + " | ".join(
            f"{mean([r for r in ref if r['setting'] == s], 'pref_score'):.2f} / "
            f"{mean([r for r in ref if r['setting'] == s], 'fidelity_iou'):.2f} / "
            f"{mean([r for r in ref if r['setting'] == s], 'shape_acc'):.2f}" for s in settings) + f" | {_joint(ref):.2f} |")
    for f in fams:
        rs = groups[(f, best[f])]
        cells = []
        for s in settings:
            c = [r for r in rs if r["setting"] == s]
            cells.append(f"{mean(c, 'pref_score'):.2f} / {mean(c, 'fidelity_iou'):.2f} / {mean(c, 'shape_acc'):.2f}")
        lines.append(f"| {f} ({best[f]:g}) | " + " | ".join(cells) + f" | {_joint(rs):.2f} |")
    return "\n".join(lines)


def lr_table(rows: list[dict], cfg: BenchmarkConfig) -> str:
    """Per method family (name without @lr) and learning rate: means over every (setting, seed) cell; the best lr
    of each family by the mean of pref_score × shape_acc per cell (style reached *and* the prompted shape drawn)."""
    groups = _family_groups(rows, cfg)
    families = sorted({f for f, _ in groups})
    if not any(sum(f == g for g, _ in groups) > 1 for f in families):
        return ""
    settings = [s for s in cfg.settings if any(r["setting"] == s for r in rows)]
    mean = lambda rs, k: statistics.fmean(r[k] for r in rs)  # noqa: E731
    joint, best = _joint, best_lrs(rows, cfg)
    lines = ["**Learning-rate sweep: mean over settings " + ", ".join(settings) + " and seeds (best lr per method "
             "in bold, chosen by pref × shape accuracy)**", "",
             "| method | lr | cells | pref score | fidelity IoU | shape acc | pref × shape acc | "
             + " | ".join(f"pref / shape {s}" for s in settings) + " |", "|---|---|---|---|---|---|---|" + "---|" * len(settings)]
    for f in families:
        for lr in sorted(lr for g, lr in groups if g == f):
            rs = groups[(f, lr)]
            per = []
            for s in settings:
                cell = [r for r in rs if r["setting"] == s]
                per.append(f"{mean(cell, 'pref_score'):.2f} / {mean(cell, 'shape_acc'):.2f}" if cell else "–")
            b = "**" if lr == best[f] else ""
            lines.append(f"| {b}{f}{b} | {b}{lr:g}{b} | {len(rs)} | {mean(rs, 'pref_score'):.2f} | "
                         f"{mean(rs, 'fidelity_iou'):.2f} | {mean(rs, 'shape_acc'):.2f} | {joint(rs):.2f} | "
                         + " | ".join(per) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--config", default="configs/diffusion/benchmark.yaml")
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--report-only", action="store_true", help="only rebuild the table from results.jsonl")
    ap.add_argument("--section", default="quality", help="marked section of docs/benchmarks/diffusion.md to write")
    ap.add_argument("--title", default="", help="heading of the section (default: by section)")
    ap.add_argument("--format", choices=["ci", "sweep", "both"], default="",
                    help="tables: mean ± CI per metric (default for quality), lr sweep (default otherwise), or both")
    ap.add_argument("--worker", type=int, default=-1, help=argparse.SUPPRESS)  # internal: run one shard
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(BenchmarkConfig, args.config, args.overrides)
    run_dir = Path(args.run_dir)
    if args.worker >= 0:
        # one worker, called directly (the CLI would refuse a --resume whose shard field differs from config.yaml)
        run(dataclasses.replace(cfg, shard=args.worker, num_shards=args.shards), run_dir)
        return
    if not args.report_only:
        import torch

        torch.set_num_threads(cfg.threads)
        ref = Path(cfg.reference_path) if cfg.reference_path else run_dir / "reference.safetensors"
        pretrain_reference(cfg, ref)  # once, before the workers start
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(run_dir / "claims", ignore_errors=True)  # claims of killed workers; finished cells are kept
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        procs = [subprocess.Popen([sys.executable, __file__, "--run-dir", str(run_dir), "--config", args.config,
                                   "--shards", str(args.shards), "--worker", str(i), *args.overrides,
                                   f"reference_path={ref}"],
                                  env={**os.environ, "OMP_NUM_THREADS": str(cfg.threads)})
                 for i in range(args.shards)]
        if any(p.wait() != 0 for p in procs):
            sys.exit("a benchmark worker failed")
    rows = unique_rows(run_dir / "results.jsonl")
    seeds = sorted({r["seed"] for r in rows})
    sweep = args.section != "quality"
    fmt = args.format or ("sweep" if sweep else "ci")
    text = "\n".join([
        "## " + (args.title or ("Learning-rate sweep and SFT reference (MaPO vs Diffusion-DPO vs SFT)" if sweep else
                                "Offline reference-mismatch benchmark (MaPO vs Diffusion-DPO vs SFT)")), "",
        f"Command: `python scripts/bench_diffusion.py --run-dir {run_dir} --config {args.config} "
        f"--shards {args.shards}{'' if args.section == 'quality' else ' --section ' + args.section} "
        f"{'--title ' + repr(args.title) + ' ' if args.title else ''}{'--format ' + args.format + ' ' if args.format else ''}"
        f"{' '.join(args.overrides)}`".rstrip() + "  ",
        f"Seeds: {seeds}. Date: {dt.date.today().isoformat()}. Machine: {platform.machine()} CPU, "
        f"{os.cpu_count()} cores shared with other jobs, torch threads {cfg.threads} per worker.  ",
        f"Model: pixel-space UNet2DConditionModel {cfg.channels} at {cfg.size}×{cfg.size}, reference pretrained "
        f"{cfg.pretrain_steps} steps × {cfg.pretrain_batch} (lr {cfg.pretrain_lr:g}) then 500 more at lr 1e-3 "
        f"(`pretrain_init`, see setup) on hue ~ N(0°, 12°) (p = {1 - cfg.rare_prob:g}) or "
        f"N(120°, 12°) (p = {cfg.rare_prob:g}). Fine-tuning: full weights, {cfg.finetune_steps} steps × "
        f"{cfg.finetune_batch} pairs, AdamW lr {cfg.finetune_lr:g} (a method name ending in @lr used that lr), {cfg.num_pairs} pairs per setting and seed; "
        f"MaPO official defaults (c 0.5, T 1000, margin weight {cfg.mapo_margin_weight:g}); Diffusion-DPO β in the "
        f"official −0.5·β form, frozen-copy reference. Evaluation: {cfg.samples_per_class} DDIM samples "
        f"({cfg.sample_steps} steps) per shape, fixed noise per seed.", "",
        *([table(rows, cfg), ""] if fmt in ("ci", "both") else []),
        *([lr_table(rows, cfg), "", best_lr_table(rows, cfg)] if fmt in ("sweep", "both") else [])])
    write_markdown_section(DOC, args.section, text)
    print(text)


if __name__ == "__main__":
    main()
