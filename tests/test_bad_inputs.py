"""Broken inputs to every job of the runs/safety area: one clear exit-2 message, before any work, nothing written.

Each row: the job, its arguments, a setup that plants files in the case's folder (``{d}`` in an argument is that
folder), and the message expected on stderr. Every case asserts exit code 2, no traceback, and that no run folder
was made (or, for ``--resume``, that the run folder is byte-for-byte unchanged: nothing trained, no results written).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import pytest

from mmalign.cli import main

DEMO = ["trainer.progress=false", "trainer.plots=false", "n_pairs=256", "hidden=16"]


def _write(name: str, data: bytes | str) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        (d / name).write_bytes(data.encode() if isinstance(data, str) else data)
    return setup


def _plain_tensors(d: Path) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(d / "plain.safetensors"))


def _pickled_weights(d: Path) -> None:
    from _pickle_payload import torch_pickle_bytes

    (d / "w.pt").write_bytes(torch_pickle_bytes(d / "ran"))


def _pickled_zip(d: Path) -> None:
    from _pickle_payload import sb3_zip_bytes

    (d / "o.zip").write_bytes(sb3_zip_bytes(d / "ran"))


NEW_RUN_CASES = [
    # (id, job, args, setup, message)
    ("nan", "train demo", ["trainer.lr=nan"], None, "trainer.lr must be a finite number > 0, got nan"),
    ("inf", "train demo", ["beta=inf"], None, "beta must be a finite number > 0, got inf"),
    ("empty", "train demo", ["trainer.max_steps="], None, "trainer.max_steps must be an integer, got ''"),
    ("wrong type", "train demo", ["trainer.max_steps=abc"], None, "trainer.max_steps must be an integer, got 'abc'"),
    ("unknown field", "train demo", ["lr=0.1"], None, "unknown field(s) ['lr'] for DemoConfig"),
    ("bad choice", "train demo", ["loss=nope"], None, "loss must be one of ['dpo', 'ipo', 'cdpo', 'robust_dpo']"),
    ("other job's config", "train demo", ["--config", "{d}/c.yaml"], _write("c.yaml", "job: robotics.pearl\n"),
     "is for job 'robotics.pearl', not 'train.demo'"),
    ("broken yaml", "train demo", ["--config", "{d}/c.yaml"], _write("c.yaml", "a: [1,\n"), "is not valid YAML"),
    ("missing config", "train demo", ["--config", "{d}/none.yaml"], None, "config file not found"),
    ("nested wrong type", "hindsight text", ["sft.max_steps=0"], None, "sft.max_steps must be a finite number > 0"),
    ("nan trust", "hindsight market", ["trust=nan"], None, "trust must be in [0.5, 1.0], got nan"),
    ("empty list", "hindsight market", ["seeds=[]"], None, "seeds must list at least one seed"),
    ("wrong item type", "hindsight market", ["seeds=a"], None, "seeds[0] must be an integer, got 'a'"),
    ("unknown env", "robotics cpl", ["env_id=NoSuchTask-v9"], None, "env_id 'NoSuchTask-v9' is not a registered"),
    ("discrete env", "robotics cpl", ["env_id=CartPole-v1"], None, "needs a Box action space"),
    ("nan list item", "robotics cpl", ["noise_levels=[nan]"], None, "noise_levels must be in [0.0, 10.0], got nan"),
    ("missing oracle", "robotics cpl", ["oracle_path={d}/none.safetensors"], None, "does not exist"),
    ("0-byte oracle", "robotics cpl", ["oracle_path={d}/o.safetensors"], _write("o.safetensors", b""),
     "is not a readable safetensors policy"),
    ("oracle without header", "robotics cpl", ["oracle_path={d}/plain.safetensors"], _plain_tensors,
     "must carry format 'mmalign-sb3-policy-v1'"),
    ("oracle of another kind", "robotics cpl", ["oracle_path={d}/o.pkl"], _write("o.pkl", b"x"),
     "must be a .safetensors policy"),
    ("oracle zip not a zip", "robotics cpl", ["oracle_path={d}/o.zip"], _write("o.zip", b"PK\x03\x04junk"),
     "is not a readable SB3 model zip"),
    ("pickled oracle zip", "robotics cpl", ["oracle_path={d}/o.zip"], _pickled_zip, "policy.pth holds pickled objects"),
    ("cpl resume", "robotics cpl", ["--resume"], None, "--resume is not supported by robotics.cpl"),
    ("unknown source env", "robotics pearl", ["source_env_id=Reacher-v5"], None,
     "source_env_id must be a PushAvoid task"),
    ("unknown target env", "robotics pearl", ["target_env_id=mmalign/Nope-v0"], None,
     "target_env_id must be a PushAvoid task"),
    ("pearl resume", "robotics pearl", ["--resume"], None, "--resume is not supported by robotics.pearl"),
    ("gw chunks", "robotics pearl", ["gw_solver=batched", "gw_chunks=100"], None, "gw_chunks=100 leaves fewer"),
    ("rapl env", "robotics rapl", ["cross_env_id=mmalign/HindsightMarket-v0"], None,
     "cross_env_id must be a PushAvoid task"),
    ("missing weights", "robotics rapl", ["weights_path={d}/none.pt"], None, "weights_path must be an existing file"),
    ("0-byte weights", "robotics rapl", ["weights_path={d}/w.safetensors"], _write("w.safetensors", b""),
     "is not a readable weights file"),
    ("pickled weights", "robotics rapl", ["weights_path={d}/w.pt"], _pickled_weights, "is not a readable weights file"),
    ("cache is a file", "robotics rapl", ["data_cache={d}/c"], _write("c", "x"), "data_cache must be a folder"),
    ("rapl resume", "robotics rapl", ["--resume"], None, "--resume is not supported by robotics.rapl"),
    ("zero count", "robotics rapl", ["num_prefs=0"], None, "num_prefs must be a finite number > 0, got 0"),
    ("pebble env typo", "robotics pebble", ["env_id=Reachr-v5"], None, "is not a registered gymnasium id"),
    ("pebble resume", "robotics pebble", ["--resume"], None, "not supported by robotics.pebble"),
    ("pebble teacher", "robotics pebble", ["teacher=nobody"], None, "teacher"),
    ("main env typo", "robotics main", ["env_id=Reachr-v5"], None, "is not a registered gymnasium id"),
    ("main resume", "robotics main", ["--resume"], None, "not supported by robotics.main"),
    ("missing pretrain_init", "diffusion benchmark", ["pretrain_init={d}/none.safetensors"], None,
     "pretrain_init: '{d}/none.safetensors' is not a file"),
    ("pickled pretrain_init", "diffusion benchmark", ["pretrain_init={d}/w.pt"], _pickled_weights,
     "is not a .safetensors file (pickled formats are never loaded)"),
    ("foreign reference", "diffusion benchmark", ["reference_path={d}/plain.safetensors"], _plain_tensors,
     "reference_path: '{d}/plain.safetensors' does not hold this benchmark's model"),
    ("reference in no folder", "diffusion benchmark", ["reference_path={d}/no/r.safetensors"], None,
     "and its folder"),
]


@pytest.mark.parametrize("case", NEW_RUN_CASES, ids=[c[0] for c in NEW_RUN_CASES])
def test_a_broken_input_fails_before_work(tmp_path: Path, capsys: pytest.CaptureFixture[str], case) -> None:
    _, job, args, setup, message = case
    if setup is not None:
        setup(tmp_path)
    run_dir = tmp_path / "run"
    argv = [*job.split(), "--output-dir", str(run_dir), *(a.replace("{d}", str(tmp_path)) for a in args)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    message = message.replace("{d}", str(tmp_path))
    assert message in err and err.startswith("mmalign: error: ") and "Traceback" not in err, err
    assert not run_dir.exists()  # nothing made, nothing trained, no results
    assert not (tmp_path / "ran").exists()  # no planted pickle ran


# -- resuming from broken checkpoints and result files: refused, run folder untouched -------------------------------

@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("demo") / "run"
    assert main(["train", "demo", "--output-dir", str(run_dir), *DEMO, "trainer.max_steps=2",
                 "trainer.save_every=1"]) == 0
    return run_dir


def _flip(name: str) -> Callable[[Path], None]:
    def corrupt(run: Path) -> None:
        f = run / "checkpoints" / "step-00000002" / name
        data = bytearray(f.read_bytes())
        data[-2] ^= 0xFF
        f.write_bytes(bytes(data))
    return corrupt


def _empty(name: str) -> Callable[[Path], None]:
    def corrupt(run: Path) -> None:
        (run / "checkpoints" / "step-00000002" / name).write_bytes(b"")
    return corrupt


def _dangling_latest(run: Path) -> None:
    (run / "checkpoints" / "latest").write_text("step-00000099")


RESUME_CASES = [
    ("bit-flipped model", _flip("model.safetensors"), "model.safetensors is corrupt or truncated: its SHA-256"),
    ("bit-flipped optimizer", _flip("optimizer.safetensors"), "optimizer.safetensors is corrupt or truncated"),
    ("0-byte model", _empty("model.safetensors"), "model.safetensors is truncated or was modified: 0 bytes"),
    ("0-byte state", _empty("trainer_state.json"), "trainer_state.json is truncated or was modified: 0 bytes"),
    ("0-byte manifest", _empty("manifest.json"), "manifest.json is corrupt or truncated"),
    ("latest names nothing", _dangling_latest, "names step-00000099, which does not exist"),
]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.mark.parametrize("case", RESUME_CASES, ids=[c[0] for c in RESUME_CASES])
def test_resume_from_a_broken_checkpoint_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     demo_run: Path, case) -> None:
    _, corrupt, message = case
    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    corrupt(run)
    before = _snapshot(run)
    assert main(["train", "demo", "--output-dir", str(run), "--resume", *DEMO, "trainer.max_steps=2",
                 "trainer.save_every=1"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert _snapshot(run) == before  # nothing trained, nothing logged, no summary rewritten


def test_resume_with_a_broken_result_row_names_the_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("job: hindsight.market\n")
    (run / "results.jsonl").write_text('{"method": "reference"}\n{not json}\n')
    before = _snapshot(run)
    assert main(["hindsight", "market", "--output-dir", str(run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "results.jsonl row 2 is not valid JSON" in err and "Traceback" not in err, err
    assert _snapshot(run) == before
