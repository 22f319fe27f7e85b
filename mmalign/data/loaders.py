"""Loaders for preference data from JSONL, Parquet and local Hugging Face ``datasets`` folders."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from mmalign.data.validation import KINDS, ValidationReport, validate_rows

__all__ = ["PreferenceDataset", "load_preference_data", "read_rows", "write_jsonl"]


@dataclass
class PreferenceDataset:
    """Validated preference rows of one kind (``text``, ``image`` or ``segment``) with the validation report."""

    kind: str
    rows: list[Mapping[str, Any]]
    report: ValidationReport
    source: str = ""

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Mapping[str, Any]:
        return self.rows[i]

    def labels(self) -> list[float]:
        """P(first ≻ second) per row; rows without a label count as 1 (chosen preferred)."""
        return [1.0 if row.get("label") is None else float(row["label"]) for row in self.rows]


def read_rows(path: str | Path, split: str | None = None) -> list[dict[str, Any]]:
    """Raw rows of a ``.jsonl``/``.json`` file, a ``.parquet`` file, or a ``datasets.save_to_disk`` folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"preference data not found: {path}")
    if path.is_dir():
        try:
            from datasets import DatasetDict, load_from_disk
        except ImportError as err:
            raise ImportError("reading a Hugging Face datasets folder needs `pip install datasets`") from err
        ds = load_from_disk(str(path))
        if isinstance(ds, DatasetDict):
            if split is None:
                if len(ds) != 1:
                    raise ValueError(f"{path} holds splits {list(ds)}; pass split=...")
                split = next(iter(ds))
            if split not in ds:
                raise ValueError(f"split {split!r} not in {path} (has {list(ds)})")
            ds = ds[split]
        return [dict(r) for r in ds]
    suffix = path.suffix.lower()
    if suffix in {".jsonl", ".json"}:
        rows = []
        try:  # newline="": no newline translation, so that the split below sees the file's own line ends
            with open(path, encoding="utf-8-sig", newline="") as fh:
                text = fh.read()
        except UnicodeDecodeError as err:
            raise ValueError(f"{path} is not UTF-8 text (invalid byte at offset {err.start})") from None
        if suffix == ".json" and text.lstrip().startswith("["):
            try:
                return list(json.loads(text))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{err.lineno}:{err.colno} is not a valid JSON array ({err.msg}; the file "
                                 f"may be truncated)") from None
        # Lines end at "\n" only ("\r\n" leaves a "\r", which JSON ignores as whitespace): str.splitlines would also
        # split at U+2028, U+2029 and U+0085, which JSON strings may contain unescaped.
        for lineno, line in enumerate(text.split("\n"), 1):
            if not line.strip(" \t\r"):
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno} is not valid JSON ({err.msg})") from None
        return rows
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as err:
            raise ImportError("reading Parquet needs `pip install pyarrow`") from err
        return pq.read_table(path).to_pylist()
    raise ValueError(f"unsupported data file {path}: expected .jsonl, .json, .parquet or a datasets folder")


def load_preference_data(
    path: str | Path, kind: str, *, skip_invalid: bool = False, split: str | None = None
) -> PreferenceDataset:
    """Read and validate preference data; bad rows raise (listing every one) unless ``skip_invalid``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    path = Path(path)
    rows = read_rows(path, split)
    base = path if path.is_dir() else path.parent
    kept, report = validate_rows(kind, rows, skip_invalid=skip_invalid, base_dir=base, source=str(path))
    if report.dropped:
        print(f"[mmalign] {path}: {report.summary()}")
    return PreferenceDataset(kind, list(kept), report, str(path))


def write_jsonl(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write rows as JSONL (arrays converted to nested lists)."""

    def default(obj: Any) -> Any:
        if hasattr(obj, "tolist"):
            return obj.tolist()
        raise TypeError(f"cannot write {type(obj).__name__} to JSON")

    with open(path, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row, default=default) + "\n")
