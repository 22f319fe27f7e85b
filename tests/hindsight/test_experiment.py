"""Smoke run of the marketplace experiment (job hindsight.market) and its config validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmalign.config import load_config
from mmalign.hindsight.config import HindsightMarketConfig
from mmalign.hindsight.experiment import conditions, run
from mmalign.registry import JOBS

ROOT = Path(__file__).resolve().parents[2]


def test_job_and_configs_load() -> None:
    entry = JOBS.entry("hindsight.market")
    assert entry.extra["default_config"] == "configs/hindsight/market.yaml"
    full = load_config(HindsightMarketConfig, ROOT / "configs/hindsight/market.yaml")
    assert len(full.seeds) == 5 and full.trust_sweep == [0.5, 0.8, 1.0]
    cond = conditions(full)
    assert len(cond) == len(set(cond))
    assert {c[0] for c in cond} == {"reference", "dpo", "ppo"}


@pytest.mark.parametrize("override, match", [(["trust=0.3"], "trust"), (["methods=[sft]"], "methods"),
                                             (["flip_rate=0.5"], "flip_rate"), (["seeds=[]"], "seeds")])
def test_config_validation(override: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_config(HindsightMarketConfig, None, override)


def test_smoke_run(tmp_path: Path) -> None:
    cfg = load_config(HindsightMarketConfig, ROOT / "configs/hindsight/smoke.yaml")
    summary = run(cfg, tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(rows) == len(conditions(cfg)) == summary["runs"]
    table = (tmp_path / "table.md").read_text()
    assert "Main table" in table and "Trust sweep" in table and "accuracy sweep" in table
    for name in ("main.png", "trust_sweep.png", "accuracy_sweep.png"):
        assert (tmp_path / name).stat().st_size > 0
    for key in ("eval/dpo/foresight/true_utility", "eval/ppo/partial_hindsight/deception_rate"):
        assert -1.0 <= summary[key] <= 1.0
    # resuming a finished run recomputes nothing
    again = run(cfg, tmp_path, resume=True)
    assert again["runs"] == summary["runs"]


def test_benchmark_script_renders_and_keeps_discussion(tmp_path: Path, load_script) -> None:
    script = load_script("run_hindsight_sweep")
    run_dir = tmp_path / "run"
    doc = tmp_path / "doc.md"
    doc.write_text("# Title\n\nintro\n\n<!-- BEGIN generated -->\nstale-generated-text\n<!-- END generated -->\n"
                   "\n## Discussion\nkept\n")
    assert script.main(["--config", str(ROOT / "configs/hindsight/smoke.yaml"), "--output-dir", str(run_dir),
                        "--doc", str(doc), "--horizon-episodes", "0", "methods=[dpo]", "channels=[foresight]",
                        "trust_sweep=[]", "accuracy_sweep=[]"]) == 0
    text = doc.read_text()
    assert "stale-generated-text" not in text and "intro" in text and "## Discussion\nkept" in text
    assert "RLHS rating" in text and "Sweep time" in text and "Main table" in text and "DPO | foresight" in text


@pytest.mark.slow
def test_two_workers_give_identical_results(tmp_path: Path) -> None:
    base = ["seeds=[0]", "methods=[dpo]", "channels=[foresight]", "trust_sweep=[]", "accuracy_sweep=[]",
            "n_pairs=200", "dpo_steps=5", "n_eval=100", "plots=false"]
    one = run(load_config(HindsightMarketConfig, None, base), tmp_path / "one")
    two = run(load_config(HindsightMarketConfig, None, [*base, "workers=2"]), tmp_path / "two")
    for key in one:
        if key.startswith("eval/"):
            assert one[key] == two[key]


def test_table_cells_say_when_nan_seeds_were_left_out():
    from mmalign.hindsight.experiment import _fmt, _mean_std

    assert _fmt(_mean_std([1.0, 3.0])) == "+2.00 ± 1.00"
    assert _fmt(_mean_std([1.0, float("nan"), 3.0])) == "+2.00 ± 1.00 (n=2)"  # not silently a 3-seed mean
    assert _fmt(_mean_std([float("nan")])) == "+nan ± nan"
