"""Clips of any MuJoCo task: drawn from the simulator states recorded with a segment, or recovered from observations
for the tasks that observe ``qpos``/``qvel``; everything else is refused with what to record."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

gym = pytest.importorskip("gymnasium")
pytest.importorskip("mujoco")
pytest.importorskip("imageio_ffmpeg")

from mmalign.robotics.render import check_obs_renderable, mujoco_sizes, states_from_obs  # noqa: E402
from mmalign.robotics.segments import collect_episodes, segments_from_episodes  # noqa: E402


def _recorded(env_id: str, steps: int = 24, seed: int = 0, length: int = 8):  # type: ignore[no-untyped-def]
    """Random-action segments of ``env_id`` with the states recorded while collecting."""
    env = gym.make(env_id, max_episode_steps=steps)
    rng = np.random.default_rng(seed)
    low, high = env.action_space.low, env.action_space.high
    episodes = collect_episodes(env, lambda _o: rng.uniform(low, high), 1, seed, record_state=True)
    env.close()
    return segments_from_episodes(episodes, length)


@pytest.mark.parametrize("env_id", ["HalfCheetah-v5", "Hopper-v5", "Walker2d-v5", "Reacher-v5"])
def test_states_recovered_from_observations_match_the_recorded_ones(env_id: str) -> None:
    segs = _recorded(env_id)
    nq, nv, _ = mujoco_sizes(env_id)
    for obs, qpos, qvel in zip(segs.obs, segs.qpos, segs.qvel):
        got_qpos, got_qvel = states_from_obs(env_id, obs, nq, nv)
        if env_id.startswith("Reacher"):  # angles from cos/sin; the target's velocity is not observed (it is 0)
            np.testing.assert_allclose(np.cos(got_qpos[:, :2]), np.cos(qpos[:, :2]), atol=1e-5)
            np.testing.assert_allclose(np.sin(got_qpos[:, :2]), np.sin(qpos[:, :2]), atol=1e-5)
            np.testing.assert_allclose(got_qpos[:, 2:], qpos[:, 2:], atol=1e-5)
            np.testing.assert_allclose(got_qvel[:, :2], qvel[:, :2], atol=1e-5)
        else:  # the root x (not observed) is 0; everything else is the recorded state
            np.testing.assert_allclose(got_qpos[:, 1:], qpos[:, 1:], atol=1e-5)
            # Hopper and Walker2d observe velocities clipped to [-10, 10]; a drawing uses only the positions
            clipped = np.clip(qvel, -10, 10) if env_id.startswith(("Hopper", "Walker2d")) else qvel
            np.testing.assert_allclose(got_qvel, clipped, atol=1e-5)
            assert (got_qpos[:, 0] == 0).all()


def test_tasks_whose_state_is_not_observed_are_refused_with_what_to_record() -> None:
    with pytest.raises(ValueError, match=r"Pusher-v5 from its 23-dimensional.*qpos_first/qvel_first"):
        check_obs_renderable("Pusher-v5")
    with pytest.raises(ValueError, match=r"Ant-v5 .*record the state"):
        check_obs_renderable("Ant-v5")
    with pytest.raises(ValueError, match=r"'Pendulum-v1' is not a MuJoCo env.*frames_first"):
        check_obs_renderable("Pendulum-v1")
    with pytest.raises(ValueError, match=r"'NoSuchTask-v0' cannot be made"):
        mujoco_sizes("NoSuchTask-v0")


def test_clips_from_recorded_states_and_from_observations() -> None:
    """One render per task: HalfCheetah and Hopper drawn from observations equal the drawings of their recorded states
    (root x at 0), Pusher (state not observed) draws from its recorded states; the clips move."""
    from mmalign.label.media import render_clips

    for env_id in ("HalfCheetah-v5", "Hopper-v5"):
        segs = _recorded(env_id, seed=1)
        qpos = segs.qpos[0].copy()
        qpos[:, 0] = 0.0  # the unobserved root x, which the tracking camera does not show
        from_obs, from_states = render_clips(env_id, [{"obs": segs.obs[0]}, {"qpos": qpos, "qvel": segs.qvel[0]}],
                                             size=64)
        assert from_obs.shape == (8, 64, 64, 3)
        np.testing.assert_array_equal(from_obs, from_states)
        assert np.abs(np.diff(from_obs.astype(int), axis=0)).sum() > 0  # the body moves
    segs = _recorded("Pusher-v5", seed=2)
    first, second = render_clips("Pusher-v5", [{"qpos": segs.qpos[k], "qvel": segs.qvel[k], "obs": segs.obs[k]}
                                               for k in (0, 1)], size=64)
    assert first.shape == second.shape == (8, 64, 64, 3) and first.std() > 10  # the arm and table, not a blank view
    assert np.abs(np.diff(first.astype(int), axis=0)).sum() > 0 and not np.array_equal(first, second)


def _pair_rows(segs, n: int) -> list[dict]:  # type: ignore[no-untyped-def]
    return [{"obs_first": segs.obs[2 * k], "act_first": segs.act[2 * k], "qpos_first": segs.qpos[2 * k],
             "qvel_first": segs.qvel[2 * k], "obs_second": segs.obs[2 * k + 1], "act_second": segs.act[2 * k + 1],
             "qpos_second": segs.qpos[2 * k + 1], "qvel_second": segs.qvel[2 * k + 1]} for k in range(n)]


def test_push_refuses_bad_recorded_states_naming_the_row_before_writing(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from mmalign.cli import main
    from mmalign.data import write_jsonl

    rows = _pair_rows(_recorded("Pusher-v5", steps=32), 2)
    folder = tmp_path / "labels"
    cases = {
        "narrow": (dict(rows[1], qpos_second=rows[1]["qpos_second"][:, :9]),
                   r"row 1 \(second segment\): qpos must be \[steps, 11\]"),
        "short": (dict(rows[1], qvel_first=rows[1]["qvel_first"][:5]), r"row 1 \(first segment\): qpos, qvel and"),
        "half": ({k: v for k, v in rows[1].items() if k != "qvel_first"}, r"row 1 \(first segment\): .*only qpos"),
        "obs only": ({k: v for k, v in rows[1].items() if not k.startswith("q")}, r"row 1 \(first segment\).*Pusher"),
    }
    for name, (bad, message) in cases.items():
        data = tmp_path / f"{name.replace(' ', '_')}.jsonl"
        write_jsonl(data, [rows[0], bad])
        assert main(["label", "push", "--output-dir", str(tmp_path / f"run-{len(name)}"), f"folder={folder}",
                     "project=p", f"data={data}", "kind=clip", "env_id=Pusher-v5"]) == 2, name
        err = capsys.readouterr().err
        assert __import__("re").search(message, err), (name, err[-800:])
        assert not (folder / "labels.db").exists()  # refused before the database or a project exists


def test_app_renders_posted_states_and_refuses_unobserved_ones(tmp_path: Path) -> None:
    pytest.importorskip("starlette")
    pytest.importorskip("sqlalchemy")
    from starlette.testclient import TestClient

    from label_helpers import auth, make_app
    from mmalign.label.store import sqlite_url

    rows = json.loads(json.dumps(_pair_rows(_recorded("Pusher-v5", steps=16, seed=3), 1),
                                 default=lambda a: a.tolist()))
    app, store, admin, labeller = make_app(tmp_path, sqlite_url(tmp_path))
    with TestClient(app) as client:
        assert client.post("/api/projects", json={"name": "p", "kind": "clip"}, headers=auth(admin)).status_code == 200
        obs_only = {k: v for k, v in rows[0].items() if not k.startswith("q")}
        r = client.post("/api/projects/p/queries", headers=auth(admin),
                        json={"queries": [{"external_id": "a", "env_id": "Pusher-v5", "content": obs_only}]})
        assert r.status_code == 400 and "queries[0] (first segment)" in r.json()["error"]
        assert "qpos_first" in r.json()["error"] and store.counts("p")["queries"] == 0
        r = client.post("/api/projects/p/queries", headers=auth(admin),
                        json={"queries": [{"external_id": "b", "env_id": "Pusher-v5", "content": rows[0]}]})
        assert r.status_code == 200, r.text
        q = client.get("/api/projects/p/next", headers=auth(labeller)).json()["query"]
        for side in ("left", "right"):
            video = client.get(f"/media/p/{q['payload'][side]['video']}", headers=auth(labeller))
            assert video.status_code == 200 and video.content[:4] == b"\x1a\x45\xdf\xa3"  # a WebM (EBML) file
    store.close()


def test_a_run_checks_its_human_teachers_task_before_it_starts() -> None:
    """The core teacher knows no simulator: the robotics run checks what people will be shown, before any work."""
    from mmalign.config import load_config
    from mmalign.robotics.pebble import PebbleConfig, check_setup

    def setup(env_id: str, shown: str, *extra: str) -> None:
        check_setup(load_config(PebbleConfig, None, [f"env_id={env_id}", "teacher=human", f"teacher.env_id={shown}",
                                                     *extra]))

    with pytest.raises(ValueError, match=r"teacher.env_id: the HumanTeacher shows MuJoCo.*'Pendulum-v1' is not a MuJoCo"):
        setup("Pendulum-v1", "Pendulum-v1")
    with pytest.raises(ValueError, match=r"teacher.env_id='Reacher-v5' but the run trains on 'Pusher-v5'"):
        setup("Pusher-v5", "Reacher-v5")
    # the routing selector passes no simulator states: Pusher cannot be drawn from its observations
    with pytest.raises(ValueError, match=r"from observations \(this run passes no simulator states\).*Pusher-v5"):
        setup("Pusher-v5", "Pusher-v5", "selector=routing")
    setup("Pusher-v5", "Pusher-v5")  # states are recorded for the teacher: any MuJoCo task
    setup("HalfCheetah-v5", "HalfCheetah-v5", "selector=routing")  # drawn from its observations
