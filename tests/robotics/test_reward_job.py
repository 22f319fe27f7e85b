"""``mmalign robotics reward``: segment preference file -> reward folder -> LearnedReward-v0; bad inputs refused."""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import mmalign.envs  # noqa: F401  (registers mmalign/LearnedReward-v0)
from mmalign.cli import main
from mmalign.core.reward_models import RewardEnsemble
from mmalign.core.teachers import bpref_teacher
from mmalign.data import write_jsonl
from mmalign.robotics.reward_job import RewardJobConfig, validate
from mmalign.robotics.segments import collect_episodes, random_pairs, segments_from_episodes

LENGTH = 10


def _pendulum_segments(seed: int, episodes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random-action Pendulum-v1 segments: ``obs [N, H, 3]``, ``act [N, H, 1]``, true rewards ``[N, H]``.

    Pendulum's reward is a fixed function of the state and action (no per-episode target as in Reacher), so a few
    hundred labelled pairs generalise to unseen episodes."""
    env = gym.make("Pendulum-v1")
    rng = np.random.default_rng(seed)
    eps = collect_episodes(env, lambda _obs: rng.uniform(-2, 2, 1), episodes, seed)
    env.close()
    seg = segments_from_episodes(eps, LENGTH)
    return seg.obs, seg.act, seg.true_rewards


def _pair_rows(obs: np.ndarray, act: np.ndarray, rew: np.ndarray, num: int, seed: int) -> list[dict]:
    """Pairs labelled by the true return through the core B-Pref oracle (1 / 0 / 0.5 for equal returns)."""
    first, second = random_pairs(len(obs), num, np.random.default_rng(seed))
    labels = bpref_teacher("oracle")(rew[first], rew[second]).labels.numpy()
    return [{"obs_first": obs[i], "act_first": act[i], "obs_second": obs[j], "act_second": act[j],
             "label": float(y)} for i, j, y in zip(first, second, labels)]


@pytest.fixture(scope="module")
def pendulum_data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("reward_job")
    obs, act, rew = _pendulum_segments(seed=0, episodes=4)  # 4 x 200 steps -> 80 segments
    rows = _pair_rows(obs, act, rew, 300, seed=1)
    rows.append(dict(rows[0], label=0.5))  # a tie: a soft target
    path = folder / "pairs.jsonl"
    write_jsonl(path, rows)
    return {"path": path, "folder": folder, "held_out": _pendulum_segments(seed=1000, episodes=3)}


def test_reward_job_end_to_end(pendulum_data: dict, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(["robotics", "reward", "--output-dir", str(run), f"data={pendulum_data['path']}",
                 "env_id=Pendulum-v1", "epochs=30", "ensemble_size=2", "seed=0"]) == 0
    folder = run / "reward_model"
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    meta = json.loads((folder / "config.json").read_text())["meta"]
    assert meta["env_id"] == "Pendulum-v1" and meta["obs_dim"] == 3 and meta["act_dim"] == 1
    model = RewardEnsemble.from_pretrained(folder)
    extras = model.pretrained_extras
    obs, act, rew = pendulum_data["held_out"]  # segments of unseen episodes
    norm = (torch.as_tensor(obs) - extras["obs_mean"]) / extras["obs_std"]
    with torch.no_grad():
        pred = model.segment_returns(norm, torch.as_tensor(act)).mean(0).numpy()
    true = rew.sum(1)
    i, j = np.triu_indices(len(true), 1)
    keep = true[i] != true[j]
    accuracy = float(((pred[i] > pred[j]) == (true[i] > true[j]))[keep].mean())
    assert accuracy > 0.7, accuracy
    summary = json.loads((run / "summary.json").read_text())  # the job's own seeded held-out split
    assert summary["eval/pref_accuracy"] > 0.7 and summary["train/num_val_pairs"] == 60
    assert summary["data/ties"] == 1 and summary["data/dropped_rows"] == 0
    env = gym.make("mmalign/LearnedReward-v0", env_id="Pendulum-v1", reward_model=str(folder))
    env.reset(seed=0)
    for _ in range(5):
        _, r, _, _, info = env.step(env.action_space.sample())
        assert np.isfinite(r) and "true_reward" in info
    env.close()


def _cfg(path: Path, **kw: object) -> RewardJobConfig:
    return RewardJobConfig(data=str(path), **kw)  # type: ignore[arg-type]


def test_bad_inputs_are_refused_naming_the_field(pendulum_data: dict, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        validate(_cfg(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match="data is required"):
        validate(RewardJobConfig())
    text = tmp_path / "text.jsonl"  # a text preference file is not segment data
    write_jsonl(text, [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 3)
    with pytest.raises(ValueError, match="obs_first"):
        validate(_cfg(text))
    with pytest.raises(ValueError, match="3 observation and 1 action.*'CartPole-v1' has 4 and 2"):  # another env
        validate(_cfg(pendulum_data["path"], env_id="CartPole-v1"))
    with pytest.raises(ValueError, match="env_id 'NoSuchEnv-v0' cannot be made"):
        validate(_cfg(pendulum_data["path"], env_id="NoSuchEnv-v0"))
    rows = [json.loads(line) for line in pendulum_data["path"].read_text().splitlines()[:3]]
    one = tmp_path / "one.jsonl"
    write_jsonl(one, rows[:1])
    with pytest.raises(ValueError, match="at least 2 usable"):
        validate(_cfg(one))
    ragged = tmp_path / "ragged.jsonl"  # row 1: 5 observation features where row 0 has 3
    write_jsonl(ragged, [rows[0], dict(rows[1], obs_second=np.zeros((LENGTH, 5)))])
    with pytest.raises(ValueError, match=r"row 1 field 'obs_second' has 5 features"):
        validate(_cfg(ragged))
    with pytest.raises(ValueError, match="--resume"):
        validate(_cfg(pendulum_data["path"]), resume=True)
    unlabelled = tmp_path / "unlabelled.jsonl"  # first/second are not chosen/rejected: no label is no label
    write_jsonl(unlabelled, [rows[0], {k: v for k, v in rows[1].items() if k != "label"}, rows[2]])
    with pytest.raises(ValueError, match=r"rows \[1\] have no label"):
        validate(_cfg(unlabelled))
    # through the CLI: refused before any run folder is made
    assert main(["robotics", "reward", "--output-dir", str(tmp_path / "r"), f"data={one}"]) == 2
    assert not (tmp_path / "r").exists()


def test_skipped_rows_left_out_and_counted_ragged_lengths_masked(pendulum_data: dict, tmp_path: Path) -> None:
    rows = [json.loads(line) for line in pendulum_data["path"].read_text().splitlines()[:6]]
    rows[2]["label"] = float("nan")  # a skipped query
    rows[3]["obs_first"], rows[3]["act_first"] = rows[3]["obs_first"][:4], rows[3]["act_first"][:4]  # padded, masked
    path = tmp_path / "skips.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="NaN"):
        validate(_cfg(path))
    cfg = ["robotics", "reward", "--output-dir", str(tmp_path / "run"), f"data={path}", "skip_invalid=true",
           "epochs=2", "val_fraction=0"]
    assert main(cfg) == 0
    assert json.loads((tmp_path / "run" / "reward_model" / "config.json").read_text())["meta"]["pairs"] == 5
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["data/dropped_rows"] == 1
