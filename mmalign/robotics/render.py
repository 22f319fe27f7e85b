"""Offscreen MuJoCo rendering of segments to frames, GIF/MP4 and frame strips.

Rendering restores each recorded ``(qpos, qvel)`` into a fresh ``MjData`` and draws it with ``mujoco.Renderer``
with shadows, reflections and skybox off (software GL renders ~10x faster without them). The GL backend is fixed
when ``mujoco`` is imported, so :func:`render_states_isolated` renders in a child process, trying ``MUJOCO_GL=egl``
and then ``osmesa``; a crash of the GL stack therefore cannot take the experiment down.

Any gymnasium MuJoCo task renders from states recorded while collecting (``collect_episodes(record_state=True)``
keeps ``env.unwrapped.data.qpos``/``qvel`` per step); :func:`states_from_obs` recovers the states from the
observations alone for the tasks whose observation is known to be ``qpos[k:] ++ qvel`` (:data:`OBS_STATE_TASKS`) and
for Reacher, and refuses every other task with an error that says what to record instead.

Run as a module (used by the child process): ``python -m mmalign.robotics.render IN.npz OUT.npz``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

__all__ = [
    "OBS_STATE_TASKS",
    "mujoco_sizes",
    "states_from_obs",
    "segment_states",
    "check_obs_renderable",
    "render_states",
    "render_states_isolated",
    "save_video",
    "frame_strip",
    "side_by_side",
]

# Gymnasium tasks whose observation is exactly ``qpos[k:] ++ qvel`` (k = 0..2 root coordinates left out). A task is
# listed by name rather than guessed from its sizes: an observation of the same length with another layout (Pusher:
# arm qpos, arm qvel, body positions) would be drawn as a wrong pose without any error.
OBS_STATE_TASKS = ("HalfCheetah", "Hopper", "Walker2d", "Swimmer", "InvertedPendulum")

# Fixed views where the default gymnasium camera tracks a body and shows little.
_CAMERAS: dict[str, dict[str, Any]] = {
    "Reacher": {"distance": 0.6, "elevation": -90.0, "azimuth": 90.0},
    "Pusher": {"distance": 2.2, "elevation": -70.0, "azimuth": 180.0, "lookat": (0.2, -0.3, -0.2)},
    "InvertedPendulum": {"distance": 2.5, "elevation": -10.0, "azimuth": 90.0},
    "InvertedDoublePendulum": {"distance": 3.5, "elevation": -10.0, "azimuth": 90.0},
}


def _family(env_id: str) -> str:
    """``"HalfCheetah"`` of ``"HalfCheetah-v5"`` or ``"gymnasium_robotics:HalfCheetah-v5"``."""
    return env_id.rsplit(":", 1)[-1].rsplit("/", 1)[-1].split("-")[0]


def mujoco_sizes(env_id: str) -> tuple[int, int, int]:
    """``(nq, nv, obs_dim)`` of a gymnasium MuJoCo env; ``ValueError`` for an env that cannot be made or has no MuJoCo
    model (it cannot be rendered from states: give frames instead)."""
    import gymnasium

    try:
        env = gymnasium.make(env_id)
    except Exception as err:  # unknown id, missing dependency: one line naming the env
        raise ValueError(f"env {env_id!r} cannot be made to render clips: {err}") from None
    try:
        model = getattr(env.unwrapped, "model", None)
        if model is None or not hasattr(model, "nq"):
            raise ValueError(f"env {env_id!r} is not a MuJoCo env (no env.unwrapped.model), so its segments cannot be "
                             f"rendered from simulator states: give rendered frames (frames_first / frames_second)")
        return int(model.nq), int(model.nv), int(np.prod(env.observation_space.shape or ()))
    finally:
        env.close()


def states_from_obs(env_id: str, obs: np.ndarray, nq: int, nv: int) -> tuple[np.ndarray, np.ndarray]:
    """``(qpos [T, nq], qvel [T, nv])`` from gymnasium observations ``[T, obs_dim]``, for the tasks of
    :data:`OBS_STATE_TASKS` (the excluded root position is set to 0, which their tracking camera does not show) and
    Reacher. Any other task raises ``ValueError``: record the states while collecting instead. (Hopper and Walker2d
    observe ``qvel`` clipped to ±10; a drawing depends on ``qpos`` only.)"""
    obs = np.asarray(obs, dtype=np.float64)
    if obs.ndim != 2:
        raise ValueError(f"observations must be [steps, obs_dim], got shape {obs.shape}")
    t, d = obs.shape
    family = _family(env_id)
    if family == "Reacher" and nq == nv == 4 and d in (10, 11):
        # obs = cos q0, cos q1, sin q0, sin q1, target xy, qvel[:2], fingertip - target (3 in v4, 2 in v5)
        qpos = np.zeros((t, nq))
        qpos[:, 0] = np.arctan2(obs[:, 2], obs[:, 0])
        qpos[:, 1] = np.arctan2(obs[:, 3], obs[:, 1])
        qpos[:, 2:4] = obs[:, 4:6]
        qvel = np.zeros((t, nv))
        qvel[:, :2] = obs[:, 6:8]
        return qpos, qvel
    skipped = nq + nv - d
    if family in OBS_STATE_TASKS and 0 <= skipped <= 2:
        qpos = np.zeros((t, nq))
        qpos[:, skipped:] = obs[:, : nq - skipped]
        return qpos, obs[:, nq - skipped:].copy()
    raise ValueError(f"cannot recover the MuJoCo state of {env_id} from its {d}-dimensional observations (nq={nq}, "
                     f"nv={nv}; only Reacher and {', '.join(OBS_STATE_TASKS)} observe qpos/qvel): record the state "
                     f"while collecting (collect_episodes(record_state=True); columns qpos_first/qvel_first/"
                     f"qpos_second/qvel_second) or give rendered frames (frames_first / frames_second)")


def segment_states(env_id: str, segment: Mapping[str, Any], nq: int, nv: int,
                   where: str = "segment") -> tuple[np.ndarray, np.ndarray]:
    """The ``(qpos, qvel)`` to draw one segment: its recorded ``qpos``/``qvel`` when present (checked against the
    model's sizes and the observations' length), else recovered by :func:`states_from_obs` from ``obs``."""
    qpos, qvel, obs = segment.get("qpos"), segment.get("qvel"), segment.get("obs")
    if qpos is None and qvel is None:
        if obs is None:
            raise ValueError(f"{where}: needs recorded qpos/qvel or observations to render")
        try:
            return states_from_obs(env_id, np.asarray(obs), nq, nv)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
    if qpos is None or qvel is None:
        raise ValueError(f"{where}: qpos and qvel are recorded together, got only {'qpos' if qvel is None else 'qvel'}")
    try:
        qpos, qvel = np.asarray(qpos, dtype=np.float64), np.asarray(qvel, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: qpos/qvel must be numeric [steps, nq] / [steps, nv] arrays") from None
    for name, arr, width in (("qpos", qpos, nq), ("qvel", qvel, nv)):
        if arr.ndim != 2 or arr.shape[1] != width or len(arr) == 0:
            raise ValueError(f"{where}: {name} must be [steps, {width}] for {env_id} ({name[1:]}={width}), got shape "
                             f"{arr.shape}")
        if not np.isfinite(arr).all():
            raise ValueError(f"{where}: {name} holds NaN or inf")
    steps = {"qpos": len(qpos), "qvel": len(qvel)}
    if obs is not None:
        steps["obs"] = len(np.asarray(obs))
    if len(set(steps.values())) > 1:
        raise ValueError(f"{where}: qpos, qvel and the observations must have one row per step, got {steps}")
    return qpos, qvel


def check_obs_renderable(env_id: str) -> None:
    """Raise ``ValueError`` unless segments of ``env_id`` can be drawn from their observations alone (what a run that
    sends only observations, e.g. the ``human`` teacher, needs)."""
    nq, nv, obs_dim = mujoco_sizes(env_id)
    states_from_obs(env_id, np.zeros((1, obs_dim)), nq, nv)


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
            if "lookat" in view:
                cam.lookat[:] = view["lookat"]
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
