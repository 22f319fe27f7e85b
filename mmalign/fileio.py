"""Writing a file so that a reader (or a crash) never sees it half written, and reading back what a crash left."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["atomic_write_text", "read_appended_rows", "read_safetensors"]


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, fsync and ``os.replace``.

    Readers see the old content or the new one, never a partial file; an existing file keeps its permission bits
    (a new one gets the umask's). On any error the temporary file is removed and ``path`` is untouched.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> path = Path(tempfile.mkdtemp()) / "notes.txt"
        >>> atomic_write_text(path, "hello")
        >>> path.read_text()
        'hello'
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


def read_appended_rows(path: str | Path, truncate: bool = True) -> list[dict[str, Any]]:
    """The complete rows of a JSONL file that a run appends to row by row (``[]`` if there is none yet).

    A last line cut short by a kill is left out and, with ``truncate``, dropped from the file too, so that the rows
    appended after it start on a line of their own (pass ``truncate=False`` while other processes may be appending).
    A broken row elsewhere is an error naming it.
    """
    import json

    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if truncate and len(complete) != len(data):
        with path.open("r+b") as fh:
            fh.truncate(len(complete))
    rows = []
    for number, line in enumerate(complete.decode().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} row {number} is not valid JSON ({err}); remove that line to resume") from None
    return rows


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_safetensors(path: str | Path, what: str = "weights") -> dict:
    """The tensors of a user-given ``.safetensors`` file; ``ValueError`` naming ``what`` and the file otherwise.

    A missing file, a folder, another format (a pickled ``.bin``/``.pt`` is never opened) or a truncated/corrupt
    file each raise one clear error instead of a library traceback.
    """
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{what}: {str(p)!r} is not a file (expected a .safetensors file)")
    if p.suffix != ".safetensors":
        raise ValueError(f"{what}: {str(p)!r} is not a .safetensors file (pickled formats are never loaded)")
    try:
        return load_file(str(p))
    except Exception as err:  # safetensors raises several error types for truncated/corrupt files
        raise ValueError(f"{what}: {str(p)!r} is corrupt or truncated ({type(err).__name__}: {err})") from None
