"""Timing repeated training steps for the throughput benchmarks (``vision_lm/perf.py``, ``diffusion/perf.py``)."""

from __future__ import annotations

import time
from typing import Callable

import torch

__all__ = ["time_steps"]


def time_steps(step: Callable[[], object], *, steps: int, warmup: int = 0,
               device: torch.device | str = "cpu") -> list[float]:
    """Seconds of wall-clock time of each of ``steps`` calls of ``step``, after ``warmup`` untimed calls.

    On CUDA the device is synchronised before and after each call, so that a step's time includes its kernels
    (queued asynchronously otherwise) and not the previous step's.

    Examples:
        >>> times = time_steps(lambda: sum(range(1000)), steps=3, warmup=1)
        >>> len(times), all(t >= 0 for t in times)
        (3, True)
    """
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps must be >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    cuda = torch.device(device).type == "cuda"
    times = []
    for i in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times
