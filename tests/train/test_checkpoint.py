"""Checkpoints: atomic, complete, and clear errors for corrupt or truncated files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mmalign.train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint


def _setup() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    sched.step()
    return model, opt, sched


def _save(root: Path, step: int, model, opt, sched, keep: int = 2) -> Path:
    return save_checkpoint(root, step, model_tensors=model.state_dict(), optimizer=opt, scheduler=sched,
                           trainer_state={"config_fingerprint": "x"}, keep=keep)


def test_round_trip_restores_everything(tmp_path: Path) -> None:
    model, opt, sched = _setup()
    _save(tmp_path, 1, model, opt, sched)
    expected_next = torch.rand(3)
    model2, opt2, sched2 = torch.nn.Linear(4, 3), None, None
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.1)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0 / (1 + s))
    torch.rand(5)  # move the RNG away
    state = load_checkpoint(latest_checkpoint(tmp_path), model=model2, optimizer=opt2, scheduler=sched2)
    assert state["step"] == 1
    assert torch.equal(torch.rand(3), expected_next)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], opt2.state_dict()["state"][0]["exp_avg"])
    assert sched2.state_dict()["last_epoch"] == sched.state_dict()["last_epoch"]


def test_truncated_file_names_the_file(tmp_path: Path) -> None:
    model, opt, sched = _setup()
    path = _save(tmp_path, 3, model, opt, sched)
    target = path / "model.safetensors"
    target.write_bytes(target.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(path, model=model, optimizer=opt, scheduler=sched)


def test_corrupt_file_of_same_size_names_the_file(tmp_path: Path) -> None:
    model, opt, sched = _setup()
    path = _save(tmp_path, 3, model, opt, sched)
    target = path / "optimizer.safetensors"
    target.write_bytes(b"\x00" * target.stat().st_size)
    with pytest.raises(CheckpointError, match="optimizer.safetensors"):
        load_checkpoint(path, model=model, optimizer=opt, scheduler=sched)


def test_partial_checkpoint_never_replaces_the_last_good_one(tmp_path: Path) -> None:
    model, opt, sched = _setup()
    good = _save(tmp_path, 5, model, opt, sched)
    # a crash while writing step 10 leaves only a .tmp folder behind
    (tmp_path / "step-00000010.tmp").mkdir()
    (tmp_path / "step-00000010.tmp" / "model.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path) == good
    load_checkpoint(good, model=model, optimizer=opt, scheduler=sched)
    # the next save replaces the stale tmp folder and becomes latest
    newer = _save(tmp_path, 10, model, opt, sched)
    assert latest_checkpoint(tmp_path) == newer and not (tmp_path / "step-00000010.tmp").exists()


def test_keeps_only_the_newest_checkpoints(tmp_path: Path) -> None:
    model, opt, sched = _setup()
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, model, opt, sched, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000003", "step-00000004"]


def test_rotation_never_deletes_the_checkpoint_just_written(tmp_path: Path) -> None:
    """Folders of later steps (an earlier run in this folder) are kept and reported; rotation works below the step."""
    model, opt, sched = _setup()
    for step in (900, 1000):  # stale, higher-numbered
        _save(tmp_path, step, model, opt, sched)
    for step in (50, 60):
        with pytest.warns(UserWarning, match=r"later steps .*'step-00000900', 'step-00001000'.* kept"):
            _save(tmp_path, step, model, opt, sched)
    with pytest.warns(UserWarning, match="later steps"):
        written = _save(tmp_path, 100, model, opt, sched, keep=2)
    assert latest_checkpoint(tmp_path) == written and written.is_dir()
    assert sorted(p.name for p in tmp_path.glob("step-*")) == [
        "step-00000060", "step-00000100", "step-00000900", "step-00001000"]
    with pytest.warns(UserWarning, match="later steps"):
        _save(tmp_path, 101, model, opt, sched, keep=1)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000101", "step-00000900", "step-00001000"]
    load_checkpoint(latest_checkpoint(tmp_path), model=model, optimizer=opt, scheduler=sched)


@pytest.mark.parametrize("crash", ["before_new_in_place", "before_latest", "before_old_deleted"])
def test_replacing_a_step_never_leaves_latest_without_a_checkpoint(tmp_path: Path, monkeypatch, crash: str) -> None:
    """Saving a step that already exists, killed at each point of the swap, leaves a loadable latest checkpoint."""
    model, opt, sched = _setup()
    _save(tmp_path, 100, model, opt, sched)
    _save(tmp_path, 200, model, opt, sched)
    real_replace = os.replace

    def replace(src, dst) -> None:
        src, dst = Path(src), Path(dst)
        if crash == "before_new_in_place" and src.name == "step-00000200.tmp":
            raise KeyboardInterrupt  # killed just before the new folder is renamed in
        real_replace(src, dst)
        if (crash == "before_latest" and src.name == "step-00000200.tmp") or (
                crash == "before_old_deleted" and dst.name == "latest"):
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 200, model, opt, sched)
    monkeypatch.setattr(os, "replace", real_replace)
    found = latest_checkpoint(tmp_path)
    assert found is not None and found.name.startswith("step-00000200")
    assert load_checkpoint(found, model=model, optimizer=opt, scheduler=sched)["step"] == 200
    # the next save finishes (or rolls back) the interrupted replacement and rotates as usual
    newer = _save(tmp_path, 300, model, opt, sched)
    assert latest_checkpoint(tmp_path) == newer
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".tmp")) == [
        "latest", "step-00000200", "step-00000300"]


def test_cuda_rng_states_are_restored_in_device_order() -> None:
    from mmalign.train.checkpoint import _cuda_rng_states

    tensors = {f"torch_cuda_{i}": torch.tensor([i]) for i in (3, 11, 0, 10, 2, 1, 9, 4, 5, 6, 7, 8)}
    tensors["torch_cpu"] = torch.tensor([-1])
    assert [int(t) for t in _cuda_rng_states(tensors)] == list(range(12))


def test_checkpoints_hold_no_pickle(tmp_path: Path) -> None:
    model, opt, sched = _setup()
    path = _save(tmp_path, 1, model, opt, sched)
    assert {p.suffix for p in path.iterdir()} <= {".safetensors", ".json"}


def test_wrong_model_is_a_clear_error(tmp_path: Path) -> None:
    model, opt, sched = _setup()
    path = _save(tmp_path, 1, model, opt, sched)
    with pytest.raises(CheckpointError, match="does not match the model"):
        load_checkpoint(path, model=torch.nn.Linear(5, 3), optimizer=None, scheduler=None)


def test_extra_generators_are_saved_and_restored(tmp_path: Path) -> None:
    model, opt, sched = _setup()
    gen = torch.Generator().manual_seed(7)
    torch.randn(3, generator=gen)
    path = save_checkpoint(tmp_path, 1, model_tensors=model.state_dict(), optimizer=opt, scheduler=sched,
                           trainer_state={}, generators={"noise": gen})
    expected = torch.randn(4, generator=gen)
    other = torch.Generator().manual_seed(99)
    load_checkpoint(path, model=None, optimizer=None, scheduler=None, generators={"noise": other})
    assert torch.equal(torch.randn(4, generator=other), expected)
    with pytest.raises(CheckpointError, match="random generator 'missing'"):
        load_checkpoint(path, model=None, optimizer=None, scheduler=None, generators={"missing": other})


def test_optimizer_saved_for_other_parameters_is_a_clear_error(tmp_path: Path) -> None:
    model, opt, sched = _setup()
    path = save_checkpoint(tmp_path, 1, model_tensors=model.state_dict(), optimizer=opt, scheduler=sched,
                           trainer_state={}, param_names=["bias", "weight"])
    with pytest.raises(CheckpointError, match="optimizer.json does not match the optimizer: saved parameter order"):
        load_checkpoint(path, model=model, optimizer=opt, scheduler=sched)
    two_groups = torch.optim.AdamW([{"params": [model.weight]}, {"params": [model.bias]}], lr=0.1)
    with pytest.raises(CheckpointError, match=r"parameters per group \[2\], the optimizer has \[1, 1\]"):
        load_checkpoint(path, model=None, optimizer=two_groups, scheduler=None)


def test_nothing_is_applied_when_a_later_file_is_bad(tmp_path: Path) -> None:
    model, opt, sched = _setup()
    path = _save(tmp_path, 1, model, opt, sched)
    target = path / "scheduler.json"
    target.write_text("{" + " " * (target.stat().st_size - 1))  # same size, not JSON
    fresh = torch.nn.Linear(4, 3)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(CheckpointError, match="scheduler.json"):
        load_checkpoint(path, model=fresh, optimizer=None, scheduler=sched)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def test_shape_mismatch_names_the_tensor(tmp_path: Path) -> None:
    model, opt, sched = _setup()
    path = _save(tmp_path, 1, model, opt, sched)
    with pytest.raises(CheckpointError, match=r"shape mismatch \['weight: \(3, 4\) vs model \(3, 5\)'"):
        load_checkpoint(path, model=torch.nn.Linear(5, 3), optimizer=None, scheduler=None)


def _stepped_scaler() -> torch.amp.GradScaler:
    """A real loss scaler away from its defaults: one overflow (scale halved), then one good step (tracker 1)."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_factor=4.0, backoff_factor=0.25,
                                  growth_interval=3)
    weight = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([weight], lr=0.1)
    for factor in (1e37, 1.0):
        opt.zero_grad()
        scaler.scale(weight.sum() * factor).backward()
        scaler.step(opt)
        scaler.update()
    return scaler


def test_loss_scaler_state_round_trips(tmp_path: Path) -> None:
    model, opt, sched = _setup()
    scaler = _stepped_scaler()
    assert scaler.state_dict() == {"scale": 2.0**8, "growth_factor": 4.0, "backoff_factor": 0.25,
                                   "growth_interval": 3, "_growth_tracker": 1}
    path = save_checkpoint(tmp_path, 1, model_tensors=model.state_dict(), optimizer=opt, scheduler=sched,
                           trainer_state={}, scaler=scaler)
    assert {p.suffix for p in path.iterdir()} <= {".safetensors", ".json"}
    fresh = torch.amp.GradScaler("cpu")
    load_checkpoint(path, model=None, optimizer=None, scheduler=None, scaler=fresh)
    assert fresh.state_dict() == scaler.state_dict()
    # the restored scaler goes on as the saved one does: two more good steps grow the scale (interval 3)
    weight = torch.nn.Parameter(torch.ones(2))
    for s in (scaler, fresh):
        for _ in range(2):
            s.scale(weight.sum()).backward()
            s.unscale_(torch.optim.SGD([weight], lr=0.0))
            s.update()
    assert fresh.state_dict() == scaler.state_dict() and fresh.get_scale() == 2.0**10
    # without a scaler (CPU, bf16, fp32) nothing is written, and a scaler given on load keeps its defaults
    plain = _save(tmp_path / "plain", 1, model, opt, sched)
    assert not (plain / "scaler.json").exists()
    default = torch.amp.GradScaler("cpu")
    load_checkpoint(plain, model=None, optimizer=None, scheduler=None, scaler=default)
    assert default.state_dict() == torch.amp.GradScaler("cpu").state_dict()
    disabled = torch.amp.GradScaler("cpu", enabled=False)
    assert not (_save(tmp_path / "off", 1, model, opt, sched) / "scaler.json").exists()
    load_checkpoint(path, model=None, optimizer=None, scheduler=None, scaler=disabled)  # ignored, no error


def test_malformed_scaler_state_names_the_file_and_applies_nothing(tmp_path: Path) -> None:
    import json

    model, opt, sched = _setup()
    path = save_checkpoint(tmp_path, 1, model_tensors=model.state_dict(), optimizer=opt, scheduler=sched,
                           trainer_state={}, scaler=_stepped_scaler())
    target = path / "scaler.json"
    state = json.loads(target.read_text())
    target.write_text(json.dumps({**state, "scale": str(state["scale"])}))
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "scaler.json": target.stat().st_size}))
    fresh_model, fresh = torch.nn.Linear(4, 3), torch.amp.GradScaler("cpu")
    before = {k: v.clone() for k, v in fresh_model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"scaler.json is malformed: 'scale' must be a number, got '256.0'"):
        load_checkpoint(path, model=fresh_model, optimizer=None, scheduler=None, scaler=fresh)
    assert all(torch.equal(before[k], v) for k, v in fresh_model.state_dict().items())
    assert fresh.state_dict() == torch.amp.GradScaler("cpu").state_dict()


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "rng-0.safetensors"])
def test_bytes_flipped_inside_a_tensor_file_are_refused_naming_the_file(tmp_path: Path, name: str) -> None:
    """Same size, valid safetensors header, different numbers: only the SHA-256 in the manifest can tell."""
    model, opt, sched = _setup()
    path = save_checkpoint(tmp_path, 1, model_tensors=model.state_dict(), optimizer=opt, scheduler=sched,
                           trainer_state={})
    target = path / name
    data = bytearray(target.read_bytes())
    data[-3] ^= 0xFF  # inside the last tensor's bytes
    target.write_bytes(bytes(data))
    fresh = torch.nn.Linear(4, 3)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(CheckpointError, match=rf"{name} is corrupt or truncated: its SHA-256 .* differs"):
        load_checkpoint(path, model=fresh, optimizer=torch.optim.AdamW(fresh.parameters()),
                        scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def test_manifest_records_size_and_sha256_of_every_file(tmp_path: Path) -> None:
    import hashlib
    import json

    model, opt, sched = _setup()
    path = save_checkpoint(tmp_path, 1, model_tensors=model.state_dict(), optimizer=opt, scheduler=sched,
                           trainer_state={})
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest) == {p.name for p in path.iterdir()} - {"manifest.json"}
    for name, entry in manifest.items():
        data = (path / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
