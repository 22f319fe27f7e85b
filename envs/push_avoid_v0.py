"""PushAvoid-v0: push a puck into a goal zone while the effector keeps out of a forbidden zone (planar MuJoCo).

The visuomotor reward-learning testbed of RAPL/PEARL in mmalign (X-MAGICAL "avoiding"-style). Two embodiments do the
same job (``embodiment="point"``: a sphere on two velocity-controlled slide joints; ``"arm"``: a 2-link
velocity-controlled planar arm whose end-effector sphere pushes) and two related task layouts
(``layout="up"``: goal above the start; ``"right"``: the scene rotated by -90 degrees with larger zones), so that
preferences can be transferred across tasks and rewards across bodies.

Rewards: the returned ``reward`` is the hand-written task reward ``-||puck - goal||`` (what an engineer writes);
the user's true preference also penalises every step the effector spends in the forbidden zone, which the
hand-written reward misses. The true reward is reported only in ``info["true_reward"]`` (for simulated humans and
evaluation). Observations: ``obs_mode="state"`` (float32 vector, for fast policy learning) or ``"pixels"``
(``(size, size, 3)`` uint8 top-down frames); ``render()`` always returns the pixel frame. Rendering uses
``mujoco.Renderer`` with shadows, reflections and skybox off (set ``MUJOCO_GL=egl`` for headless use).

Change without a version bump (pre-1.0): ``step`` now recomputes kinematics after ``mj_step``, so the effector
position and velocity in the observation, the forbidden-zone test of ``true_reward`` and the rendered frame all
belong to the current state; before, they were one physics substep old while the puck was current (up to ~1 cm of
effector lag). The dynamics are unchanged; observations, ``info["in_forbidden"]``/``true_reward`` and frames
recorded before the change can differ slightly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import mujoco
import numpy as np
from gymnasium import spaces

ASSETS = Path(__file__).resolve().parent / "assets"
EFFECTOR_RADIUS = 0.04
PUCK_RADIUS = 0.05
ARM_LINKS = (0.45, 0.4)


@dataclass(frozen=True)
class Layout:
    """Positions (metres, table frame) of one task variant."""

    effector_start: tuple[float, float]
    puck_start: tuple[float, float]
    goal: tuple[float, float]
    goal_radius: float
    forbidden: tuple[float, float]
    forbidden_radius: float
    arm_base: tuple[float, float]


def _rot(p: tuple[float, float]) -> tuple[float, float]:
    return (p[1], -p[0])  # rotation by -90 degrees


_UP = Layout((0.0, -0.4), (0.0, -0.1), (0.0, 0.3), 0.1, (0.09, 0.0), 0.1, (0.0, -0.6))
LAYOUTS: dict[str, Layout] = {
    "up": _UP,
    "right": Layout(
        _rot(_UP.effector_start), _rot(_UP.puck_start), _rot(_UP.goal), 0.11,
        _rot(_UP.forbidden), 0.11, _rot(_UP.arm_base),
    ),
}


def _preload_triton() -> None:
    """Import torch's compiler stack (which imports triton) before the first EGL context of the process.

    On the development machine, importing triton *after* an EGL context existed segfaulted the process (it happens
    lazily, e.g. on the first ``torch.optim.Adam`` or ``import torchvision``), which killed reward-learning runs
    that render first and train later. Importing it first avoids that; without torch this is a no-op.
    """
    try:
        import torch._dynamo  # noqa: F401
    except ImportError:
        pass


class PushAvoidEnv(gym.Env):
    """Planar push-into-goal, keep-out-of-forbidden-zone task with a point or arm embodiment (see module doc)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(
        self,
        embodiment: str = "point",
        layout: str = "up",
        obs_mode: str = "state",
        image_size: int = 64,
        episode_steps: int = 30,
        frame_skip: int = 5,
        forbidden_penalty: float = 0.5,
        render_mode: str | None = None,
    ) -> None:
        if embodiment not in ("point", "arm"):
            raise ValueError(f"embodiment must be one of ['point', 'arm'], got {embodiment!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
        if obs_mode not in ("state", "pixels"):
            raise ValueError(f"obs_mode must be one of ['state', 'pixels'], got {obs_mode!r}")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        for name, value in (("image_size", image_size), ("episode_steps", episode_steps), ("frame_skip", frame_skip)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if forbidden_penalty < 0:
            raise ValueError(f"forbidden_penalty must be >= 0, got {forbidden_penalty!r}")
        self.embodiment, self.layout_name, self.obs_mode = embodiment, layout, obs_mode
        self.layout = LAYOUTS[layout]
        self.image_size, self.episode_steps, self.frame_skip = image_size, episode_steps, frame_skip
        self.forbidden_penalty = float(forbidden_penalty)
        self.render_mode = render_mode

        self.model = mujoco.MjModel.from_xml_path(str(ASSETS / f"push_avoid_{embodiment}.xml"))
        self.data = mujoco.MjData(self.model)
        m = self.model
        gid = lambda name: mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_GEOM, name)  # noqa: E731
        m.geom_pos[gid("goal_zone"), :2] = self.layout.goal
        m.geom_size[gid("goal_zone"), 0] = self.layout.goal_radius
        m.geom_pos[gid("forbidden_zone"), :2] = self.layout.forbidden
        m.geom_size[gid("forbidden_zone"), 0] = self.layout.forbidden_radius
        self._effector_geom = gid("effector")
        self._puck_qpos = m.jnt_qposadr[mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_JOINT, "puck_x")]
        if embodiment == "arm":
            m.body_pos[mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_BODY, "arm_base"), :2] = self.layout.arm_base
        self._max_ctrl = float(m.actuator_ctrlrange[0, 1])
        # the XML's offscreen framebuffer is 256 px; mujoco.Renderer refuses larger frames
        m.vis.global_.offwidth = max(int(m.vis.global_.offwidth), image_size)
        m.vis.global_.offheight = max(int(m.vis.global_.offheight), image_size)
        self._renderer: Any = None
        self._step = 0
        # one env step lasts frame_skip physics steps: frames (videos, human rendering) play at that rate
        self.metadata = {**self.metadata, "render_fps": int(round(1.0 / (m.opt.timestep * frame_skip)))}

        self.action_space = spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        if obs_mode == "pixels":
            self.observation_space = spaces.Box(0, 255, shape=(image_size, image_size, 3), dtype=np.uint8)
        else:
            dim = 12 + (4 if embodiment == "arm" else 0)
            self.observation_space = spaces.Box(-np.inf, np.inf, shape=(dim,), dtype=np.float32)

    # ---------------------------------------------------------------- kinematics
    def _arm_ik(self, target: np.ndarray) -> np.ndarray:
        """Joint angles putting the effector at ``target`` (elbow-left solution)."""
        l1, l2 = ARM_LINKS
        d = target - np.asarray(self.layout.arm_base)
        r2 = float(np.clip(d @ d, (l1 - l2) ** 2 + 1e-6, (l1 + l2) ** 2 - 1e-6))
        c2 = (r2 - l1**2 - l2**2) / (2 * l1 * l2)
        q2 = math.acos(float(np.clip(c2, -1.0, 1.0)))
        q1 = math.atan2(d[1], d[0]) - math.atan2(l2 * math.sin(q2), l1 + l2 * math.cos(q2))
        return np.array([q1, q2])

    def effector_jacobian(self) -> np.ndarray:
        """(2, 2) map from actuated joint velocities to the effector's planar velocity."""
        jacp = np.zeros((3, self.model.nv))
        mujoco.mj_jacGeom(self.model, self.data, jacp, None, self._effector_geom)
        return jacp[:2, :2].copy()

    def effector_velocity_to_action(self, velocity: np.ndarray) -> np.ndarray:
        """Action (in [-1, 1]^2) that moves the effector with planar ``velocity`` (m/s); for scripted behaviour."""
        jac = self.effector_jacobian()
        # Damped least squares keeps the arm's action bounded near its singular (stretched) pose.
        qdot = jac.T @ np.linalg.solve(jac @ jac.T + 1e-3 * np.eye(2), np.asarray(velocity, dtype=float))
        return np.clip(qdot / self._max_ctrl, -1.0, 1.0).astype(np.float32)

    # ---------------------------------------------------------------- state
    @property
    def effector_pos(self) -> np.ndarray:
        return self.data.geom_xpos[self._effector_geom, :2].copy()

    @property
    def puck_pos(self) -> np.ndarray:
        return self.data.qpos[self._puck_qpos : self._puck_qpos + 2].copy()

    def _effector_vel(self) -> np.ndarray:
        return self.effector_jacobian() @ self.data.qvel[:2]

    def _obs(self) -> np.ndarray:
        if self.obs_mode == "pixels":
            return self._render_frame()
        parts = [
            self.effector_pos, self._effector_vel(), self.puck_pos,
            self.data.qvel[self._puck_qpos : self._puck_qpos + 2], self.layout.goal, self.layout.forbidden,
        ]
        if self.embodiment == "arm":
            q = self.data.qpos[:2]
            parts.append(np.concatenate([np.cos(q), np.sin(q)]))
        return np.concatenate(parts).astype(np.float32)

    def _reward_terms(self) -> dict[str, float]:
        lay = self.layout
        goal_distance = float(np.linalg.norm(self.puck_pos - np.asarray(lay.goal)))
        in_forbidden = float(np.linalg.norm(self.effector_pos - np.asarray(lay.forbidden)) < lay.forbidden_radius)
        return {
            "goal_distance": goal_distance,
            "in_goal": float(goal_distance < lay.goal_radius),
            "in_forbidden": in_forbidden,
            "true_reward": -goal_distance - self.forbidden_penalty * in_forbidden,
            "task_reward": -goal_distance,
        }

    # ---------------------------------------------------------------- gym API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        mujoco.mj_resetData(self.model, self.data)
        lay = self.layout
        start = np.asarray(lay.effector_start) + self.np_random.uniform(-0.03, 0.03, size=2)
        if self.embodiment == "point":
            self.data.qpos[:2] = start
        else:
            self.data.qpos[:2] = self._arm_ik(start)
        self.data.qpos[self._puck_qpos : self._puck_qpos + 2] = np.asarray(lay.puck_start) + self.np_random.uniform(
            -0.03, 0.03, size=2
        )
        mujoco.mj_forward(self.model, self.data)
        self._step = 0
        return self._obs(), self._reward_terms()

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        action = np.asarray(action, dtype=np.float64).reshape(2)
        self.data.ctrl[:] = np.clip(action, -1.0, 1.0) * self._max_ctrl
        mujoco.mj_step(self.model, self.data, nstep=self.frame_skip)
        # mj_step leaves positions/Jacobians of the last substep's start: recompute them from the new qpos/qvel so
        # the observation, the forbidden-zone check and the rendered frame all see the current state
        mujoco.mj_forward(self.model, self.data)
        self._step += 1
        info = self._reward_terms()
        truncated = self._step >= self.episode_steps
        return self._obs(), info["task_reward"], False, truncated, info

    def _render_frame(self) -> np.ndarray:
        if self._renderer is None:
            _preload_triton()
            self._renderer = mujoco.Renderer(self.model, self.image_size, self.image_size)
            self._scene_option = mujoco.MjvOption()
            for flag in (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION,
                         mujoco.mjtRndFlag.mjRND_SKYBOX):
                self._renderer.scene.flags[flag] = False
        self._renderer.update_scene(self.data, camera="top", scene_option=self._scene_option)
        return self._renderer.render().copy()

    def render(self) -> np.ndarray | None:
        if self.render_mode != "rgb_array":
            return None
        return self._render_frame()

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
