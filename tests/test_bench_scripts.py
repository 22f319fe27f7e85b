"""Aggregation of benchmark scripts that have no test file of their own (bench_pbrl, bench_rapl, bench_sharding,
bench_routing): pairing by seed, duplicate rows, n= counts and the lines written into the docs."""

from __future__ import annotations

import argparse
import json
import os

import pytest


def _pbrl_row(seed: int, teacher: str, final: float, init: float = -20.0, **labels: float) -> dict:
    return {"task": "Reacher-v5", "seed": seed, "teacher": teacher, "steps": 1000, "final_true_return": final,
            "curve": [{"step": 0, "eval/true_return": init}, {"step": 1000, "eval/true_return": final}],
            "labels": {"labels/agreement_with_true_return": 1.0, **labels}, "wall_s": 1.0, "cpu_s": 1.0}


@pytest.fixture()
def pbrl(load_script, monkeypatch):
    mod = load_script("bench_pbrl")
    monkeypatch.setattr(mod, "random_return", lambda task: -40.0)  # no env rollout in a unit test
    return mod


def _table_row(text: str, teacher: str) -> list[str]:
    line = next(ln for ln in text.splitlines() if ln.startswith(f"| {teacher} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_pbrl_duplicate_rows_are_counted_once(pbrl, tmp_path):
    """Regression: a second row for the same (task, seed, teacher) (two processes on one folder, concatenated
    results files) was averaged in as an extra seed; now the first row is used and the duplicate reported."""
    rows = [_pbrl_row(s, "true", -10.0) for s in (0, 1)] + [_pbrl_row(0, "oracle", -16.0),
                                                           _pbrl_row(1, "oracle", -13.0),
                                                           _pbrl_row(1, "oracle", -40.0)]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cells = _table_row(pbrl.summarize(tmp_path, None), "oracle")
    # (−16+40)/30 = 0.8, (−13+40)/30 = 0.9
    assert cells[1] == "0,1" and cells[2] == "-14.50 ± 1.50"
    assert cells[3] == "0.850 ± 0.050" and cells[4] == "0.80, 0.90"


def test_pbrl_normalised_score_pairs_seeds_and_counts_them(pbrl, tmp_path):
    """Regression: a seed without a true-reward run was dropped from the normalised score without an n= and the
    per-seed list shifted against the seeds column; now the row says n= and the unpaired seed shows '–'."""
    rows = [_pbrl_row(0, "true", -10.0), _pbrl_row(2, "true", -10.0),
            _pbrl_row(0, "oracle", -16.0), _pbrl_row(1, "oracle", -13.0), _pbrl_row(2, "oracle", -13.0),
            _pbrl_row(0, "equal", -10.0, **{"labels/ties": 3.0}),
            _pbrl_row(2, "equal", -10.0, **{"labels/ties": 4.0}),
            _pbrl_row(0, "label_flip", -10.0)]  # a teacher outside TEACHER_ORDER sorts last instead of crashing
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = pbrl.summarize(tmp_path, None)
    cells = _table_row(text, "oracle")
    assert cells[1] == "0,1,2" and cells[3] == "0.850 ± 0.050 (n=2)" and cells[4] == "0.80, –, 0.90"
    assert _table_row(text, "true")[3] == "1.000 ± 0.000"  # every seed paired: no n= note
    assert _table_row(text, "equal")[8] == "4"  # mean 3.5 ties is rounded (was truncated to 3)
    order = [ln.split("|")[1].strip() for ln in text.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    assert order == ["true", "oracle", "equal", "label_flip"]


def test_pbrl_doc_header_states_machine_and_std(pbrl, tmp_path, monkeypatch):
    rows = [_pbrl_row(0, "true", -10.0), _pbrl_row(0, "oracle", -16.0)]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    doc = tmp_path / "doc.md"
    pbrl.summarize(tmp_path, str(doc))
    text = doc.read_text()
    assert "shared 16-core CPU" in text and "2-core" not in text and "population std over seeds (ddof 0)" in text


def _rapl_metrics(method: str, rho: float) -> dict:
    key = "rapl" if method == "rapl" else "bt_pixels"
    return {"train/steps": 10.0, f"{method}/final_pref_accuracy": 1.0, f"heldout/spearman_{key}": rho,
            f"cross/spearman_{key}": rho, "heldout/spearman_unaligned_ot": 0.1, "heldout/spearman_task_reward": 0.2,
            "cross/spearman_unaligned_ot": 0.1, "cross/spearman_task_reward": 0.2}


def test_rapl_comparison_pairs_seeds_and_states_its_std(load_script, monkeypatch):
    rapl = load_script("bench_rapl")
    tag = "epochs32"
    res = {(tag, 0, "rapl", 25): _rapl_metrics("rapl", 0.8), (tag, 0, "bt", 50): _rapl_metrics("bt", 0.7),
           (tag, 1, "rapl", 25): _rapl_metrics("rapl", 0.5),  # seed 1's BT run is missing: seed 1 is left out
           (tag, 2, "rapl", 25): _rapl_metrics("rapl", 0.6), (tag, 2, "bt", 50): _rapl_metrics("bt", 0.6)}
    rows = rapl.comparison_rows(res, tag, [50], "heldout", [0, 1, 2])
    assert rows[0].startswith("| 25 vs 50 | +0.70 ± 0.10 (n=2) | +0.65 ± 0.05 (n=2) | +0.10 / +0.00 (2/2 seeds ≥ 0) "
                              "| **met** |")
    # must-show uses >=: equal means are met
    tie = {**res, (tag, 0, "bt", 50): _rapl_metrics("bt", 0.8)}
    del tie[(tag, 2, "rapl", 25)]
    assert "| **met** |" in rapl.comparison_rows(tie, tag, [50], "heldout", [0])[0]
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    args = argparse.Namespace(seeds=[0, 1, 2], prefs=[50], epochs=32.0, train_length="epochs", train_steps=100,
                              no_embed_norm=False, cmdline="--seeds 0 1 2", load="load 1", out="runs/x", n_train=160,
                              n_eval=80)
    text = rapl.main_section(res, args, tag)
    assert "shared 16-core CPU" in text and "population std (ddof 0)" in text


def test_sharding_command_line_names_every_non_default_option(load_script):
    """Regression: --warmup and --strategies were left out of the command printed into the docs."""
    sharding = load_script("bench_sharding")
    ap = sharding.parser()
    assert sharding.command_line(ap.parse_args([]), ap) == "python scripts/bench_sharding.py"
    args = ap.parse_args(["--width", "64", "--warmup", "1", "--strategies", "ddp", "zero3"])
    assert sharding.command_line(args, ap) == ("python scripts/bench_sharding.py --width 64 --warmup 1 "
                                               "--strategies ddp zero3")


def test_pearl_section_states_the_measured_load_not_a_fixed_one(load_script, tmp_path, monkeypatch):
    """Regression: the machine line carried a hard-coded "2-core ... load average 8-28 during the runs" into every
    later rebuild; it now reports this machine's core count and load when the section is written."""
    import sys

    pearl = load_script("bench_pearl")
    run_dir = tmp_path / "landmark_entropic" / "seed0"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text(json.dumps({"pearl/label_accuracy": 0.7, "reward/spearman_pearl": 0.5}))
    written = {}
    monkeypatch.setattr(pearl, "write_section", lambda name, body: written.update({name: body}))
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(os, "getloadavg", lambda: (3.25, 0.0, 0.0))
    monkeypatch.setattr(sys, "argv", ["bench_pearl.py", "--seeds", "0", "--from-runs", "--out", str(tmp_path)])
    pearl.main()
    text = written["bench_pearl"]
    assert "shared 16-core CPU" in text and "1-min load average 3.2 when this section was written" in text
    assert "8-28" not in text and "| landmark/entropic | 0.700 ± 0.000 (n=1) |" in text
