"""Column mapping: read data sets whose columns are named differently from the format mmalign expects.

A mapping is ``{expected name: column in the data}``, e.g. for RLAIF-V (``image``, ``question``, ``chosen``,
``rejected``) ``{"prompt": "question", "images": "image"}`` — on the command line ``columns.prompt=question
columns.images=image``. Columns not named keep their own names. Expected list-valued fields (``images``,
``rejected_images``, ``retrieved_images``, ``videos``) accept a single value per row (RLAIF-V's one ``image``) and
wrap it in a list.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

__all__ = ["LIST_FIELDS", "parse_columns", "map_columns"]

LIST_FIELDS = ("images", "rejected_images", "retrieved_images", "videos")


def parse_columns(spec: Mapping[str, str] | str | None) -> dict[str, str]:
    """A mapping from a dict, or from a string ``"prompt=question,images=image"``; None or empty gives ``{}``."""
    if not spec:
        return {}
    if isinstance(spec, str):
        out = {}
        for item in spec.split(","):
            target, sep, column = item.partition("=")
            if not sep or not target.strip() or not column.strip():
                raise ValueError(f"column mapping entry {item!r} must look like expected=column (e.g. prompt=question)")
            out[target.strip()] = column.strip()
        spec = out
    for target, column in spec.items():
        if not isinstance(target, str) or not isinstance(column, str) or not column:
            raise ValueError(f"column mapping {target!r}: {column!r} must map a field name to a column name")
    sources = list(spec.values())
    dup = sorted({c for c in sources if sources.count(c) > 1})
    if dup:
        raise ValueError(f"column mapping reads column(s) {dup} into more than one field")
    return dict(spec)


def map_columns(rows: Sequence[Mapping[str, Any]], mapping: Mapping[str, str] | str | None,
                source: str = "") -> list[dict[str, Any]]:
    """Rows renamed by ``mapping`` (see :func:`parse_columns`); a mapped column absent from every row raises.

    A column missing from only some rows leaves the field missing there, which validation reports per row.
    """
    mapping = parse_columns(mapping)
    rows = list(rows)
    if not mapping:
        return [dict(r) if isinstance(r, Mapping) else r for r in rows]  # type: ignore[misc]
    present: set[str] = set()
    for row in rows:
        if isinstance(row, Mapping):
            present.update(row)
    absent = {t: c for t, c in mapping.items() if c not in present}
    if absent and rows:
        where = f" in {source}" if source else ""
        raise ValueError(f"mapped column(s) {', '.join(f'{c!r} (columns.{t})' for t, c in absent.items())} not "
                         f"found{where}; the data has columns {sorted(present)}")
    renamed = set(mapping.values())
    out: list[dict[str, Any]] = []
    for row in rows:
        if not isinstance(row, Mapping):
            out.append(row)  # type: ignore[arg-type]  # validation reports non-mapping rows
            continue
        new = {k: v for k, v in row.items() if k not in renamed or k in mapping}
        for target, column in mapping.items():
            if column in row:
                value = row[column]
                if target in LIST_FIELDS and value is not None and not isinstance(value, (list, tuple)):
                    value = [value]
                new[target] = value
            else:
                new.pop(target, None)
        out.append(new)
    return out
