"""Robotics benchmark scripts (bench_pbrl, bench_rapl, bench_pearl, bench_cpl): the seed protocol's flags, pairing
by seed, duplicate rows, 95% t-intervals and the lines written into the docs."""

from __future__ import annotations

import argparse
import json
import os
import sys

import pytest

from mmalign.robotics.protocol import seed_plan


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


def _write(tmp_path, rows) -> None:  # noqa: ANN001
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_pbrl_duplicates_counted_once_and_t_intervals(pbrl, tmp_path):
    """A second row for the same (task, seed, teacher) is ignored; spreads are 95% t half-widths."""
    _write(tmp_path, [_pbrl_row(s, "true", -10.0) for s in (0, 1)]
           + [_pbrl_row(0, "oracle", -16.0), _pbrl_row(1, "oracle", -13.0), _pbrl_row(1, "oracle", -40.0)])
    cells = _table_row(pbrl.summarize(tmp_path, None), "oracle")
    # finals -16, -13: s/sqrt(2) = 1.5, t_{0.975,1} = 12.706 -> 19.06; init-normalised (−16+20)/10, (−13+20)/10
    assert cells[1] == "0,1" and cells[2] == "-14.50 ± 19.06 (n=2)"
    assert cells[3] == "0.55 ± 1.91 (n=2)"
    assert cells[4] == "0.850 ± 0.635 (n=2)" and cells[5] == "0.80, 0.90"  # random-normalised (−16+40)/30, ...


def test_pbrl_pairs_seeds_and_filters_to_the_plan(pbrl, tmp_path):
    _write(tmp_path, [_pbrl_row(0, "true", -10.0), _pbrl_row(2, "true", -10.0), _pbrl_row(0, "oracle", -16.0),
                      _pbrl_row(1, "oracle", -13.0), _pbrl_row(2, "oracle", -13.0),
                      _pbrl_row(0, "equal", -10.0, **{"labels/ties": 3.0}),
                      _pbrl_row(2, "equal", -10.0, **{"labels/ties": 4.0}), _pbrl_row(0, "label_flip", -10.0)])
    text = pbrl.summarize(tmp_path, None)
    cells = _table_row(text, "oracle")
    assert cells[1] == "0,1,2" and cells[4] == "0.850 ± 0.635 (n=2)"  # n counts the seeds paired with a true run
    assert cells[5] == "0.80, –, 0.90"  # the seed without a true-reward run shows '–'
    assert _table_row(text, "equal")[8] == "4"  # mean 3.5 ties rounds
    order = [ln.split("|")[1].strip() for ln in text.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    assert order == ["true", "oracle", "equal", "label_flip"]
    only_2 = pbrl.summarize(tmp_path, None, plan=seed_plan([0, 1], [2], sized_down="test"))
    assert _table_row(only_2, "oracle")[1] == "2"
    with pytest.raises(SystemExit, match="no run on seeds"):
        pbrl.summarize(tmp_path, None, plan=seed_plan([0], [7], sized_down="test"))


def test_pbrl_doc_needs_reporting_seeds_and_states_the_protocol(pbrl, tmp_path, monkeypatch):
    _write(tmp_path, [_pbrl_row(s, t, -10.0 - (t == "oracle")) for s in (5, 6) for t in ("true", "oracle")])
    doc = tmp_path / "doc.md"
    monkeypatch.setattr(sys, "argv", ["bench_pbrl.py", "--summarize", str(tmp_path), "--doc", str(doc)])
    with pytest.raises(SystemExit):
        pbrl.main()  # development seeds only: no reported table
    assert not doc.exists()
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(sys, "argv", ["bench_pbrl.py", "--summarize", str(tmp_path), "--doc", str(doc),
                                      "--report-seeds", "5", "6", "--sized-down", "unit test"])
    pbrl.main()
    text = doc.read_text()
    assert "shared 16-core CPU" in text and "95% t half-width" in text
    assert "reporting seeds [5, 6] (n=2), disjoint from the development seeds [0, 1, 2]" in text


def _rapl_metrics(rapl: float | None, bt: float | None) -> dict:
    m = {"heldout/spearman_unaligned_ot": 0.1, "heldout/spearman_task_reward": 0.2, "cross/spearman_unaligned_ot": 0.1,
         "cross/spearman_task_reward": 0.2, "time/cpu_s": 360.0}
    for split in ("heldout", "cross"):
        if rapl is not None:
            m[f"{split}/spearman_rapl"] = rapl
        if bt is not None:
            m[f"{split}/spearman_bt_pixels"] = bt
    return m


def test_rapl_verdict_is_a_paired_non_inferiority_test(load_script, monkeypatch):
    rapl = load_script("bench_rapl")
    args = argparse.Namespace(rapl_budgets=[10], bt_budgets=[10, 50], ratio=5, margin=0.05, n_train=160, n_eval=80,
                              image_size=32, pretrain_cross=60,
                              pretrain_steps=500, pretrain_window=2, pretrain_temperature=0.1, epochs=32.0,
                              out="runs/x", cmdline="--report-seeds 5 6 7")
    seeds = (5, 6, 7)
    res = {}
    for s, (r, bp, bs) in zip(seeds, [(0.80, 0.70, 0.60), (0.82, 0.75, 0.62), (0.78, 0.74, 0.58)]):
        res[(s, "pre", 10)] = _rapl_metrics(r, 0.5)
        res[(s, "scratch", 10)] = _rapl_metrics(0.6, 0.4)
        res[(s, "pre", 50)] = _rapl_metrics(None, bp)
        res[(s, "scratch", 50)] = _rapl_metrics(None, bs)
    rows = rapl.verdict_rows(res, args, seeds, "heldout")
    assert len(rows) == 2 and rows[0].startswith("| RAPL-pre@10 vs BT-pre@50 | +0.80 ± 0.05 (n=3) |")
    assert "(n=3, 3/3 seeds > 0)" in rows[0] and rows[0].endswith("**holds** |")
    # BT clearly better on every seed: the claim fails
    worse = {**res, **{(s, "pre", 50): _rapl_metrics(None, 0.95 + 0.01 * i) for i, s in enumerate(seeds)}}
    assert rapl.verdict_rows(worse, args, seeds, "heldout")[0].endswith("**fails** (BT better) |")
    curves = rapl.curve_rows(res, args, seeds, "heldout")
    assert curves[1].startswith("| 50 | – | – | +0.73")  # RAPL not run at 50
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    text = rapl.section(res, args, seed_plan([0, 1], list(seeds), sized_down="unit test"))
    assert "CPU time of this table 1.20 h (12 runs" in text and "shared 16-core CPU" in text
    assert "sized down" in text and "non-inferiority" in text


def test_rapl_script_refuses_overlapping_seeds(load_script, monkeypatch):
    rapl = load_script("bench_rapl")
    monkeypatch.setattr(sys, "argv", ["bench_rapl.py", "--dev-seeds", "0", "1", "--report-seeds", "1", "2", "3", "4",
                                      "5"])
    with pytest.raises(SystemExit):
        rapl.main()


def test_pearl_policy_section_pairs_pearl_with_each_baseline_per_descriptor(load_script, tmp_path, monkeypatch):
    pearl = load_script("bench_pearl")
    names = ("pearl", "true_labels", "no_transfer", "true_reward", "bc")
    for desc, base in (("landmark", -9.0), ("raw", -12.0)):
        for seed, acc in ((5, 0.7), (6, 0.8)):
            run_dir = tmp_path / f"{desc}_entropic" / f"seed{seed}"
            run_dir.mkdir(parents=True)
            returns = dict(zip(names, (base + seed - 5, -8.5, -11.0, -8.0, -12.5)))
            (run_dir / "metrics.json").write_text(json.dumps({
                "pearl/label_accuracy": acc, "reward/spearman_pearl": 0.5, "time/cpu_s": 900.0,
                **{f"offline/true_return_{k}": v for k, v in returns.items()},
                **{f"offline/puck_moved_{k}": 1.0 for k in names}}))
    written = {}
    monkeypatch.setattr(pearl, "write_section", lambda name, body: written.update({name: body}))
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(os, "getloadavg", lambda: (3.25, 0.0, 0.0))
    monkeypatch.setattr(sys, "argv", ["bench_pearl.py", "--report-seeds", "5", "6", "--sized-down", "unit test",
                                      "--from-runs", "--out", str(tmp_path)])
    pearl.main()
    text = written["bench_pearl"]
    assert "shared 16-core CPU" in text and "1-min load average 3.2 when written" in text
    assert "CPU time of this table 1.00 h (4 runs)" in text and "95% t half-width" in text
    rows = {ln.split(" | ")[0]: ln for ln in text.splitlines() if ln.startswith(("| landmark", "| raw"))}
    # label accuracy 0.75 ± t_{0.975,1} * 0.05 = 0.635; PEARL −8.5 ± 6.35; PEARL − no transfer +2.50 on both seeds
    assert rows["| landmark"].startswith("| landmark | 0.750 ± 0.635 (n=2) | +0.50 ± 0.00 (n=2) | -8.50 ± 6.35 (n=2)")
    assert "| +2.50 ± 6.35 (n=2, 2/2 seeds > 0) | +4.00 ± 6.35 (n=2, 2/2 seeds > 0) |" in rows["| landmark"]
    assert "| -3.00 ± 6.35 (n=2, 0/2 seeds > 0) |" in rows["| raw"]  # raw PEARL −11.5 vs true labels −8.5
    written.clear()
    monkeypatch.setattr(sys, "argv", ["bench_pearl.py", "--dev-seeds", "5", "6", "--from-runs", "--out",
                                      str(tmp_path)])
    pearl.main()
    assert not written  # a development run writes no table


def test_pearl_script_refuses_an_unknown_variant(load_script, monkeypatch, tmp_path):
    pearl = load_script("bench_pearl")
    monkeypatch.setattr(sys, "argv", ["bench_pearl.py", "--variants", "landmark", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit):
        pearl.main()
    assert not (tmp_path / "o").exists()


def test_cpl_script_refuses_a_doc_without_reporting_seeds(load_script, monkeypatch, tmp_path):
    cpl = load_script("bench_cpl")
    monkeypatch.setattr(sys, "argv", ["bench_cpl.py", "--out", str(tmp_path / "o"), "--doc", str(tmp_path / "d.md")])
    with pytest.raises(SystemExit):
        cpl.main()
    assert not (tmp_path / "o").exists()  # refused before any work


def test_pearl_noise_sweep_table_pairs_gaussian_and_bt(load_script, tmp_path, monkeypatch):
    pearl = load_script("bench_pearl")
    keys = ("pearl/label_accuracy", "reward/spearman_pearl", "reward/spearman_pearl_bt", "reward/spearman_true_labels",
            "reward/spearman_true_labels_bt", "reward/spearman_no_transfer")
    for seed, g in ((10, 0.6), (11, 0.7)):
        run_dir = tmp_path / "noise_raw_flip0.2" / f"seed{seed}"
        run_dir.mkdir(parents=True)
        vals = dict(zip(keys, (0.6, g, g - 0.1, 0.8, 0.8, 0.0)))
        (run_dir / "metrics.json").write_text(json.dumps({**vals, "time/cpu_s": 1800.0}))
    written = {}
    monkeypatch.setattr(pearl, "write_section", lambda name, body: written.update({name: body}))
    monkeypatch.setattr(sys, "argv", ["bench_pearl.py", "--flips", "0.2", "--report-seeds", "10", "11", "--sized-down",
                                      "unit test", "--from-runs", "--out", str(tmp_path)])
    pearl.main()
    text = written["bench_pearl_noise"]
    row = next(ln for ln in text.splitlines() if ln.startswith("| raw | 0.2 |"))
    assert "+0.10 ± 0.00 (n=2, 2/2 seeds > 0)" in row and "+0.65 ± 0.64 (n=2)" in row
    assert "CPU time of this table 1.00 h (2 runs)" in text


def test_rapl_development_run_prints_and_writes_nothing(load_script, tmp_path, monkeypatch):
    rapl = load_script("bench_rapl")
    run_dir = tmp_path / "seed0_pre10"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text(json.dumps({**_rapl_metrics(0.7, 0.6), "pretrain/final_accuracy": 0.9}))
    written = {}
    monkeypatch.setattr(rapl, "write_section", lambda name, body: written.update({name: body}))
    monkeypatch.setattr(sys, "argv", ["bench_rapl.py", "--dev-seeds", "0", "--rapl-budgets", "10", "--bt-budgets", "10",
                                      "--from-runs", "--out", str(tmp_path)])
    rapl.main()
    assert not written


def test_pbrl_sweep_builds_valid_configs_for_the_headline_recipe(pbrl, tmp_path, monkeypatch):
    """Regression: --normalize-act without --act-weight passed rm_act_weight=0.0, which PebbleConfig refuses
    (None means automatic); the sweep crashed before its first run."""
    import mmalign.robotics.pebble as pebble

    seen = []

    def fake_train(cfg, progress=None):  # noqa: ANN001, ANN202
        seen.append(cfg)
        return {"final_true_return": -10.0, "curve": [{"step": 0, "eval/true_return": -20.0},
                                                      {"step": 1000, "eval/true_return": -10.0}], "labels": {}}

    monkeypatch.setattr(pebble, "train_agent", fake_train)
    monkeypatch.setattr(sys, "argv", ["bench_pbrl.py", "--tasks", "Reacher-v5", "--teachers", "oracle",
                                      "--dev-seeds", "0", "--normalize-act", "--action-squares", "--out",
                                      str(tmp_path)])
    pbrl.main()
    assert len(seen) == 2 and seen[1].normalize_act and seen[1].rm_act_weight is None
    assert seen[1].eval_episodes == 10


def _fake_train(seen: list):  # noqa: ANN202 - a stand-in for pebble.train_agent
    def train(cfg, progress=None):  # noqa: ANN001, ANN202
        seen.append(cfg)
        return {"final_true_return": -10.0, "curve": [{"step": 0, "eval/true_return": -20.0},
                                                      {"step": 1000, "eval/true_return": -10.0}], "labels": {}}
    return train


def test_pbrl_teacher_overrides_name_the_row_and_reuse_only_matching_runs(pbrl, tmp_path, monkeypatch):
    """``mistake:eps_mistake=0.2`` (the label-flip teacher at 0.2) runs as its own row; a stored row is reused only
    when its settings equal this call's, and a misspelt field is refused before any run."""
    import mmalign.robotics.pebble as pebble

    assert pbrl.parse_teacher("mistake:eps_mistake=0.2,sample=true") == ("mistake", {"eps_mistake": 0.2,
                                                                                     "sample": True})
    assert pbrl.teacher_row_name("mistake:eps_mistake=0.2") == "mistake [eps_mistake=0.2]"
    assert pbrl.teacher_row_name("oracle", "250 labels") == "oracle [250 labels]"
    with pytest.raises(ValueError, match="NAME:field=value"):
        pbrl.parse_teacher("mistake:0.2")
    seen: list = []
    monkeypatch.setattr(pebble, "train_agent", _fake_train(seen))
    argv = ["bench_pbrl.py", "--tasks", "Reacher-v5", "--dev-seeds", "0", "--out", str(tmp_path), "--teachers"]
    monkeypatch.setattr(sys, "argv", argv + ["oracle", "mistake:eps_mistke=0.2"])
    with pytest.raises(SystemExit):
        pbrl.main()
    assert not seen and not (tmp_path / "results.jsonl").exists()
    monkeypatch.setattr(sys, "argv", argv + ["mistake:eps_mistake=0.2"])
    pbrl.main()
    assert [c.teacher for c in seen] == ["oracle", {"name": "mistake", "eps_mistake": 0.2}]
    rows = [json.loads(ln) for ln in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["teacher"] for r in rows] == ["true", "mistake [eps_mistake=0.2]"]
    pbrl.main()  # same settings: both rows reused, nothing run again
    assert len(seen) == 2
    monkeypatch.setattr(sys, "argv", argv + ["mistake:eps_mistake=0.2", "--labels", "500"])
    with pytest.raises(SystemExit, match="label_budget: stored 1000, now 500"):
        pbrl.main()
    assert len(seen) == 2


def test_pbrl_noisy_teachers_paired_with_the_oracle_and_all_curves_drawn(pbrl, tmp_path):
    """Each teacher other than the oracle gets its per-seed difference to the oracle; the teachers' figure draws all
    seven curves (true + six teachers), and more curves than colours is an error, not a silently dropped curve."""
    from mmalign.robotics.report import plot_curves

    teachers = ["stochastic", "mistake", "mistake [eps_mistake=0.2]", "skip", "equal", "myopic"]
    rows = [_pbrl_row(s, "true", -10.0) for s in (0, 1, 2)] + [_pbrl_row(s, "oracle", -14.0 - s) for s in (0, 1, 2)]
    rows += [_pbrl_row(s, t, -16.0 - 2 * s) for s in (0, 1, 2) for t in teachers]
    _write(tmp_path, rows)
    text = pbrl.summarize(tmp_path, None)
    # teacher − oracle per seed: −2, −3, −4 -> mean −3, s = 1, t_{0.975,2} = 4.303 -> 2.48
    assert _table_row(text, "mistake [eps_mistake=0.2]")[-1] == "-3.00 ± 2.48 (n=3, 0/3 seeds > 0)"
    assert _table_row(text, "oracle")[-1] == "-" and _table_row(text, "true")[-1] == "-"
    assert (tmp_path / "curves_Reacher-v5_teachers.png").stat().st_size > 0
    with pytest.raises(ValueError, match="at most 10 curves, got 11"):
        plot_curves({f"c{i}": [{"step": 0, "eval/true_return": 0.0}] for i in range(11)}, tmp_path / "x.png")


def test_pbrl_task_without_defaults_gets_ten_evaluation_episodes(pbrl, tmp_path, monkeypatch):
    """A held-out task (no TASK_DEFAULTS entry) is evaluated on >= 10 episodes, as the seed protocol asks."""
    import mmalign.robotics.pebble as pebble

    seen: list = []
    monkeypatch.setattr(pebble, "train_agent", _fake_train(seen))
    monkeypatch.setattr(sys, "argv", ["bench_pbrl.py", "--tasks", "Hopper-v5", "--teachers", "oracle", "--dev-seeds",
                                      "0", "--out", str(tmp_path)])
    pbrl.main()
    assert [(c.env_id, c.eval_episodes, c.segment_length) for c in seen] == [("Hopper-v5", 10, 25)] * 2
