"""Loaders for preference data: JSONL/JSON, Parquet, local Hugging Face ``datasets`` folders and Hub data sets.

A source is a local file (``.jsonl``, ``.json``, ``.parquet``), a folder written by ``Dataset.save_to_disk``, a
folder laid out like a Hub data set repository (data files that ``datasets.load_dataset`` reads, e.g. a local
copy of one), or a Hub id (``owner/name``) loaded with ``datasets.load_dataset`` (from the local cache only when
``HF_HUB_OFFLINE=1``). Images stay encoded (bytes or paths) in the rows: ``datasets`` sources are read in Arrow
format so that their Image columns are not decoded; see :mod:`mmalign.data.media` for lazy decoding. Embedded image
bytes (Parquet, ``datasets``) do not stay in the rows: they are moved to a temporary file as the rows are read, and
the rows hold references read per use (:mod:`mmalign.data.spill`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from mmalign.data.columns import map_columns
from mmalign.data.spill import SpillFile, spill_media
from mmalign.data.validation import KINDS, ValidationReport, validate_rows

__all__ = ["PreferenceDataset", "load_preference_data", "read_rows", "write_jsonl", "is_hub_id", "hub_folder"]

_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


@dataclass
class PreferenceDataset:
    """Validated preference rows of one kind (``text``, ``image`` or ``segment``) with the validation report."""

    kind: str
    rows: list[Mapping[str, Any]]
    report: ValidationReport
    source: str = ""
    base_dir: Path | None = None  # the folder relative media paths resolve against and are confined to
    allow_outside: bool = False  # media paths may leave base_dir

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Mapping[str, Any]:
        return self.rows[i]

    def row_number(self, i: int) -> int:
        """The row number in the user's data of kept row ``i`` (rows dropped by ``skip_invalid`` shift indices)."""
        return self.report.kept_index[i] if self.report.kept_index else i

    def labels(self) -> list[float]:
        """P(first ≻ second) per row; rows without a label count as 1 (chosen preferred)."""
        return [1.0 if row.get("label") is None else float(row["label"]) for row in self.rows]


def is_hub_id(source: str | Path) -> bool:
    """Whether ``source`` names a Hub data set rather than a local path (it does not exist locally, has no data
    file suffix, and looks like ``name`` or ``owner/name``)."""
    text = str(source)
    return (not Path(text).exists() and not text.startswith((".", "/", "~")) and not text.endswith(_FILE_SUFFIXES)
            and bool(_HUB_ID.match(text)))


def _spilled_rows(batches: Iterable[Any]) -> list[dict[str, Any]]:
    """Rows of Arrow record batches / tables, with embedded media bytes moved to a spill file (see
    :mod:`mmalign.data.spill`) batch by batch, so that the data set's encoded images are never all in memory."""
    store = SpillFile()
    rows = []
    for batch in batches:
        rows += [{k: spill_media(v, store) for k, v in row.items()} for row in batch.to_pylist()]
    return rows


def _arrow_rows(ds: Any) -> list[dict[str, Any]]:
    """Rows of a ``datasets.Dataset`` with Image columns left encoded (``{"bytes", "path"}``), not decoded to PIL."""
    return _spilled_rows(ds.with_format("arrow").iter(batch_size=512))


def _pick_split(ds: Any, split: str | None, where: str) -> Any:
    from datasets import DatasetDict

    if isinstance(ds, DatasetDict):
        if split is None:
            if len(ds) != 1:
                raise ValueError(f"{where} holds splits {list(ds)}; pass split=...")
            split = next(iter(ds))
        if split not in ds:
            raise ValueError(f"split {split!r} not in {where} (has {list(ds)})")
        ds = ds[split]
    return ds


def _load_dataset(name: str, split: str | None) -> list[dict[str, Any]]:
    """``datasets.load_dataset(name)`` (a Hub id or a local folder of data files) as encoded rows."""
    import os

    try:
        from datasets import load_dataset
    except ImportError as err:
        raise ImportError("reading a Hub data set needs `pip install datasets`") from err
    try:
        ds = load_dataset(name, split=split)
    except (FileNotFoundError, ConnectionError, ValueError) as err:
        offline = " (HF_HUB_OFFLINE is set: only data sets already in the local cache load)" \
            if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") else ""
        raise FileNotFoundError(f"preference data {name!r} is neither a local file or folder nor a loadable Hub "
                                f"data set{offline}: {type(err).__name__}: {err}") from None
    return _arrow_rows(_pick_split(ds, split, name))


def hub_folder(name: str) -> Path:
    """The local folder of Hub data set ``name`` that its media paths resolve against and may not leave.

    ``datasets.load_dataset`` downloads a Hub data set's files into the Hugging Face Hub cache, a snapshot folder per
    revision (``<cache>/datasets--owner--name/snapshots/<commit>``); relative paths in its rows name files of that
    repository, so they resolve against the snapshot of the revision loaded (``main``). Without one in the cache, the
    repository's cache folder (which then holds no file): every path is refused unless ``allow_outside``.
    """
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(name, repo_type="dataset", local_files_only=True))
    except Exception:  # noqa: BLE001  (no local snapshot: nothing a path could name is known to be the data set's)
        return Path(constants.HF_HUB_CACHE) / f"datasets--{name.replace('/', '--')}"


def read_rows(path: str | Path, split: str | None = None) -> list[dict[str, Any]]:
    """Raw rows of a ``.jsonl``/``.json`` file, a ``.parquet`` file, a ``datasets.save_to_disk`` folder, a folder of
    data files in a Hub data set layout, or a Hub id (see the module docstring)."""
    if is_hub_id(path):
        return _load_dataset(str(path), split)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"preference data not found: {path}")
    if path.is_dir():
        try:
            from datasets import load_from_disk
        except ImportError as err:
            raise ImportError("reading a Hugging Face datasets folder needs `pip install datasets`") from err
        if not any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            return _load_dataset(str(path), split)  # data files laid out as a Hub repository (a local copy)
        return _arrow_rows(_pick_split(load_from_disk(str(path)), split, str(path)))
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
        # batch by batch: one whole-file Arrow table next to its Python rows nearly doubled the peak memory
        return _spilled_rows(pq.ParquetFile(path).iter_batches(batch_size=512))
    raise ValueError(f"unsupported data file {path}: expected .jsonl, .json, .parquet or a datasets folder")


def load_preference_data(
    path: str | Path, kind: str, *, skip_invalid: bool = False, split: str | None = None,
    columns: Mapping[str, str] | str | None = None, allow_outside: bool = False, image_token: str | None = None,
) -> PreferenceDataset:
    """Read, map columns, and validate preference data; bad rows raise (listing every one) unless ``skip_invalid``.

    ``columns``: ``{expected field: column}`` (see :mod:`mmalign.data.columns`). Media paths resolve against the data
    file's folder (a data folder itself; a Hub data set's local snapshot, see :func:`hub_folder`) and may not leave it
    unless ``allow_outside``. ``image_token``: the model's
    placeholder counted in string prompts. Nothing is decoded: image values stay bytes or paths.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    hub = is_hub_id(path)
    rows = map_columns(read_rows(path, split), columns, source=str(path))
    base = hub_folder(str(path)) if hub else (Path(path) if Path(path).is_dir() else Path(path).parent)
    kept, report = validate_rows(kind, rows, skip_invalid=skip_invalid, base_dir=base, source=str(path),
                                 allow_outside=allow_outside, image_token=image_token)
    if report.dropped:
        print(f"[mmalign] {path}: {report.summary()}")
    return PreferenceDataset(kind, list(kept), report, str(path), base, allow_outside)


def write_jsonl(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write rows as JSONL (arrays converted to nested lists)."""

    def default(obj: Any) -> Any:
        if hasattr(obj, "tolist"):
            return obj.tolist()
        raise TypeError(f"cannot write {type(obj).__name__} to JSON")

    with open(path, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row, default=default) + "\n")
