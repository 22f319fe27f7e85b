"""SB3 policies without pickle: safetensors round trip, safe reading of SB3 zips, pickled entries refused."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from _pickle_payload import sb3_zip_bytes

from mmalign.robotics.sb3_io import check_policy_file, load_sb3_any, load_sb3_policy, read_sb3_zip, save_sb3_policy

ENV = "Pendulum-v1"


@pytest.fixture(scope="module")
def sac():
    import gymnasium
    from stable_baselines3 import SAC

    return SAC("MlpPolicy", gymnasium.make(ENV), seed=0, policy_kwargs=dict(net_arch=[16, 16]), device="cpu",
               buffer_size=100, learning_starts=0)


def _same_policy(a, b) -> None:
    sa, sb = a.policy.state_dict(), b.policy.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    obs = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    assert np.array_equal(a.predict(obs, deterministic=True)[0], b.predict(obs, deterministic=True)[0])


def test_safetensors_round_trip_rebuilds_the_same_policy(sac, tmp_path: Path) -> None:
    path = save_sb3_policy(sac, tmp_path / "p.safetensors", ENV)
    assert check_policy_file(path)["policy_kwargs"]["net_arch"] == [16, 16]
    _same_policy(sac, load_sb3_policy(path, env_id=ENV, algo="SAC"))
    with pytest.raises(ValueError, match="trained on 'Pendulum-v1', not 'MountainCarContinuous-v0'"):
        load_sb3_policy(path, env_id="MountainCarContinuous-v0")


def test_an_sb3_zip_is_read_without_unpickling(sac, tmp_path: Path) -> None:
    sac.save(tmp_path / "model.zip")
    _same_policy(sac, read_sb3_zip(tmp_path / "model.zip", env_id=ENV, algo="SAC"))


@pytest.mark.parametrize("bad, message", [
    (b"", "not a readable safetensors policy"),
    (b"\x00" * 64, "not a readable safetensors policy"),
])
def test_broken_policy_files_are_refused(tmp_path: Path, bad: bytes, message: str) -> None:
    (tmp_path / "p.safetensors").write_bytes(bad)
    with pytest.raises(ValueError, match=message):
        load_sb3_policy(tmp_path / "p.safetensors")


def test_a_pickled_sb3_zip_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    # the payload is live: unpickling it the way SB3's loader would creates the marker
    from _pickle_payload import payload_bytes

    pickle.loads(payload_bytes(tmp_path / "live"))
    assert (tmp_path / "live").exists()
    (tmp_path / "evil.zip").write_bytes(sb3_zip_bytes(marker))
    with pytest.raises(ValueError, match="policy.pth holds pickled objects"):
        load_sb3_any(tmp_path / "evil.zip", env_id=ENV, algo="SAC")
    assert not marker.exists()


def test_allow_pickle_uses_sb3_with_a_warning(sac, tmp_path: Path) -> None:
    sac.save(tmp_path / "model.zip")
    with pytest.warns(UserWarning, match="unpickles the file"):
        _same_policy(sac, load_sb3_any(tmp_path / "model.zip", env_id=ENV, algo="SAC", allow_pickle=True))
