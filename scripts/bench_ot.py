"""Speed of batched OT for RAPL rewards: 1,024 trajectory pairs of 50 frames x 512-d features.

Compares mmalign's batched plans (`mmalign.robotics.ot.ot_plan`: POT's `ot.batch.solve_batch` log-Sinkhorn on
torch, one call for all pairs) with the per-pair NumPy loop the reference code's pattern implies
(`ot.sinkhorn(..., method="sinkhorn_log")` per pair), with the same cosine cost, reg and iteration count, on CPU
(and CUDA when present). Checks the batched plans agree with the loop. Writes a section of
docs/benchmarks/visuomotor.md.

    python scripts/bench_ot.py --pairs 1024 --frames 50 --dim 512 --threads 1 2
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from mmalign.robotics.ot import cosine_cost, ot_plan
from doc_sections import machine, now, visuomotor_section as write_section


def _time(fn, repeats: int) -> tuple[float, object]:  # noqa: ANN001
    out = fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best, out


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
    rows = []
    cost_np = cosine_cost(x, y).double().numpy()
    a = np.full(args.frames, 1.0 / args.frames)

    k = args.loop_pairs or args.pairs

    def loop() -> np.ndarray:
        return np.stack([ot.sinkhorn(a, a, c, args.reg, method="sinkhorn_log", numItermax=args.iters, stopThr=0.0)
                         for c in cost_np[:k]])

    torch.set_num_threads(1)
    t_loop, plans_loop = _time(loop, 1)
    t_loop *= args.pairs / k  # per-pair cost is constant, so the loop time scales linearly with the pair count
    scaled = f", timed on {k} pairs and scaled x{args.pairs / k:g}" if k != args.pairs else ""
    rows.append((f"NumPy POT `ot.sinkhorn` per-pair loop (float64{scaled})", "cpu", 1, t_loop))
    for threads in args.threads:
        torch.set_num_threads(threads)
        for dtype in (torch.float32, torch.float64):
            def ours(dtype: torch.dtype = dtype) -> torch.Tensor:
                return ot_plan(cosine_cost(x.to(dtype), y.to(dtype)), args.reg, args.iters)

            t, plans = _time(ours, args.repeats)
            err = float(np.abs(plans[:k].double().numpy() - plans_loop).max())
            rows.append((f"mmalign `ot_plan` = POT `ot.batch.solve_batch` log-Sinkhorn (torch {str(dtype)[6:]}; "
                         f"max |plan diff| {err:.1e})", "cpu", threads, t))
    if torch.cuda.is_available():
        xc, yc = x.cuda(), y.cuda()
        t, _ = _time(lambda: ot_plan(cosine_cost(xc, yc), args.reg, args.iters), args.repeats)
        rows.append(("mmalign `ot_plan` (POT batch, torch float32)", torch.cuda.get_device_name(), 0, t))
    for r in rows:
        print(f"{r[0]:<75} {r[1]:>6} threads={r[2]} {r[3] * 1e3:9.1f} ms  x{t_loop / r[3]:.1f}")
    if args.no_write:
        return
    lines = [
        "## Batched OT speed (`scripts/bench_ot.py`)",
        "",
        f"Command: `python scripts/bench_ot.py --pairs {args.pairs} --frames {args.frames} --dim {args.dim} "
        f"--threads {' '.join(map(str, args.threads))} --loop-pairs {args.loop_pairs}`; seed {args.seed}; {now()}; {machine()}; shared 2-core "
        "CPU with other engineers' jobs running (absolute times are noisy; ratios within the run are the point). "
        f"Problem: {args.pairs} pairs of {args.frames}x{args.frames} OT, cosine cost of {args.dim}-d features "
        f"(cost computation included), reg {args.reg}, {args.iters} log-domain Sinkhorn iterations (fixed, no early "
        f"stop), best of {args.repeats} (the loop: 1 run). GPU: "
        f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'none available to this run'}.",
        "",
        "| solver | device | torch threads | time (ms) | speed-up vs loop |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r[0]} | {r[1]} | {r[2]} | {r[3] * 1e3:.1f} | {t_loop / r[3]:.1f}x |" for r in rows]
    write_section("bench_ot", "\n".join(lines))


if __name__ == "__main__":
    main()
