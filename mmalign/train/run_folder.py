"""The run folder of a job: made only after validation, locked for the run's life, removed if a run fails early.

Every ``mmalign <domain> <job>`` goes through :class:`RunFolder` (see :func:`mmalign.cli.run_job`):

1. :meth:`RunFolder.check` runs before anything is created: a new run needs a missing or empty folder, ``--resume``
   needs a folder holding the ``config.yaml`` of a run of this job with the same settings.
2. The job's own input validation runs (its module's optional ``validate(cfg, resume)``), still creating nothing.
3. :meth:`RunFolder.open` makes the folder and takes an exclusive advisory lock (``fcntl.flock`` on ``.lock``) held
   until :meth:`RunFolder.close`; a second process on the same folder is refused with :class:`RunLockedError`.
4. If the job fails before it saved any progress (a checkpoint, or rows in ``results.jsonl``), a new run's folder
   is removed again, so the same command can simply be run again; a folder with progress is kept for ``--resume``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

from mmalign.train.errors import RunLockedError

__all__ = ["RunFolder", "RunLockedError", "LOCK_FILE", "has_progress"]

LOCK_FILE = ".lock"
CONFIG_FILE = "config.yaml"


def has_progress(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds something a ``--resume`` would continue from (a checkpoint or result rows)."""
    if not run_dir.is_dir():
        return False
    if any(p.is_file() for p in run_dir.rglob("checkpoints/latest")):
        return True
    rows = run_dir / "results.jsonl"
    return rows.is_file() and rows.stat().st_size > 0


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class RunFolder:
    """One job's run folder (see the module docstring); ``main`` is False on the non-main processes of a launch."""

    def __init__(self, path: Path, job: str, resume: bool, main: bool = True) -> None:
        self.path, self.job, self.resume, self.main = Path(path), job, resume, main
        self._fd: int | None = None
        self._created = False

    # -- before any work -----------------------------------------------------------------------------------------
    def check(self, cfg: Any) -> None:
        """Refuse a folder that a new run would overwrite, or a ``--resume`` of something that is not this run."""
        import yaml

        if not self.main:
            return
        path = self.path
        if path.exists() and not path.is_dir():
            raise FileExistsError(f"--output-dir {path} is a file, not a folder")
        if not self.resume:
            if path.is_dir() and any(p.name not in (LOCK_FILE, f".{CONFIG_FILE}.tmp") for p in path.iterdir()):
                raise FileExistsError(
                    f"run folder {path} already holds files; pass --resume to continue it or choose another "
                    f"--output-dir")
            return
        saved_file = path / CONFIG_FILE
        if not saved_file.is_file():
            raise FileNotFoundError(f"--resume: {path} is not a run folder (it holds no {CONFIG_FILE}); start a "
                                    f"new run without --resume")
        try:
            saved = yaml.safe_load(saved_file.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"--resume: {saved_file} is not valid YAML ({err})") from None
        if not isinstance(saved, dict):
            raise ValueError(f"--resume: {saved_file} must hold a mapping, got {type(saved).__name__}")
        if saved.get("job", self.job) != self.job:
            raise ValueError(f"--resume: {path} is a run of {saved['job']!r}, not {self.job!r}")
        saved = {k: v for k, v in saved.items() if k != "job"}
        # through the config class, so that fields added since the run started compare at their defaults
        previous = _flatten(yaml.safe_load(yaml.safe_dump(type(cfg).from_dict(saved).to_dict())))
        current = _flatten(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
        changed = sorted(k for k in previous.keys() | current.keys() if previous.get(k) != current.get(k))
        if changed:
            diffs = ", ".join(f"{k}: {previous.get(k)!r} -> {current.get(k)!r}" for k in changed[:5])
            raise ValueError(f"--resume with a config that differs from the one saved in {saved_file} ({diffs})")

    # -- the run's life ------------------------------------------------------------------------------------------
    def open(self, cfg: Any) -> None:
        """Create the folder, take its lock and (for a new run) write ``config.yaml``."""
        import fcntl

        import yaml

        if not self.main:
            return
        self._created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = _read_holder(self.path / LOCK_FILE)
            raise RunLockedError(f"run folder {self.path} is in use by another mmalign process{holder}; wait for "
                                 f"it to finish (or stop it) before starting or resuming a run there") from None
        self._fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        if not self.resume:
            # checked again under the lock: a process that started at the same moment may have written meanwhile
            if any(p.name not in (LOCK_FILE, f".{CONFIG_FILE}.tmp") for p in self.path.iterdir()):
                self.close(failed=False)
                raise FileExistsError(f"run folder {self.path} already holds files; pass --resume to continue it "
                                      f"or choose another --output-dir")
            self._created = True  # empty before: everything in it is this run's
            # atomically: a run killed at any moment leaves either no config.yaml or a complete one to resume with
            tmp = self.path / f".{CONFIG_FILE}.tmp"
            tmp.write_text(yaml.safe_dump({"job": self.job, **cfg.to_dict()}, sort_keys=False))
            os.replace(tmp, self.path / CONFIG_FILE)

    def close(self, failed: bool, progress: Callable[[Path], bool] = has_progress) -> bool:
        """Release the lock; after a failed new run without progress remove the folder. True if it was removed."""
        import fcntl

        if not self.main or self._fd is None:
            return False
        removed = False
        try:
            if failed and self._created and not self.resume and not progress(self.path):
                shutil.rmtree(self.path, ignore_errors=True)  # the lock file goes with it; the fd stays valid
                removed = True
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        return removed


def _read_holder(lock: Path) -> str:
    try:
        pid = lock.read_text().strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""
