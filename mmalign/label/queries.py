"""From preference data to queries (what the page shows) and from answers back to preference rows.

A query's payload is JSON: ``left``/``right`` (the pair's first and second item) plus the shared context —
``prompt`` and ``images`` (text kind), ``caption`` (image kind), ``fps`` (clip kind). Items are
``{"text", "runs"}`` (an answer with its word-level difference runs), ``{"image": name}`` or ``{"video": name}``
where a name is a media file in the project folder (:mod:`mmalign.label.media`).

Exported rows are the source rows with ``label`` = P(first ≻ second) from the people's answers (the mean over
labellers that did not skip), so ``load_preference_data(path, kind)`` and every job that reads preference data
accepts them; queries that everybody skipped are left out and counted.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from mmalign.label.media import highlight, render_clips, save_clip, save_image, segment_of

__all__ = ["DATA_KIND", "build_payload", "rows_to_queries", "export_rows", "decode_upload"]

# query kind -> mmalign.data kind
DATA_KIND = {"clip": "segment", "image": "image", "text": "text"}


def _text(value: Any) -> str:
    """A prompt or response as text: a string, or the text parts of a conversation (images are shown apart)."""
    if isinstance(value, str):
        return value
    parts: list[str] = []
    for message in value or []:
        content = message.get("content") if isinstance(message, Mapping) else message
        for part in content if isinstance(content, (list, tuple)) else [content]:
            if isinstance(part, Mapping):
                part = part.get("text") if part.get("type", "text") == "text" else None
            if isinstance(part, str):
                role = message.get("role") if isinstance(message, Mapping) else None
                parts.append(f"{role}: {part}" if role and len(value) > 1 else part)
    return "\n".join(parts)


def decode_upload(value: Any, where: str) -> Any:
    """An image sent over HTTP as ``{"png_base64": ...}`` (or a nested array) to a value :func:`save_image` reads."""
    if isinstance(value, Mapping) and "png_base64" in value:
        try:
            return {"bytes": base64.b64decode(value["png_base64"], validate=True), "path": None}
        except (binascii.Error, TypeError):
            raise ValueError(f"{where}: png_base64 is not valid base64") from None
    if isinstance(value, (str, Mapping)):  # a path or an HF image dict would read the server's own files
        raise ValueError(f"{where}: an uploaded image must be {{'png_base64': ...}} or an array of pixels")
    return value


def build_payload(kind: str, content: Mapping[str, Any], media_dir: Path, base_dir: Path | None = None,
                  *, clips: tuple[np.ndarray, np.ndarray] | None = None, fps: int = 20) -> dict[str, Any]:
    """The payload of one query from a row of preference data (``first``/``second`` in the row's own columns)."""
    if kind == "text":
        first, second = _text(content["chosen"]), _text(content["rejected"])
        runs_first, runs_second = highlight(first, second)
        images = content.get("images") or []
        return {"prompt": _text(content["prompt"]),
                "images": [save_image(im, media_dir, base_dir) for im in images],
                "left": {"text": first, "runs": runs_first}, "right": {"text": second, "runs": runs_second}}
    if kind == "image":
        return {"caption": str(content["caption"]),
                "left": {"image": save_image(content["chosen_image"], media_dir, base_dir)},
                "right": {"image": save_image(content["rejected_image"], media_dir, base_dir)}}
    if kind == "clip":
        if clips is None:
            if content.get("frames_first") is None or content.get("frames_second") is None:
                raise ValueError("a clip query needs frames_first/frames_second, or an env_id to render its recorded "
                                 "qpos_*/qvel_* or its observations")
            clips = (np.asarray(content["frames_first"]), np.asarray(content["frames_second"]))
        return {"fps": fps, "left": {"video": save_clip(clips[0], media_dir, fps)},
                "right": {"video": save_clip(clips[1], media_dir, fps)}}
    raise ValueError(f"kind must be clip, image or text, got {kind!r}")


def rows_to_queries(kind: str, rows: Sequence[Mapping[str, Any]], media_dir: Path, base_dir: Path | None, *,
                    env_id: str = "", fps: int = 20, id_prefix: str = "", reference: bool = False,
                    keep_row: bool = True, row_numbers: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Queries for :meth:`Store.add_queries` from validated rows; a row's ``label`` becomes the reference label
    only with ``reference=True`` (then the progress view reports each labeller's agreement with it).

    Clip rows are shown from ``frames_first``/``frames_second`` when given, else rendered for ``env_id`` from the
    recorded ``qpos_*``/``qvel_*`` or from the observations (see :func:`mmalign.label.media.render_clips`); every
    row's states are checked before anything is rendered or saved. ``row_numbers`` name the rows in errors."""
    numbers = list(row_numbers) if row_numbers is not None else list(range(len(rows)))
    rendered: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    if kind == "clip":
        todo = [n for n, r in enumerate(rows) if r.get("frames_first") is None or r.get("frames_second") is None]
        if todo and not env_id:
            raise ValueError(f"rows {[numbers[n] for n in todo][:10]} have no frames_first/frames_second: give env_id "
                             f"to render them from their states or observations")
        if todo:
            segs = [segment_of(rows[n], side, f"row {numbers[n]}") for n in todo for side in ("first", "second")]
            frames = render_clips(env_id, segs)
            rendered = {n: (frames[2 * k], frames[2 * k + 1]) for k, n in enumerate(todo)}
    out = []
    for n, row in enumerate(rows):
        payload = build_payload(kind, row, media_dir, base_dir, clips=rendered.get(n), fps=fps)
        label = row.get("label")
        out.append({"external_id": str(row.get("id", f"{id_prefix}{n}")), "payload": payload,
                    "row": _jsonable(row) if keep_row else {},
                    "reference_label": float(label) if reference and label is not None else None})
    return out


def _jsonable(row: Mapping[str, Any]) -> dict[str, Any]:
    """The row as JSON: arrays as nested lists, image bytes and PIL images dropped (the payload holds every image
    as a file, and the export writes the image columns from there)."""
    def conv(v: Any) -> Any:
        if hasattr(v, "tolist"):
            return v.tolist()
        if isinstance(v, Mapping):
            return {k: conv(x) for k, x in v.items() if not isinstance(x, (bytes, bytearray))}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, (bytes, bytearray)) or (hasattr(v, "mode") and hasattr(v, "size")):
            return None
        return v

    return {k: conv(v) for k, v in row.items()}


def export_rows(kind: str, queries: Iterable[tuple[int, str, dict, dict, float | None, int]],
                answers: Sequence[Mapping[str, Any]], media_dir: Path, out_dir: Path) -> tuple[list[dict], dict]:
    """Preference rows of ``kind`` from the answers (one row per query with at least one non-skipped answer).

    Images the source row had as bytes are written next to the export (``media/<name>``) from the project's media.
    """
    labels: dict[int, list[float]] = {}
    comments: dict[int, list[str]] = {}
    skipped: dict[int, int] = {}
    for a in answers:
        if a["label"] is None:
            skipped[a["query_id"]] = skipped.get(a["query_id"], 0) + 1
        else:
            labels.setdefault(a["query_id"], []).append(float(a["label"]))
        if a.get("comment"):
            comments.setdefault(a["query_id"], []).append(str(a["comment"]))
    rows, all_skipped, unanswered = [], 0, 0
    for qid, ext, payload, row, _ref, _n in queries:
        if qid not in labels:
            all_skipped += qid in skipped
            unanswered += qid not in skipped
            continue
        out = {k: v for k, v in row.items() if v is not None} if row else {}
        _fill_from_payload(kind, out, payload, media_dir, out_dir)
        out["id"] = ext
        out["label"] = float(np.mean(labels[qid]))
        out["num_labels"] = len(labels[qid])
        if qid in comments:
            out["comments"] = comments[qid]
        rows.append(out)
    return rows, {"rows": len(rows), "all_skipped": all_skipped, "unanswered": unanswered}


def _fill_from_payload(kind: str, out: dict[str, Any], payload: Mapping[str, Any], media_dir: Path,
                       out_dir: Path) -> None:
    """Columns a row built over HTTP (no source row) lacks, taken from the payload; image columns always point to
    copies of the project's media next to the export."""
    def copy(name: str) -> str:
        (out_dir / "media").mkdir(parents=True, exist_ok=True)
        target = out_dir / "media" / name
        if not target.exists():
            target.write_bytes((media_dir / name).read_bytes())
        return f"media/{name}"

    if kind == "text":
        out.setdefault("prompt", payload["prompt"])
        out.setdefault("chosen", payload["left"]["text"])
        out.setdefault("rejected", payload["right"]["text"])
        if payload.get("images"):  # the project's copies: the export folder is self-contained
            out["images"] = [copy(n) for n in payload["images"]]
    elif kind == "image":
        out.setdefault("caption", payload["caption"])
        for col, side in (("chosen_image", "left"), ("rejected_image", "right")):
            out[col] = copy(payload[side]["image"])
