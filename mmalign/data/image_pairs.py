"""Image preference pairs for diffusion training: Pick-a-Pic's layout and mmalign's ``image`` kind on mmalign.data.

Layouts (after the optional column mapping, :mod:`mmalign.data.columns`):

* ``pickapic``: ``caption``, ``jpg_0``, ``jpg_1``, ``label_0`` (1: ``jpg_0`` preferred, 0: ``jpg_1``, 0.5: a tie);
  ties are dropped (``ties="drop"``, as Diffusion-DPO's script) or kept with label 0.5 (``ties="half"``).
* ``image``: ``caption``, ``chosen_image``, ``rejected_image`` and an optional ``label`` = P(first ≻ second).

Sources are those of :func:`mmalign.data.read_rows` (JSONL, Parquet with embedded bytes or paths, a ``datasets``
folder, a Hub id). Every row is checked before any training (:func:`mmalign.data.validate_rows`: missing caption,
unreadable image, path leaving the data folder, label range; here also: ``label_0`` in {0, 0.5, 1} and every image
fully decoded, which catches truncated files); bad rows raise one error naming each row, or with ``skip_invalid``
are dropped and counted. Items are pixel pairs at the training resolution (:func:`mmalign.diffusion.encoding.prepare_pair`).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from mmalign.data.columns import map_columns
from mmalign.data.loaders import is_hub_id, read_rows
from mmalign.data.media import LazyImage, image_source
from mmalign.data.validation import DataValidationError, ValidationReport, validate_rows

__all__ = ["LAYOUTS", "PICKAPIC_COLUMNS", "ImagePairDataset", "load_image_pairs"]

LAYOUTS = ("auto", "pickapic", "image")
PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")


def _pickapic_to_image(row: Mapping[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """A Pick-a-Pic row as an ``image``-kind row (label = label_0), or the reason it is invalid."""
    missing = [c for c in PICKAPIC_COLUMNS if c not in row or row[c] is None]
    if missing:
        return None, f"missing field(s) {missing} (Pick-a-Pic layout needs {list(PICKAPIC_COLUMNS)})"
    label = row["label_0"]
    if isinstance(label, bool) or not isinstance(label, (int, float)) or label not in (0, 0.5, 1):
        return None, f"label_0 must be 0, 0.5 or 1 (jpg_1 preferred, tie, jpg_0 preferred), got {label!r}"
    out = {k: v for k, v in row.items() if k not in ("jpg_0", "jpg_1", "label_0")}
    out.update(chosen_image=row["jpg_0"], rejected_image=row["jpg_1"], label=float(label))
    return out, None


def _decode_problem(value: Any, base_dir: Path | None, allow_outside: bool) -> str | None:
    """Why an (already path-checked) image value cannot be fully decoded, or None."""
    from mmalign.data.media import open_image

    source = image_source(value, base_dir, allow_outside=allow_outside) if not hasattr(value, "mode") else None
    if source is None:
        return None  # PIL images and arrays were checked by validate_rows
    try:
        with open_image(source) as im:
            im.load()  # verify() passes truncated JPEG/PNG files: decode every pixel once
    except Exception as err:  # PIL raises many types for broken files
        return f"image cannot be decoded ({type(err).__name__}: {str(err)[:80]}); truncated or corrupt file"
    return None


def _identity(value: Any, base_dir: Path | None) -> str:
    """What identifies an image value for the latent cache key: its bytes' digest, or path, size and mtime."""
    if isinstance(value, Mapping) and value.get("bytes") is not None:
        return hashlib.sha256(bytes(value["bytes"])).hexdigest()
    path = value.get("path") if isinstance(value, Mapping) else value
    if isinstance(path, (str, Path)):
        full = Path(path) if base_dir is None or Path(path).is_absolute() else base_dir / path
        stat = full.stat() if full.is_file() else None
        return f"{path}:{stat.st_size}:{stat.st_mtime_ns}" if stat else str(path)
    return hashlib.sha256(repr(value).encode()).hexdigest()


@dataclass
class ImagePairDataset:
    """Validated image pairs (chosen first) served as pixel pairs at ``resolution``.

    Item: ``chosen_pixels``/``rejected_pixels`` ``[3, R, R]`` in [-1, 1], ``caption``, ``time_ids`` ``[6]`` and,
    with kept ties, ``label`` (1, or 0.5 for a tie). ``report`` counts what validation (and tie dropping) removed.
    """

    rows: list[dict[str, Any]]
    report: ValidationReport
    source: str
    base_dir: Path | None
    resolution: int
    random_crop: bool = False
    hflip: bool = False
    allow_outside: bool = False
    keep_ties: bool = False
    ties_dropped: int = 0

    def __len__(self) -> int:
        return len(self.rows)

    def deterministic(self) -> "ImagePairDataset":
        """The same pairs with centre crop and no flip (what a latent cache stores)."""
        return replace(self, random_crop=False, hflip=False)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        from mmalign.diffusion.encoding import prepare_pair

        row = self.rows[i]
        p = 1.0 if row.get("label") is None else float(row["label"])
        first, second = ("chosen_image", "rejected_image") if p >= 0.5 else ("rejected_image", "chosen_image")
        images = [LazyImage(row[k], self.base_dir, self.allow_outside).load() for k in (first, second)]
        chosen, rejected, time_ids = prepare_pair(images[0], images[1], self.resolution, random_crop=self.random_crop,
                                                  hflip=self.hflip)
        item: dict[str, Any] = {"chosen_pixels": chosen, "rejected_pixels": rejected, "caption": row["caption"],
                                "time_ids": time_ids}
        if self.keep_ties:
            item["label"] = torch.tensor(max(p, 1.0 - p))
        return item

    def fingerprint(self) -> str:
        """A digest of what the items depend on: each row's caption, image identities and label, and the resolution."""
        h = hashlib.sha256(f"{self.resolution}|{self.keep_ties}".encode())
        for row in self.rows:
            parts = [row["caption"], _identity(row["chosen_image"], self.base_dir),
                     _identity(row["rejected_image"], self.base_dir), repr(row.get("label"))]
            h.update("\x1f".join(parts).encode() + b"\x1e")
        return h.hexdigest()


def load_image_pairs(source: str | Path, *, resolution: int, layout: str = "auto",
                     columns: Mapping[str, str] | str | None = None, split: str | None = None, ties: str = "drop",
                     skip_invalid: bool = False, allow_outside: bool = False, random_crop: bool = False,
                     hflip: bool = False) -> ImagePairDataset:
    """Read, map, validate (every row, before any training) and serve image pairs; see the module docstring.

    Raises :class:`mmalign.data.DataValidationError` naming every bad row, unless ``skip_invalid`` (then the bad
    rows are dropped, counted in ``report`` and printed), and ``ValueError`` when nothing is left to train on.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
    if ties not in ("drop", "half"):
        raise ValueError(f"ties must be drop or half, got {ties!r}")
    if resolution <= 0:
        raise ValueError(f"resolution must be a positive integer, got {resolution}")
    where = str(source)
    rows = map_columns(read_rows(source, split), columns, source=where)
    total = len(rows)
    if layout == "auto":
        layout = "pickapic" if any(isinstance(r, Mapping) and "jpg_0" in r for r in rows) else "image"
    problems: list[tuple[int, str]] = []
    index = list(range(len(rows)))
    if layout == "pickapic":
        converted, index = [], []
        for i, row in enumerate(rows):
            new, why = _pickapic_to_image(row) if isinstance(row, Mapping) else (None, "row is not a mapping")
            if why:
                problems.append((i, why))
            else:
                converted.append(new)
                index.append(i)
        rows = converted
    base = None if is_hub_id(source) else (Path(source) if Path(source).is_dir() else Path(source).parent)
    kept, report = validate_rows("image", rows, skip_invalid=True, base_dir=base, source=where,
                                 allow_outside=allow_outside)
    problems += [(index[i], why) for i, why in report.dropped]
    good: list[dict[str, Any]] = []
    for i, row in zip(report.kept_index, kept):
        found = [(k, w) for k in ("chosen_image", "rejected_image") if (w := _decode_problem(row[k], base, allow_outside))]
        problems += [(index[i], f"{k!r}: {w}") for k, w in found]
        if not found:
            good.append(dict(row))
    if problems and not skip_invalid:
        raise DataValidationError(sorted(problems), total, where)
    dropped_ties = 0
    if ties == "drop":
        n = len(good)
        good = [r for r in good if r.get("label") is None or not math.isclose(float(r["label"]), 0.5)]
        dropped_ties = n - len(good)
    final = ValidationReport(total=total, kept=len(good), dropped=sorted(problems))
    if problems or dropped_ties:
        print(f"[mmalign] {where}: {len({i for i, _ in problems})} invalid rows dropped, {dropped_ties} ties dropped, "
              f"{len(good)} pairs kept")
    if not good:
        raise ValueError(f"no image pairs left to train on in {where} ({final.total} rows: "
                         f"{len({i for i, _ in problems})} invalid, {dropped_ties} ties dropped)")
    return ImagePairDataset(good, final, where, base, resolution, random_crop, hflip, allow_outside,
                            keep_ties=ties == "half", ties_dropped=dropped_ties)
