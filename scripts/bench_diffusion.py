"""Offline reference-mismatch benchmark (MaPO vs Diffusion-DPO β sweep vs SFT): run it, then write the table.

    python scripts/bench_diffusion.py --run-dir runs/diffusion-bench [--config configs/diffusion/benchmark.yaml]
        [--shards 2] [--report-only] [--mapo-c C] [--mapo-temperature T] [--merge DIR]... [key=value ...]

Runs ``mmalign.diffusion.benchmark.run`` (``--shards N`` starts N worker processes on disjoint cells sharing one run
folder; rows already in results.jsonl are kept), then writes the "quality" section of docs/benchmarks/diffusion.md.
MaPO ablations: each (w, c, T) variant runs in its own folder (``mapo_margin_weight=`` override, ``--mapo-c``,
``--mapo-temperature``); in the tables its MaPO rows are labelled e.g. ``mapo[T=100]`` and ``--merge`` joins the
rows of several folders into one report.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from mmalign.config import check_positive, load_config
from doc_sections import write_marked_section
from mmalign.diffusion.benchmark import BenchmarkConfig, pretrain_reference, run, unique_rows

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "diffusion.md"
OFFICIAL_MAPO = {"w": 0.1, "T": 1000.0, "c": 0.5}  # mapo-t2i/mapo: --beta_mapo, num_train_timesteps, --snr_value
OPTIONS_FILE = "script_options.json"  # the run folder's MaPO variant (w, c, T): one variant per folder


def check_mapo_options(c: float | None, temperature: float | None) -> None:
    """ValueError unless each given MaPO option is a finite number > 0 (None: the official default)."""
    for name, value in (("--mapo-c", c), ("--mapo-temperature", temperature)):
        if value is not None:
            check_positive(name, value)


def with_mapo_options(cfg: Any, c: float | None, temperature: float | None) -> Any:
    """``cfg`` with the given MaPO c / T (None keeps the config's, official 0.5 / 1000)."""
    check_mapo_options(c, temperature)
    changes = {k: v for k, v in (("mapo_c", c), ("mapo_temperature", temperature)) if v is not None}
    return dataclasses.replace(cfg, **changes) if changes else cfg


def mapo_variant(w: float, c: float | None, temperature: float | None) -> dict[str, float]:
    return {"w": float(w), "T": float(temperature or OFFICIAL_MAPO["T"]), "c": float(c or OFFICIAL_MAPO["c"])}


def record_options(run_dir: Path, variant: dict[str, float]) -> None:
    """Write the folder's MaPO variant; refuse a folder whose MaPO rows were made with another one."""
    path = run_dir / OPTIONS_FILE
    old = json.loads(path.read_text()) if path.is_file() else None
    results = run_dir / "results.jsonl"
    has_mapo = results.is_file() and any(r["method"].startswith("mapo") for r in unique_rows(results))
    if old is not None and old != variant and has_mapo:
        raise ValueError(f"--run-dir {run_dir} holds MaPO rows made with {old}, got {variant}: use a fresh --run-dir "
                         "per MaPO variant (and --merge to report them together)")
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(variant) + "\n")


def _label(method: str, variant: dict[str, float]) -> str:
    """``mapo@1e-3`` -> ``mapo[w=0,T=100]@1e-3`` for a non-official variant; other methods unchanged."""
    name, at, lr = method.partition("@")
    diff = [f"{k}={variant[k]:g}" for k in ("w", "T", "c") if variant[k] != OFFICIAL_MAPO[k]]
    return f"{name}[{','.join(diff)}]{at}{lr}" if name == "mapo" and diff else method


def load_rows(run_dir: Path, variant: dict[str, float]) -> list[dict]:
    """Rows of a run folder with MaPO methods labelled by ``variant``."""
    return [{**r, "method": _label(r["method"], variant)} for r in unique_rows(run_dir / "results.jsonl")]


def folder_variant(run_dir: Path) -> dict[str, float]:
    """The MaPO variant a finished folder was run with (config.yaml's margin weight, script_options.json's c / T)."""
    cfg_file, opt_file = run_dir / "config.yaml", run_dir / OPTIONS_FILE
    w = yaml.safe_load(cfg_file.read_text()).get("mapo_margin_weight", OFFICIAL_MAPO["w"]) if cfg_file.is_file() \
        else OFFICIAL_MAPO["w"]
    opts = json.loads(opt_file.read_text()) if opt_file.is_file() else {}
    return mapo_variant(w, opts.get("c"), opts.get("T"))


def merged_rows(parts: list[list[dict]]) -> list[dict]:
    """Rows of several folders, the first per (setting, method, seed) (shared cells such as the reference)."""
    seen, out = set(), []
    for rows in parts:
        for r in rows:
            key = (r["setting"], r["method"], r["seed"])
            if key not in seen:
                seen.add(key)
                out.append(r)
    return out


def _methods(rows: list[dict], cfg: BenchmarkConfig) -> list[str]:
    """Methods in table order: reference, the config's methods, then their MaPO variants (``mapo[...]``)."""
    present = {r["method"] for r in rows}
    wanted = {"reference", *cfg.methods}
    order = ["reference", *cfg.methods, *(r["method"] for r in rows)]
    return [m for m in dict.fromkeys(order) if m in present and re.sub(r"\[.*\]", "", m) in wanted]


def _ci(values: list[float], signed: bool = False) -> str:
    """mean ± half-width of a 95% t-interval over seeds (or cells)."""
    m = statistics.fmean(values)
    fmt = "+.2f" if signed else ".2f"
    if len(values) < 2:
        return f"{m:{fmt}}"
    return f"{m:{fmt}} ± {_t975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values)):.2f}"


def _t975(df: int) -> float:
    """Two-sided 95% quantile of Student's t with ``df`` degrees of freedom: the 2-decimal table the published tables
    used up to df = 14 (kept so they reproduce), scipy's exact quantile beyond (not a flat 2.0)."""
    table = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23, 11: 2.20,
             12: 2.18, 13: 2.16, 14: 2.14}
    if df in table:
        return table[df]
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def table(rows: list[dict], cfg: BenchmarkConfig) -> str:
    settings = [s for s in cfg.settings if any(r["setting"] == s for r in rows)]
    methods = _methods(rows, cfg)
    cell: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        cell.setdefault((r["setting"], r["method"]), []).append(r)
    lines = []
    for metric, title in (("pref_score", "Preference score (style: fraction of samples within ±{tol:g}° of the "
                                         "chosen hue; safety: 1 − green rate), mean ± 95% CI over seeds"),
                          ("fidelity_iou", "Fidelity (IoU of the drawn foreground with the prompted shape's mask)"),
                          ("shape_acc", "Shape accuracy (prompted shape is the best-matching mask)"),
                          ("pref_shape", "Per-sample joint score (fraction of samples that are a preference hit "
                                         "*and* draw the prompted shape)"),
                          ("w1_chosen", "Circular W1 (degrees) from the samples' hues to the chosen images' hues; "
                                        "the reference row is the reference-chosen mismatch")):
        if not all(metric in r for r in rows):
            continue  # rows from before this metric existed
        lines += [f"**{title.format(tol=cfg.tolerance)}**", "", "| method | " + " | ".join(settings) + " |",
                  "|---|" + "---|" * len(settings)]
        for m in methods:
            vals = [_ci([r[metric] for r in cell[(s, m)]]) + f" (n={len(cell[(s, m)])})" if (s, m) in cell else "–"
                    for s in settings]
            lines.append(f"| {m} | " + " | ".join(vals) + " |")
        lines.append("")
    # the paper's claim: MaPO's advantage over the best Diffusion-DPO beta grows with the mismatch (compared within
    # full fine-tuning and within each LoRA rank; with several lrs of a method, its best per setting)
    family = lambda m: m.partition("@")[0]  # noqa: E731
    for adapter in dict.fromkeys(_adapter(m) for m in methods):
        mapos = [m for m in methods if family(m) == "mapo" + adapter]
        sfts = [m for m in methods if family(m) == "sft" + adapter]
        dpos = [m for m in methods if m.startswith("dpo_") and _adapter(m) == adapter]
        if not dpos or not mapos:
            continue
        lines += [f"**MaPO − best Diffusion-DPO β{' (' + adapter[1:] + ')' if adapter else ''} (per setting, "
                  "preference score, mean over seeds; a method run at several lrs shows its best)**", "",
                  "| setting | MaPO | best DPO (β) | SFT | MaPO − best DPO |", "|---|---|---|---|---|"]
        for s in settings:
            mean = lambda m: statistics.fmean(r["pref_score"] for r in cell[(s, m)]) if (s, m) in cell else float("nan")  # noqa: E731
            if not any((s, m) in cell for m in mapos):
                continue
            best = lambda ms: max(ms, key=lambda m: -1.0 if math.isnan(mean(m)) else mean(m))  # noqa: E731
            show = lambda m, ms: f"{mean(m):.2f}" + (f" (@{m.partition('@')[2]})" if len(ms) > 1 else "")  # noqa: E731
            bm, bd = best(mapos), best(dpos)
            sft = show(best(sfts), sfts) if sfts else "–"
            lines.append(f"| {s} | {show(bm, mapos)} | {mean(bd):.2f} ({bd[4:]}) | {sft} | "
                         f"{mean(bm) - mean(bd):+.2f} |")
        lines.append("")
    return "\n".join(lines).rstrip("\n")


def _adapter(method: str) -> str:
    """``"dpo_500+lora8@1e-3"`` -> ``"+lora8"``; ``""`` for full fine-tuning."""
    name = method.partition("@")[0]
    return "+" + name.partition("+")[2] if "+" in name else ""


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
    order = list(dict.fromkeys(m.partition("@")[0] for m in _methods(rows, cfg)))
    fams = sorted(best, key=lambda f: (("sft", "mapo").index(f) if f in ("sft", "mapo") else 2, order.index(f)))
    # with several lrs of a method here, its lr is picked on the very cells reported: say so (optimistic)
    chosen_here = any(sum(g == f for g, _ in groups) > 1 for f in best)
    note = " (lr picked by mean pref × shape over these same cells and seeds: optimistic)" if chosen_here else ""
    lines = ["**Each method at its own best lr: preference score / fidelity IoU / shape accuracy, mean over "
             f"seeds{note}**",
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


def paired_table(rows: list[dict], cfg: BenchmarkConfig, baseline: str) -> str:
    """Per method: mean difference to ``baseline`` over the (setting, seed) cells both have, ± 95% t-interval."""
    by = {(r["method"], r["setting"], r["seed"]): r for r in rows}
    lines = [f"**Paired difference to {baseline} on the same (setting, seed) cells: mean ± 95% CI over cells**", "",
             "| method | cells | Δ pref × shape acc | Δ pref score | Δ fidelity IoU | Δ shape acc |",
             "|---|---|---|---|---|---|"]
    for m in _methods(rows, cfg):
        pairs = [(r, by[(baseline, s, seed)]) for (mm, s, seed), r in by.items() if mm == m and m != baseline
                 and (baseline, s, seed) in by]
        if not pairs:
            continue
        d = {k: [f(a) - f(b) for a, b in pairs] for k, f in (
            ("joint", lambda r: r["pref_score"] * r["shape_acc"]), ("pref", lambda r: r["pref_score"]),
            ("fid", lambda r: r["fidelity_iou"]), ("shape", lambda r: r["shape_acc"]))}
        lines.append(f"| {m} | {len(pairs)} | " + " | ".join(_ci(d[k], signed=True) for k in d) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--config", default="configs/diffusion/benchmark.yaml")
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--report-only", action="store_true", help="only rebuild the table from results.jsonl")
    ap.add_argument("--section", default="quality", help="marked section of the Markdown file (--doc) to write")
    ap.add_argument("--doc", default=str(DOC), help="Markdown file the section goes to (default: %(default)s)")
    ap.add_argument("--title", default="", help="heading of the section (default: by section)")
    ap.add_argument("--format", choices=["ci", "sweep", "both"], default="",
                    help="tables: mean ± CI per metric (default for quality), lr sweep (default otherwise), or both")
    ap.add_argument("--mapo-c", type=float, default=None,
                    help="MaPO c (official --snr_value 0.5) for this folder's MaPO cells; > 0")
    ap.add_argument("--mapo-temperature", type=float, default=None,
                    help="MaPO temperature T (official 1000 = training timesteps) for this folder's MaPO cells; > 0")
    ap.add_argument("--merge", action="append", default=[], metavar="DIR",
                    help="a further finished run folder whose rows (MaPO labelled by its variant) join the report; "
                         "repeatable")
    ap.add_argument("--baseline", default="", metavar="METHOD",
                    help="also tabulate each method's paired difference to this method (e.g. mapo@1e-3)")
    ap.add_argument("--worker", type=int, default=-1, help=argparse.SUPPRESS)  # internal: run one shard
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    check_mapo_options(args.mapo_c, args.mapo_temperature)
    cfg = with_mapo_options(load_config(BenchmarkConfig, args.config, args.overrides), args.mapo_c,
                            args.mapo_temperature)
    if args.baseline and re.sub(r"\[.*\]", "", args.baseline) not in ["reference", *cfg.methods]:
        raise ValueError(f"--baseline must be 'reference' or one of methods {cfg.methods}, got {args.baseline!r}")
    run_dir = Path(args.run_dir)
    for d in args.merge:
        if not (Path(d) / "results.jsonl").is_file():
            raise ValueError(f"--merge {d}: no results.jsonl there (expected a finished run folder)")
    variant = mapo_variant(cfg.mapo_margin_weight, args.mapo_c, args.mapo_temperature)
    mapo_opts = [a for flag, v in (("--mapo-c", args.mapo_c), ("--mapo-temperature", args.mapo_temperature))
                 if v is not None for a in (flag, f"{v:g}")]
    if args.worker >= 0:
        # one worker, called directly (the CLI would refuse a --resume whose shard field differs from config.yaml)
        run(dataclasses.replace(cfg, shard=args.worker, num_shards=args.shards), run_dir)
        return
    if not args.report_only:
        import torch

        torch.set_num_threads(cfg.threads)
        ref = Path(cfg.reference_path) if cfg.reference_path else run_dir / "reference.safetensors"
        pretrain_reference(cfg, ref)  # once, before the workers start
        record_options(run_dir, variant)
        shutil.rmtree(run_dir / "claims", ignore_errors=True)  # claims of killed workers; finished cells are kept
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        procs = [subprocess.Popen([sys.executable, __file__, "--run-dir", str(run_dir), "--config", args.config,
                                   "--shards", str(args.shards), "--worker", str(i), *mapo_opts,
                                   *args.overrides,
                                   f"reference_path={ref}"],
                                  env={**os.environ, "OMP_NUM_THREADS": str(cfg.threads)})
                 for i in range(args.shards)]
        if any(p.wait() != 0 for p in procs):
            sys.exit("a benchmark worker failed")
    rows = merged_rows([load_rows(run_dir, variant), *(load_rows(Path(d), folder_variant(Path(d)))
                                                        for d in args.merge)])
    seeds = sorted({r["seed"] for r in rows})
    sweep = args.section != "quality"
    fmt = args.format or ("sweep" if sweep else "ci")
    command = ["python scripts/bench_diffusion.py", "--run-dir", str(run_dir), "--config", args.config,
               "--shards", str(args.shards), *(["--section", args.section] if args.section != "quality" else []),
               *(["--title", repr(args.title)] if args.title else []),
               *(["--format", args.format] if args.format else []),
               *(["--baseline", args.baseline] if args.baseline else []), *mapo_opts,
               *(a for d in args.merge for a in ("--merge", d)), *args.overrides]
    lora = any(_adapter(m) for m in cfg.methods)
    lora_note = (" (methods with +lora<r>: rank-r LoRA on to_q/to_k/to_v/to_out.0 only, α = r, Gaussian init as "
                 "diffusers' DPO script, merged into the weights before sampling)") if lora else ""
    lora_ref = " (with +lora<r>: the same network with adapters disabled)" if lora else ""
    text = "\n".join([
        "## " + (args.title or ("Learning-rate sweep and SFT reference (MaPO vs Diffusion-DPO vs SFT)" if sweep else
                                "Offline reference-mismatch benchmark (MaPO vs Diffusion-DPO vs SFT)")), "",
        f"Command: `{' '.join(command)}`  ",
        f"Seeds: {seeds}. Date: {dt.date.today().isoformat()}. Machine: {platform.machine()} CPU, "
        f"{os.cpu_count()} cores shared with other jobs, torch threads {cfg.threads} per worker.  ",
        f"Model: pixel-space UNet2DConditionModel {cfg.channels} at {cfg.size}×{cfg.size}, reference pretrained "
        f"{cfg.pretrain_steps} steps × {cfg.pretrain_batch} (lr {cfg.pretrain_lr:g}) then 500 more at lr 1e-3 "
        f"(`pretrain_init`, see setup) on hue ~ N(0°, 12°) (p = {1 - cfg.rare_prob:g}) or "
        f"N(120°, 12°) (p = {cfg.rare_prob:g}). Fine-tuning: full weights{lora_note}, {cfg.finetune_steps} steps × "
        f"{cfg.finetune_batch} pairs, AdamW lr {cfg.finetune_lr:g} (a method name ending in @lr used that lr), {cfg.num_pairs} pairs per setting and seed; "
        f"MaPO c {variant['c']:g}, T {variant['T']:g}, margin weight {variant['w']:g} (official 0.5, 1000, 0.1; rows "
        "named mapo[...] list the values that differ); Diffusion-DPO β in the "
        f"official −0.5·β form, frozen-copy reference{lora_ref}. Evaluation: {cfg.samples_per_class} DDIM samples "
        f"({cfg.sample_steps} steps) per shape, fixed noise per seed.", "",
        *([table(rows, cfg), ""] if fmt in ("ci", "both") else []),
        *([t for t in (lr_table(rows, cfg),) if t] + ["", best_lr_table(rows, cfg)] if fmt in ("sweep", "both")
          else []),
        *(["", paired_table(rows, cfg, args.baseline)] if args.baseline else [])])
    write_marked_section(Path(args.doc), args.section, text, "# Diffusion alignment benchmarks")
    print(text)


if __name__ == "__main__":
    main()
