"""The main job's command (``mmalign robotics main``) runs end to end in smoke mode and writes its report."""

import json

import pytest

from mmalign.cli import run_job
from mmalign.robotics.main_job import MainConfig


def test_main_job_smoke(tmp_path):
    out = tmp_path / "run"
    summary = run_job("robotics.main", None, ["smoke=true", "render_size=32"], output_dir=str(out))
    for name in ("report.md", "report.html", "learning_curves.png", "reward_scatter.png", "curves.json",
                 "reward_model.safetensors", "config.yaml", "summary.json"):
        assert (out / name).is_file(), name
    assert summary["labels/queries"] == 24  # smoke budget, exactly
    curves = json.loads((out / "curves.json").read_text())
    assert len(curves) == 3 and all(len(rows) >= 2 for rows in curves.values())
    report = (out / "report.md").read_text()
    for heading in ("Learning curves", "Learned vs true reward", "Label statistics", "Segment video"):
        assert heading in report
    # The video is best effort (needs EGL or OSMesa); when it renders, the GIF must exist.
    if "query_pair.gif" in report:
        assert (out / "query_pair.gif").stat().st_size > 0


def test_main_config_defaults_are_the_main_job_and_validate():
    cfg = MainConfig()
    assert cfg.env_id == "Reacher-v5" and cfg.teacher == "mistake" and cfg.algo == "sac"
    assert cfg.effective_agent().total_steps == cfg.total_steps
    assert MainConfig(smoke=True).effective_agent().total_steps < 1000
    with pytest.raises(ValueError, match="reward"):
        MainConfig(reward="true")
    # the main job runs with the reward-input fix (standardised + squared actions), as configs/robotics/main.yaml says
    assert cfg.normalize_act and cfg.rm_action_squares and cfg.effective_agent().normalize_act


def test_main_yaml_writes_out_the_embedded_defaults():
    from pathlib import Path

    from mmalign.config import load_config

    path = Path(__file__).resolve().parents[2] / "configs" / "robotics" / "main.yaml"
    assert load_config(MainConfig, path, job="robotics.main") == MainConfig()
