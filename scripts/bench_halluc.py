"""Hallucination testbed: base-model gates, then each method vs DPO (paired, Holm) -> docs/benchmarks/vision_lm.md.

    nice -n 19 python scripts/bench_halluc.py --seeds dev --base-only [key=value ...]  # base recipe tuning rows
    nice -n 19 python scripts/bench_halluc.py --seeds dev --pref-tune [key=value ...]  # preference setting rows
    nice -n 19 python scripts/bench_halluc.py --seeds report [key=value ...]   # report seeds: gates + verdicts
    nice -n 19 python scripts/bench_halluc.py --seeds report --flip-dirs DIR ...  # flip-rate sweep from run dirs

Per seed (:func:`mmalign.vision_lm.halluc_bench.run_seed`): weak-evidence scenes, the base model (built once per
seed and cached under ``runs/halluc_base``), its gates, and, only when every seed's base passes every gate, each
method's LoRA run and diagnostics. One JSON file per seed in the run dir (finished seeds are skipped on a re-run;
seeds may run as parallel processes with ``--only-seed``). The page gets the gates section (always) and the results
section (verdict per paper claim, method table, paired comparison with DPO, diagnostics) only when the gates pass;
otherwise the script says so, writes no preference row, and exits with status 3.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from mmalign.config import load_config
from mmalign.vision_lm import halluc_base as H
from mmalign.vision_lm import stats
from mmalign.vision_lm.halluc_bench import HallucBenchConfig, run_seed
from doc_sections import machine, write_marked_section

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks" / "vision_lm.md"
TITLE = "# Vision-language: hallucination testbed"
ROW_NAMES = {"dpo": "DPO (rule-corrupted pairs)", "dpo_flipped": "DPO, flipped labels",
             "robust_dpo_flipped": "robust DPO (eps = flip rate), flipped labels",
             "robust_dpo_flipped_est": "robust DPO (eps estimated), flipped labels", "realign": "Re-Align (rDPO)",
             "dpo_realign_pairs": "DPO on Re-Align's pairs", "bdhs_offline": "BDHS offline",
             "bdhs_online": "BDHS online", "bdhs_mixed": "BDHS Mixed-DPO", "rrpo": "RRPO"}
# paper claim -> (row, compared with, on: "primary" metric or "kl" = token KL to the base, lower is the claim; paper)
CLAIMS = {
    "Re-Align: its pairs + rDPO beat DPO on rule-corrupted pairs": ("realign", "dpo", "primary",
                                                                    "Table 1: POPE-r 88.65 vs 88.21 (POVID)"),
    "Re-Align: rDPO beats DPO on the same pairs": ("realign", "dpo_realign_pairs", "primary",
                                                   "Table 4: POPE-r +0.47 / +1.62 over DPO"),
    "BDHS: image-hidden rejected answers beat DPO's pairs": ("bdhs_offline", "dpo", "primary",
                                                             "POPE 88.75 vs 88.09 (DPO, POVID pairs)"),
    "RRPO: less hallucination than DPO": ("rrpo", "dpo", "primary", "better than DPO on hallucination benchmarks"),
    "RRPO: diverges less from the reference than DPO": ("rrpo", "dpo", "kl", "token KL ~1 vs ~20 for DPO"),
    "robust DPO: recovers from flipped labels": ("robust_dpo_flipped", "dpo_flipped", "primary",
                                                 "unbiased DPO loss under flip rate eps"),
    "robust DPO with eps estimated: recovers": ("robust_dpo_flipped_est", "dpo_flipped", "primary",
                                                "eps estimated, not told"),
}
MIN_EFFECT = 0.01  # a gain whose 95% interval lies below this is read as "not reproduced", not "inconclusive"
BASE_COLS = [("pope_random_acc", "POPE-r"), ("pope_popular_acc", "POPE-p"), ("pope_adversarial_acc", "POPE-a"),
             ("blank_pope_random_acc", "blank POPE-r"), ("partner_balanced_acc", "partner bal. acc"),
             ("partner_yes_ratio", "partner yes"), ("bayes_partner_balanced_acc", "Bayes bal. acc")]
ROW_COLS = [("partner_balanced_acc", "partner bal. acc"), ("partner_f1", "partner F1"),
            ("partner_yes_ratio", "partner yes"), ("partner_violating_yes", "halluc. rate"),
            ("partner_visible_recall", "visible recall"), ("pope_adversarial_acc", "POPE-a"),
            ("pope_random_acc", "POPE-r"), ("caption_chair_i", "CHAIR_i"), ("caption_chair_s", "CHAIR_s"),
            ("diag/token_kl_to_base", "token KL")]


def ci(values: list[float], digits: int = 3) -> str:
    m, h = stats.mean_ci(values)
    return f"{m:.{digits}f}" if math.isnan(h) else f"{m:.{digits}f} ± {h:.{digits}f}"


def yes_ratio_key(primary: str) -> str:
    return "partner_yes_ratio" if primary.startswith("partner") else primary.replace("_acc", "_yes_ratio")


def gates_passed(results: dict[str, dict]) -> bool:
    return bool(results) and all(all(r["gates"].values()) for r in results.values())


def gate_section(results: dict[str, dict], cfg: HallucBenchConfig, header: str) -> str:
    seeds = sorted(results, key=int)
    lines = ["## Base model and gates", "", header, "",
             "| seed | " + " | ".join(c for _, c in BASE_COLS) + " | gates | base CPU s |",
             "|---|" + "---|" * (len(BASE_COLS) + 2)]
    for s in seeds:
        r = results[s]
        failed = [g for g, ok in r["gates"].items() if not ok]
        lines.append(f"| {s} | " + " | ".join(f"{r['base'][k]:.3f}" for k, _ in BASE_COLS)
                     + f" | {'pass' if not failed else 'FAIL: ' + '; '.join(failed)} | "
                     f"{r['base_info'].get('build_cpu_s', float('nan')):.0f} |")
    lines.append("| mean ± 95% CI | " + " | ".join(ci([results[s]["base"][k] for s in seeds]) for k, _ in BASE_COLS)
                 + " | | |")
    lines.append("")
    if gates_passed(results):
        lines.append("Every seed's base model passes every gate.")
    else:
        lines.append("**The base model fails the gates: no preference row is reported.**")
    return "\n".join(lines)


def comparisons(results: dict[str, dict], cfg: HallucBenchConfig) -> dict[str, dict]:
    """Each claim of :data:`CLAIMS` whose row ran: the row minus its DPO baseline, paired over seeds, Holm over all
    claims. For a "kl" claim the difference is in token KL to the base (the claim is a negative difference)."""
    seeds = sorted(results, key=int)
    yes_key = yes_ratio_key(cfg.primary_metric)
    out = {}
    for claim, (row, against, kind, _) in CLAIMS.items():
        if row not in cfg.methods or against not in cfg.methods:
            continue
        key = cfg.primary_metric if kind == "primary" else "diag/token_kl_to_base"
        test = stats.paired_test([results[s]["rows"][row][key] for s in seeds],
                                 [results[s]["rows"][against][key] for s in seeds])
        out[claim] = {"row": row, "kind": kind, **test,
                      "yes_ratio": float(np.mean([results[s]["rows"][row][yes_key] for s in seeds]))}
    for c, p in zip(out.values(), stats.holm([c["p"] for c in out.values()])):
        c["p_holm"] = p
        if c["kind"] == "kl":  # lower KL is the claim; the yes-ratio rule does not apply to a divergence
            c["verdict"] = "no difference" if math.isnan(p) or p >= 0.05 else "better" if c["diff"] < 0 else "worse"
        else:
            c["verdict"] = stats.verdict(c["diff"], p, c["yes_ratio"])
    return out


def claim_verdict(c: dict) -> str:
    if c["verdict"] == "better":
        return "reproduced"
    if c["verdict"] in ("worse", "yes-ratio shift"):
        return "not reproduced"
    if c["kind"] == "primary" and not math.isnan(c["half_width"]) and c["diff"] + c["half_width"] < MIN_EFFECT:
        return "not reproduced"
    return "inconclusive"


def results_section(results: dict[str, dict], cfg: HallucBenchConfig, header: str) -> str:
    seeds = sorted(results, key=int)
    comps = comparisons(results, cfg)
    key = cfg.primary_metric
    lines = ["## Verdicts per paper claim", "", header, "",
             f"Primary metric (declared in the config before the runs): `{key}`. Each method minus its DPO row "
             f"(compared with), per seed (n = {len(seeds)}); mean ± 95% t-interval, two-sided paired t-test, "
             "Holm-corrected over "
             f"the {len(comps)} claims. A gain with the method's yes-ratio outside {stats.YES_RATIO_BAND} does "
             f"not count; a gain whose interval lies below {MIN_EFFECT} is read as not reproduced. The RRPO "
             "divergence claim is read on the token KL to the base (lower = the claim).", "",
             "| claim | paper | compared with | Δ | p (Holm) | yes-ratio | verdict |", "|---|---|---|---|---|---|---|"]
    for claim, (row, against, kind, paper) in CLAIMS.items():
        if claim not in comps:
            lines.append(f"| {claim} | {paper} | {ROW_NAMES.get(against, against)} | not run | | | - |")
            continue
        c = comps[claim]
        what = "" if kind == "primary" else " (token KL)"
        lines.append(f"| {claim} | {paper} | {ROW_NAMES.get(against, against)} | {c['diff']:+.3f} ± "
                     f"{c['half_width']:.3f}{what} | {c['p_holm']:.3f} | {c['yes_ratio']:.2f} | {claim_verdict(c)} |")
    # CHAIR columns only where every row measured them (runs with n_caption_scenes=0 have none)
    cols = [(k, c) for k, c in ROW_COLS if not k.startswith("caption_")
            or all(k in results[s]["rows"][row] for s in seeds for row in cfg.methods)]
    lines += ["", "### Methods (mean ± 95% CI over seeds)", "",
              "| method | " + " | ".join(c for _, c in cols) + " | pairs |", "|---|" + "---|" * (len(cols) + 1)]
    lines.append("| base (SFT) | " + " | ".join(ci([results[s]["base"][k] for s in seeds]) if k in
                                                   results[seeds[0]]["base"] else "0" for k, _ in cols) + " | - |")
    for row in cfg.methods:
        r = [results[s]["rows"][row] for s in seeds]
        lines.append(f"| {ROW_NAMES.get(row, row)} | " + " | ".join(ci([x[k] for x in r]) for k, _ in cols)
                     + f" | {np.mean([x['n_pairs'] for x in r]):.0f} |")
    steps = sorted({int(k.rsplit("step", 1)[1]) for k in results[seeds[0]]["rows"][cfg.methods[0]]
                    if k.startswith("diag/token_kl_step")})
    lines += ["", "### Mechanism diagnostics (mean ± 95% CI over seeds)", "",
              "Token KL to the base during training (LoRA active, a quarter of the KL examples) at steps "
              f"{', '.join(map(str, steps))}; rejected correct: fraction of the pair set's rejected answers that are "
              "true of the image as annotated (captions: every mention right; yes/no: the right answer); other: the "
              "pair builder's statistics and robust DPO's estimated flip rate ε̂.", "",
              "| method | " + " | ".join(f"KL step {n}" for n in steps) + " | rejected correct: captions | yes/no | "
              "other |", "|---|" + "---|" * (len(steps) + 3)]
    shown: set[str] = set()  # a pair-set diagnostic is shared by every row trained on that pair set: shown once
    for row in cfg.methods:
        r = [results[s]["rows"][row] for s in seeds]
        cells = [ci([x[f"diag/token_kl_step{n}"] for x in r]) for n in steps]
        for kind in ("caption", "yesno"):
            key = next((k for k in r[0] if k.startswith("diag/") and k.endswith(f"_rejected_correct_{kind}")), "")
            cells.append(ci([x[key] for x in r]) if key and key not in shown else "")
            shown.add(key)
        extra = sorted(k for k in r[0] if k.startswith(("realign/", "bdhs/", "robust/")) and k not in shown)
        shown.update(k for k in extra if not k.startswith("robust/"))
        cells.append("; ".join(f"{k.split('/')[1]} {ci([x[k] for x in r])}" for k in extra))
        lines.append(f"| {ROW_NAMES.get(row, row)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def emit(args: argparse.Namespace, key: str, body: str) -> None:
    """Write ``body`` as the page's marked section ``key`` (print it with ``--no-doc``)."""
    if args.no_doc:
        print(body)
    else:
        write_marked_section(DOC, key, body, TITLE)


def refusal_section(results: dict[str, dict]) -> str:
    """The claims table when no preference row may be reported (a gate failed, or rows are missing)."""
    failed = sorted({g for r in results.values() for g, ok in r["gates"].items() if not ok})
    why = ("the base model fails " + "; ".join(failed)) if failed else "the method rows have not run on every seed"
    lines = ["## Verdicts per paper claim", "", f"Not tested: {why} (see the gates below), so the script reports "
             "no preference row.", "", "| claim | paper | verdict |", "|---|---|---|"]
    lines += [f"| {claim} | {paper} | not tested |" for claim, (*_, paper) in CLAIMS.items()]
    return "\n".join(lines)


def tuning(cfg: HallucBenchConfig, seeds: list[int], args: argparse.Namespace, run_dir: Path) -> int:
    """``--base-only``: one tuning row per seed (base metrics, gates, build CPU time) -> section halluc_tuning."""
    log = run_dir / "tuning.jsonl"
    for seed in [] if args.no_run else seeds:  # --no-run: only rewrite the table from tuning.jsonl
        data = H.make_data(cfg.base, seed, 1, cfg.n_test_scenes)
        adapter, info = H.build_base(cfg.base, seed, data, Path(args.cache_dir))
        row = {"overrides": args.overrides, "seed": seed, "base": H.evaluate(adapter, data, seed, cfg.base.generator()),
               "info": info}
        row["gates"] = H.gates(row["base"])
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: row[k] for k in ("overrides", "seed", "gates")}), flush=True)
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    cols = BASE_COLS[:5]
    lines = ["## What it took to pass the gates", "",
             f"Each row: `nice -n 10 python scripts/bench_halluc.py --seeds dev --base-only --only-seed SEED "
             f"<overrides>` (base model only, {cfg.n_test_scenes} test scenes; dev seeds, never report seeds); "
             f"machine: {machine()}, 1 torch thread. CPU s = the base model's build time.", "",
             "| overrides | seed | " + " | ".join(c for _, c in cols) + " | gates passed | CPU s |",
             "|---|---|" + "---|" * (len(cols) + 2)]
    for r in rows:
        lines.append(f"| `{' '.join(r['overrides']) or '(config)'}` | {r['seed']} | "
                     + " | ".join(f"{r['base'][k]:.3f}" for k, _ in cols)
                     + f" | {sum(r['gates'].values())}/{len(r['gates'])} | {r['info'].get('build_cpu_s', 0):.0f} |")
    body = "\n".join(lines)
    emit(args, "halluc_tuning", body)
    return 0


TUNE_COLS = [("partner_balanced_acc", "partner bal. acc"), ("partner_yes_ratio", "partner yes"),
             ("partner_violating_yes", "halluc. rate"), ("partner_visible_recall", "visible recall"),
             ("pope_adversarial_acc", "POPE-a"), ("diag/token_kl_to_base", "token KL")]
# stored per tuning row; TUNE_COLS_STORED adds what the table leaves out
TUNE_COLS_STORED = [*TUNE_COLS, ("pope_random_acc", "POPE-r"), ("train/pref_accuracy", "train pref acc"),
                    ("partner_violating_gap", "yes-no logit on prior-violating partner questions")]
TUNE_SETTINGS = ("pref_labels", "pref_steps", "pref_lr", "beta", "lora_r", "pref_batch_size", "n_pref_scenes",
                 "partner_question_rate")
TUNE_DEFAULTS = {"n_pref_scenes": 256, "partner_question_rate": 0.0}  # settings that rows written before they were recorded ran with
TRAJECTORY = ("rewards/margin", "rewards/chosen", "rewards/rejected", "train/loss")
MOVED = 0.55  # a row "moves" the partner question when its balanced accuracy is at least this (the base: 0.50)


def _tune_key(r: dict) -> str:
    """A tuning row's identity: settings, seed and numbers (a repeated attempt of a deterministic run is shown
    once)."""
    return json.dumps([r["settings"], r["seed"], {m: {k: v for k, v in x.items() if k in dict(TUNE_COLS)}
                                                  for m, x in r["rows"].items()}], sort_keys=True)


def pref_tuning_section(rows: list[dict], ref: HallucBenchConfig, n_test: int) -> str:
    """The compact dev table: one line per (setting, method row), one column per dev seed with the partner
    question's balanced accuracy / yes-ratio, how many seeds moved off the base's 0.50, and CPU s per seed."""
    recipes: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        st = {**TUNE_DEFAULTS, **r["settings"]}
        for m, x in r["rows"].items():
            recipes.setdefault((tuple(str(st[k]) for k in TUNE_SETTINGS), m), {})[int(r["seed"])] = x
    seeds = sorted({int(r["seed"]) for r in rows})
    label = {"pref_lr": "lr", "beta": "β", "lora_r": "r", "pref_batch_size": "batch", "n_pref_scenes": "pairs from",
             "partner_question_rate": "partner questions"}

    def name(values: tuple[str, ...]) -> str:
        st = dict(zip(TUNE_SETTINGS, values))
        other = [f"{label[k]} {float(st[k]):g}" for k in TUNE_SETTINGS[2:] if float(st[k]) != getattr(ref, k)]
        return f"{st['pref_labels']}, {st['pref_steps']} steps" + "".join(f", {o}" for o in other)

    order = sorted(recipes, key=lambda k: (k[0][0], *(float(v) for v in k[0][1:]), k[1]))
    lines = ["## Preference-training settings (dev seeds)", "",
             "Each line: `python scripts/bench_halluc.py --seeds dev --pref-tune <overrides>` (the cached "
             f"base of each dev seed, never a report seed; {n_test} test scenes); machine: {machine()}, 1 torch "
             f"thread. Settings not named are the configured ones: LoRA r {ref.lora_r}, lr {ref.pref_lr:g}, "
             f"β {ref.beta:g}, {ref.pref_batch_size} pairs per step, pairs from {ref.n_pref_scenes} scenes. A cell is "
             f"the partner question's balanced accuracy / yes-ratio (the base: 0.50 / 1.00); moved: seeds at "
             f"≥ {MOVED}; CPU s: training and evaluation per seed.", "",
             "| setting | row | " + " | ".join(map(str, seeds)) + " | moved | CPU s |",
             "|---|---|" + "---|" * (len(seeds) + 2)]
    for key in order:
        per = recipes[key]
        cells = [f"{per[s]['partner_balanced_acc']:.2f}/{per[s]['partner_yes_ratio']:.2f}" if s in per else ""
                 for s in seeds]
        moved = sum(x["partner_balanced_acc"] >= MOVED for x in per.values())
        lines.append(f"| {name(key[0])} | {key[1]} | " + " | ".join(cells) + f" | {moved}/{len(per)} | "
                     f"{np.mean([x['cpu_s'] for x in per.values()]):.0f} |")
    return "\n".join(lines)


def pref_tuning(cfg: HallucBenchConfig, seeds: list[int], args: argparse.Namespace, run_dir: Path) -> int:
    """``--pref-tune``: train the configured rows from each dev seed's base (a preference-setting attempt), append
    one row per seed to <run-dir>/pref_tuning.jsonl (metrics, the pair set's partner questions, the DPO reward
    trajectory), rewrite the page's table from every row there."""
    if args.seeds != "dev":
        raise ValueError("--pref-tune tunes on the dev seeds only: pass --seeds dev")
    log = run_dir / "pref_tuning.jsonl"
    tag = f"{'-'.join(args.overrides) or 'config'}-{time.time_ns()}"  # a repeated attempt never reuses a dir
    for seed in [] if args.no_run else seeds:
        res = run_seed(cfg, seed, run_dir / "pref_tune" / tag, Path(args.cache_dir))
        if not all(res["gates"].values()):
            raise ValueError(f"dev seed {seed}'s base model fails the gates {res['gates']}: tune another seed")
        row = {"overrides": args.overrides, "seed": seed, "base": res["base"],
               "settings": {k: getattr(cfg, k) for k in TUNE_SETTINGS}, "rows": {}}
        for m, r in res["rows"].items():
            logged = run_dir / "pref_tune" / tag / f"seed{seed}" / m / "metrics.jsonl"
            traj = [json.loads(ln) for ln in logged.read_text().splitlines() if ln.strip()] if logged.is_file() else []
            row["rows"][m] = ({k: r[k] for k, _ in TUNE_COLS_STORED if k in r} | {"cpu_s": r["cpu_s"]}
                              | {k: r[k] for k in r if "_partner_pairs_" in k}
                              | {"trajectory": [{k: t[k] for k in ("step", *TRAJECTORY) if k in t}
                                                for t in traj if "train/loss" in t]})
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({"overrides": args.overrides, "seed": seed,
                          **{m: [round(r.get(k, math.nan), 3) for k in ("partner_balanced_acc", "partner_yes_ratio",
                                                                        "partner_violating_gap")]
                             for m, r in row["rows"].items()}}), flush=True)
    rows, seen = [], set()
    for line in log.read_text().splitlines():
        r = json.loads(line) if line.strip() else None
        if r and _tune_key(r) not in seen:  # a repeated attempt with identical numbers (deterministic runs): once
            seen.add(_tune_key(r))
            rows.append(r)
    ref = load_config(HallucBenchConfig, args.config, [])  # the configured settings, without this call's overrides
    emit(args, "halluc_pref_tuning", pref_tuning_section(rows, ref, cfg.n_test_scenes))
    return 0


FLIP_ROWS = ("dpo_flipped", "robust_dpo_flipped", "robust_dpo_flipped_est")


def flip_section(dirs: list[Path], cfg: HallucBenchConfig, seeds: list[int], header: str) -> str:
    """The flip-rate sweep from run dirs that differ in ``flip_rate``: per rate, each flipped row's primary metric;
    DPO's change against no flips and each robust DPO's gain over DPO at the same rate, paired over seeds,
    Holm-corrected over the table's tests. Without a ``flip_rate=0`` dir, DPO at 0 flips is a dir's ``dpo`` row (the
    same seeded training as ``dpo_flipped`` with nothing flipped); a row a dir did not run is left blank."""
    key = cfg.primary_metric
    runs: dict[float, dict[int, dict]] = {}
    for d in dirs:
        missing = [f"seed{s}.json" for s in seeds if not (d / f"seed{s}.json").is_file()]
        if missing:
            raise ValueError(f"--flip-dirs: {d} has no {', '.join(missing)} (run those seeds first)")
        per = {s: json.loads((d / f"seed{s}.json").read_text()) for s in seeds}
        rates = {r["flip_rate"] for r in per.values()}
        if len(rates) != 1:
            raise ValueError(f"--flip-dirs: {d} holds seeds run with different flip rates {sorted(rates)}")
        rate = rates.pop()
        runs[rate] = {s: {**runs.get(rate, {}).get(s, {}), **r["rows"]} for s, r in per.items()}
        if all("dpo" in r["rows"] for r in per.values()):
            for s, r in per.items():
                runs.setdefault(0.0, {}).setdefault(s, {}).setdefault("dpo_flipped", r["rows"]["dpo"])
    if 0.0 not in runs:
        raise ValueError("--flip-dirs must include a run with flip_rate=0 or one with the dpo row, got none")
    for per in runs[0.0].values():  # with no flips robust DPO's known eps is 0, where its loss is DPO's
        per.setdefault("robust_dpo_flipped", per["dpo_flipped"])
    val = {(rate, row): [runs[rate][s][row][key] for s in seeds] for rate in runs for row in FLIP_ROWS
           if all(row in runs[rate][s] for s in seeds)}
    tests = {}
    for rate in sorted(runs):
        if rate > 0 and (rate, "dpo_flipped") in val:
            tests[(rate, "degrade")] = stats.paired_test(val[rate, "dpo_flipped"], val[0.0, "dpo_flipped"])
        for row in FLIP_ROWS[1:] if rate > 0 else FLIP_ROWS[2:]:
            if (rate, row) in val and (rate, "dpo_flipped") in val:
                tests[(rate, row)] = stats.paired_test(val[rate, row], val[rate, "dpo_flipped"])
    for t, p in zip(tests.values(), stats.holm([t["p"] for t in tests.values()])):
        t["p_holm"] = p

    def diff(t: dict | None) -> str:
        return "" if t is None else f"{t['diff']:+.3f} ± {t['half_width']:.3f} (p {t['p_holm']:.3f})"

    cpu = sum(runs[rate][s][row].get("cpu_s", 0.0) for rate in runs if rate > 0 for s in seeds
              for row in FLIP_ROWS if row in runs[rate][s])

    lines = ["## Robust DPO: flip-rate sweep", "", header, "",
             f"`{key}` per flip rate (mean ± 95% CI over seeds, n = {len(seeds)}); Δ columns are paired over seeds, "
             f"Holm-corrected over the table's {len(tests)} tests. ε̂: robust DPO's estimate of the flip rate; with "
             "no flips the known ε is 0, where robust DPO is DPO. The flipped rows' training and evaluation took "
             f"{cpu / 60:.1f} CPU-min.", "",
             "| flip rate | DPO | rDPO, ε known | rDPO, ε estimated | ε̂ | DPO − DPO at 0 flips | "
             "rDPO known − DPO | rDPO est. − DPO |", "|---|---|---|---|---|---|---|---|"]
    for rate in sorted(runs):
        est = (rate, "robust_dpo_flipped_est") in val
        eps = ci([runs[rate][s]["robust_dpo_flipped_est"]["robust/eps_hat"] for s in seeds]) if est else "not run"
        lines.append(f"| {rate:g} | " + " | ".join(ci(val[rate, row]) if (rate, row) in val else "not run"
                                                   for row in FLIP_ROWS) + f" | {eps} | "
                     + " | ".join(diff(tests.get((rate, what))) for what in ("degrade", *FLIP_ROWS[1:])) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "vision_lm" / "benchmark_halluc.yaml"))
    ap.add_argument("--seeds", choices=("dev", "report"), default="dev")
    ap.add_argument("--only-seed", type=int, default=None, help="run this one seed (parallel processes); no page")
    ap.add_argument("--run-dir", default=None, help="default runs/bench_halluc_<dev|report>")
    ap.add_argument("--cache-dir", default=str(ROOT / "runs" / "halluc_base"))
    ap.add_argument("--force", action="store_true",
                    help="train the rows even when a gate fails (stored for diagnosis; never written to the page)")
    ap.add_argument("--no-doc", action="store_true", help="print the sections instead of writing the page")
    ap.add_argument("--no-run", action="store_true",
                    help="never train: write the page from the stored seed files (a seed still running counts with "
                         "its partial file: its base, gates and finished rows)")
    ap.add_argument("--base-only", action="store_true",
                    help="build and gate the base model of each seed (a tuning attempt): append one row per seed to "
                         "<run-dir>/tuning.jsonl and rewrite the page's tuning table from every row there")
    ap.add_argument("--pref-tune", action="store_true",
                    help="dev seeds: train the configured rows from each base (a preference-setting attempt), append "
                         "rows to <run-dir>/pref_tuning.jsonl and rewrite the page's preference tuning table")
    ap.add_argument("--flip-dirs", nargs="+", default=None,
                    help="write the flip-rate sweep section from these run dirs (one per flip rate, 0 included; "
                         "rows dpo_flipped, robust_dpo_flipped, robust_dpo_flipped_est); trains nothing; put it "
                         "after the key=value overrides")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of HallucBenchConfig (base.<field>=...)")
    args = ap.parse_args(argv)
    cfg = load_config(HallucBenchConfig, args.config, args.overrides)
    seeds = cfg.dev_seeds if args.seeds == "dev" else cfg.report_seeds
    if args.only_seed is not None:
        if args.only_seed not in seeds:
            raise ValueError(f"--only-seed {args.only_seed} is not among the {args.seeds} seeds {seeds}")
        seeds = [args.only_seed]
    run_dir = Path(args.run_dir or ROOT / "runs" / f"bench_halluc_{args.seeds}")
    run_dir.mkdir(parents=True, exist_ok=True)
    if args.base_only:
        return tuning(cfg, seeds, args, run_dir)
    if args.pref_tune:
        return pref_tuning(cfg, seeds, args, run_dir)
    if args.flip_dirs:
        cmd = " ".join(["python scripts/bench_halluc.py", f"--seeds {args.seeds}", *args.overrides])
        header = (f"Command per flip rate: `{cmd} flip_rate=RATE --run-dir DIR`, then `--flip-dirs` over the run dirs "
                  f"({', '.join(f'`{d}`' for d in args.flip_dirs)}); "
                  f"{args.seeds} seeds {seeds}; machine: {machine()}, CPU only, 1 torch thread.")
        body = flip_section([Path(d) for d in args.flip_dirs], cfg, seeds, header)
        emit(args, "halluc_flips", body)
        return 0
    for seed in seeds:
        store = run_dir / f"seed{seed}.json"
        if store.exists() or args.no_run:
            continue
        t0 = time.perf_counter()
        res = run_seed(cfg, seed, run_dir, Path(args.cache_dir), force=args.force,
                       on_row=lambda r: (run_dir / f"partial-seed{seed}.json").write_text(json.dumps(r, indent=1)))
        res["wall_s"] = time.perf_counter() - t0
        store.write_text(json.dumps(res, indent=1))
        (run_dir / f"partial-seed{seed}.json").unlink(missing_ok=True)
        print(f"seed {seed}: gates {res['gates']}, CPU {res['cpu_s']:.0f} s, wall {res['wall_s']:.0f} s", flush=True)
    if args.only_seed is not None:
        return 0
    results, running = {}, []
    for s in seeds:
        done, part = run_dir / f"seed{s}.json", run_dir / f"partial-seed{s}.json"
        if done.exists():
            results[str(s)] = json.loads(done.read_text())
        elif part.exists():  # only with --no-run: the loop above runs every missing seed otherwise
            results[str(s)] = json.loads(part.read_text())
            running.append(s)
        else:
            raise ValueError(f"--no-run: seed {s} has no seed{s}.json or partial-seed{s}.json in {run_dir}")
    # per seed: process CPU time of run_seed, base build included (a seed still running has none yet)
    finished = [r["cpu_s"] for s, r in results.items() if int(s) not in running]
    cpu = sum(finished)
    cmd = " ".join(["python scripts/bench_halluc.py", f"--seeds {args.seeds}",
                    *([f"--run-dir {args.run_dir}"] if args.run_dir else []), *args.overrides])
    header = (f"Command: `{cmd}`; {args.seeds} seeds {seeds}; {cfg.n_test_scenes} test scenes per seed "
              f"(half prior-violating); machine: {machine()}, CPU only, 1 torch thread, shared 2-core machine; "
              f"CPU time {cpu / 60:.1f} min for the {len(finished)} finished seeds "
              f"({cpu / max(len(finished), 1) / 60:.1f} min per seed, base builds included where not cached)"
              + (f"; seeds {running} were still running (their base, gates and finished rows are counted)."
                 if running else "."))
    ok = gates_passed(results)
    if ok and all(cfg.methods and set(cfg.methods) <= set(r["rows"]) for r in results.values()):
        verdicts = results_section(results, cfg, header)
    else:
        verdicts = refusal_section(results)
    gate_header = header if verdicts.startswith("## Verdicts per paper claim\n\nNot tested") else (
        f"{args.seeds.capitalize()} seeds {seeds}; command, machine and CPU time as in the verdicts above.")
    sections = [("halluc_results", verdicts), ("halluc_gates", gate_section(results, cfg, gate_header))]
    for key, body in sections:
        emit(args, key, body)
    if not ok:
        print("the base model fails the gates: preference rows are not reported", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
