"""Errors a user's input or files cause during a run; light (no torch), so the CLI can catch them cheaply."""

from __future__ import annotations

__all__ = ["CheckpointError", "RunLockedError"]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, truncated or corrupt; the message names the file."""


class RunLockedError(RuntimeError):
    """Another process holds the run folder's lock."""
