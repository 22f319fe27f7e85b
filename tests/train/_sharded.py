"""Helpers shared by the multi-process trainer tests (FSDP, DeepSpeed ZeRO) and their ``torchrun`` workers.

Imported as a plain module: pytest puts ``tests/train`` on ``sys.path`` for the tests, ``torchrun`` for the workers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]  # free port


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The final weights a run wrote."""
    return load_file(str(run_dir / "model.safetensors"))


def assert_weights_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], exact: bool) -> None:
    """Same names; bitwise equal tensors (``exact``) or equal to 1e-6."""
    assert a.keys() == b.keys()
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), f"{key} differs"
        else:
            torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=f"{key} differs")


def launch(worker: Path, out: Path, *args: str) -> Path:
    """Run ``worker`` under ``torchrun`` with 2 processes; fail with its output tail if it fails."""
    proc = subprocess.run([*TORCHRUN, str(worker), str(out), *args], env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out


# -- used inside the workers ------------------------------------------------------------------------------------------
def finish_worker() -> None:
    """End a worker: tear the process group down in step on every rank (the CLI's ``close_process_group``), then
    leave without the interpreter's exit-time destructors.

    DeepSpeed keeps gloo process groups referenced past ``destroy_process_group`` (``deepspeed.utils.groups``'s
    world group, the engine's ``data_parallel_group``, each ZeRO-3 parameter's ``ds_process_group``): after it, two
    groups' gloo threads and sockets are still alive, and would be torn down by exit-time destructors on each rank
    on its own while the other rank may already have closed its side. Under load a worker died there ("terminate
    called without an active exception"). The results are written before this call; ``os._exit`` skips only that
    teardown, after flushing the output.
    """
    from mmalign.cli import close_process_group

    close_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def demo_runner(common: list[str]) -> Callable[..., dict]:
    """``run(out, name, steps, extra, resume=False)``: the trainer's demo job with ``common`` + ``extra`` settings."""
    from mmalign.config import load_config
    from mmalign.train.demo import DemoConfig, run

    def _run(out: Path, name: str, steps: int, extra: list[str], resume: bool = False) -> dict:
        cfg = load_config(DemoConfig, None, [*common, *extra, f"trainer.max_steps={steps}"])
        return run(cfg, out / name, resume=resume)

    return _run


def record_linear_dtypes(keep: Callable[[torch.nn.Linear], bool]) -> set[str]:
    """Patch ``nn.Linear.forward`` to record the weight dtypes of the calls ``keep`` selects; returns the live set."""
    seen: set[str] = set()
    forward = torch.nn.Linear.forward

    def recording(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if keep(self):
            seen.add(str(self.weight.dtype))
        return forward(self, x)

    torch.nn.Linear.forward = recording  # type: ignore[method-assign]
    return seen


def corrupt_rank1_then_resume(out: Path, source: str, step: int, resume: Callable[[], Any]) -> list[str]:
    """Copy run ``source`` keeping only its checkpoint ``step``, zero the ``rng-1`` file there (same size, so the
    manifest passes; only rank 1 reads it), call ``resume()`` on every rank and gather each rank's error message."""
    from mmalign.train.checkpoint import CheckpointError, latest_checkpoint

    if torch.distributed.get_rank() == 0:
        bad = out / "bad" / "checkpoints"
        shutil.copytree(out / source, out / "bad")
        for ckpt in bad.glob("step-*"):
            if ckpt.name != f"step-{step:08d}":
                shutil.rmtree(ckpt)
        (bad / "latest").write_text(f"step-{step:08d}")
        target = latest_checkpoint(bad) / "rng-1.safetensors"  # type: ignore[operator]
        target.write_bytes(b"\x00" * target.stat().st_size)
    torch.distributed.barrier()
    try:
        resume()
        error = "no error"
    except CheckpointError as err:
        error = str(err)
    gathered: list = [None, None]
    torch.distributed.all_gather_object(gathered, error)
    return gathered
