"""Preference data: one set of types for text/image pairs (TRL columns), diffusion image pairs and trajectory
segment pairs, with loaders (JSONL, Parquet, local datasets folders) and row-level validation."""

from mmalign.data.loaders import PreferenceDataset, load_preference_data, read_rows, write_jsonl
from mmalign.data.validation import KINDS, REQUIRED, DataValidationError, ValidationReport, validate_rows

__all__ = [
    "KINDS",
    "REQUIRED",
    "DataValidationError",
    "PreferenceDataset",
    "ValidationReport",
    "load_preference_data",
    "read_rows",
    "validate_rows",
    "write_jsonl",
]
