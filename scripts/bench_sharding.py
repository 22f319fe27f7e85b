"""What each multi-process strategy of the trainer holds per process, and what a step costs: DDP, FSDP2, ZeRO-1/2/3.

Every strategy trains the same MLP (``--layers`` Linear layers of ``--width``, fp32, AdamW) on the same generated
regression data through ``mmalign.train.Trainer`` with 2 processes (``torchrun``, gloo on CPU or NCCL on GPUs), the
same global batch and seed. Per process (rank 0) it reports exact element counts of what that process keeps between
steps — parameters, fp32 master copies (ZeRO's flat partitions), AdamW moments — converted to MiB, the growth of peak
RSS (CPU) or of ``torch.cuda.max_memory_allocated`` (GPU) during training, the median step time after warm-up, and the
largest weight difference to the DDP run after the same steps (all strategies follow the same trajectory).

    python scripts/bench_sharding.py                  # 2 CPU processes, writes the "sharding" section of
                                                      # docs/benchmarks/training.md
    python scripts/bench_sharding.py --width 512 --layers 4 --steps 6 --no-doc   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks" / "training.md"
STRATEGIES = {"ddp": ["trainer.distributed=ddp"], "fsdp": ["trainer.distributed=fsdp"],
              "zero1": ["trainer.distributed=deepspeed", "trainer.zero_stage=1"],
              "zero2": ["trainer.distributed=deepspeed", "trainer.zero_stage=2"],
              "zero3": ["trainer.distributed=deepspeed", "trainer.zero_stage=3"]}
MIB = 2**20


def _local_numel(t) -> int:  # noqa: ANN001 - a tensor, DTensor or ZeRO-3 parameter
    if hasattr(t, "ds_tensor"):
        return int(t.ds_tensor.numel())
    if hasattr(t, "to_local"):
        return int(t.to_local().numel())
    return int(t.numel())


def _rss_kib(field: str) -> int:
    """A Linux /proc/self/status memory field (VmRSS, VmHWM) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def held_elements(trainer) -> dict[str, int]:  # noqa: ANN001 - a mmalign Trainer after train()
    """Elements this process keeps between steps: parameters, separate fp32 masters, AdamW moments."""
    module = trainer.unwrapped_model()
    params = sum(_local_numel(p) for p in module.parameters())
    if trainer.zero:
        from mmalign.train.zero import _flat_partitions

        flats = _flat_partitions(trainer.model.optimizer)
        state = trainer.model.optimizer.optimizer.state
        masters = sum(f.numel() for f in flats)
        moments = sum(state[f][k].numel() for f in flats for k in ("exp_avg", "exp_avg_sq") if f in state)
    else:
        masters = 0
        moments = sum(_local_numel(s[k]) for s in trainer.optimizer.state.values() for k in ("exp_avg", "exp_avg_sq"))
    return {"params": params, "masters": masters, "moments": moments}


def worker(args: argparse.Namespace) -> None:
    """One strategy, run by every process under torchrun; rank 0 writes ``args.out``."""
    import torch
    import torch.distributed as dist

    from mmalign.config import load_config
    from mmalign.train.config import TrainerConfig
    from mmalign.train.trainer import Trainer, seed_everything

    torch.set_num_threads(args.threads)
    cfg = load_config(TrainerConfig, None, [
        f"max_steps={args.steps}", f"batch_size={args.batch // 2}", "log_every=1", "save_every=0", "progress=false",
        "plots=false", "lr=1e-3", "max_grad_norm=1.0", "mixed_precision=no",
        *[s.removeprefix("trainer.") for s in STRATEGIES[args.strategy]]])
    seed_everything(0)
    layers: list[torch.nn.Module] = []
    for _ in range(args.layers):
        layers += [torch.nn.Linear(args.width, args.width), torch.nn.Tanh()]
    model = torch.nn.Sequential(*layers[:-1])
    n_params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(args.width, generator=gen), torch.randn(args.width, generator=gen))
            for _ in range(args.batch * 4)]

    calls = [0]
    steady: dict[str, int] = {}

    def loss_fn(m, batch):  # noqa: ANN001, ANN202
        if calls[0] == args.warmup and device.type == "cpu":  # after the warm-up steps: reset the peak RSS
            steady["base"] = _rss_kib("VmRSS") * 1024
            Path("/proc/self/clear_refs").write_text("5")
        calls[0] += 1
        x, y = batch
        return ((m(x) - y) ** 2).mean(), {}

    run_dir = Path(args.out).with_suffix("")
    trainer = Trainer(cfg, model, data, loss_fn, run_dir)
    device = trainer.accelerator.device
    assert args.warmup < args.steps, "--warmup must be below --steps"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    held = held_elements(trainer)
    if device.type == "cuda":
        steady_growth = peak - base  # GPU: the whole run (held state is allocated during the first step)
    else:
        steady_growth = _rss_kib("VmHWM") * 1024 - steady["base"]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["perf/examples_per_s"] for r in rows if "perf/examples_per_s" in r][args.warmup:]
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps({
            "strategy": args.strategy, "n_params": n_params, "held": held, "peak_growth": peak - base, "steady_growth": steady_growth,
            "step_s": args.batch / statistics.median(rates), "wall_s": wall, "device": str(device),
            "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                            else platform.processor() or platform.machine())}))


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=1024, help="hidden width of the MLP")
    ap.add_argument("--layers", type=int, default=8, help="number of Linear layers")
    ap.add_argument("--batch", type=int, default=64, help="global batch (2 processes x batch/2)")
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per strategy")
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the median step time")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    ap.add_argument("--no-doc", action="store_true", help="print the table only")
    ap.add_argument("--section", default="sharding", help="marked section of docs/benchmarks/training.md to write")
    ap.add_argument("--worker", choices=list(STRATEGIES), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    return ap


def command_line(args: argparse.Namespace, ap: argparse.ArgumentParser) -> str:
    """The command printed into the docs: every option that differs from its default."""
    parts = []
    for k in ("width", "layers", "batch", "steps", "warmup", "threads", "strategies", "section"):
        v = getattr(args, k)
        if v != ap.get_default(k):
            parts.append(f" --{k} " + (" ".join(v) if isinstance(v, list) else str(v)))
    return "python scripts/bench_sharding.py" + "".join(parts)


def main() -> None:
    ap = parser()
    args = ap.parse_args()
    if args.worker:
        args.strategy = args.worker
        worker(args)
        return

    import torch
    from safetensors.torch import load_file

    results, weights = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.strategies:
            out = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   __file__, "--worker", name, "--out", str(out), "--width", str(args.width), "--layers",
                   str(args.layers), "--batch", str(args.batch), "--steps", str(args.steps), "--warmup",
                   str(args.warmup), "--threads", str(args.threads)]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            results.append(json.loads(out.read_text()))
            weights[name] = load_file(str(out.with_suffix("") / "model.safetensors"))
            print(json.dumps(results[-1]))
    ref = weights.get("ddp")
    n = results[0]["n_params"]
    lines = [
        "| strategy | params held (MiB) | fp32 masters (MiB) | AdamW moments (MiB) | total held (MiB) | "
        "peak growth, whole run (MiB) | peak above steady RSS, after warm-up (MiB) | step time (s, median) | "
        "max abs weight diff to DDP |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        h = {k: v * 4 / MIB for k, v in r["held"].items()}
        diff = (max(float((weights[r["strategy"]][k] - ref[k]).abs().max()) for k in ref) if ref is not None
                else float("nan"))
        lines.append(f"| {r['strategy']} | {h['params']:.1f} | {h['masters']:.1f} | {h['moments']:.1f} | "
                     f"{sum(h.values()):.1f} | {r['peak_growth'] / MIB:.0f} | {r['steady_growth'] / MIB:.0f} | "
                     f"{r['step_s']:.3f} | {diff:.1e} |")
    table = "\n".join(lines)
    print(table)
    if args.no_doc:
        return
    cmd = command_line(args, ap)
    load = os.getloadavg()
    text = "\n".join([
        f"## What each process holds: DDP, FSDP2 and DeepSpeed ZeRO-1/2/3 ({n / 1e6:.1f}M parameters)", "",
        f"Command: `{cmd}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Machine: {results[0]['device_name']} "
        f"({results[0]['device']}), {os.cpu_count()} cores, load average {load[0]:.1f} at the end; torch "
        f"{torch.__version__}; 2 processes × {args.threads} thread(s). Model: {args.layers} Linear layers of "
        f"{args.width} ({n / 1e6:.1f}M fp32 parameters, {n * 4 / MIB:.0f} MiB), AdamW, global batch {args.batch}, "
        f"{args.steps} steps, seed 0, median step time after {args.warmup} warm-up steps. *Held* = exact element "
        "counts rank 0 keeps between steps (× 4 bytes); *peak growth, whole run* = growth of rank 0's peak RSS from "
        "the built trainer to the end (includes wrapping the model: DDP's buckets, DeepSpeed's flattening copies); "
        "*peak above steady RSS* = rank 0's peak RSS during the steps after warm-up minus its RSS when they began "
        "(peak reset through /proc/self/clear_refs): the per-step transient memory (gradients, activations, "
        "communication buffers) on top of what is held.", "",
        table, ""])
    from doc_sections import write_marked_section

    write_marked_section(DOC, args.section, text, "# Training infrastructure benchmarks")
    print(f"wrote the {args.section} section of {DOC}")


if __name__ == "__main__":
    main()
