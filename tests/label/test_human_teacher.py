"""The ``human`` teacher against a live app: a scripted labeller answers over HTTP; timeout and budget skip."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("sqlalchemy")
gymnasium = pytest.importorskip("gymnasium")

from label_helpers import LiveServer, make_app  # noqa: E402
from mmalign.label.store import choice_label, sqlite_url, swapped  # noqa: E402
from mmalign.registry import TEACHERS  # noqa: E402


def _reacher_segments(n: int, h: int = 6, seed: int = 0) -> np.ndarray:
    env = gymnasium.make("Reacher-v5")
    obs, _ = env.reset(seed=seed)
    env.action_space.seed(seed)
    out = []
    for _ in range(n * h):
        out.append(obs)
        obs, *_ = env.step(env.action_space.sample())
    env.close()
    return np.asarray(out, dtype=np.float32).reshape(n, h, -1)


def _labeller(store: Any, token: str, project: str, stop: threading.Event, choices: list[str]) -> None:
    lid = store.authenticate(token)[0]
    k = 0
    while not stop.is_set():
        try:
            q = store.lease(project, lid)
        except Exception:  # noqa: BLE001  (the project appears when the teacher first posts)
            q = None
        if q is None:
            time.sleep(0.05)
            continue
        store.submit(lid, f"scripted-{q.query_id:06d}", q.query_id, choices[k % len(choices)])
        k += 1


@pytest.fixture()
def app_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    app, store, admin, labeller = make_app(tmp_path, sqlite_url(tmp_path))
    monkeypatch.setenv("MMALIGN_LABEL_ADMIN_TOKEN", admin)
    with LiveServer(app) as live:
        yield live, store, labeller
    store.close()


def test_human_teacher_returns_the_labellers_answers(app_env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    live, store, labeller = app_env
    teacher = TEACHERS.get("human")(url=live.url, project="run", env_id="Reacher-v5", poll_seconds=0.1, timeout=120)
    assert not teacher.needs_true_reward
    obs = _reacher_segments(6)
    rewards = np.zeros((3, 6), dtype=np.float32)
    stop = threading.Event()
    worker = threading.Thread(target=_labeller, args=(store, labeller, "run", stop, ["left", "right", "equal"]))
    worker.start()
    try:
        act = np.zeros((3, 6, 2), dtype=np.float32)
        out = teacher(rewards, rewards, obs_first=obs[:3], obs_second=obs[3:], act_first=act, act_second=act)
    finally:
        stop.set()
        worker.join()
    stored = store.answers("run")
    assert len(stored) == 3 and out.answered.all()
    expected = {a["query_id"]: choice_label(a["choice"], swapped(a["query_id"], a["labeller_id"])) for a in stored}
    assert out.labels.tolist() == [expected[q] for q in sorted(expected)]
    assert out.metrics["teacher/timed_out"] == 0 and out.metrics["teacher/num_answered"] == 3
    # each posted pair became a playable clip pair, and the run's project exports as segment preference data
    (_, _, payload, row, _, _) = next(store.queries("run"))
    assert payload["left"]["video"].endswith(".webm") and len(row["obs_first"]) == 6
    from mmalign.data import load_preference_data, write_jsonl
    from mmalign.label.queries import export_rows

    rows, _ = export_rows("clip", store.queries("run"), stored, tmp_path / "media" / "run", tmp_path / "out")
    write_jsonl(tmp_path / "run.jsonl", rows)
    data = load_preference_data(tmp_path / "run.jsonl", "segment")
    assert sorted(data.labels()) == sorted(expected.values())


def test_unanswered_queries_time_out_as_skipped_and_leave_the_queue(app_env) -> None:  # type: ignore[no-untyped-def]
    live, store, labeller = app_env
    teacher = TEACHERS.get("human")(url=live.url, project="run", env_id="Reacher-v5", poll_seconds=0.1,
                                    timeout=0.3, max_queries=2)
    obs = _reacher_segments(6, seed=1)
    rewards = np.zeros((3, 6), dtype=np.float32)
    out = teacher(rewards, rewards, obs_first=obs[:3], obs_second=obs[3:])
    assert not out.answered.any() and np.isnan(out.labels.numpy()).all()
    assert out.metrics["teacher/timed_out"] == 2 and out.metrics["teacher/over_budget"] == 1
    assert store.counts("run")["cancelled"] == 2
    assert store.lease("run", store.authenticate(labeller)[0]) is None  # withdrawn: nobody is asked any more
    again = teacher(rewards, rewards, obs_first=obs[:3], obs_second=obs[3:])
    assert again.metrics["teacher/over_budget"] == 3  # the budget is spent


def test_human_teacher_checks_its_fields_and_the_token(monkeypatch: pytest.MonkeyPatch) -> None:
    human = TEACHERS.get("human")
    with pytest.raises(ValueError, match="env_id"):
        human(url="http://x")
    with pytest.raises(ValueError, match="url"):
        human(url="ftp://x", env_id="Reacher-v5")
    with pytest.raises(ValueError, match="timeout"):
        human(env_id="Reacher-v5", timeout=-1)
    monkeypatch.delenv("MMALIGN_LABEL_ADMIN_TOKEN", raising=False)
    r = np.zeros((1, 2), dtype=np.float32)
    with pytest.raises(RuntimeError, match="MMALIGN_LABEL_ADMIN_TOKEN"):
        human(env_id="Reacher-v5")(r, r, obs_first=np.zeros((1, 2, 11)), obs_second=np.zeros((1, 2, 11)))


def test_human_teacher_is_registered_with_the_core_teachers() -> None:
    import mmalign.registry as registry
    from mmalign.core.teachers import HumanTeacher

    assert TEACHERS.get("human") is HumanTeacher
    assert "mmalign.core.teachers.human" not in registry._PLUGIN_MODULES  # no plugin of its own


def test_pebble_run_asks_about_a_task_drawn_from_recorded_states(  # type: ignore[no-untyped-def]
        app_env, tmp_path: Path) -> None:
    """Pusher does not observe its full state: the run records qpos/qvel beside its buffer for the human teacher, and
    each posted pair carries the states of exactly the steps its observations come from."""
    from mmalign.cli import run_job

    live, store, labeller = app_env
    stop = threading.Event()
    worker = threading.Thread(target=_labeller, args=(store, labeller, "pusher-run", stop, ["left", "right", "equal"]))
    worker.start()
    try:
        overrides = ["env_id=Pusher-v5", "total_steps=120", "learning_starts=40", "first_feedback=60",
                     "feedback_every=40", "label_budget=4", "initial_labels=2", "labels_per_round=2", "rm_batch_size=2",
                     "rm_epochs=1", "eval_every=120", "eval_episodes=1", "batch_size=16", "segment_length=5",
                     "candidate_factor=1", "net_width=16", "rm_hidden=16", "save_reward_model=false", "teacher=human",
                     f"teacher.url={live.url}", "teacher.project=pusher-run", "teacher.env_id=Pusher-v5",
                     "teacher.poll_seconds=0.1", "teacher.timeout=120"]
        summary = run_job("robotics.pebble", None, overrides, str(tmp_path / "run"))
    finally:
        stop.set()
        worker.join()
    assert summary["labels/queries"] == 4 and summary["labels/answered"] == 4 and summary["labels/ties"] == 1
    rows = [row for _qid, _ext, _payload, row, _ref, _n in store.queries("pusher-run")]
    assert len(rows) == 4
    for row in rows:
        for side in ("first", "second"):
            obs, qpos, qvel = (np.asarray(row[f"{k}_{side}"]) for k in ("obs", "qpos", "qvel"))
            assert qpos.shape == (5, 11) and qvel.shape == (5, 11)
            # Pusher observes the arm's joint positions and velocities: the recorded states are those of each step
            np.testing.assert_allclose(obs[:, :7], qpos[:, :7], atol=1e-5)
            np.testing.assert_allclose(obs[:, 7:14], qvel[:, :7], atol=1e-4)
