"""Speed of batched OT for RAPL rewards: 1,024 trajectory pairs of 50 frames x 512-d features.

Compares mmalign's batched plans (`mmalign.robotics.ot.ot_plan`: POT's `ot.batch.solve_batch` log-Sinkhorn on
torch, one call for all pairs) with the per-pair NumPy loop the reference code's pattern implies
(`ot.sinkhorn(..., method="sinkhorn_log")` per pair), with the same cosine cost, reg and iteration count, on CPU
(and CUDA when present). Checks the batched plans agree with the loop. Writes a section of
docs/benchmarks/ot_speed.md.

    python scripts/bench_ot.py --pairs 1024 --frames 50 --dim 512 --threads 1 2
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from mmalign.robotics.ot import cosine_cost, ot_plan
from doc_sections import OT_SPEED, machine, now, write_marked_section


def _once(fn) -> tuple[float, object]:  # noqa: ANN001
    t = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def main() -> None:
    import ot

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=1024)
    ap.add_argument("--frames", type=int, default=50)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--reg", type=float, default=0.05)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--loop-pairs", type=int, default=0,
                    help="time the per-pair loop on this many pairs and scale linearly to --pairs (0 = all pairs)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.pairs, args.frames, args.dim, generator=g)
    y = torch.randn(args.pairs, args.frames, args.dim, generator=g)
    cost_np = cosine_cost(x, y).double().numpy()
    a = np.full(args.frames, 1.0 / args.frames)

    k = args.loop_pairs or args.pairs

    def loop() -> np.ndarray:
        return np.stack([ot.sinkhorn(a, a, c, args.reg, method="sinkhorn_log", numItermax=args.iters, stopThr=0.0)
                         for c in cost_np[:k]])

    systems: list[tuple[str, str, int, object]] = [
        (f"NumPy POT `ot.sinkhorn` per-pair loop (float64{', timed on %d pairs and scaled x%g' % (k, args.pairs / k) if k != args.pairs else ''})",
         "cpu", 1, loop)]
    for threads in args.threads:
        for dtype in (torch.float32, torch.float64):
            def ours(dtype: torch.dtype = dtype) -> torch.Tensor:
                return ot_plan(cosine_cost(x.to(dtype), y.to(dtype)), args.reg, args.iters)

            systems.append((f"mmalign `ot_plan` = POT `ot.batch.solve_batch` log-Sinkhorn (torch {str(dtype)[6:]})",
                            "cpu", threads, ours))
    if torch.cuda.is_available():
        xc, yc = x.cuda(), y.cuda()
        systems.append(("mmalign `ot_plan` (POT batch, torch float32)", torch.cuda.get_device_name(), 0,
                        lambda: ot_plan(cosine_cost(xc, yc), args.reg, args.iters)))
    # interleaved rounds (loop, batched, batched, ...) so that load changes hit every system alike; each round gives
    # one speed-up per system (loop time of that round / the system's time), reported as the median over rounds
    times: list[list[float]] = [[] for _ in systems]
    errs: list[float] = [0.0 for _ in systems]
    for _, _, threads, fn in systems[1:]:  # warm-up of the torch paths
        torch.set_num_threads(max(threads, 1))
        fn()
    for _ in range(args.repeats):
        plans_loop = None
        for i, (_, _, threads, fn) in enumerate(systems):
            torch.set_num_threads(max(threads, 1))
            t, out = _once(fn)
            if i == 0:
                t *= args.pairs / k  # per-pair cost is constant: the loop time scales linearly with the pair count
                plans_loop = out
            else:
                errs[i] = max(errs[i], float(np.abs(out[:k].double().cpu().numpy() - plans_loop).max()))
            times[i].append(t)
    loop_t = np.array(times[0])
    rows = []
    for i, (name, device, threads, _) in enumerate(systems):
        t = np.array(times[i])
        err = f"; max abs plan diff {errs[i]:.1e}" if i else ""
        rows.append((name.replace(")", err + ")", 1) if i and name.endswith(")") else name, device, threads,
                     float(np.median(t)), float(np.median(loop_t / t)), float((loop_t / t).min()),
                     float((loop_t / t).max())))
    for r in rows:
        print(f"{r[0]:<95} {r[1]:>6} threads={r[2]} {r[3] * 1e3:9.1f} ms  x{r[4]:.1f} [{r[5]:.1f}, {r[6]:.1f}]")
    if args.no_write:
        return
    lines = [
        "## Batched OT speed (`scripts/bench_ot.py`)",
        "",
        f"Command: `python scripts/bench_ot.py --pairs {args.pairs} --frames {args.frames} --dim {args.dim} "
        f"--threads {' '.join(map(str, args.threads))} --loop-pairs {args.loop_pairs} --repeats {args.repeats}`; seed {args.seed}; {now()}; {machine()}; shared 2-core "
        "CPU with other engineers' jobs running (absolute times are noisy; ratios within the run are the point). "
        f"Problem: {args.pairs} pairs of {args.frames}x{args.frames} OT, cosine cost of {args.dim}-d features "
        f"(cost computation included), reg {args.reg}, {args.iters} log-domain Sinkhorn iterations (fixed, no early "
        f"stop); {args.repeats} interleaved rounds (loop, then each batched variant, per round); time = median "
        "over rounds, speed-up = median (min–max) over rounds of the round's loop time / the variant's time; "
        f"1-min load average {os.getloadavg()[0]:.1f} at the end. GPU: "
        f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'none available to this run'}.",
        "",
        "| solver | device | torch threads | time (ms) | speed-up vs loop (min–max) |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r[0]} | {r[1]} | {r[2]} | {r[3] * 1e3:.1f} | {r[4]:.1f}x ({r[5]:.1f}–{r[6]:.1f}) |" for r in rows]
    write_marked_section(OT_SPEED, "bench_ot", "\n".join(lines), "# Batched optimal transport for RAPL rewards\n")


if __name__ == "__main__":
    main()
