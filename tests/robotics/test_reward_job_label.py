"""People's clip labels to a reward model, end to end on a real export file: Pusher segments collected with their
simulator states -> ``mmalign label push`` (clips drawn from the recorded states, or given as frames) -> a labeller
answers over the app's HTTP API -> ``mmalign label export`` -> ``mmalign robotics reward`` on that exact file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

gym = pytest.importorskip("gymnasium")
pytest.importorskip("mujoco")
pytest.importorskip("starlette")
pytest.importorskip("sqlalchemy")
pytest.importorskip("imageio_ffmpeg")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "label"))  # the labelling tests' helpers

from starlette.testclient import TestClient  # noqa: E402

import mmalign.envs  # noqa: E402,F401  (registers mmalign/LearnedReward-v0)
from label_helpers import auth, clip_frames, make_app  # noqa: E402
from mmalign.cli import main  # noqa: E402
from mmalign.data import load_preference_data, write_jsonl  # noqa: E402
from mmalign.label.store import sqlite_url, swapped  # noqa: E402
from mmalign.robotics.segments import collect_episodes, segments_from_episodes  # noqa: E402

ENV = "Pusher-v5"
PAIRS, FRAMED = 6, 1  # the first FRAMED pairs carry their clips as frames_*, the others only their states


def _pusher_pairs(folder: Path) -> Path:
    """Segments of 4 episodes with actions of growing size (returns differ), states recorded while collecting."""
    env = gym.make(ENV, max_episode_steps=40)
    rng = np.random.default_rng(0)
    episodes = []
    for k, scale in enumerate((0.1, 0.4, 0.7, 1.0)):
        episodes += collect_episodes(env, lambda _o, s=scale: s * rng.uniform(-2, 2, 7), 1, seed=k, record_state=True)
    env.close()
    segs = segments_from_episodes(episodes, 10)  # 16 segments, 12 in pairs
    order = np.random.default_rng(1).permutation(len(segs))
    rows = []
    for k in range(PAIRS):
        row = {}
        for side, i in (("first", order[2 * k]), ("second", order[2 * k + 1])):
            row.update({f"obs_{side}": segs.obs[i], f"act_{side}": segs.act[i], f"rewards_{side}": segs.true_rewards[i],
                        f"qpos_{side}": segs.qpos[i], f"qvel_{side}": segs.qvel[i]})
        rows.append(row)
    for k in range(FRAMED):  # these rows come with their clips as frames (shown as given) and without states
        for n, s in enumerate(("first", "second")):
            rows[k][f"frames_{s}"] = clip_frames(2 * k + n, t=10, size=32)
            del rows[k][f"qpos_{s}"], rows[k][f"qvel_{s}"]
    path = folder / "pusher_pairs.jsonl"
    write_jsonl(path, rows)
    return path


def test_clip_labels_from_the_app_train_a_reward_model(tmp_path: Path) -> None:
    data = _pusher_pairs(tmp_path)
    labels = tmp_path / "labels"
    assert main(["label", "push", "--output-dir", str(tmp_path / "run-push"), f"folder={labels}", "project=pusher",
                 f"data={data}", "kind=clip", f"env_id={ENV}", "fps=10"]) == 0
    app, store, admin, labeller = make_app(labels, sqlite_url(labels))
    lid = store.authenticate(labeller)[0]
    rows = {qid: row for qid, _ext, _payload, row, _ref, _n in store.queries("pusher")}
    expected: dict[str, float] = {}  # external id -> the label the export must hold
    with TestClient(app) as client:
        for k in range(PAIRS):
            q = client.get("/api/projects/pusher/next", headers=auth(labeller)).json()["query"]
            for side in ("left", "right"):  # the clips people watch are served
                assert client.get(f"/media/pusher/{q['payload'][side]['video']}",
                                  headers=auth(labeller)).status_code == 200
            row = rows[q["query_id"]]
            first_better = sum(row["rewards_first"]) > sum(row["rewards_second"])  # a labeller who sees progress
            if "frames_first" in row:  # queries are handed out in order: the framed pairs come first
                assert k < FRAMED
            if k == PAIRS - 1:
                choice = "skip"  # can't tell: not exported, not trained on
            elif k == FRAMED:
                choice = "equal"
            else:
                choice = "left" if first_better != swapped(q["query_id"], lid) else "right"
            r = client.post("/api/answers", headers=auth(labeller), json={
                "submission_id": f"pusher-{q['query_id']:06d}", "query_id": q["query_id"], "choice": choice,
                "comment": "the arm pushes" if k == 2 else ""})
            assert r.status_code == 200 and r.json()["stored"], r.text
            if choice != "skip":
                ext = next(e for qid, e, *_ in store.queries("pusher") if qid == q["query_id"])
                expected[ext] = 0.5 if choice == "equal" else float(first_better)
    store.close()

    out = tmp_path / "export" / "pusher.jsonl"
    assert main(["label", "export", "--output-dir", str(tmp_path / "run-export"), f"folder={labels}",
                 "project=pusher", f"output={out}"]) == 0
    exported = load_preference_data(out, "segment")
    assert {r["id"]: r["label"] for r in exported.rows} == expected  # every answer, as answered
    framed = [r for r in exported.rows if "frames_first" in r]
    assert len(framed) == FRAMED and all(np.shape(r["frames_first"]) == (10, 32, 32, 3) for r in framed)
    assert all(np.shape(r["qpos_first"]) == (10, 11) for r in exported.rows if "frames_first" not in r)

    run = tmp_path / "run-reward"
    assert main(["robotics", "reward", "--output-dir", str(run), f"data={out}", f"env_id={ENV}", "epochs=40",
                 "ensemble_size=2", "val_fraction=0", "seed=0"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data/rows"] == PAIRS - 1 and summary["data/ties"] == 1 and summary["data/dropped_rows"] == 0
    unused = set(summary["data/unused_columns"].split(","))
    assert {"rewards_first", "rewards_second", "id", "num_labels", "comments"} <= unused  # reported, not used
    assert {"qpos_first", "qvel_second", "frames_first", "frames_second"} <= unused
    assert summary["train/num_pairs"] == PAIRS - 1
    folder = run / "reward_model"
    meta = json.loads((folder / "config.json").read_text())["meta"]
    assert meta["obs_dim"] == 23 and meta["act_dim"] == 7 and meta["source"] == str(out)
    env = gym.make("mmalign/LearnedReward-v0", env_id=ENV, reward_model=str(folder))
    env.reset(seed=0)
    _, reward, *_ = env.step(env.action_space.sample())
    assert np.isfinite(reward)
    env.close()

    # per-step columns the model does not read must still belong to the row's segments
    raw = [json.loads(line) for line in out.read_text().splitlines()]
    stated = next(i for i, r in enumerate(raw) if "qpos_first" in r)
    raw[stated]["qpos_first"] = raw[stated]["qpos_first"][:7]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in raw))
    assert main(["robotics", "reward", "--output-dir", str(tmp_path / "run-bad"), f"data={bad}"]) == 2
    assert not (tmp_path / "run-bad").exists()
    from mmalign.robotics.reward_job import RewardJobConfig, validate

    with pytest.raises(ValueError, match=rf"row {stated} field 'qpos_first' has 7 steps, the observations 10"):
        validate(RewardJobConfig(data=str(bad)))
