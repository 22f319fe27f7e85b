"""Writing measured results into Markdown pages without touching the hand-written text around them."""

from __future__ import annotations

from pathlib import Path

__all__ = ["write_marked_section"]


def write_marked_section(path: str | Path, key: str, body: str, title: str = "") -> None:
    """Replace the block between ``<!-- key:start -->`` and ``<!-- key:end -->`` in ``path`` (append it if absent).

    A benchmark script regenerates only its own block, so several scripts can share one page and the discussion
    written around the blocks survives re-runs. ``title`` starts a page that does not exist yet.
    """
    path = Path(path)
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    doc = path.read_text() if path.is_file() else (title.rstrip() + "\n" if title else "")
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in doc and end in doc and doc.index(start) < doc.index(end):
        doc = doc[: doc.index(start)] + block + doc[doc.index(end) + len(end):]
    else:
        doc = doc.rstrip() + "\n\n" + block + "\n" if doc.strip() else block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc)
