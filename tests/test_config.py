"""Config dataclasses: help on every field, YAML + overrides, validation before work starts."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import pytest

from mmalign.config import Config, config_help, load_config, option, parse_overrides
from mmalign.registry import JOBS, resolve
from mmalign.train.config import TrainerConfig
from mmalign.train.demo import DemoConfig


def _all_config_classes() -> list[type[Config]]:
    seen: list[type[Config]] = []

    def walk(cls: type[Config]) -> None:
        if cls in seen:
            return
        seen.append(cls)
        for f in dataclasses.fields(cls):
            tp = cls.__annotations__.get(f.name)
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if isinstance(default, Config):
                walk(type(default))

    for entry in JOBS.entries():
        walk(resolve(entry.extra["config"]))
    return seen


def test_every_field_of_every_job_config_has_help() -> None:
    classes = _all_config_classes()
    assert TrainerConfig in classes and DemoConfig in classes
    for cls in classes:
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"
        assert config_help(cls)


def test_every_job_config_builds_from_defaults() -> None:
    for entry in JOBS.entries():
        cls = resolve(entry.extra["config"])
        assert isinstance(cls(), Config), entry.name


def test_yaml_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("beta: 0.3\ntrainer:\n  max_steps: 11\n")
    cfg = load_config(DemoConfig, path, ["trainer.lr=0.01", "loss=robust_dpo", "eps=0.1"])
    assert (cfg.beta, cfg.trainer.max_steps, cfg.trainer.lr, cfg.loss, cfg.eps) == (0.3, 11, 0.01, "robust_dpo", 0.1)
    # nested partial mappings keep the job's own nested defaults
    assert cfg.trainer.batch_size == DemoConfig().trainer.batch_size


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["eps=0.5"], r"eps must be in \[0.0, 0.5\), got 0.5"),
        (["beta=0"], "beta must be a finite number > 0, got 0"),
        (["trainer.lr=-1"], r"trainer.lr must be a finite number > 0, got -1"),
        (["trainer.lr_schedule=step"], "trainer.lr_schedule must be one of"),
        (["loss=kto"], "loss must be one of"),
        (["n_pairs=many"], "must be an integer, got 'many'"),
        (["unknown_field=1"], r"unknown field\(s\) \['unknown_field'\]"),
        (["noequals"], "override must look like key=value"),
    ],
)
def test_bad_values_fail_naming_field_value_and_allowed(override: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(DemoConfig, None, override)


def test_missing_config_file_is_clear(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(DemoConfig, tmp_path / "nope.yaml")


def test_parse_overrides_nests_and_types() -> None:
    assert parse_overrides(["a.b=1", "a.c=x", "d=[1, 2]", "e=true"]) == {"a": {"b": 1, "c": "x"}, "d": [1, 2],
                                                                         "e": True}


def test_yaml_12_scalars_no_is_a_string_and_1e_3_a_float(tmp_path: Path) -> None:
    """YAML 1.1 reads ``no``/``off`` as False and ``1e-3`` as a string; configs use YAML 1.2 scalars instead."""
    assert parse_overrides(["m=no", "o=off", "y=Yes", "lr=1e-3", "big=-2.5E+4", "t=False", "n=~", "i=12"]) == {
        "m": "no", "o": "off", "y": "Yes", "lr": 0.001, "big": -25000.0, "t": False, "n": None, "i": 12}
    cfg = load_config(DemoConfig, None, ["trainer.mixed_precision=no", "trainer.lr=1e-3"])
    assert cfg.trainer.mixed_precision == "no" and cfg.trainer.lr == 0.001
    path = tmp_path / "c.yaml"
    path.write_text("trainer:\n  mixed_precision: no\n  lr: 5e-4\n  progress: false\n")
    cfg = load_config(DemoConfig, path)
    assert (cfg.trainer.mixed_precision, cfg.trainer.lr, cfg.trainer.progress) == ("no", 0.0005, False)


def test_shipped_yaml_configs_load() -> None:
    root = Path(__file__).resolve().parents[1] / "configs"
    by_config = {}
    for entry in JOBS.entries():
        if entry.extra.get("default_config"):
            by_config[entry.extra["default_config"]] = resolve(entry.extra["config"])
    for rel, cls in by_config.items():
        path = root.parent / rel
        assert path.is_file(), f"{entry.name}: default config {rel} is missing"
        load_config(cls, path)


# configs read by a benchmark script rather than a job: path -> config class
SCRIPT_CONFIGS = {"configs/vision_lm/benchmark_halluc.yaml": "mmalign.vision_lm.halluc_bench:HallucBenchConfig"}


def test_every_shipped_yaml_loads_with_a_job_config_of_its_folder() -> None:
    """Variants such as configs/robotics/pebble_halfcheetah.yaml have no job of their own: each must load with
    the config class of some job whose default config lives in the same folder (a typo'd field fails them all)."""
    root = Path(__file__).resolve().parents[1]
    by_folder: dict[str, list] = {}
    for entry in JOBS.entries():
        if entry.extra.get("default_config"):
            by_folder.setdefault(str(Path(entry.extra["default_config"]).parent), []).append(
                resolve(entry.extra["config"]))
    paths = sorted((root / "configs").glob("*/*.yaml"))
    assert len(paths) >= 20
    for path in paths:
        if str(path.relative_to(root)) in SCRIPT_CONFIGS:  # a benchmark script's config, not a job's
            load_config(resolve(SCRIPT_CONFIGS[str(path.relative_to(root))]), path)
            continue
        classes = by_folder.get(str(path.parent.relative_to(root)), [])
        assert classes, f"{path}: no job has a default config in its folder"
        errors = []
        for cls in classes:
            try:
                load_config(cls, path)
                break
            except (ValueError, TypeError) as exc:
                errors.append(f"{cls.__name__}: {exc}")
        else:
            raise AssertionError(f"{path} loads with none of its folder's job configs: {errors}")


def test_nested_errors_name_the_dotted_field() -> None:
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['trainer.foo'\] for TrainerConfig"):
        load_config(DemoConfig, None, ["trainer.foo=1"])
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['trainer.lora.bogus'\]"):
        load_config(DemoConfig, None, ["trainer.lora.bogus=1"])
    with pytest.raises(ValueError, match=r"^trainer.lr must be a number, got 'abc'$"):
        load_config(DemoConfig, None, ["trainer.lr=abc"])
    with pytest.raises(ValueError, match=r"^trainer must be a mapping for TrainerConfig, got 3$"):
        load_config(DemoConfig, None, ["trainer=3"])


@dataclasses.dataclass
class _Fields(Config):
    cache_dir: str = option("", "a folder ('' = none)")
    seeds: list[int] = option([0], "seeds")
    algo: Literal["sac", "ppo"] = option("sac", "learner")


def test_empty_override_is_the_empty_string() -> None:
    """``cache_dir=''`` reaches the program as ``cache_dir=``: the documented '' value, not None."""
    assert parse_overrides(["a=", "b= ", "c=~"]) == {"a": "", "b": "", "c": None}
    cfg = load_config(_Fields, None, ["cache_dir=", "seeds="])
    assert (cfg.cache_dir, cfg.seeds) == ("", [])


def test_config_file_errors_are_value_errors_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("beta: [0.3\n")
    with pytest.raises(ValueError, match="c.yaml is not valid YAML"):
        load_config(DemoConfig, path)
    path.write_text("1: a\nbeta: 0.3\n")  # a non-string key next to string keys
    with pytest.raises(ValueError, match=r"unknown field\(s\) \[1\]"):
        load_config(DemoConfig, path)


def test_a_run_folders_config_yaml_loads_back_for_its_own_job(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("job: train.demo\nbeta: 0.3\n")
    assert load_config(DemoConfig, path, job="train.demo").beta == 0.3
    with pytest.raises(ValueError, match="is for job 'train.demo', not 'robotics.main'"):
        load_config(DemoConfig, path, job="robotics.main")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['job'\]"):
        load_config(DemoConfig, path)  # without a job to check against, job stays an unknown field


def test_help_shows_item_types_and_choices() -> None:
    text = "\n".join(config_help(_Fields))
    assert "seeds (list[int], default [0])" in text and "algo (Literal['sac', 'ppo'], default 'sac')" in text


def test_yaml_12_integers_and_duplicate_keys(tmp_path: Path) -> None:
    """010 is ten and 1:30 a string (YAML 1.1: octal 8, sexagesimal 90); a key given twice is an error."""
    assert parse_overrides(["a=010", "b=1:30", "c=0o17", "d=0x1F", "e=-7", "f=1_000", "g=07.5"]) == {
        "a": 10, "b": "1:30", "c": 15, "d": 31, "e": -7, "f": 1000, "g": 7.5}
    path = tmp_path / "dup.yaml"
    path.write_text("eps: 0.1\nloss: dpo\neps: 0.2\n")
    with pytest.raises(ValueError, match="duplicate key 'eps'"):
        load_config(DemoConfig, path)
    path.write_text("trainer:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(ValueError, match="duplicate key 'lr'"):
        load_config(DemoConfig, path)
