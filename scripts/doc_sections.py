"""Writing measured results into the Markdown pages of docs/benchmarks/ (used by the benchmark scripts).

A benchmark script regenerates only its own block between ``<!-- key:start -->`` and ``<!-- key:end -->``, so
several scripts can share one page and the text written around the blocks survives re-runs. Scripts import this
module by name (``python scripts/bench_x.py`` puts ``scripts/`` on ``sys.path``).
"""

from __future__ import annotations

import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

from mmalign.fileio import atomic_write_text

__all__ = ["write_marked_section", "visuomotor_section", "machine", "now", "VISUOMOTOR", "OT_SPEED", "PEARL"]

VISUOMOTOR = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "visuomotor.md"
OT_SPEED = VISUOMOTOR.with_name("ot_speed.md")
PEARL = VISUOMOTOR.with_name("pearl_transfer.md")
_VISUOMOTOR_TITLE = "# Visuomotor rewards: RAPL\n\nEach section is written by the script it names.\n"


def write_marked_section(path: str | Path, key: str, body: str, title: str = "") -> None:
    """Replace the block between ``<!-- key:start -->`` and ``<!-- key:end -->`` in ``path`` (append it if absent).

    ``title`` starts a page that does not exist yet. A page whose markers for ``key`` are not exactly one start
    followed by one end (a marker lost or copied by hand), or a ``body`` holding those markers, raises
    ``ValueError`` and leaves the page as it was: guessing would delete the text between a stray marker and the
    block. The page is replaced atomically (never left half written).
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


def visuomotor_section(name: str, body: str, doc: Path = VISUOMOTOR) -> None:
    """Write section ``name`` of docs/benchmarks/visuomotor.md (bench_rapl)."""
    write_marked_section(doc, name, body, _VISUOMOTOR_TITLE)


def machine() -> str:
    """CPU model, OS and Python version, for a benchmark page's setup line."""
    try:
        cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("Model name")), "?")
    except OSError:
        model = platform.processor() or "?"
    return f"{model}, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def now() -> str:
    """The current UTC time to the minute."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
