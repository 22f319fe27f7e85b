"""What each process loads at each step: batch indices as a pure function of (seed, step), seeded worker loading.

Data order is a pure function of (seed, epoch, step), so a run resumed from a checkpoint sees exactly the batches
an uninterrupted run would have seen; each process takes its shard of every global batch. With DataLoader workers the
worker RNGs are reseeded before every micro-batch from its position in the run (see :class:`_SeededBatches`).
"""

from __future__ import annotations

import hashlib
import random
from typing import Any, Iterator, Sequence

import numpy as np
import torch

__all__ = ["_StepBatches", "_SeededBatches", "_batch_seeds", "_default_collate"]


class _StepBatches:
    """Micro-batch index lists for one process, from ``start_step`` on; a pure function of (seed, step).

    With ``keyed`` each micro-batch comes as ``(step, micro, indices)``, for :class:`_SeededBatches` in the workers.
    """

    def __init__(self, n: int, batch_size: int, accum: int, world: int, rank: int, seed: int, start: int, stop: int,
                 keyed: bool = False):
        self.n, self.bs, self.accum, self.world, self.rank = n, batch_size, accum, world, rank
        self.seed, self.start, self.stop, self.keyed = seed, start, stop, keyed
        self.global_batch = batch_size * accum * world
        self.steps_per_epoch = n // self.global_batch

    def order(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=gen)

    def __iter__(self) -> Iterator[Any]:
        perm, perm_epoch = None, -1
        for step in range(self.start, self.stop):
            epoch, k = divmod(step, self.steps_per_epoch)
            if epoch != perm_epoch:
                perm, perm_epoch = self.order(epoch), epoch
            assert perm is not None
            chunk = perm[k * self.global_batch : (k + 1) * self.global_batch]
            for micro in range(self.accum):
                first = (micro * self.world + self.rank) * self.bs
                indices = chunk[first : first + self.bs].tolist()
                yield (step, micro, indices) if self.keyed else indices

    def __len__(self) -> int:
        return (self.stop - self.start) * self.accum


def _batch_seeds(seed: int, step: int, micro: int, rank: int) -> tuple[int, int, int]:
    """Seeds (torch, numpy, python) of one micro-batch's loading: a pure function of its position in the run."""
    digest = hashlib.sha256(f"mmalign-data:{seed}:{step}:{micro}:{rank}".encode()).digest()
    return (int.from_bytes(digest[:8], "little") >> 1, int.from_bytes(digest[8:12], "little"),
            int.from_bytes(digest[12:28], "little"))


class _SeededBatches:
    """Wraps the dataset in DataLoader workers: reseeds the worker's RNGs before loading each keyed micro-batch.

    A worker's RNG streams would otherwise start from the DataLoader's base seed at every (re)start of the run, so
    random augmentation after a resume would repeat the first steps' draws instead of continuing. The reseeding also
    covers ``collate_fn``, which runs right after in the same worker.
    """

    def __init__(self, dataset: Any, seed: int, rank: int) -> None:
        self.dataset, self.seed, self.rank = dataset, seed, rank

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, key: tuple[int, int, list[int]]) -> list[Any]:
        step, micro, indices = key
        torch_seed, np_seed, py_seed = _batch_seeds(self.seed, step, micro, self.rank)
        torch.manual_seed(torch_seed)
        np.random.seed(np_seed)
        random.seed(py_seed)
        getitems = getattr(self.dataset, "__getitems__", None)
        return list(getitems(indices)) if getitems else [self.dataset[i] for i in indices]


def _default_collate(items: Sequence[Any]) -> Any:
    from torch.utils.data import default_collate

    return default_collate(list(items))
