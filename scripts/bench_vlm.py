"""The ``vlm benchmark`` job over seeds: every method x seeds -> mean +- std tables in ``runs/bench_vlm/results.md``.

Its base model is not checked for grounding, so these tables cannot test the papers' claims: the verdicts come from
the hallucination testbed (``scripts/bench_halluc.py``, docs/benchmarks/vision_lm.md). Use this script to compare
methods or families on the job's own scenes.

    nice -n 10 .venv/bin/python scripts/bench_vlm.py --config configs/vision_lm/benchmark.yaml [key=value ...]
    nice -n 10 .venv/bin/python scripts/bench_vlm.py --family idefics3 [key=value ...]

Runs :func:`mmalign.vision_lm.benchmark.run_seed` per seed (tiny VLM, vision-tower pre-training, SFT, each
method's pairs and LoRA preference training, CHAIR/POPE on the prior-violating test split), stores raw numbers in
``runs/bench_vlm/results-seed<N>.json`` (one file per seed: seeds may run as parallel processes; finished seeds are
skipped on a re-run; the table is written from every seed file present) and writes the "Results" section of that
Markdown file (between ``<!-- results:start -->`` and ``<!-- results:end -->``). ``--family`` (default: the
config's, ``llava``) picks another tiny architecture; a non-LLaVA family defaults to its own run dir
(``runs/bench_vlm_<family>``) and page section (``results_<family>``).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from mmalign.config import load_config
from mmalign.vision_lm.benchmark import BenchmarkConfig, run_seed
from mmalign.vision_lm.families import FAMILIES
from doc_sections import write_marked_section

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "runs" / "bench_vlm" / "results.md"  # not a docs page: see the module docstring
COLUMNS = [
    ("eval/chair_i", "CHAIR_i ↓"), ("eval/chair_s", "CHAIR_s ↓"), ("eval/attr_error", "attr err ↓"),
    ("eval/recall", "recall ↑"), ("eval/caption_len", "len"),
    ("eval/pope_random_acc", "POPE-r acc ↑"), ("eval/pope_popular_acc", "POPE-p acc ↑"),
    ("eval/pope_adversarial_acc", "POPE-a acc ↑"), ("eval/pope_adversarial_f1", "POPE-a F1 ↑"),
    ("eval/pope_adversarial_yes_ratio", "POPE-a yes"),
]
ROW_NAMES = {
    "sft": "SFT (reference)", "dpo": "DPO (rule-corrupted pairs)", "dpo_flipped": "DPO, 20% flipped labels",
    "robust_dpo_flipped": "robust DPO (eps=0.2), 20% flipped", "realign": "Re-Align (DPO + visual term)",
    "bdhs_offline": "BDHS offline", "bdhs_online": "BDHS online", "bdhs_mixed": "BDHS Mixed-DPO (p=0.5)",
    "rrpo": "RRPO (diff phrases + token KL)",
}

FAMILY_NAMES = {
    "llava": "LlavaForConditionalGeneration + LlavaProcessor, 4 image tokens",
    "llava_next": "LlavaNextForConditionalGeneration + LlavaNextProcessor, AnyRes base view + 1 tile, 10 image tokens",
    "idefics3": "Idefics3ForConditionalGeneration + Idefics3Processor, 4 tiles + global view after pixel shuffle, "
                "5 image tokens",
    "smolvlm": "SmolVLMForConditionalGeneration + SmolVLMProcessor, 4 tiles + global view after pixel shuffle, "
               "5 image tokens",
}


def fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def write_section(results: dict[str, dict], cfg: BenchmarkConfig, argv: list[str], wall_s: float,
                  section: str = "results", heading: str = "Results: offline hallucination benchmark") -> None:
    seeds = sorted(results, key=int)
    rows = [r for r in ["sft", *cfg.methods] if all(r in results[s] for s in seeds)]
    lines = [f"<!-- {section}:start -->", f"## {heading}", "",
             f"Command: `nice -n 10 .venv/bin/python scripts/bench_vlm.py {' '.join(argv)}` (each seed ran as its own "
             f"process with `seeds=[N]`, several at once, then one call without overrides wrote the table); seeds "
             f"{[int(s) for s in seeds]}; "
             f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {platform.machine()} CPU, "
             "1 torch thread per seed process, shared 2-core machine with other jobs running.", "",
             f"Model: tiny {cfg.family} ({FAMILY_NAMES[cfg.family]}). "
             f"Test split: {cfg.n_test_scenes} prior-violating scenes per seed. SFT: {cfg.sft_steps} steps on "
             f"{cfg.n_sft_scenes} scenes (prior strength {cfg.prior_strength}); preference training: LoRA r="
             f"{cfg.lora_r}, {cfg.pref_steps} steps x {cfg.pref_batch_size} pairs, lr {cfg.pref_lr}, beta "
             f"{cfg.beta}, pairs built from {cfg.n_pref_scenes} fresh train-split scenes. Mean ± std over seeds "
             "(sample std). `pairs` = mean number of preference pairs (Re-Align keeps only accepted fills).", "",
             "| method | " + " | ".join(c[1] for c in COLUMNS) + " | pairs |",
             "|---|" + "---|" * (len(COLUMNS) + 1)]
    for r in rows:
        cells = [fmt([results[s][r][k] for s in seeds]) for k, _ in COLUMNS]
        pairs = f"{np.mean([results[s][r]['n_pairs'] for s in seeds]):.0f}" if r != "sft" else "-"
        lines.append(f"| {ROW_NAMES.get(r, r)} | " + " | ".join(cells) + f" | {pairs} |")
    # Seeds differ a lot at the SFT level, so the paired change against each seed's own SFT model is the fairer view.
    delta_cols = [("eval/chair_i", "Δ CHAIR_i"), ("eval/chair_s", "Δ CHAIR_s"), ("eval/recall", "Δ recall"),
                  ("eval/pope_adversarial_acc", "Δ POPE-a acc"), ("eval/pope_adversarial_f1", "Δ POPE-a F1"),
                  ("eval/pope_random_acc", "Δ POPE-r acc")]
    lines += ["", "Paired change against the same seed's SFT model (mean ± std over seeds; negative Δ CHAIR is better):",
              "", "| method | " + " | ".join(c[1] for c in delta_cols) + " |", "|---|" + "---|" * len(delta_cols)]
    for r in rows[1:]:
        cells = [fmt([results[s][r][k] - results[s]["sft"][k] for s in seeds]) for k, _ in delta_cols]
        lines.append(f"| {ROW_NAMES.get(r, r)} | " + " | ".join(cells) + " |")
    missing = [r for r in cfg.methods if r not in rows]
    if missing:
        lines += ["", f"Not run in every seed (did not fit the time budget): {', '.join(missing)}."]
    DOC.parent.mkdir(parents=True, exist_ok=True)
    write_marked_section(DOC, section, "\n".join(lines[1:]), "# Vision-language benchmarks")


def load_results(run_dir: Path) -> dict[str, dict]:
    """{seed: {row: metrics}} from the finished seed files, plus the partial file of every unfinished seed."""
    out = {p.stem.split("seed")[-1]: json.loads(p.read_text()) for p in sorted(run_dir.glob("partial-seed*.json"))}
    for p in sorted(run_dir.glob("results-seed*.json")):
        out[p.stem.split("seed")[-1]] = json.loads(p.read_text())
    return out


def write_family_comparison(run_dirs: dict[str, Path], methods: list[str]) -> None:
    """Section ``results_families``: paired Δ (method - same seed's SFT) per family, from each family's seed files."""
    cols = [("eval/chair_i", "Δ CHAIR_i"), ("eval/chair_s", "Δ CHAIR_s"), ("eval/recall", "Δ recall"),
            ("eval/pope_adversarial_acc", "Δ POPE-a acc")]
    loaded = {f: r for f, r in ((f, load_results(d)) for f, d in run_dirs.items()) if r}
    where = ", ".join(f"{f} `{_rel(run_dirs[f])}` seeds {sorted(int(s) for s in r)}" for f, r in loaded.items())
    lines = ["## Families side by side (paired change against each seed's SFT model)", "",
             f"Written by `scripts/bench_vlm.py --compare-families ...` from the per-seed JSON files ({where}); "
             "mean ± std over each family's seeds; the same benchmark config for every family. Negative Δ CHAIR is "
             "better.", "",
             "| method | " + " | ".join(f"{c} {f}" for _, c in cols for f in loaded) + " |",
             "|---|" + "---|" * (len(cols) * len(loaded))]
    for m in methods:
        cells = []
        for key, _ in cols:
            for res in loaded.values():
                seeds = [s for s in res if m in res[s]]
                n_note = f" (n={len(seeds)})" if len(seeds) < len(res) else ""  # not every seed ran the method
                cells.append(fmt([res[s][m][key] - res[s]["sft"][key] for s in seeds]) + n_note if seeds else "-")
        lines.append(f"| {ROW_NAMES.get(m, m)} | " + " | ".join(cells) + " |")
    DOC.parent.mkdir(parents=True, exist_ok=True)
    write_marked_section(DOC, "results_families", "\n".join(lines), "# Vision-language benchmarks")


def _rel(path: Path) -> Path:
    return path.relative_to(ROOT) if path.is_absolute() and path.is_relative_to(ROOT) else path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "vision_lm" / "benchmark.yaml"))
    ap.add_argument("--family", choices=FAMILIES, default=None,
                    help="tiny VLM family (default: the config's, llava); same as the override family=<name>")
    ap.add_argument("--run-dir", default=None, help="default runs/bench_vlm (llava) or runs/bench_vlm_<family>")
    ap.add_argument("--section", default=None,
                    help="marker key of the page section to (re)write; default results (llava) or results_<family>")
    ap.add_argument("--heading", default=None, help="title of that section")
    ap.add_argument("--compare-families", nargs="*", metavar="FAMILY=DIR", default=None,
                    help="only (re)write the families side-by-side section from the named run dirs (none named: "
                         "runs/bench_vlm[_<family>] of every family); key=value overrides go before this option")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of BenchmarkConfig")
    args = ap.parse_args(argv)
    if args.compare_families is not None:
        dirs = {} if args.compare_families else {
            f: ROOT / "runs" / ("bench_vlm" if f == "llava" else f"bench_vlm_{f}") for f in FAMILIES}
        for pair in args.compare_families:
            fam, _, path = pair.partition("=")
            if fam not in FAMILIES or not path:
                raise ValueError(f"--compare-families takes FAMILY=DIR with FAMILY in {FAMILIES}, got {pair!r}")
            dirs[fam] = Path(path) if Path(path).is_absolute() else ROOT / path
        write_family_comparison(dirs, load_config(BenchmarkConfig, args.config, args.overrides).methods)
        return
    overrides = [*args.overrides, *([f"family={args.family}"] if args.family else [])]
    cfg = load_config(BenchmarkConfig, args.config, overrides)
    other = cfg.family != "llava"
    args.run_dir = args.run_dir or str(ROOT / "runs" / (f"bench_vlm_{cfg.family}" if other else "bench_vlm"))
    args.section = args.section or (f"results_{cfg.family}" if other else "results")
    args.heading = args.heading or ("Results: offline hallucination benchmark"
                                    + (f", tiny {cfg.family}" if other else ""))
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # One JSON file per seed, so seeds can run as separate processes and a re-run skips finished seeds.
    for seed in cfg.seeds:
        store = run_dir / f"results-seed{seed}.json"
        if store.exists():
            continue
        partial = run_dir / f"partial-seed{seed}.json"  # rows so far, for a table from an unfinished sweep
        res = run_seed(cfg, seed, run_dir, on_row=lambda r: partial.write_text(json.dumps(r, indent=1)))
        store.write_text(json.dumps(res, indent=1))
        partial.unlink(missing_ok=True)
        print(f"seed {seed} done after {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
    results = load_results(run_dir)
    config_arg = Path(args.config)
    config_arg = config_arg.relative_to(ROOT) if config_arg.is_absolute() else config_arg
    argv = [f"--config {config_arg}", *([f"--family {args.family}"] if args.family else [])]
    # a second table of a family (e.g. longer training) keeps its own run dir and section: name them in the command
    if args.section != ("results_" + cfg.family if other else "results"):
        run_arg = Path(args.run_dir)
        run_arg = run_arg.relative_to(ROOT) if run_arg.is_absolute() and run_arg.is_relative_to(ROOT) else run_arg
        argv += [f"--run-dir {run_arg}", f"--section {args.section}", f"--heading '{args.heading}'"]
    write_section(results, cfg, [*argv, *args.overrides], time.perf_counter() - t0, args.section, args.heading)

if __name__ == "__main__":
    main()
