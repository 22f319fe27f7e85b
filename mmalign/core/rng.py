"""Seeded, side-effect-free construction: draw from torch's global RNG as if after ``torch.manual_seed(seed)``.

Libraries such as peft and ``transformers``' ``from_config`` initialise weights from torch's global generators.
:func:`seeded_global_rng` makes such a draw reproducible without touching the caller's RNG: the CPU generator (and
every CUDA generator once CUDA is initialised) is saved, seeded, and restored on exit. ``torch.manual_seed`` inside a
plain ``fork_rng(devices=[])`` is not enough: it also seeds the CUDA generators (not restored when they are not
forked) or, before CUDA is initialised, queues that seed for whenever CUDA starts — reseeding the caller's CUDA RNG.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def seeded_global_rng(seed: int) -> Iterator[None]:
    """Within the block, torch's global RNG is seeded with ``seed``; outside, every generator is as it was.

    On CPU-only runs (or before CUDA is initialised) only the CPU generator is seeded, so nothing is queued for a
    CUDA RNG started later; once CUDA is initialised its generators are seeded too (weights built on a GPU draw
    from them) and restored afterwards.
    """
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if cuda else []):
        if cuda:
            torch.manual_seed(int(seed))
        else:
            torch.random.default_generator.manual_seed(int(seed))
        yield
