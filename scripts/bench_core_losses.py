"""Benchmark: does a change to the core losses change the cost of a training step? Old code vs new, interleaved.

Two steps that call a core loss on every iteration are timed under two checkouts of mmalign (``--base``: the old
code, e.g. ``git worktree add /tmp/base <commit>``; ``--new``: default this checkout):

- ``vlm``: one DPO step of the tiny LLaVA of the VLM train job (batch of 8 scene pairs, full fine-tuning, cached
  reference log-probs): adapter forward of both branches, ``dpo_loss``, backward, AdamW step, metrics read (as
  the trainer logs them);
- ``reward``: one epoch of the main job's reward fit (``fit_ensemble``: ensemble of 3 MLPs of 64x64 on
  Reacher-sized inputs, obs 10 + act 2, 400 labelled pairs of 25-step segments, batch 64: 7 Adam steps of
  ``bradley_terry_loss`` per member).

Each checkout runs in its own long-lived worker process (one intra-op thread); after a warm-up block, the driver
alternates blocks A, B, B, A, ... so that drifting load hits both alike, and reports per block the CPU time of the
worker (``time.process_time``: time spent descheduled by other jobs is not counted). The verdict is the median of
the per-round ratios new/old with a bootstrap 95% interval over rounds.

    python scripts/bench_core_losses.py --base /tmp/base [--new .] [--rounds 20] [--out docs/benchmarks/core_losses.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

TASKS = {"vlm": 20, "reward": 5}  # steps per timed block (about half a second each)


# -- worker (runs under one checkout's mmalign) -------------------------------------------------------------------
def _vlm_step() -> Callable[[], None]:
    import numpy as np
    import torch

    from mmalign.vision_lm import benchmark as B
    from mmalign.vision_lm import scenes as S
    from mmalign.vision_lm.adapter import VLMAdapter
    from mmalign.vision_lm.objectives import PairCollator, PreferenceObjective
    from mmalign.vision_lm.tiny import build_tiny_llava

    rng = np.random.default_rng(0)
    model, processor = build_tiny_llava(S.vocabulary(), seed=0, patch_size=16)
    adapter = VLMAdapter(model, processor, max_length=2048)
    scenes = [S.SceneGenerator().sample(rng) for _ in range(8)]
    pairs = B.corrupt_pairs(scenes, [S.render(s, rng=rng) for s in scenes], rng)[:8]
    batch = PairCollator(adapter)(list(enumerate(pairs)))
    objective = PreferenceObjective(adapter, "dpo", beta=0.1)
    with torch.no_grad():  # the cached reference of the train job's reference=cache mode
        ref = objective._scores([batch["chosen"], batch["rejected"]], False)
    batch["ref/chosen/tokens"], batch["ref/rejected/tokens"] = ref[0][0], ref[1][0]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.train()

    def step() -> None:
        loss, metrics = objective(model, batch)
        loss.backward()
        dict(metrics)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _reward_step() -> Callable[[], None]:
    import torch

    from mmalign.robotics.reward_io import build_ensemble, fit_ensemble

    g = torch.Generator().manual_seed(0)
    n, h, obs_dim, act_dim = 400, 25, 10, 2
    obs1, obs2 = torch.randn(n, h, obs_dim, generator=g), torch.randn(n, h, obs_dim, generator=g)
    act1, act2 = torch.randn(n, h, act_dim, generator=g), torch.randn(n, h, act_dim, generator=g)
    labels = (torch.rand(n, generator=g) < 0.5).float()
    ensemble = build_ensemble(obs_dim, act_dim, 3, 64, seed=0, input_norm=True)
    seed = iter(range(10**6))

    def step() -> None:
        fit_ensemble(ensemble, obs1, act1, obs2, act2, labels, epochs=1, batch_size=64, lr=3e-4, seed=next(seed))

    return step


def worker() -> None:
    import torch

    torch.set_num_threads(1)
    steps = {"vlm": _vlm_step(), "reward": _reward_step()}
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        task, count = line.split()
        step = steps[task]
        c0 = time.process_time()
        for _ in range(int(count)):
            step()
        print(json.dumps({"cpu_s": (time.process_time() - c0) / int(count)}), flush=True)


# -- driver ---------------------------------------------------------------------------------------------------------
class Worker:
    def __init__(self, root: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker"], cwd=root, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"worker exited with {self.proc.wait()}")

    def time(self, task: str, count: int) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{task} {count}\n")
        self.proc.stdin.flush()
        return float(self._read()["cpu_s"])

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait()


def _git(root: Path) -> str:
    out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "mmalign/core/losses"],
                           capture_output=True, text=True).stdout.strip()
    return out.stdout.strip() + (" with uncommitted mmalign/core/losses changes" if dirty else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", type=Path, required=True, help="checkout of the old code")
    p.add_argument("--new", type=Path, default=Path(__file__).resolve().parents[1], help="checkout of the new code")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--out", type=Path, default=None, help="write the Markdown page here")
    args = p.parse_args()
    import numpy as np

    load0 = os.getloadavg()[0]
    sides = {"old": Worker(args.base.resolve()), "new": Worker(args.new.resolve())}
    for side in sides.values():  # warm-up block (allocator, lazy imports)
        for task, count in TASKS.items():
            side.time(task, count)
    times: dict[str, dict[str, list[float]]] = {t: {"old": [], "new": []} for t in TASKS}
    for r in range(args.rounds):
        order = ("old", "new") if r % 2 == 0 else ("new", "old")
        for task, count in TASKS.items():
            for name in order:
                times[task][name].append(sides[name].time(task, count))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{t} {times[t]['new'][-1] / times[t]['old'][-1]:.3f}" for t in TASKS), flush=True)
    for side in sides.values():
        side.close()
    rng = np.random.default_rng(args.seed)
    rows = []
    for task in TASKS:
        old, new = np.array(times[task]["old"]), np.array(times[task]["new"])
        ratio = new / old
        boot = np.median(ratio[rng.integers(0, len(ratio), (2000, len(ratio)))], axis=1)
        lo, hi = np.percentile(boot, [2.5, 97.5])
        rows.append(f"| {task} | {1e3 * np.median(old):.1f} | {1e3 * np.median(new):.1f} | {np.median(ratio):.3f} "
                    f"| [{lo:.3f}, {hi:.3f}] | {'yes' if lo <= 1.0 <= hi else 'no'} |")
    command = (f"python scripts/bench_core_losses.py --base <old checkout> --rounds {args.rounds} --seed {args.seed}"
               + (f" --out {args.out}" if args.out else ""))
    table = "\n".join(["| step | old (ms, CPU) | new (ms, CPU) | ratio new/old (median) | 95% interval | "
                       "unchanged (1 in interval) |", "|---|---:|---:|---:|---|:---:|", *rows])
    import torch

    page = f"""# Core losses: cost in a training step

Each core loss has one code path: its input validation (a `ValueError` naming the bad argument), then the math.
This page checks that this costs a real training step nothing measurable, by timing the step under the old code
({_git(args.base)}) and the new ({_git(args.new)}), interleaved.

Steps (see `scripts/bench_core_losses.py`): **vlm**, one DPO step of the tiny LLaVA of the VLM train job (8 scene
pairs, full fine-tuning, cached reference, metrics read); **reward**, one epoch of the main job's reward fit
(ensemble of 3 MLPs 64x64, Reacher-sized inputs, 400 pairs of 25-step segments, batch 64: 7 Adam steps per member).
Cells are medians over {args.rounds} rounds of the worker's CPU time per step (`time.process_time`, one thread); the
ratio is the median of per-round ratios, its interval a bootstrap over rounds (seed {args.seed}).

{table}

Machine: {platform.machine()}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}, Python
{platform.python_version()}, torch {torch.__version__}; load average (1 min) at start / end {load0:.1f} /
{os.getloadavg()[0]:.1f} (a shared machine: the old and new blocks alternate so that load hits both alike).

Command: `{command}`
"""
    print(page)
    if args.out:
        args.out.write_text(page)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker()
    else:
        main()
