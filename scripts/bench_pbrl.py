"""B-Pref-style teacher sweep for online PbRL (SAC) on MuJoCo tasks, with true-reward SAC at equal env steps.

Each (task, seed) trains one true-reward SAC and one learned-reward SAC per teacher; results are appended to a
JSON-lines file as they finish (so a partial sweep is never lost; a row already there is reused only if it ran with
this call's settings) and summarised as Markdown (over seeds: the final true return, ``learned / true`` normalised
by the untrained deterministic policy of the same seed (the headline, stricter) and by the uniformly random policy,
the paired differences to true-reward SAC and, for the other teachers, to the oracle) plus plots per task. Seeds
follow the robotics protocol (docs/benchmarks/robotics_protocol.md): settings are chosen on ``--dev-seeds``; a table
written with ``--doc`` holds only ``--report-seeds`` runs (disjoint from the development seeds), mean ± 95% t
half-width.

    .venv/bin/python scripts/bench_pbrl.py --tasks Reacher-v5 Pusher-v5 --teachers oracle mistake --dev-seeds 0 1 2 \\
        --steps 10000 --labels 1000 --out runs/bench_pbrl      # defaults: reward standardised, recent 3k candidates
    .venv/bin/python scripts/bench_pbrl.py --tasks Pusher-v5 Reacher-v5 --teachers oracle --dev-seeds 0 1 2 3 4 5 6 7 8 9 \\
        --report-seeds 10 11 12 13 14 --labels 1000 --rounds 9 --normalize-act --action-squares \\
        --out runs/pbrl_rep                                    # the headline recipe (pebble.yaml), reporting seeds
    .venv/bin/python scripts/bench_pbrl.py --tasks Pusher-v5 --teachers oracle stochastic mistake mistake:eps_mistake=0.2 \\
        skip equal myopic ... --out runs/pbrl_teach/Pusher-v5  # B-Pref sweep; NAME:field=value overrides a teacher
    .venv/bin/python scripts/bench_pbrl.py --tasks Reacher-v5 --teachers oracle --selector routing --tag routing \\
        --labels 400 --no-true --out runs/bench_pbrl           # a variant, reported as its own row "oracle [routing]"
    .venv/bin/python scripts/bench_pbrl.py --summarize runs/pbrl_rep --dev-seeds 0 1 2 3 4 5 6 7 8 9 --report-seeds 10 11 12 13 14 \\
        --doc docs/benchmarks/robotics_feedback.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from mmalign.robotics.protocol import add_seed_args, seed_plan_from_args

TASK_DEFAULTS = {
    # segment length, eval episodes (>= 10 everywhere: the robotics seed protocol)
    "Reacher-v5": dict(segment_length=25, eval_episodes=10),
    "InvertedDoublePendulum-v5": dict(segment_length=25, eval_episodes=10),
    "HalfCheetah-v5": dict(segment_length=25, eval_episodes=10),
    "Pusher-v5": dict(segment_length=25, eval_episodes=10),
}


TEACHER_ORDER = ["true", "oracle", "stochastic", "mistake", "skip", "equal", "myopic"]


def parse_teacher(spec: str) -> tuple[str, dict]:
    """``"mistake"`` -> ``("mistake", {})``; ``"mistake:eps_mistake=0.2"`` -> ``("mistake", {"eps_mistake": 0.2})``:
    a registered teacher with per-field overrides (values read as JSON numbers/booleans, else kept as text)."""
    name, _, rest = spec.partition(":")
    fields: dict = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"--teachers {spec!r}: expected NAME or NAME:field=value[,field=value], got {item!r}")
        try:
            fields[key] = json.loads(value)
        except json.JSONDecodeError:
            fields[key] = value
    return name, fields


def teacher_row_name(spec: str, tag: str = "") -> str:
    """Row name of a teacher spec, ``"mistake [eps_mistake=0.2]"``, then the variant tag: ``"oracle [routing]"``."""
    name, fields = parse_teacher(spec)
    parts = [name] + ([",".join(f"{k}={v}" for k, v in fields.items())] if fields else []) + ([tag] if tag else [])
    return parts[0] + "".join(f" [{x}]" for x in parts[1:])


def config_mismatch(stored: dict, current: dict) -> list[str]:
    """Fields (present in both) where a stored run's config differs from the one this call would run."""
    return [f"{k}: stored {stored[k]!r}, now {current[k]!r}" for k in sorted(set(stored) & set(current))
            if stored[k] != current[k]]


def random_return(env_id: str, episodes: int = 20, seed: int = 0) -> float:
    import gymnasium

    from mmalign.robotics.segments import collect_episodes

    env = gymnasium.make(env_id)
    env.action_space.seed(seed)
    eps = collect_episodes(env, lambda o: env.action_space.sample(), episodes, seed=123_000 + seed)
    return float(np.mean([ep["rew"].sum() for ep in eps]))


def run_sweep(args: argparse.Namespace) -> None:
    import torch

    from mmalign.robotics.pebble import PebbleConfig, train_agent

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "results.jsonl"
    done: dict[tuple, dict] = {}
    if log.exists():
        done = {(r["task"], r["seed"], r["teacher"]): r.get("config", {}) for r in unique_rows(log)}
    for task in args.tasks:
        for seed in args.plan.seeds:
            for teacher in (["true"] if not args.no_true else []) + list(args.teachers):
                name = "true" if teacher == "true" else teacher_row_name(teacher, args.tag)
                t_name, t_fields = parse_teacher(teacher)
                # a task without an entry (Hopper-v5, Walker2d-v5, ...) gets the same segments and >= 10 episodes
                extra = dict(TASK_DEFAULTS.get(task, dict(segment_length=25, eval_episodes=10)))
                for field in ("net_width", "batch_size", "first_feedback", "eval_episodes", "recent_window"):
                    if getattr(args, field) is not None:
                        extra[field] = getattr(args, field)
                cfg = PebbleConfig(
                    env_id=task, seed=seed, total_steps=args.steps, reward="true" if teacher == "true" else "learned",
                    teacher="oracle" if teacher == "true" else ({"name": t_name, **t_fields} if t_fields else t_name),
                    label_budget=args.labels,
                    initial_labels=min(args.labels, max(64, args.labels // 4)),
                    labels_per_round=max(1, -(-(args.labels - max(64, args.labels // 4)) // max(1, args.rounds - 1))),
                    eval_every=args.eval_every, save_reward_model=False, rm_epochs=args.rm_epochs,
                    selector=args.selector, rm_label_smoothing=args.label_smoothing, reward_norm=args.reward_norm,
                    normalize_act=args.normalize_act,
                    rm_act_weight=(args.act_weight or None) if args.normalize_act else None,  # None = automatic
                    rm_action_squares=args.action_squares,
                    feedback_every=args.feedback_every, **extra,
                )
                current = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "device"}
                if (task, seed, name) in done:
                    # a row already in the folder (an interrupted sweep, or rows copied in for reuse) counts only if
                    # it ran with the settings of this call; never mix settings silently
                    diff = config_mismatch(done[(task, seed, name)], current)
                    if diff:
                        raise SystemExit(f"{log}: the stored run {(task, seed, name)} has other settings than this "
                                         f"call ({'; '.join(diff)}): use another --out or --tag")
                    continue
                t0 = time.perf_counter()
                c0 = time.process_time()
                res = train_agent(cfg, progress=lambda m, t=teacher: print(f"[{task} s{seed} {t}] {m}", flush=True))
                row = {"task": task, "seed": seed, "teacher": name, "steps": args.steps,
                       "final_true_return": res["final_true_return"], "curve": res["curve"],
                       "labels": res.get("labels", {}), "wall_s": time.perf_counter() - t0,
                       "cpu_s": time.process_time() - c0,
                       "config": current}
                with open(log, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
    summarize(out, args.doc, args.key, args.plan)


def unique_rows(path: Path) -> list[dict]:
    """Rows of results.jsonl, the first one per (task, seed, teacher): the sweep skips a key once it has a row, so a
    second row (two processes on one folder, or concatenated files) is a duplicate, reported and not counted."""
    seen: set[tuple] = set()
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        k = (r["task"], r["seed"], r["teacher"])
        if k in seen:
            print(f"warning: duplicate row {k} in {path} ignored (the first one is used)", flush=True)
            continue
        seen.add(k)
        rows.append(r)
    return rows


def _teacher_key(name: str) -> tuple[int, str]:
    base = name.split(" ")[0]
    return (TEACHER_ORDER.index(base) if base in TEACHER_ORDER else len(TEACHER_ORDER), name)


def summarize(out: Path, doc: str | None, key: str = "bench_pbrl", plan: object = None) -> str:
    """Tables of the runs in ``out`` whose seed is in ``plan.seeds`` (all runs when ``plan`` is None)."""
    from mmalign.robotics.protocol import fmt_ci, paired_diff
    from mmalign.robotics.report import markdown_table, plot_curves

    rows = unique_rows(out / "results.jsonl")
    if plan is not None:
        rows = [r for r in rows if r["seed"] in plan.seeds]
        if not rows:
            raise SystemExit(f"{out / 'results.jsonl'} has no run on seeds {list(plan.seeds)}")
    lines = []
    for task in sorted({r["task"] for r in rows}):
        rand = random_return(task)
        task_rows = [r for r in rows if r["task"] == task]
        true_final = {r["seed"]: r["final_true_return"] for r in task_rows if r["teacher"] == "true"}
        oracle_final = {r["seed"]: r["final_true_return"] for r in task_rows if r["teacher"] == "oracle"}
        # teachers and variants other than the oracle are compared with it seed by seed (B-Pref's question)
        vs_oracle = bool(oracle_final) and any(r["teacher"] not in ("true", "oracle") for r in task_rows)
        table = []
        curves = {}
        names = sorted({r["teacher"] for r in task_rows}, key=_teacher_key)
        for teacher in names:
            sel = sorted([r for r in task_rows if r["teacher"] == teacher], key=lambda r: r["seed"])
            finals = np.array([r["final_true_return"] for r in sel])
            paired = [r for r in sel if r["seed"] in true_final and abs(true_final[r["seed"]] - rand) > 1e-8]
            norm = [(r["final_true_return"] - rand) / (true_final[r["seed"]] - rand) for r in paired]
            # per seed in the order of the "seeds" column; "–" where the seed has no true-reward run to pair with
            by_seed = dict(zip((r["seed"] for r in paired), norm))
            per_seed = ", ".join(f"{by_seed[r['seed']]:.2f}" if r["seed"] in by_seed else "–" for r in sel)
            # Stricter: relative to the untrained deterministic policy of the same seed (step-0 evaluation), which
            # on Reacher/Pusher already scores far above the uniformly random policy (it outputs near-zero actions).
            # Undefined where true-reward SAC itself did not clearly beat that policy (gain < 10% of true − rand).
            init_by_seed = {r["seed"]: (r["final_true_return"] - r["curve"][0]["eval/true_return"])
                            / (true_final[r["seed"]] - r["curve"][0]["eval/true_return"]) for r in paired
                            if true_final[r["seed"]] - r["curve"][0]["eval/true_return"]
                            > 0.1 * (true_final[r["seed"]] - rand)}
            init = list(init_by_seed.values())
            agree = [r["labels"].get("labels/agreement_with_true_return", np.nan) for r in sel]
            cpu = [r["cpu_s"] for r in sel if r.get("cpu_s") is not None and np.isfinite(r["cpu_s"])]
            table.append({"teacher": teacher, "seeds": ",".join(str(r["seed"]) for r in sel),
                          "final true return": fmt_ci(finals, ".2f"),
                          "(learned−init)/(true−init)": fmt_ci(init, ".2f") if init else "-",
                          "(learned−rand)/(true−rand)": fmt_ci(norm, ".3f") if norm else "-",
                          "per seed (rand)": per_seed if teacher != "true" else "-",
                          "queries": int(round(float(np.mean([r["labels"].get("labels/queries", 0) for r in sel])))),
                          "answered": int(round(float(np.mean([r["labels"].get("labels/answered", 0) for r in sel])))),
                          "ties": int(round(float(np.mean([r["labels"].get("labels/ties", 0) for r in sel])))),
                          "label agreement": f"{np.nanmean(agree):.3f}" if teacher != "true" else "-",
                          "CPU s/run": f"{np.mean(cpu):.0f}" if cpu else "-",
                          # the headline per seed ('–': true-reward SAC did not clearly beat the untrained policy)
                          "per seed (init)": ", ".join(f"{init_by_seed[r['seed']]:.2f}" if r["seed"] in init_by_seed
                                                       else "–" for r in sel) if teacher != "true" else "-",
                          "final − true, paired": str(paired_diff({r["seed"]: r["final_true_return"] for r in sel},
                                                                  true_final)) if teacher != "true" else "-"})
            if vs_oracle:
                table[-1]["final − oracle, paired"] = (
                    str(paired_diff({r["seed"]: r["final_true_return"] for r in sel}, oracle_final))
                    if teacher not in ("true", "oracle") else "-")
            pseudo = [r["labels"]["labels/pseudo_total"] for r in sel if "labels/pseudo_total" in r["labels"]]
            if pseudo:  # routing: the ensemble's own (confident) labels, never counted as queries
                pagree = np.nanmean([r["labels"]["labels/pseudo_agreement_with_true_return"] for r in sel])
                table[-1]["teacher"] += f" ({np.mean(pseudo):.0f} pseudo-labels, {pagree:.3f} agree)"
            steps = [p["step"] for p in sel[0]["curve"]]
            ys = np.array([[p["eval/true_return"] for p in r["curve"]][: len(steps)] for r in sel])
            curves[teacher] = [{"step": s, "eval/true_return": float(m), "eval/true_return_std": float(sd)}
                               for s, m, sd in zip(steps, ys.mean(0), ys.std(0))]
        # one figure for the oracle and its variants, one for the noisy teachers (the palette has six colours)
        main = {k: v for k, v in curves.items() if k == "true" or k.startswith("oracle")}
        noisy = {k: v for k, v in curves.items() if k == "true" or not k.startswith("oracle")}
        plot_curves(main, out / f"curves_{task}.png", title=f"{task}: true return, mean ± std over seeds")
        if len(noisy) > 1:
            plot_curves(noisy, out / f"curves_{task}_teachers.png", title=f"{task}: noisy teachers, mean ± std")
        inits = sorted({(r["seed"], round(r["curve"][0]["eval/true_return"], 2)) for r in task_rows if r["curve"]})
        lines += [f"### {task} ({task_rows[0]['steps']} env steps, uniformly random policy {rand:.2f}; untrained "
                  f"deterministic policy (step 0) per seed: {', '.join(f's{k} {v}' for k, v in inits)})", "",
                  markdown_table(table), "", f"Curves: `{out / f'curves_{task}.png'}`", ""]
    cpu_all = [r["cpu_s"] for r in rows if r.get("cpu_s") is not None and np.isfinite(r["cpu_s"])]
    lines.append(f"CPU time of these tables: {sum(cpu_all):.0f} s ({sum(cpu_all) / 3600:.2f} CPU-hours) over "
                 f"{len(cpu_all)} runs, process time of one torch thread per run.")
    text = "\n".join(lines)
    (out / "summary.md").write_text(text)
    if doc:
        header = (f"Tables written by `scripts/bench_pbrl.py --summarize {out}`. Machine: {platform.platform()}, "
                  f"{platform.processor() or 'cpu'}; shared {os.cpu_count()}-core CPU with other jobs running (wall "
                  f"times are inflated; CPU s is process time). Date: "
                  f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. {plan.describe() if plan else ''}. "
                  "± = 95% t half-width over seeds; a normalised score pairs each seed with the same seed's "
                  "true-reward run; the `init` score (against the untrained policy) is the headline, undefined where "
                  "true-reward SAC did not beat the untrained policy by 10% of its gain over random.\n\n")
        from doc_sections import write_marked_section

        write_marked_section(doc, key, header + text)
    print(text)
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["Reacher-v5", "Pusher-v5"])
    p.add_argument("--teachers", nargs="*", default=["oracle", "stochastic", "mistake", "skip", "equal", "myopic"],
                   help="registered teachers, each NAME or NAME:field=value[,...], e.g. mistake:eps_mistake=0.2")
    p.add_argument("--steps", type=int, default=10000)
    p.add_argument("--labels", type=int, default=1000, help="query budget (a quarter in the first round)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument("--feedback-every", type=int, default=1000)
    p.add_argument("--rm-epochs", type=int, default=30)
    p.add_argument("--selector", default="disagreement")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="reward-model label smoothing")
    p.add_argument("--reward-norm", action=argparse.BooleanOptionalAction, default=True,
                   help="standardise the learned reward before relabelling")
    p.add_argument("--recent-window", type=int, default=3000, help="candidates from the last N env steps (0 = all)")
    p.add_argument("--net-width", type=int, default=None, help="agent hidden width (PebbleConfig.net_width; default 64)")
    p.add_argument("--batch-size", type=int, default=None, help="SAC minibatch (PebbleConfig.batch_size; default 128)")
    p.add_argument("--first-feedback", type=int, default=None,
                   help="env step of the first feedback round (PebbleConfig.first_feedback; default 1000)")
    p.add_argument("--eval-episodes", type=int, default=None, help="evaluation episodes (default: per task)")
    p.add_argument("--normalize-act", action=argparse.BooleanOptionalAction, default=False,
                   help="standardise (and weight) the reward model's action inputs (PebbleConfig.normalize_act)")
    p.add_argument("--act-weight", type=float, default=0.0,
                   help="weight of the standardised actions (PebbleConfig.rm_act_weight; 0 = sqrt(obs_dim/act_dim))")
    p.add_argument("--action-squares", action=argparse.BooleanOptionalAction, default=False,
                   help="append squared actions to the reward model's input (PebbleConfig.rm_action_squares)")
    p.add_argument("--no-true", action="store_true", help="skip the true-reward runs")
    p.add_argument("--tag", default="", help="name suffix of a variant's learned-reward rows, e.g. 'routing'")
    p.add_argument("--out", default="runs/bench_pbrl")
    p.add_argument("--doc", default=None, help="also write the Markdown section to this file")
    p.add_argument("--summarize", default=None, help="only summarise the results in this folder")
    p.add_argument("--key", default="bench_pbrl", help="marker key of the section written into --doc")
    add_seed_args(p, dev_default=(0, 1, 2))
    args = p.parse_args()
    try:
        args.plan = seed_plan_from_args(args)
    except ValueError as err:
        p.error(str(err))
    from mmalign.registry import TEACHERS
    from mmalign.robotics.pebble import check_part

    for spec in args.teachers:  # a misspelt teacher or field fails here, not after hours of other runs
        try:
            name, fields = parse_teacher(spec)
            check_part("--teachers", {"name": name, **fields}, TEACHERS)
        except ValueError as err:
            p.error(str(err))
    if args.doc and not args.plan.reporting:
        p.error("--doc writes a reported table: give --report-seeds (disjoint from --dev-seeds)")
    if args.summarize:
        summarize(Path(args.summarize), args.doc, args.key, args.plan)
    else:
        run_sweep(args)


if __name__ == "__main__":
    main()
