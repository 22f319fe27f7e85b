"""Offline VLM hallucination benchmark: every method x seeds -> mean +- std table in docs/benchmarks/vision_lm.md.

    nice -n 10 .venv/bin/python scripts/bench_vlm.py --config configs/vision_lm/benchmark.yaml [key=value ...]

Runs :func:`mmalign.vision_lm.benchmark.run_seed` per seed (tiny LLaVA, vision-tower pre-training, SFT, each
method's pairs and LoRA preference training, CHAIR/POPE on the prior-violating test split), stores raw numbers in
``runs/bench_vlm/results-seed<N>.json`` (one file per seed: seeds may run as parallel processes; finished seeds are
skipped on a re-run; the table is written from every seed file present) and writes the "Results" section of the Markdown page (between
``<!-- results:start -->`` and ``<!-- results:end -->``).
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
from mmalign.reporting import write_marked_section

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks" / "vision_lm.md"
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


def fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def write_section(results: dict[str, dict], cfg: BenchmarkConfig, argv: list[str], wall_s: float,
                  section: str = "results", heading: str = "Results: offline hallucination benchmark") -> None:
    seeds = sorted(results, key=int)
    rows = [r for r in ["sft", *cfg.methods] if all(r in results[s] for s in seeds)]
    lines = [f"<!-- {section}:start -->", f"## {heading}", "",
             f"Command: `nice -n 10 .venv/bin/python scripts/bench_vlm.py {' '.join(argv)}` (the three seeds ran as three "
             f"parallel processes with `seeds=[N]`, then one call without overrides wrote the table); seeds "
             f"{[int(s) for s in seeds]}; "
             f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {platform.machine()} CPU, "
             "1 torch thread per seed process, shared 2-core machine with other jobs running.", "",
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
        lines += ["", f"Not run (did not fit the time budget): {', '.join(missing)}."]
    write_marked_section(DOC, section, "\n".join(lines[1:]), "# Vision-language benchmarks")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "vision_lm" / "benchmark.yaml"))
    ap.add_argument("--run-dir", default=str(ROOT / "runs" / "bench_vlm"))
    ap.add_argument("--section", default="results", help="marker key of the page section to (re)write")
    ap.add_argument("--heading", default="Results: offline hallucination benchmark", help="title of that section")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of BenchmarkConfig")
    args = ap.parse_args()
    cfg = load_config(BenchmarkConfig, args.config, args.overrides)
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # One JSON file per seed, so seeds can run as separate processes and a re-run skips finished seeds.
    for seed in cfg.seeds:
        store = run_dir / f"results-seed{seed}.json"
        if store.exists():
            continue
        res = run_seed(cfg, seed, run_dir)
        store.write_text(json.dumps(res, indent=1))
        print(f"seed {seed} done after {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
    results = {p.stem.split("seed")[-1]: json.loads(p.read_text()) for p in sorted(run_dir.glob("results-seed*.json"))}
    config_arg = Path(args.config)
    config_arg = config_arg.relative_to(ROOT) if config_arg.is_absolute() else config_arg
    argv = [f"--config {config_arg}"]
    if args.section != "results":  # a second table (e.g. longer training) keeps its own run dir and section
        run_arg = Path(args.run_dir)
        run_arg = run_arg.relative_to(ROOT) if run_arg.is_absolute() and run_arg.is_relative_to(ROOT) else run_arg
        argv += [f"--run-dir {run_arg}", f"--section {args.section}", f"--heading '{args.heading}'"]
    write_section(results, cfg, [*argv, *args.overrides], time.perf_counter() - t0, args.section, args.heading)

if __name__ == "__main__":
    main()
