"""Jobs that resume by result row: a row cut short by a kill is dropped and its cell runs again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmalign.fileio import read_appended_rows


def test_a_cut_last_row_is_left_out_and_dropped_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    assert read_appended_rows(path) == []
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": ')
    assert read_appended_rows(path, truncate=False) == [{"a": 1}, {"a": 2}]
    assert path.read_text().endswith('{"a": ')  # left alone: another process may be appending
    assert read_appended_rows(path) == [{"a": 1}, {"a": 2}]
    assert path.read_text() == '{"a": 1}\n{"a": 2}\n'


def test_diffusion_benchmark_resumes_past_a_cut_row(tmp_path: Path) -> None:
    from mmalign.diffusion.benchmark import BenchmarkConfig, run

    cfg = BenchmarkConfig(size=8, channels=[8, 16], embed_dim=8, pretrain_steps=2, pretrain_batch=4, num_pairs=8,
                          finetune_steps=1, finetune_batch=4, settings=["style_90"], methods=["mapo"], seeds=[0],
                          samples_per_class=1, sample_steps=2)
    run(cfg, tmp_path)
    rows = (tmp_path / "results.jsonl").read_text().splitlines()
    assert [json.loads(r)["method"] for r in rows] == ["reference", "mapo"]
    assert not list(tmp_path.glob(".*.tmp"))  # the reference was written through a temporary file
    (tmp_path / "results.jsonl").write_text(rows[0] + "\n" + rows[1][:20])  # killed while appending the mapo row
    run(cfg, tmp_path, resume=True)
    again = (tmp_path / "results.jsonl").read_text().splitlines()
    strip = lambda r: {k: v for k, v in json.loads(r).items() if k != "seconds"}  # noqa: E731
    assert [strip(r) for r in again] == [strip(r) for r in rows]


def test_vlm_benchmark_resumed_after_its_last_row_keeps_every_row(tmp_path: Path) -> None:
    """Regression (found by a kill in the last fifth of the run): a resume of a run whose rows were all stored wrote
    back the SFT row alone."""
    from mmalign.vision_lm.benchmark import BenchmarkConfig, run

    cfg = BenchmarkConfig(seeds=[0], methods=["dpo"], n_sft_scenes=16, sft_steps=2, batch_size=8, n_pref_scenes=8,
                          pref_steps=2, pref_batch_size=4, n_test_scenes=4, vision_steps=2, lora_r=2)
    first = run(cfg, tmp_path)
    stored = (tmp_path / "results.json").read_text()
    assert list(json.loads(stored)["0"]) == ["sft", "dpo"]
    assert run(cfg, tmp_path, resume=True) == first
    assert (tmp_path / "results.json").read_text() == stored


def test_sharded_diffusion_benchmark_names_cells_claimed_by_a_killed_worker(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A worker killed after claiming a cell leaves its claim: the others skip that cell, and say so (never silently)."""
    from mmalign.diffusion.benchmark import BenchmarkConfig, run

    cfg = BenchmarkConfig(size=8, channels=[8, 16], embed_dim=8, pretrain_steps=2, pretrain_batch=4, num_pairs=8,
                          finetune_steps=1, finetune_batch=4, settings=["style_90"], methods=["mapo"], seeds=[0],
                          samples_per_class=1, sample_steps=2, num_shards=2, shard=0)
    (tmp_path / "claims").mkdir()
    (tmp_path / "claims" / "style_90-mapo-0").touch()  # the killed worker's claim
    summary = run(cfg, tmp_path)
    assert summary["cells/pending"] == 1.0
    assert "1 cell(s) claimed by other workers have no row yet (style_90-mapo-0)" in capsys.readouterr().out
    (tmp_path / "claims" / "style_90-mapo-0").unlink()  # as the message says
    assert run(cfg, tmp_path, resume=True)["cells/pending"] == 0.0
