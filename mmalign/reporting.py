"""Writing measured results into Markdown pages without touching the hand-written text around them."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write_text", "write_marked_section"]


def write_marked_section(path: str | Path, key: str, body: str, title: str = "") -> None:
    """Replace the block between ``<!-- key:start -->`` and ``<!-- key:end -->`` in ``path`` (append it if absent).

    A benchmark script regenerates only its own block, so several scripts can share one page and the discussion
    written around the blocks survives re-runs. ``title`` starts a page that does not exist yet. A page whose
    markers for ``key`` are not exactly one start followed by one end (a marker lost or copied by hand), or a
    ``body`` holding those markers, raises ``ValueError`` and leaves the page as it was: guessing would delete
    the text between a stray marker and the block. The page is replaced atomically (never left half written).
    """
    path = Path(path)
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    if start in body or end in body:
        raise ValueError(f"body of section {key!r} must not contain its own markers {start} / {end}")
    doc = path.read_text() if path.is_file() else (title.rstrip() + "\n" if title else "")
    block = f"{start}\n{body.rstrip()}\n{end}"
    n_start, n_end = doc.count(start), doc.count(end)
    if n_start == n_end == 1 and doc.index(start) < doc.index(end):
        doc = doc[: doc.index(start)] + block + doc[doc.index(end) + len(end):]
    elif n_start == n_end == 0:
        doc = doc.rstrip() + "\n\n" + block + "\n" if doc.strip() else block + "\n"
    else:
        found = "the end before the start" if n_start == n_end == 1 else f"{n_start} start and {n_end} end markers"
        raise ValueError(f"{path}: section {key!r} needs one {start} before one {end}, found {found}; "
                         "fix the page by hand")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, doc)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, fsync and ``os.replace``.

    Readers see the old content or the new one, never a partial file; an existing file keeps its permission bits
    (a new one gets the umask's). On any error the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
