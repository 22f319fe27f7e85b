"""Image references in preference data: where an image lies (confined to the data folder) and lazy decoding.

An image value in a row is a path (relative to the data file's folder), a Hugging Face ``datasets`` Image value
(``{"bytes": ..., "path": ...}``, as Parquet files and ``datasets`` folders store them), a PIL image or an array.
Rows keep these values as they are (encoded bytes or a path, never decoded pixels); :class:`LazyImage` decodes one
when a batch is built, so a data set of many large images is never held decoded in memory.

Paths may not leave the data folder: a relative path with ``..``, an absolute path or a symlink that resolves
outside it raises :class:`PathEscapeError`, unless the caller passes ``allow_outside=True`` (the user's explicit
option, e.g. ``allow_outside_paths=true`` in a job config).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

__all__ = ["PathEscapeError", "LazyImage", "decode_image", "image_source", "is_hf_image", "resolve_media_path"]


class PathEscapeError(ValueError):
    """A media path in the data points outside the data file's folder."""


def is_hf_image(value: Any) -> bool:
    """An HF ``datasets`` Image feature value: ``{"bytes": ..., "path": ...}`` (either may be None)."""
    return isinstance(value, Mapping) and ("bytes" in value or "path" in value)


def resolve_media_path(value: str | Path, base_dir: Path | None, *, allow_outside: bool = False) -> Path:
    """The file a media path names: relative paths under ``base_dir``; confined to ``base_dir`` unless allowed.

    ``base_dir`` None (rows built in Python, no data file) leaves the path as given. Otherwise the path, with every
    symlink resolved, must lie inside ``base_dir`` (itself resolved): ``../x.png``, ``/etc/x.png`` or a link
    pointing out of the folder raise :class:`PathEscapeError` naming the path, unless ``allow_outside``. A Hub data
    set's snapshot folder in the Hub cache (``datasets--owner--name/snapshots/<commit>``) confines to its repository
    folder: the snapshot's files are links into that repository's ``blobs/``.
    """
    path = Path(value)
    if base_dir is None:
        return path
    full = path if path.is_absolute() else base_dir / path
    if allow_outside:
        return full
    root = base_dir.resolve()
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("datasets--"):
        root = root.parent.parent  # a Hub cache snapshot: its files are links into the repository's blobs/ folder
    real = full.resolve()
    if not real.is_relative_to(root):
        how = "an absolute path" if path.is_absolute() else "a link" if ".." not in path.parts else "a '..' path"
        raise PathEscapeError(f"image path {str(value)!r} is {how} outside the data folder {root} (resolves to "
                              f"{real}); move the file into the folder or set allow_outside_paths=true")
    return full


def image_source(value: Any, base_dir: Path | None, *, allow_outside: bool = False) -> Path | bytes | None:
    """Where a path or HF Image value's image lies: encoded bytes, or a confined path; None when it holds neither.

    An HF Image with ``bytes`` None is stored by path (``datasets`` writes path-backed images so to Parquet).
    """
    if is_hf_image(value):
        if value.get("bytes") is not None:
            return bytes(value["bytes"])
        value = value.get("path")
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return None
    return resolve_media_path(value, base_dir, allow_outside=allow_outside)


def open_image(source: Path | bytes) -> Any:
    """A lazily read PIL image of encoded bytes or a file (pixels are read on first access)."""
    from PIL import Image

    return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)


def decode_image(value: Any, base_dir: Path | None = None, *, allow_outside: bool = False) -> Any:
    """A decoded RGB PIL image for a path / HF Image value; PIL images and arrays are returned as they are."""
    if isinstance(value, (str, Path)) or is_hf_image(value):
        source = image_source(value, base_dir, allow_outside=allow_outside)
        if source is None:
            raise ValueError("image value holds neither bytes nor a path")
        with open_image(source) as im:
            return im.convert("RGB")
    return value


@dataclass(frozen=True)
class LazyImage:
    """An image value and the folder its path is relative to; :meth:`load` decodes it (nothing is cached)."""

    value: Any
    base_dir: Path | None = None
    allow_outside: bool = False

    def load(self) -> Any:
        return decode_image(self.value, self.base_dir, allow_outside=self.allow_outside)


def load_images(images: Any) -> Any:
    """``images`` with every :class:`LazyImage` decoded (lists and None pass through)."""
    if images is None:
        return None
    return [im.load() if isinstance(im, LazyImage) else im for im in images]
