"""Run folders: made only after validation, locked for the run's life, removed when a new run fails early."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmalign.cli import main
from mmalign.train.run_folder import LOCK_FILE, RunFolder, has_progress

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
QUIET = ["trainer.progress=false", "trainer.plots=false", "n_pairs=256", "hidden=16"]


def _wait_for(path: Path, proc: subprocess.Popen, limit_s: float = 300) -> None:
    deadline = time.monotonic() + limit_s  # a bound against hanging, not a timing assertion
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


def test_a_second_process_on_a_running_folder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "mmalign.cli", "train", "demo", "--output-dir", str(run_dir), *QUIET,
         "trainer.max_steps=1000000", "trainer.save_every=1"],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for(run_dir / "checkpoints" / "latest", first)  # running, past its first checkpoint, lock held
        assert main(["train", "demo", "--output-dir", str(run_dir), "--resume", *QUIET,
                     "trainer.max_steps=1000000", "trainer.save_every=1"]) == 2
        err = capsys.readouterr().err
        assert f"run folder {run_dir} is in use by another mmalign process (pid {first.pid})" in err
        assert "Traceback" not in err
    finally:
        first.kill()
        first.wait()
    # the lock dies with its process: the folder can be locked (resumed) again
    from mmalign.train.demo import DemoConfig

    again = RunFolder(run_dir, "train.demo", resume=True)
    again.open(DemoConfig())
    again.close(failed=False)


def test_the_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    from mmalign.train.demo import DemoConfig
    from mmalign.train.errors import RunLockedError

    cfg = DemoConfig()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from mmalign.train.run_folder import RunFolder; "
         "from mmalign.train.demo import DemoConfig; f = RunFolder(Path(sys.argv[1]), 'train.demo', False); "
         "f.open(DemoConfig()); print('locked', flush=True); sys.stdin.read()", str(tmp_path / "r")],
        env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        other = RunFolder(tmp_path / "r", "train.demo", resume=True)
        other.check(cfg)
        with pytest.raises(RunLockedError, match=f"in use by another mmalign process \\(pid {holder.pid}\\)"):
            other.open(cfg)
    finally:
        holder.communicate("")
    again = RunFolder(tmp_path / "r", "train.demo", resume=True)
    again.open(cfg)  # released at the holder's exit
    assert (tmp_path / "r" / LOCK_FILE).is_file()
    assert again.close(failed=True) is False  # a resumed folder is never removed


def test_a_new_run_that_fails_before_progress_leaves_nothing(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    # fails inside the job (the trainer: fewer examples than one batch), after the folder was made
    assert main(["train", "demo", "--output-dir", str(run_dir), *QUIET[:2], "n_pairs=8"]) == 2
    assert "fewer than one global batch" in capsys.readouterr().err
    assert not run_dir.exists()
    # so the corrected command can run in the same folder
    assert main(["train", "demo", "--output-dir", str(run_dir), *QUIET, "trainer.max_steps=2"]) == 0


def test_a_failed_run_with_a_checkpoint_is_kept_for_resume(tmp_path: Path) -> None:
    from mmalign.train.demo import DemoConfig

    folder = RunFolder(tmp_path / "r", "train.demo", resume=False)
    folder.check(DemoConfig())
    folder.open(DemoConfig())
    (tmp_path / "r" / "checkpoints").mkdir()
    (tmp_path / "r" / "checkpoints" / "latest").write_text("step-00000002")
    assert has_progress(tmp_path / "r")
    assert folder.close(failed=True) is False and (tmp_path / "r" / "config.yaml").is_file()


@pytest.mark.parametrize("setup, message", [
    ("missing", "is not a run folder (it holds no config.yaml)"),
    ("other_job", "is a run of 'robotics.pearl', not 'train.demo'"),
])
def test_resume_needs_a_run_folder_of_this_job(tmp_path: Path, capsys: pytest.CaptureFixture[str], setup: str,
                                               message: str) -> None:
    run_dir = tmp_path / "run"
    if setup == "other_job":
        run_dir.mkdir()
        (run_dir / "config.yaml").write_text("job: robotics.pearl\n")
    assert main(["train", "demo", "--output-dir", str(run_dir), "--resume", *QUIET]) == 2
    assert message in capsys.readouterr().err
    assert setup == "other_job" or not run_dir.exists()


CPL_TINY = ["oracle_steps=300", "episodes_per_level=2", "noise_levels=[0.0,1.0]", "random_episodes=2",
            "segment_length=10", "pairs_per_segment=3", "value_samples=4", "hidden=16", "bc_steps=20",
            "cpl_steps=20", "batch_size=8", "eval_episodes=1"]


def test_cpl_keeps_its_trained_oracle_when_a_later_phase_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The oracle is progress (robotics.cpl's has_progress): kept, and a new run started from it gets the results of
    an uninterrupted run; a failure before the oracle is saved still removes the folder."""
    import json

    from mmalign.robotics import cpl

    assert main(["robotics", "cpl", "--output-dir", str(tmp_path / "full"), *CPL_TINY]) == 0
    def rows(run: str) -> list[dict]:  # the results, without the CPU time each method took
        return [{k: v for k, v in r.items() if not k.endswith("_cpu_s")}
                for r in json.loads((tmp_path / run / "results.json").read_text())["rows"]]

    expected = rows("full")

    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("no room for the dataset")

    with monkeypatch.context() as patch:
        patch.setattr(cpl, "build_dataset", broken)
        assert main(["robotics", "cpl", "--output-dir", str(tmp_path / "run"), *CPL_TINY]) == 2
    err = capsys.readouterr().err
    oracle = tmp_path / "run" / "oracle_sac.safetensors"
    assert "no room for the dataset" in err and "was removed" not in err
    assert f"oracle_path={oracle}" in err
    assert oracle.is_file() and (tmp_path / "run" / "config.yaml").is_file()
    assert main(["robotics", "cpl", "--output-dir", str(tmp_path / "again"), *CPL_TINY, f"oracle_path={oracle}"]) == 0
    assert rows("again") == expected

    with monkeypatch.context() as patch:  # before the oracle exists there is nothing to keep
        patch.setattr(cpl, "train_oracle", broken)
        assert main(["robotics", "cpl", "--output-dir", str(tmp_path / "early"), *CPL_TINY]) == 2
    assert "was removed" in capsys.readouterr().err and not (tmp_path / "early").exists()


@pytest.mark.parametrize("job", [["vlm", "generate"], ["label", "export"]])
def test_resume_of_a_job_without_progress_is_refused_before_anything(tmp_path: Path, job: list[str],
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Jobs whose run takes no ``resume`` refuse --resume in one line (it used to reach the job as a TypeError)."""
    (tmp_path / "run").mkdir()
    assert main([*job, "--resume", "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"--resume is not supported by {'.'.join(job)}" in err and "Traceback" not in err
    assert list((tmp_path / "run").iterdir()) == []
