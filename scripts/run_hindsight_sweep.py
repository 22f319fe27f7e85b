"""Run the RLHS marketplace sweep (and optionally its text form) and write docs/benchmarks/hindsight.md.

    python scripts/run_hindsight_sweep.py --output-dir runs/hindsight-market
    python scripts/run_hindsight_sweep.py --output-dir runs/hindsight-market --text-output-dir runs/hindsight-text
    python scripts/run_hindsight_sweep.py --from-run runs/hindsight-market      # re-render the doc only

The generated part of the Markdown page (command, machine, load, timing, tables, the comparison with RLHS Table 1)
sits between ``<!-- BEGIN generated -->`` and ``<!-- END generated -->``; text outside the markers (the discussion)
is kept.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- BEGIN generated -->", "<!-- END generated -->"
# RLHS arXiv v1 Table 1 (marketplace, Llama-2-7b; rating = Likert normalised to [-1, 1]); docs: papers/cores.md 3.3
RLHS = {("dpo", "foresight"): (0.95, -0.51), ("dpo", "partial_hindsight"): (0.35, 0.18),
        ("dpo", "full_hindsight"): (0.33, 0.23), ("ppo", "foresight"): (0.97, -0.71),
        ("ppo", "partial_hindsight"): (0.41, 0.18), ("ppo", "full_hindsight"): (0.31, 0.24)}


def machine() -> str:
    import torch

    load = os.getloadavg()
    return (f"{platform.machine()} CPU, {os.cpu_count()} cores visible, Python {platform.python_version()}, "
            f"torch {torch.__version__}, load average at render time {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")


def comparison(rows: list[dict], trusts: list[float]) -> str:
    from mmalign.hindsight.experiment import _aggregate

    agg = _aggregate(rows)
    lines = ["| method | feedback | RLHS rating | RLHS utility | "
             + " | ".join(f"ours τ={t}: rating | foresight rating | utility" for t in trusts) + " |\n",
             "|" + "---|" * (4 + 3 * len(trusts)) + "\n"]
    for (method, channel), (r_rating, r_util) in RLHS.items():
        cells = []
        for t in trusts:
            stats = agg.get((method, channel, t, None))
            if stats is None:
                cells += ["—", "—", "—"]
            else:
                cells += [f"{stats['rating'][0]:+.2f}", f"{stats['foresight_rating'][0]:+.2f}",
                          f"{stats['true_utility'][0]:+.2f}"]
        row = f"| {method.upper()} | {channel} | {r_rating:+.2f} | {r_util:+.2f} | " + " | ".join(cells) + " |\n"
        lines.append(row)
    return "".join(lines)


def horizon_table(horizons: tuple[int, ...] = (0, 1, 2, 4, 8), episodes: int = 1000, reveal_prob: float = 0.3) -> str:
    """Multi-turn env, two scripted sellers: how the hindsight rating separates them as the horizon N grows."""
    import gymnasium as gym
    import numpy as np

    import mmalign.envs  # noqa: F401

    def seller(honest: bool, env: gym.Env, asked: int) -> np.ndarray:
        scen = env.unwrapped._scen
        status = scen.status[0]
        if honest:
            compliant = np.nonzero(status)[0]
            rec = int(compliant.max()) if len(compliant) else len(status)  # cheapest compliant (last index) or none
            return np.array([rec, 0 if status[asked] else 1])
        return np.array([len(status) - 1, 0])  # always "has", recommend the cheapest

    lines = [f"| N | P(revealed) = 1-(1-{reveal_prob})^N | honest: hindsight rating | deceptive: hindsight rating | "
             "honest: utility | deceptive: utility |\n|---|---|---|---|---|---|\n"]
    for n in horizons:
        stats = {}
        for honest in (True, False):
            env = gym.make("mmalign/HindsightMarketMultiTurn-v0", feedback="partial_hindsight", hindsight_horizon=n,
                           reveal_prob=reveal_prob)
            ratings, utils, revealed = [], [], []
            for ep in range(episodes):
                _, info = env.reset(seed=ep)
                done = False
                while not done:
                    _, _, done, _, info = env.step(seller(honest, env, info.get("asked_item", 0)))
                ratings.append((info["hindsight_rating"] - 3) / 2)
                utils.append(info["true_utility"])
                revealed.append(info["revealed"])
            stats[honest] = (np.mean(ratings), np.mean(utils), np.mean(revealed))
        lines.append(f"| {n} | {stats[True][2]:.2f} | {stats[True][0]:+.2f} | {stats[False][0]:+.2f} | "
                     f"{stats[True][1]:+.2f} | {stats[False][1]:+.2f} |\n")
    return "".join(lines)


def render(run_dir: Path, text_dir: Path | None, command: str, horizon_episodes: int = 1000) -> str:
    import yaml

    from mmalign.hindsight.config import HindsightMarketConfig
    from mmalign.hindsight.experiment import tables

    cfg_data = yaml.safe_load((run_dir / "config.yaml").read_text())
    cfg_data.pop("job", None)
    cfg = HindsightMarketConfig.from_dict(cfg_data)
    rows = [json.loads(x) for x in (run_dir / "results.jsonl").read_text().splitlines() if x.strip()]
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    timing = json.loads((run_dir / "timing.json").read_text()) if (run_dir / "timing.json").exists() else {}
    trusts = sorted({cfg.trust, *cfg.trust_sweep})
    parts = [
        BEGIN + "\n",
        f"Command: `{timing.get('command', command)}`" + (f" (rendered by `{command}`)" if "command" in timing else "")
        + "  \n",
        f"Rendered {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC from `{run_dir}`; seeds {cfg.seeds}; "
        f"{len(rows)} trained/evaluated policies; n_pairs {cfg.n_pairs}, n_eval {cfg.n_eval} per run.  \n",
        f"Machine: {machine()}.  \n",
    ]
    if timing:
        parts.append(
            f"Sweep time: **{timing['wall_seconds']:.0f} s wall** with {cfg.workers} worker process(es); "
            f"{timing['cpu_user_seconds']:.0f} s user CPU over all processes; load average "
            f"{timing['load_before'][0]:.1f} before / {timing['load_after'][0]:.1f} after (a shared 2-core machine "
            "with other jobs running: wall time is inflated by contention, the CPU time is what the sweep needs).\n")
    elif summary:
        parts.append(f"Sweep time: {summary.get('wall_seconds', float('nan')):.0f} s wall.\n")
    parts += ["\n", tables(cfg, rows), "\n### Against RLHS Table 1 (marketplace, arXiv v1)\n\n",
              "RLHS ratings are the simulated Likert score normalised to [-1, 1]; ours are `(rating - 3) / 2` of the "
              "training channel (\"rating\") and of the foresight channel.\n\n", comparison(rows, trusts)]
    if horizon_episodes > 0:
        parts += [f"\n### Multi-turn variant: hindsight horizon N (scripted sellers, {horizon_episodes} episodes each, "
                  "trust 0.8, partial hindsight)\n\n", horizon_table(episodes=horizon_episodes)]
    if text_dir is not None and (text_dir / "text_table.md").exists():
        parts += ["\n", (text_dir / "text_table.md").read_text()]
        tsum = text_dir / "summary.json"
        if tsum.exists():
            parts.append(f"\nText run: {json.loads(tsum.read_text()).get('wall_seconds', float('nan')):.0f} s wall "
                         f"(`{text_dir}`).\n")
    parts.append(END + "\n")
    return "".join(parts)


def write_doc(doc: Path, generated: str) -> None:
    if doc.exists() and BEGIN in doc.read_text():
        text = doc.read_text()
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1] if END in rest else ""
        doc.write_text(head + generated + tail.lstrip("\n"))
    else:
        doc.parent.mkdir(parents=True, exist_ok=True)
        doc.write_text("# Hindsight simulation (RLHS marketplace)\n\n" + generated)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs/hindsight/market.yaml"))
    p.add_argument("--output-dir", default="runs/hindsight-market")
    p.add_argument("--text-config", default=str(ROOT / "configs/hindsight/text.yaml"))
    p.add_argument("--text-output-dir", default=None, help="also run the text form into this folder")
    p.add_argument("--from-run", default=None, help="only re-render the doc from this finished run folder")
    p.add_argument("--doc", default=str(ROOT / "docs/benchmarks/hindsight.md"))
    p.add_argument("--horizon-episodes", type=int, default=1000, help="multi-turn horizon table episodes (0: skip)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the market config")
    args = p.parse_args(argv)
    from mmalign.cli import run_job

    command = "python scripts/run_hindsight_sweep.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text_dir = Path(args.text_output_dir) if args.text_output_dir else None
    if args.from_run:
        run_dir = Path(args.from_run)
    else:
        run_dir = Path(args.output_dir)
        load_before, t0, cpu0 = os.getloadavg(), time.perf_counter(), os.times()
        run_job("hindsight.market", args.config, args.overrides, str(run_dir))
        cpu1 = os.times()
        timing = {"wall_seconds": time.perf_counter() - t0, "load_before": load_before, "load_after": os.getloadavg(),
                  "cpu_user_seconds": (cpu1.user - cpu0.user) + (cpu1.children_user - cpu0.children_user),
                  "command": command}
        (run_dir / "timing.json").write_text(json.dumps(timing, indent=2))
        if text_dir is not None:
            run_job("hindsight.text", args.text_config, [], str(text_dir))
    write_doc(Path(args.doc), render(run_dir, text_dir, command, args.horizon_episodes))
    print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
