"""The media a query shows: images saved as PNG, clips encoded as WebM (VP8), all in the project's own folder.

Files are named by the SHA-256 of their content (``<hex>.png`` / ``<hex>.webm``), so pushing the same pair twice
stores one file, and :func:`media_file` serves only names of that exact form that exist inside the folder: ``../``,
absolute paths, links out of the folder and any other name give ``None`` (the app answers 404).

Clips come from frames (``uint8 [T, H, W, 3]``) or from MuJoCo states rendered offscreen
(:func:`mmalign.robotics.render.render_states_isolated`, which needs ``mmalign[robotics]``): the states recorded with
the segment (``qpos_*``/``qvel_*``, any MuJoCo task) or recovered from its observations for the tasks that observe
``qpos``/``qvel`` (:func:`mmalign.robotics.render.states_from_obs`).
"""

from __future__ import annotations

import hashlib
import io
import re
import subprocess
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["media_file", "save_image", "save_clip", "render_clips", "segment_of", "highlight"]

_NAME = re.compile(r"^[0-9a-f]{64}\.(png|webm)$")
MEDIA_TYPES = {".png": "image/png", ".webm": "video/webm"}


def media_file(folder: Path, name: str) -> Path | None:
    """The file ``name`` in ``folder`` if it is a media name this module wrote and it exists there, else ``None``."""
    if not _NAME.match(name):
        return None
    root = folder.resolve()
    path = (root / name).resolve()
    if path.parent != root or not path.is_file():
        return None
    return path


def _store(folder: Path, data: bytes, suffix: str) -> str:
    name = hashlib.sha256(data).hexdigest() + suffix
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if not path.exists():
        tmp = path.with_suffix(".part")
        tmp.write_bytes(data)
        tmp.replace(path)  # atomic: a reader never sees half a file
    return name


def _to_uint8_image(value: Any) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # (C, H, W) -> (H, W, C)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.dtype != np.uint8:
        arr = np.asarray(arr, dtype=np.float64)
        if arr.size and arr.max() <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    if arr.ndim not in (2, 3):
        raise ValueError(f"an image must be (H, W), (H, W, C) or (C, H, W), got shape {arr.shape}")
    return arr


def save_image(value: Any, folder: Path, base_dir: Path | None = None) -> str:
    """Save an image value of preference data (path, HF Image, PIL image, array) as PNG; returns its name."""
    from PIL import Image

    if isinstance(value, (str, Path)) or (isinstance(value, dict) and ("bytes" in value or "path" in value)):
        from mmalign.data.media import decode_image

        image = decode_image(value, base_dir)
    elif hasattr(value, "mode") and hasattr(value, "size"):
        image = value.convert("RGB") if value.mode not in ("RGB", "RGBA", "L") else value
    else:
        image = Image.fromarray(_to_uint8_image(value))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return _store(folder, buf.getvalue(), ".png")


def save_clip(frames: Any, folder: Path, fps: int = 20) -> str:
    """Encode ``[T, H, W, 3]`` frames as a WebM (VP8) any browser plays; returns its name."""
    import imageio_ffmpeg

    arr = np.stack([_to_uint8_image(f) for f in frames]) if isinstance(frames, (list, tuple)) else np.asarray(frames)
    if arr.dtype != np.uint8:
        arr = np.stack([_to_uint8_image(f) for f in arr])
    if arr.ndim == 3:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 4 or arr.shape[0] == 0 or arr.shape[-1] != 3:
        raise ValueError(f"clip frames must be uint8 [T, H, W, 3] with T >= 1, got shape {arr.shape}")
    h, w = arr.shape[1] + arr.shape[1] % 2, arr.shape[2] + arr.shape[2] % 2  # the encoder wants even sizes
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
           "-s", f"{arr.shape[2]}x{arr.shape[1]}", "-r", str(int(fps)), "-i", "pipe:0",
           "-vf", f"pad={w}:{h}", "-c:v", "libvpx", "-b:v", "1M", "-pix_fmt", "yuv420p", "-auto-alt-ref", "0",
           "-f", "webm", "pipe:1"]
    proc = subprocess.run(cmd, input=np.ascontiguousarray(arr).tobytes(), capture_output=True, timeout=300)
    if proc.returncode != 0 or not proc.stdout:
        raise RuntimeError(f"encoding a clip with ffmpeg failed: {proc.stderr.decode(errors='replace')[-500:]}")
    return _store(folder, proc.stdout, ".webm")


def render_clips(env_id: str, segments: Sequence[Mapping[str, Any]], *, size: int = 160) -> list[np.ndarray]:
    """Render segments of a gymnasium MuJoCo task to frames, all in one child process. Each segment is a mapping with
    recorded ``qpos``/``qvel`` (any MuJoCo task) or ``obs`` only (the tasks
    :func:`~mmalign.robotics.render.states_from_obs` knows) and a ``where`` naming it in errors. Every segment's
    states are checked before anything is drawn."""
    from mmalign.robotics.render import mujoco_sizes, render_states_isolated, segment_states

    nq, nv, _ = mujoco_sizes(env_id)
    states = [segment_states(env_id, s, nq, nv, str(s.get("where", f"segment {k}"))) for k, s in enumerate(segments)]
    qpos = np.concatenate([q for q, _ in states])
    qvel = np.concatenate([v for _, v in states])
    frames, _backend = render_states_isolated(env_id, qpos, qvel, width=size, height=size)
    out, start = [], 0
    for q, _ in states:
        out.append(frames[start: start + len(q)])
        start += len(q)
    return out


def segment_of(content: Mapping[str, Any], side: str, where: str) -> dict[str, Any]:
    """One side (``first``/``second``) of a segment pair row as :func:`render_clips` takes it."""
    return {"obs": content.get(f"obs_{side}"), "qpos": content.get(f"qpos_{side}"),
            "qvel": content.get(f"qvel_{side}"), "where": f"{where} ({side} segment)"}


def _words(text: str) -> list[str]:
    return re.findall(r"\S+\s*|\s+", text)  # a word with the space after it: "red square" is one change


def highlight(first: str, second: str) -> tuple[list[list[Any]], list[list[Any]]]:
    """Word-level difference of two answers: per answer a list of ``[text, changed]`` runs (the page shows changed
    runs highlighted, every run as text)."""
    import difflib

    a, b = _words(first), _words(second)
    out_a: list[list[Any]] = []
    out_b: list[list[Any]] = []

    def add(out: list[list[Any]], text: str, changed: bool) -> None:
        if not text:
            return
        if out and out[-1][1] == changed:
            out[-1][0] += text
        else:
            out.append([text, changed])

    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        add(out_a, "".join(a[i1:i2]), op != "equal")
        add(out_b, "".join(b[j1:j2]), op != "equal")
    return out_a, out_b
