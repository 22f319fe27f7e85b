"""Preference data: one set of types for text/image pairs (TRL columns), diffusion image pairs and trajectory
segment pairs, with sources (JSONL, Parquet, local ``datasets`` folders, Hub ids), column mapping, media paths
confined to the data folder, lazy image decoding and row-level validation.

Public API:

- :func:`load_preference_data` ``(source, kind, *, columns=, split=, skip_invalid=, allow_outside=, image_token=)``
  -> :class:`PreferenceDataset` (validated rows, still encoded; ``base_dir`` for their relative paths);
- :func:`read_rows` (raw rows of any source), :func:`map_columns` / :func:`parse_columns` (``{field: column}``);
- :func:`validate_rows` / :func:`row_problems` (every bad row by index and reason; :class:`DataValidationError`);
- :class:`LazyImage`, :func:`decode_image`, :func:`resolve_media_path` (:class:`PathEscapeError`) for media values.
"""

from mmalign.data.columns import map_columns, parse_columns
from mmalign.data.loaders import PreferenceDataset, is_hub_id, load_preference_data, read_rows, write_jsonl
from mmalign.data.media import LazyImage, PathEscapeError, decode_image, load_images, resolve_media_path
from mmalign.data.validation import (
    KINDS,
    REQUIRED,
    ROLES,
    DataValidationError,
    ValidationReport,
    count_image_parts,
    row_problems,
    validate_rows,
)

__all__ = [
    "KINDS",
    "REQUIRED",
    "ROLES",
    "DataValidationError",
    "LazyImage",
    "PathEscapeError",
    "PreferenceDataset",
    "ValidationReport",
    "count_image_parts",
    "decode_image",
    "is_hub_id",
    "load_images",
    "load_preference_data",
    "map_columns",
    "parse_columns",
    "read_rows",
    "resolve_media_path",
    "row_problems",
    "validate_rows",
    "write_jsonl",
]
