"""Offscreen MuJoCo rendering of segments to frames, GIF/MP4 and frame strips.

Rendering restores each recorded ``(qpos, qvel)`` into a fresh ``MjData`` and draws it with ``mujoco.Renderer``
with shadows, reflections and skybox off (software GL renders ~10x faster without them). The GL backend is fixed
when ``mujoco`` is imported, so :func:`render_states_isolated` renders in a child process, trying ``MUJOCO_GL=egl``
and then ``osmesa``; a crash of the GL stack therefore cannot take the experiment down.

Run as a module (used by the child process): ``python -m mmalign.robotics.render IN.npz OUT.npz``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

__all__ = [
    "render_states",
    "render_states_isolated",
    "save_video",
    "frame_strip",
    "side_by_side",
]

# Top-down views where the default gymnasium camera tracks a body and shows little.
_CAMERAS: dict[str, dict[str, float]] = {
    "Reacher": {"distance": 0.6, "elevation": -90.0, "azimuth": 90.0},
    "InvertedPendulum": {"distance": 2.5, "elevation": -10.0, "azimuth": 90.0},
    "InvertedDoublePendulum": {"distance": 3.5, "elevation": -10.0, "azimuth": 90.0},
}


def render_states(
    env_id: str, qpos: np.ndarray, qvel: np.ndarray, *, width: int = 96, height: int = 96
) -> np.ndarray:
    """Render states ``qpos [N, nq]``, ``qvel [N, nv]`` of a gymnasium MuJoCo env: ``uint8 [N, height, width, 3]``."""
    import gymnasium
    import mujoco

    env = gymnasium.make(env_id)
    try:
        model = env.unwrapped.model  # type: ignore[attr-defined]
        if qpos.shape[-1] != model.nq or qvel.shape[-1] != model.nv:
            raise ValueError(
                f"qpos/qvel must have {model.nq}/{model.nv} columns for {env_id}, got {qpos.shape}/{qvel.shape}"
            )
        data = mujoco.MjData(model)
        renderer = mujoco.Renderer(model, height, width)
        for flag in (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION,
                     mujoco.mjtRndFlag.mjRND_SKYBOX):
            renderer.scene.flags[flag] = 0
        cam = mujoco.MjvCamera()
        mujoco.mjv_defaultFreeCamera(model, cam)
        view = next((v for k, v in _CAMERAS.items() if env_id.startswith(k)), None)
        if view is not None:
            cam.distance, cam.elevation, cam.azimuth = view["distance"], view["elevation"], view["azimuth"]
        elif model.nbody > 1:  # locomotion: follow the root body so the agent stays in frame
            cam.type = mujoco.mjtCamera.mjCAMERA_TRACKING
            cam.trackbodyid = 1
            cam.distance, cam.elevation, cam.azimuth = 3.0, -15.0, 90.0
        frames = np.empty((len(qpos), height, width, 3), dtype=np.uint8)
        for i in range(len(qpos)):
            data.qpos[:] = qpos[i]
            data.qvel[:] = qvel[i]
            mujoco.mj_forward(model, data)
            renderer.update_scene(data, camera=cam)
            frames[i] = renderer.render()
        renderer.close()
        return frames
    finally:
        env.close()


def render_states_isolated(
    env_id: str, qpos: np.ndarray, qvel: np.ndarray, *, width: int = 96, height: int = 96,
    backends: tuple[str, ...] = ("egl", "osmesa"), timeout: float = 300.0,
) -> tuple[np.ndarray, str]:
    """:func:`render_states` in a child process per GL backend until one works: ``(frames, backend)``.

    Raises ``RuntimeError`` with every backend's error when none works.
    """
    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        np.savez(src, env_id=np.array(env_id), qpos=qpos, qvel=qvel, size=np.array([width, height]))
        for backend in backends:
            env = {**os.environ, "MUJOCO_GL": backend}
            if backend == "osmesa":
                env["PYOPENGL_PLATFORM"] = "osmesa"
            try:
                proc = subprocess.run(
                    [sys.executable, "-m", "mmalign.robotics.render", str(src), str(dst)],
                    env=env, capture_output=True, text=True, timeout=timeout,
                )
            except subprocess.TimeoutExpired:
                errors.append(f"{backend}: timed out after {timeout:.0f} s")
                continue
            if proc.returncode == 0 and dst.exists():
                with np.load(dst) as out:
                    return out["frames"], backend
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            errors.append(f"{backend}: exit {proc.returncode}: {tail[0]}")
    raise RuntimeError("offscreen rendering failed with every backend: " + "; ".join(errors))


def side_by_side(left: np.ndarray, right: np.ndarray, gap: int = 4) -> np.ndarray:
    """Two equally long clips ``[T, h, w, 3]`` next to each other with a white gap (a query as the labeller sees it)."""
    if left.shape != right.shape:
        raise ValueError(f"left and right clips must have the same shape, got {left.shape} and {right.shape}")
    pad = np.full((*left.shape[:2], gap, 3), 255, dtype=np.uint8)
    return np.concatenate([left, pad, right], axis=2)


def save_video(frames: np.ndarray, path: str | Path, fps: int = 20) -> Path:
    """Write ``uint8 [T, h, w, 3]`` frames as GIF (pillow) or MP4 (needs imageio-ffmpeg), by the file suffix."""
    import imageio.v3 as iio

    path = Path(path)
    if path.suffix.lower() == ".gif":
        iio.imwrite(path, list(frames), extension=".gif", duration=1000.0 / fps, loop=0)
    elif path.suffix.lower() == ".mp4":
        iio.imwrite(path, frames, extension=".mp4", fps=fps)
    else:
        raise ValueError(f"path must end in .gif or .mp4, got {path.name!r}")
    return path


def frame_strip(frames: np.ndarray, num: int = 8, gap: int = 2) -> np.ndarray:
    """``num`` evenly spaced frames of a clip in one row: ``uint8 [h, num*w + gaps, 3]``."""
    idx = np.linspace(0, len(frames) - 1, num=min(num, len(frames))).round().astype(int)
    tiles = []
    for k, i in enumerate(idx):
        tiles.append(frames[i])
        if k < len(idx) - 1:
            tiles.append(np.full((frames.shape[1], gap, 3), 255, dtype=np.uint8))
    return np.concatenate(tiles, axis=1)


def _main(argv: list[str]) -> int:
    with np.load(argv[0]) as src:
        width, height = (int(v) for v in src["size"])
        frames = render_states(str(src["env_id"]), src["qpos"], src["qvel"], width=width, height=height)
    np.savez(argv[1], frames=frames)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
