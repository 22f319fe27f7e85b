"""No file a user passes can run code: a pickled payload planted in every file-path option of every job runs nothing.

The path options are found from the job configs (string fields whose name or help speaks of a file, folder, path,
weights, checkpoint or cache), so an option added later is covered without editing this test. Each option gets every
payload file kind of ``_pickle_payload.plant`` (raw pickle under many suffixes, torch-pickled ``.pt/.pth/.bin``, an
SB3 zip with a cloudpickled entry, a model folder with pickled weights). Whatever the job does with the file — refuse
it, or accept it as a folder and run — the payload's marker file must not appear.
"""

from __future__ import annotations

import dataclasses
import re
import signal
import typing
from pathlib import Path

import pytest
from _pickle_payload import payload_bytes, plant

from mmalign.cli import main
from mmalign.config import Config
from mmalign.registry import JOBS, resolve

_PATHLIKE = re.compile(r"\b(file|folder|path|directory|weights|checkpoint|zip|safetensors|jsonl|cache)\b", re.I)

# Settings that keep a job short when it accepts a file (e.g. a folder option used as a cache) and runs.
CHEAP = {
    "vlm.train": ["sft_steps=1", "n_scenes=16", "trainer.max_steps=1", "trainer.batch_size=2",
                  "trainer.progress=false", "trainer.plots=false"],
    "diffusion.train": ["num_pairs=8", "trainer.max_steps=1", "trainer.batch_size=2", "eval_samples_per_class=1",
                        "eval_steps=1", "trainer.progress=false", "trainer.plots=false"],
    "diffusion.benchmark": ["pretrain_steps=1", "num_pairs=8", "finetune_steps=1", "sample_steps=1", "seeds=[0]"],
    "diffusion.sample": ["steps=1", "model=tiny-placeholder", "prompts=[a]"],
    "robotics.cpl": ["oracle_steps=1", "episodes_per_level=1", "noise_levels=[0.0]", "random_episodes=0",
                     "bc_steps=1", "cpl_steps=1", "eval_episodes=1"],
    "robotics.rapl": ["n_train_traj=8", "n_eval_traj=2", "steps=4", "image_size=16", "num_prefs=2", "anchor_pool=2",
                      "train_length=steps", "train_steps=1", "batch_size=2", "cross_env_id=", "run_bt_baseline=false"],
}
# Jobs that do not end by themselves (a server): their folder option is a project database folder (SQLite, no pickle)
EXCLUDED = {"label.serve": "serves until stopped"}
LIMIT_S = 120  # a run that neither refuses nor finishes by then is a failure of this test, not a timing assertion


def _fields(cls: type, prefix: str = "") -> typing.Iterator[tuple[str, typing.Any, str]]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if isinstance(tp, type) and issubclass(tp, Config):
            yield from _fields(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", tp, f.metadata.get("help", "")


def path_options() -> list[tuple[str, str]]:
    """(job, dotted field) for every string/Path field of every job config that names a file or folder."""
    out = []
    for entry in JOBS.entries():
        cfg_cls = resolve(entry.extra["config"])  # type: ignore[index]
        for name, tp, help_text in _fields(cfg_cls):
            if tp in (str, Path, str | None, Path | None) and (
                    _PATHLIKE.search(help_text) or _PATHLIKE.search(name.replace("_", " "))):
                out.append((entry.name, name))
    return out


OPTIONS = path_options()


def test_options_are_found_and_cheap_settings_are_valid() -> None:
    from mmalign.config import load_config

    found = {job for job, _ in OPTIONS}
    assert {"robotics.cpl", "robotics.rapl"} <= found and ("robotics.cpl", "oracle_path") in OPTIONS
    for job, overrides in CHEAP.items():
        if job in JOBS:
            load_config(resolve(JOBS.entry(job).extra["config"]), None, overrides)  # a typo would make cases vacuous


class _Timeout(Exception):
    pass


def _alarm(signum: int, frame: typing.Any) -> None:
    raise _Timeout


# Jobs that build real models each time take seconds per payload: slow-marked (the default run keeps the rest).
HEAVY_DOMAINS = {"vlm", "diffusion"}
CASES = [pytest.param(job, field, id=f"{job}:{field}",
                      marks=[pytest.mark.slow] if job.split(".")[0] in HEAVY_DOMAINS else [])
         for job, field in OPTIONS if job not in EXCLUDED]


@pytest.mark.parametrize("job, field", CASES)
def test_a_pickled_payload_in_a_path_option_runs_nothing(tmp_path: Path, job: str, field: str) -> None:
    marker = tmp_path / "payload-ran"
    files = plant(tmp_path / "payloads", marker)
    old = signal.signal(signal.SIGALRM, _alarm)
    try:
        for kind, path in files.items():
            signal.alarm(LIMIT_S)
            try:
                code = main([*job.split("."), "--output-dir", str(tmp_path / f"run-{kind}"), *CHEAP.get(job, []),
                             f"{field}={path}"])
            except _Timeout:
                pytest.fail(f"{job} {field}={path} ({kind}) neither refused the file nor finished in {LIMIT_S} s")
            except Exception as err:  # not this test's property (a clean message is the bad-input suites'); say it
                code = f"uncaught {type(err).__name__}: {str(err)[:120]}"
                print(f"{job} {field}={kind}: {code}")
            finally:
                signal.alarm(0)
            assert not marker.exists(), f"{job} {field}={path} ({kind}) unpickled the payload ({code})"
    finally:
        signal.signal(signal.SIGALRM, old)


def test_a_pickled_config_file_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    (tmp_path / "c.yaml").write_bytes(payload_bytes(marker))
    (tmp_path / "tagged.yaml").write_text(f"!!python/object/apply:pathlib.Path.touch [!!python/object/apply:"
                                          f"pathlib.Path [{str(marker)!r}]]\n")
    for name in ("c.yaml", "tagged.yaml"):
        assert main(["train", "demo", "--output-dir", str(tmp_path / "run"), "--config", str(tmp_path / name)]) == 2
        assert not marker.exists()


def test_a_pickled_file_under_the_name_rapl_reads_from_its_cache_runs_nothing(tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture) -> None:
    marker = tmp_path / "payload-ran"
    overrides = dict(o.split("=", 1) for o in CHEAP["robotics.rapl"])
    name = f"mmalign_PushAvoidPoint-v0_n{overrides['n_train_traj']}_s0_T{overrides['steps']}_px{overrides['image_size']}"
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / f"{name}.npz").write_bytes(payload_bytes(marker))
    assert main(["robotics", "rapl", "--output-dir", str(tmp_path / "run"), *CHEAP["robotics.rapl"],
                 f"data_cache={tmp_path / 'cache'}"]) == 2
    err = capsys.readouterr().err
    assert f"{name}.npz is unreadable" in err and "pickled" in err, err
    assert not marker.exists() and not (tmp_path / "run").exists()
