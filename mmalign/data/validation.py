"""Row-level validation of preference data: every bad row is reported by index and reason.

Four kinds of data share one mechanism:

- ``text``: prompt/response pairs in the TRL preference format (``prompt``, ``chosen``, ``rejected``, optional
  ``images`` — a list of paths, arrays or PIL images —, optional ``videos`` — a list of videos, each a non-empty
  list of frames given like images or a ``(T, H, W[, C])`` array — and optional ``label`` = P(chosen ≻ rejected),
  a number, default 1). Prompt and responses are strings or conversations (lists of ``{"role", "content"}``
  messages whose content is a string or a list of parts such as ``{"type": "text", "text": ...}`` and
  ``{"type": "image"}``); a response without any text or media part is empty. Messages need a role among
  ``system``/``user``/``assistant``; a conversational prompt needs one ``{"type": "image"}`` part per image, a string
  prompt that holds the model's image token (``image_token=``) one token per image. Per-branch images
  (``rejected_images``, ``retrieved_images``) hold as many images as ``images``.
- ``prompt``: prompts to answer (``prompt``, optional ``images``/``videos``, any other fields such as an expected
  ``answer``), checked like the prompt side of ``text`` rows (generation and evaluation data).
- ``image``: diffusion pairs (``caption``, ``chosen_image``, ``rejected_image``, optional ``label``).
- ``segment``: trajectory segment pairs (``obs_first``, ``act_first``, ``obs_second``, ``act_second``, optional
  ``rewards_first``/``rewards_second``, ``frames_first``/``frames_second`` and ``label`` = P(first ≻ second)).

:func:`validate_rows` checks every row and either raises :class:`DataValidationError` listing all problems, or
with ``skip_invalid=True`` drops the bad rows and reports how many (nothing is dropped silently). Image paths are
resolved against ``base_dir`` (the data file's folder) and may not leave it unless ``allow_outside=True``
(see :mod:`mmalign.data.media`).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from mmalign.data.media import PathEscapeError, image_source, is_hf_image, open_image

__all__ = ["KINDS", "REQUIRED", "ROLES", "DataValidationError", "ValidationReport", "validate_rows", "row_problems",
           "count_image_parts"]

KINDS = ("text", "image", "segment", "prompt")
REQUIRED: dict[str, tuple[str, ...]] = {
    "text": ("prompt", "chosen", "rejected"),
    "prompt": ("prompt",),
    "image": ("caption", "chosen_image", "rejected_image"),
    "segment": ("obs_first", "act_first", "obs_second", "act_second"),
}


class DataValidationError(ValueError):
    """Raised with every bad row's index and reason when preference data fail validation."""

    def __init__(self, problems: list[tuple[int, str]], total: int, source: str = "") -> None:
        self.problems = problems
        shown = "\n".join(f"  row {i}: {why}" for i, why in problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        where = f" in {source}" if source else ""
        rows = len({i for i, _ in problems})
        super().__init__(
            f"{rows} of {total} rows{where} are invalid (pass skip_invalid=True to drop them and count them):\n"
            f"{shown}{more}"
        )


@dataclass
class ValidationReport:
    """What validation kept and dropped."""

    total: int
    kept: int
    dropped: list[tuple[int, str]] = field(default_factory=list)
    kept_index: list[int] = field(default_factory=list)

    def summary(self) -> str:
        return f"kept {self.kept} of {self.total} rows, dropped {self.total - self.kept} invalid rows"


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _check_label(row: Mapping[str, Any], out: list[str]) -> None:
    if "label" not in row or row["label"] is None:
        return
    label = row["label"]
    # a string ("0.7") or a bool (True) is not a probability, though float() would turn either into one
    if isinstance(label, (bool, np.bool_)) or not isinstance(label, numbers.Real):
        kind = ("a bool, not a probability: use 1.0 or 0.0" if isinstance(label, (bool, np.bool_))
                else type(label).__name__)
        out.append(f"label must be a number in [0, 1], got {label!r} ({kind})")
        return
    value = float(label)
    if math.isnan(value):
        out.append("label is NaN")
    elif not 0.0 <= value <= 1.0:
        out.append(f"label {value} outside [0, 1]")


def _as_float_array(value: Any, error: str, out: list[str]) -> np.ndarray | None:
    """``value`` as a float64 array, or ``None`` after appending ``error`` when it is not numeric."""
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        out.append(error)
        return None


def _check_image(name: str, value: Any, base_dir: Path | None, out: list[str], allow_outside: bool = False) -> None:
    if _is_missing(value):
        out.append(f"missing field {name!r}")
        return
    if isinstance(value, (str, Path)) or is_hf_image(value):
        try:
            source = image_source(value, base_dir, allow_outside=allow_outside)
        except PathEscapeError as err:
            out.append(f"{name!r}: {err}")
            return
        if source is None:
            out.append(f"image {name!r} holds neither bytes nor a path")
            return
        try:
            with open_image(source) as im:
                im.verify()
        except Exception as err:  # PIL raises many types for unreadable files
            where = "" if isinstance(source, bytes) else f" at {source}"
            out.append(f"unreadable image {name!r}{where} ({type(err).__name__})")
        return
    if hasattr(value, "size") and hasattr(value, "mode"):  # a PIL image
        return
    arr = _as_float_array(value, f"unreadable image {name!r}: not a path, PIL image or array", out)
    if arr is None:
        return
    if arr.ndim not in (2, 3) or arr.size == 0:
        out.append(f"image {name!r} has shape {arr.shape}, expected (H, W) or (H, W, C)/(C, H, W)")
    elif not np.isfinite(arr).all():
        out.append(f"image {name!r} contains NaN or inf")


def _check_video(name: str, value: Any, base_dir: Path | None, out: list[str], allow_outside: bool = False) -> None:
    """A video: a non-empty list of frames, each checked as an image, or a ``(T, H, W[, C])``/``(T, C, H, W)`` array."""
    if _is_missing(value):
        out.append(f"missing field {name!r}")
        return
    if isinstance(value, (list, tuple)):
        if not value:
            out.append(f"video {name!r} has no frames")
        for k, frame in enumerate(value):
            _check_image(f"{name}[{k}]", frame, base_dir, out, allow_outside)
        return
    if not hasattr(value, "shape"):  # a path, an HF Image or a PIL image is one picture, not a video
        out.append(f"video {name!r} must be a list of frames or a (T, H, W[, C]) array, got {type(value).__name__}")
        return
    arr = _as_float_array(value, f"unreadable video {name!r}: not a list of frames or a numeric array", out)
    if arr is None:
        return
    if arr.ndim not in (3, 4):
        out.append(f"video {name!r} has shape {arr.shape}, expected (T, H, W) or (T, H, W, C)/(T, C, H, W)")
    elif arr.shape[0] == 0:
        out.append(f"video {name!r} has no frames")
    elif arr.size == 0:
        out.append(f"video {name!r} has shape {arr.shape}, expected non-empty frames")
    elif not np.isfinite(arr).all():
        out.append(f"video {name!r} contains NaN or inf")


def _conversation_content(messages: list[Any]) -> tuple[str, bool]:
    """The text of a conversation and whether any message holds a non-text part (``{"type": "image"}`` ...).

    A message's ``content`` is a string, None, or a list of parts: strings and ``{"type": "text", "text": ...}``
    give text, any other typed part (image, video, audio) counts as media.
    """
    texts: list[str] = []
    media = False
    for message in messages:
        content = message.get("content") if isinstance(message, Mapping) else message
        parts = content if isinstance(content, (list, tuple)) else [content]
        for part in parts:
            if isinstance(part, Mapping):
                kind = part.get("type")
                if kind == "text" or (kind is None and "text" in part):
                    part = part.get("text")
                else:
                    media = media or kind is not None
                    continue
            if not _is_missing(part):
                texts.append(str(part))
    return " ".join(texts), media


def _as_array(name: str, value: Any, out: list[str]) -> np.ndarray | None:
    if _is_missing(value):
        out.append(f"missing field {name!r}")
        return None
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        out.append(f"field {name!r} is not a numeric array (ragged or non-numeric)")
        return None
    if arr.size == 0:
        out.append(f"field {name!r} is empty")
        return None
    if not np.isfinite(arr).all():
        out.append(f"field {name!r} contains NaN or inf")
    return arr


ROLES = ("system", "user", "assistant")


def _check_messages(name: str, messages: list[Any], out: list[str]) -> None:
    """Every message of a conversation is a mapping with a known ``role`` (no content = empty, reported later)."""
    for k, message in enumerate(messages):
        if not isinstance(message, Mapping):
            out.append(f"{name}[{k}] must be a message {{'role', 'content'}}, got {type(message).__name__}")
        elif message.get("role") not in ROLES:
            out.append(f"{name}[{k}] has unknown role {message.get('role')!r} (expected one of {', '.join(ROLES)})")


def count_image_parts(messages: list[Any]) -> int:
    """Number of ``{"type": "image"}`` parts in a conversation (the images it expects, in order)."""
    n = 0
    for message in messages:
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, (list, tuple)):
            n += sum(1 for part in content if isinstance(part, Mapping) and part.get("type") == "image")
    return n


def _n_items(value: Any) -> int:
    if _is_missing(value):
        return 0
    return len(value) if isinstance(value, (list, tuple)) else 1


def row_problems(kind: str, row: Mapping[str, Any], base_dir: Path | None = None, *, allow_outside: bool = False,
                 image_token: str | None = None) -> list[str]:
    """Every problem of one row (empty list when the row is valid).

    ``allow_outside``: media paths may leave ``base_dir``. ``image_token``: the model's image placeholder in plain
    string prompts (e.g. ``"<image>"``); a prompt that contains it must contain it once per image.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    out: list[str] = []
    for name in REQUIRED[kind]:
        if name not in row or _is_missing(row[name]):
            out.append(f"missing field {name!r}")
    if out:
        return out
    if kind in ("text", "prompt"):
        for name in REQUIRED[kind]:
            value = row[name]
            if isinstance(value, str):
                text, media = value, False
            elif isinstance(value, list):  # conversational format: list of {"role", "content"} messages
                _check_messages(name, value, out)
                text, media = _conversation_content(value)
            else:
                out.append(f"field {name!r} must be a string or a list of messages, got {type(value).__name__}")
                continue
            if name != "prompt" and not text.strip() and not media:
                out.append(f"empty response in {name!r}")
            elif kind == "prompt" and not text.strip() and not media:
                out.append("empty prompt")
        for column in ("images", "rejected_images", "retrieved_images", "videos"):
            items = row.get(column)
            if not _is_missing(items):
                check = _check_video if column == "videos" else _check_image
                for j, item in enumerate(items if isinstance(items, (list, tuple)) else [items]):
                    check(f"{column}[{j}]", item, base_dir, out, allow_outside)
        prompt, n_images = row["prompt"], _n_items(row.get("images"))
        placeholders = None
        if isinstance(prompt, list):
            placeholders = count_image_parts(prompt)
        elif image_token and isinstance(prompt, str) and image_token in prompt:
            placeholders = prompt.count(image_token)
        if placeholders is not None and placeholders != n_images:
            what = '{"type": "image"} parts' if isinstance(prompt, list) else f"{image_token!r} placeholders"
            out.append(f"the prompt has {placeholders} {what} but 'images' holds {n_images} image(s)")
        for column in ("rejected_images", "retrieved_images"):
            if not _is_missing(row.get(column)) and _n_items(row[column]) != n_images:
                out.append(f"{column!r} holds {_n_items(row[column])} image(s), 'images' holds {n_images}: each "
                           "branch needs one image per placeholder")
    elif kind == "image":
        if not isinstance(row["caption"], str):
            out.append(f"field 'caption' must be a string, got {type(row['caption']).__name__}")
        _check_image("chosen_image", row["chosen_image"], base_dir, out, allow_outside)
        _check_image("rejected_image", row["rejected_image"], base_dir, out, allow_outside)
        if not out:
            first, second = (_image_sizes(row[n], base_dir) for n in ("chosen_image", "rejected_image"))
            if not first & second:  # no reading of the two array layouts gives both images the same size
                out.append(f"chosen_image size {_show(first)} differs from rejected_image size {_show(second)} "
                           f"(height, width)")
    else:
        lengths: dict[str, int] = {}
        for side in ("first", "second"):
            for stem in ("obs", "act", "rewards", "frames"):
                name = f"{stem}_{side}"
                if stem in ("rewards", "frames") and (name not in row or _is_missing(row[name])):
                    continue
                arr = _as_array(name, row[name], out)
                if arr is not None:
                    lengths[name] = arr.shape[0] if arr.ndim else 1
        for side in ("first", "second"):
            seen = {n: l for n, l in lengths.items() if n.endswith(side)}
            if len(set(seen.values())) > 1:
                out.append(f"mismatched lengths in the {side} segment: {seen}")
    _check_label(row, out)
    return out


_CHANNELS = (1, 2, 3, 4)  # L, LA, RGB, RGBA


def _image_sizes(value: Any, base_dir: Path | None) -> set[tuple[int, int]]:
    """The possible (height, width) of a valid image (checked by ``_check_image``), whatever its format.

    Files and PIL images have one. A 2-D array is (H, W). A 3-D array is (H, W, C) when its last axis could be
    channels (1-4 long) and (C, H, W) when its first axis could; both readings are kept when both could (e.g.
    (3, 4, 3)) or neither does, so an ambiguous layout never makes two images of the same size differ.
    """
    if isinstance(value, (str, Path)) or is_hf_image(value):
        source = image_source(value, base_dir, allow_outside=True)  # already checked (and confined) by _check_image
        assert source is not None
        with open_image(source) as im:
            return {(im.size[1], im.size[0])}
    if hasattr(value, "size") and hasattr(value, "mode"):  # a PIL image: size is (width, height)
        return {(value.size[1], value.size[0])}
    shape = np.shape(value)
    if len(shape) == 2:
        return {(shape[0], shape[1])}
    hwc, chw = (shape[0], shape[1]), (shape[1], shape[2])
    sizes = ({hwc} if shape[2] in _CHANNELS else set()) | ({chw} if shape[0] in _CHANNELS else set())
    return sizes or {hwc, chw}


def _show(sizes: set[tuple[int, int]]) -> str:
    return " or ".join(str(s) for s in sorted(sizes))


def validate_rows(
    kind: str,
    rows: Sequence[Mapping[str, Any]] | Iterable[Mapping[str, Any]],
    *,
    skip_invalid: bool = False,
    base_dir: Path | None = None,
    source: str = "",
    allow_outside: bool = False,
    image_token: str | None = None,
) -> tuple[list[Mapping[str, Any]], ValidationReport]:
    """Validate every row; raise listing all problems, or drop bad rows when ``skip_invalid`` (and report them).

    ``allow_outside`` and ``image_token``: see :func:`row_problems`. The report's ``kept_index`` gives the original
    row number of every kept row (so later errors can name the row in the user's file).
    """
    rows = list(rows)
    problems: list[tuple[int, str]] = []
    keep: list[Mapping[str, Any]] = []
    kept_index: list[int] = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            problems.append((i, f"row is a {type(row).__name__}, expected a mapping of fields"))
            continue
        found = row_problems(kind, row, base_dir, allow_outside=allow_outside, image_token=image_token)
        if found:
            problems.extend((i, why) for why in found)
        else:
            keep.append(row)
            kept_index.append(i)
    if problems and not skip_invalid:
        raise DataValidationError(problems, len(rows), source)
    return keep, ValidationReport(total=len(rows), kept=len(keep), dropped=problems, kept_index=kept_index)
