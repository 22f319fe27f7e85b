"""PushAvoid envs (RAPL/PEARL): check_env in both observation modes, reward invariants, embodiments, layouts."""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import mmalign.envs  # noqa: F401
from mmalign.envs.push_avoid_v0 import LAYOUTS, PushAvoidEnv

IDS = ["mmalign/PushAvoidPoint-v0", "mmalign/PushAvoidArm-v0", "mmalign/PushAvoidPointRight-v0",
       "mmalign/PushAvoidArmRight-v0"]


@pytest.mark.parametrize("env_id", IDS)
@pytest.mark.parametrize("obs_mode", ["state", "pixels"])
def test_check_env_both_modes(env_id: str, obs_mode: str) -> None:
    env = gym.make(env_id, obs_mode=obs_mode, image_size=32, render_mode="rgb_array")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            check_env(env.unwrapped, skip_render_check=False)
    finally:
        env.close()


def test_pixel_obs_is_the_rendered_frame_and_shows_the_scene() -> None:
    env = PushAvoidEnv(obs_mode="pixels", image_size=64, render_mode="rgb_array")
    obs, _ = env.reset(seed=0)
    assert obs.shape == (64, 64, 3) and obs.dtype == np.uint8
    assert np.array_equal(obs, env.render())
    # goal zone (green) and forbidden zone (red) are visible
    assert ((obs[..., 1] > 150) & (obs[..., 0] < 120)).sum() > 10
    assert ((obs[..., 0] > 180) & (obs[..., 1] < 100)).sum() > 10
    env.close()


@pytest.mark.parametrize("embodiment", ["point", "arm"])
def test_reward_invariants_truncation_and_determinism(embodiment: str) -> None:
    def rollout(seed: int) -> tuple[list[dict], list[np.ndarray]]:
        env = PushAvoidEnv(embodiment=embodiment, episode_steps=12)
        obs, _ = env.reset(seed=seed)
        rng = np.random.default_rng(0)
        infos, obs_list = [], [obs]
        for t in range(12):
            obs, reward, term, trunc, info = env.step(rng.uniform(-1, 1, size=2))
            assert not term and trunc == (t == 11)
            assert reward == info["task_reward"] == -info["goal_distance"]
            assert info["true_reward"] == pytest.approx(reward - env.forbidden_penalty * info["in_forbidden"])
            infos.append(info)
            obs_list.append(obs)
        return infos, obs_list

    a, b = rollout(3), rollout(3)
    assert all(np.array_equal(x, y) for x, y in zip(a[1], b[1]))
    assert not np.array_equal(a[1][0], rollout(4)[1][0])


@pytest.mark.parametrize("embodiment", ["point", "arm"])
def test_effector_follows_commanded_velocity_and_pushes_puck(embodiment: str) -> None:
    env = PushAvoidEnv(embodiment=embodiment, episode_steps=40)
    env.reset(seed=0)
    start_puck = env.puck_pos
    for _ in range(25):  # drive straight at the puck and through it toward the goal
        d = env.puck_pos - env.effector_pos
        env.step(env.effector_velocity_to_action(0.6 * d / np.linalg.norm(d)))
    assert env.puck_pos[1] > start_puck[1] + 0.1  # pushed up, toward the goal


@pytest.mark.parametrize("embodiment", ["point", "arm"])
def test_step_reports_the_state_after_the_step(embodiment: str) -> None:
    """Observation, forbidden-zone flag and render data come from the current qpos/qvel, not one substep before."""
    import mujoco

    env = PushAvoidEnv(embodiment=embodiment)
    env.reset(seed=0)
    fresh = mujoco.MjData(env.model)
    rng = np.random.default_rng(0)
    for _ in range(5):
        obs, _, _, _, info = env.step(rng.uniform(-1, 1, size=2))
        fresh.qpos[:], fresh.qvel[:] = env.data.qpos, env.data.qvel
        mujoco.mj_forward(env.model, fresh)
        effector = fresh.geom_xpos[env._effector_geom, :2]
        jac = np.zeros((3, env.model.nv))
        mujoco.mj_jacGeom(env.model, fresh, jac, None, env._effector_geom)
        np.testing.assert_allclose(obs[:2], effector, atol=1e-6)
        np.testing.assert_allclose(obs[2:4], jac[:2, :2] @ fresh.qvel[:2], atol=1e-5)
        np.testing.assert_allclose(obs[4:6], env.puck_pos, atol=1e-6)
        np.testing.assert_allclose(env.data.geom_xpos, fresh.geom_xpos, atol=1e-9)  # what render() draws
        inside = np.linalg.norm(effector - np.asarray(env.layout.forbidden)) < env.layout.forbidden_radius
        assert info["in_forbidden"] == float(inside)


def test_forbidden_zone_penalised_only_in_true_reward() -> None:
    env = PushAvoidEnv(embodiment="point", episode_steps=40)
    env.reset(seed=0)
    target = np.asarray(env.layout.forbidden)
    seen = False
    for _ in range(30):
        d = target - env.effector_pos
        _, reward, _, _, info = env.step(env.effector_velocity_to_action(2.0 * d))
        seen = seen or info["in_forbidden"] == 1.0
        if info["in_forbidden"]:
            assert info["true_reward"] == pytest.approx(reward - 0.5)
    assert seen


def test_right_layout_is_the_rotated_up_layout() -> None:
    up, right = LAYOUTS["up"], LAYOUTS["right"]
    for field in ("effector_start", "puck_start", "goal", "forbidden", "arm_base"):
        x, y = getattr(up, field)
        assert getattr(right, field) == (y, -x)
    env = PushAvoidEnv(layout="right", embodiment="arm")
    env.reset(seed=1)
    assert np.linalg.norm(env.effector_pos - np.asarray(right.effector_start)) < 0.05


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="embodiment"):
        PushAvoidEnv(embodiment="hand")
    with pytest.raises(ValueError, match="layout"):
        PushAvoidEnv(layout="left")
    with pytest.raises(ValueError, match="obs_mode"):
        PushAvoidEnv(obs_mode="rgbd")
    with pytest.raises(ValueError, match="image_size"):
        PushAvoidEnv(image_size=0)


def test_pixel_frames_larger_than_the_xml_framebuffer() -> None:
    """The assets declare a 256 px offscreen buffer; a larger image_size raises it instead of failing in reset."""
    env = PushAvoidEnv(obs_mode="pixels", image_size=320, render_mode="rgb_array")
    obs, _ = env.reset(seed=0)
    assert obs.shape == (320, 320, 3) and env.render().shape == (320, 320, 3)
    env.close()


def test_render_fps_follows_frame_skip() -> None:
    assert PushAvoidEnv().metadata["render_fps"] == 20 == PushAvoidEnv.metadata["render_fps"]  # 5 x 0.01 s
    assert PushAvoidEnv(frame_skip=10).metadata["render_fps"] == 10
