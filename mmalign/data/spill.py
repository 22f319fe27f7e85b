"""Encoded media bytes kept on disk while a data set is in memory: rows hold references, bytes are read per use.

Parquet files and ``datasets`` folders embed images as encoded bytes (``{"bytes": ..., "path": ...}``). Held in the
rows, a data set's bytes would all sit in memory for the whole run (an 80,000-pair set of 100 KB images: 8 GB).
:func:`spill_media` moves every such value's bytes into one temporary file as the rows are read (batch by batch) and
leaves a :class:`SpilledBytes` reference in its place; ``bytes(ref)`` reads them back (one ``pread``), which is all
that image decoding, validation and cache keys do with them. The file is deleted when its last reference goes (and
by the OS at exit: it is unlinked on close). Data-loader workers share its open descriptor: forked ones inherit it,
spawned ones (``spawn``, ``forkserver``: Python 3.14's default on Linux) receive a duplicate when the data set is
pickled for them, never a copy of the bytes.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any, Mapping

__all__ = ["SpillFile", "SpilledBytes", "spill_media"]

# Smaller values stay in the rows: a reference costs about as much memory as a few hundred bytes.
MIN_SPILL_BYTES = 1024


class SpillFile:
    """An append-only temporary file of encoded media (deleted when this object is collected)."""

    def __init__(self) -> None:
        self._fh = tempfile.TemporaryFile(prefix="mmalign-media-", buffering=0)
        self.size = 0

    def add(self, data: bytes) -> "SpilledBytes":
        offset = self.size
        self._fh.write(data)  # unbuffered: readable by pread at once
        self.size += len(data)
        return SpilledBytes(self, offset, len(data))

    def __reduce__(self) -> tuple:
        # the file has no name to reopen: a process that unpickles this gets a duplicate of the descriptor
        from multiprocessing.reduction import DupFd

        return _attach, (DupFd(self._fh.fileno()), self.size)

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fh.fileno(), length, offset)
        if len(data) != length:
            raise OSError(f"media spill file truncated: read {len(data)} of {length} bytes at offset {offset}")
        return data


def _attach(dup: Any, size: int) -> SpillFile:
    """The unpickled side of :meth:`SpillFile.__reduce__`: the same file through a duplicated descriptor (read-only)."""
    store = SpillFile.__new__(SpillFile)
    store._fh = os.fdopen(dup.detach(), "rb", buffering=0)
    store.size = size
    return store


@dataclass(frozen=True, eq=False)
class SpilledBytes:
    """``length`` bytes at ``offset`` of ``store``; ``bytes(ref)`` reads them."""

    store: SpillFile
    offset: int
    length: int

    def __bytes__(self) -> bytes:
        return self.store.read(self.offset, self.length)

    def __len__(self) -> int:
        return self.length


def spill_media(value: Any, store: SpillFile) -> Any:
    """``value`` with the bytes of every HF Image value in it (``{"bytes": b"...", ...}``, in lists at any depth)
    moved to ``store``; other values are returned as they are."""
    if isinstance(value, Mapping):
        data = value.get("bytes")
        if isinstance(data, (bytes, bytearray)) and len(data) >= MIN_SPILL_BYTES:
            return {**value, "bytes": store.add(bytes(data))}
        return value
    if isinstance(value, list):
        return [spill_media(v, store) for v in value]
    return value
