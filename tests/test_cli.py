"""The mmalign command: list, help at every level, a job run, errors before work starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmalign.cli import main
from mmalign.registry import JOBS

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_list_shows_every_kind(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for heading in ("losses", "teachers", "reward models", "query selectors", "envs (gymnasium ids)", "jobs"):
        assert heading in out
    assert "robust_dpo" in out and "train demo" in out


def test_help_at_every_level() -> None:
    top = subprocess.run([sys.executable, "-m", "mmalign.cli", "--help"], capture_output=True, text=True, env=ENV)
    assert top.returncode == 0 and "list" in top.stdout
    domains = sorted({name.split(".")[0] for name in JOBS.names()})
    for domain in domains:
        out = subprocess.run([sys.executable, "-m", "mmalign.cli", domain, "--help"], capture_output=True,
                             text=True, env=ENV)
        assert out.returncode == 0, out.stderr
    job = subprocess.run([sys.executable, "-m", "mmalign.cli", "train", "demo", "--help"], capture_output=True,
                         text=True, env=ENV)
    assert job.returncode == 0
    assert "trainer.max_steps" in job.stdout and "KL temperature beta" in job.stdout


def test_job_runs_and_writes_a_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "run"
    code = main(["train", "demo", "--output-dir", str(out_dir), "trainer.max_steps=3", "trainer.progress=false",
                 "trainer.plots=false", "n_pairs=256"])
    assert code == 0
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["step"] == 3
    assert "job: train.demo" in (out_dir / "config.yaml").read_text()
    assert (out_dir / "metrics.jsonl").exists()
    # an existing run folder is never overwritten silently
    assert main(["train", "demo", "--output-dir", str(out_dir)]) == 2
    assert "already holds files" in capsys.readouterr().err


def test_bad_value_fails_before_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "run"
    assert main(["train", "demo", "--output-dir", str(out_dir), "eps=0.7"]) == 2
    assert "eps must be in [0.0, 0.5), got 0.7" in capsys.readouterr().err
    assert not out_dir.exists()


def test_resume_compares_configs_through_the_config_class(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    out_dir = tmp_path / "run"
    args = ["train", "demo", "--output-dir", str(out_dir), "trainer.max_steps=2", "trainer.progress=false",
            "trainer.plots=false", "n_pairs=64"]
    assert main(args) == 0
    # a run folder written before a config field existed: the missing field compares at its default
    saved = yaml.safe_load((out_dir / "config.yaml").read_text())
    del saved["trainer"]["warmup_steps"]
    (out_dir / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    assert main([*args, "--resume"]) == 0
    # a changed value is refused, naming the field and both values
    assert main([*args, "--resume", "trainer.lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert "differs from the one saved" in err and "trainer.lr:" in err and "-> 0.5" in err


def test_config_file_of_another_job_or_broken_yaml_fails_before_work(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A run folder's config.yaml (with its ``job:`` line) is a valid --config for that job only."""
    out_dir = tmp_path / "run"
    other = tmp_path / "config.yaml"
    other.write_text("job: robotics.main\nbeta: 0.3\n")
    assert main(["train", "demo", "--config", str(other), "--output-dir", str(out_dir)]) == 2
    assert "is for job 'robotics.main', not 'train.demo'" in capsys.readouterr().err
    broken = tmp_path / "broken.yaml"
    broken.write_text("beta: [0.3\n")
    assert main(["train", "demo", "--config", str(broken), "--output-dir", str(out_dir)]) == 2
    assert "broken.yaml is not valid YAML" in capsys.readouterr().err
    assert not out_dir.exists()


def test_error_inside_a_job_says_where_it_was_raised(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # a ValueError from inside the running job (not from config validation) keeps a pointer to its origin
    def broken(cfg, run_dir, **kw):  # type: ignore[no-untyped-def]
        raise ValueError("shape mismatch deep inside")

    monkeypatch.setattr(JOBS.entry("train.demo"), "target", broken)
    assert main(["train", "demo", "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "shape mismatch deep inside (raised at " in err and "test_cli.py:" in err and "MMALIGN_DEBUG=1" in err
    # a config error keeps the plain one-line message
    assert main(["train", "demo", "--output-dir", str(tmp_path / "run2"), "eps=0.7"]) == 2
    assert "raised at" not in capsys.readouterr().err
    monkeypatch.setenv("MMALIGN_DEBUG", "1")
    with pytest.raises(ValueError, match="shape mismatch"):
        main(["train", "demo", "--output-dir", str(tmp_path / "run3")])


def test_checkpoint_and_lock_errors_are_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from mmalign.train.errors import CheckpointError

    def broken(cfg, run_dir, **kw):  # type: ignore[no-untyped-def]
        raise CheckpointError("checkpoint file x/model.safetensors is corrupt or truncated")

    monkeypatch.setattr(JOBS.entry("train.demo"), "target", broken)
    assert main(["train", "demo", "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmalign: error: checkpoint file x/model.safetensors is corrupt") and err.count("\n") == 1
    assert "Traceback" not in err and f"the run folder {tmp_path / 'run'} was removed" in err
    assert not (tmp_path / "run").exists()  # failed before any progress: nothing left behind
    monkeypatch.setenv("MMALIGN_DEBUG", "1")
    with pytest.raises(CheckpointError):
        main(["train", "demo", "--output-dir", str(tmp_path / "run")])
