"""scripts/bench_diffusion.py: MaPO ablation options (c, T, margin weight per run folder), --merge and --doc."""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench(load_script):
    return load_script("bench_diffusion")


def _tiny_cfg():
    from mmalign.diffusion.benchmark import BenchmarkConfig

    return BenchmarkConfig(size=8, channels=[8, 16], embed_dim=8, num_pairs=8, finetune_steps=1, finetune_batch=4,
                           settings=["style_90"], methods=["mapo"], seeds=[0])


def _mapo_step_metrics(cfg, c=None, temperature=None, bench=None) -> dict[str, float]:
    from mmalign.diffusion.benchmark import build_model, finetune, make_pairs

    torch.manual_seed(0)
    ref = build_model(cfg).eval()
    pairs = make_pairs("style_90", cfg.num_pairs, torch.Generator().manual_seed(1), cfg.size)
    _, metrics = finetune(bench.with_mapo_options(cfg, c, temperature), ref, "mapo", pairs, seed=0)
    return metrics


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_mapo_options_are_validated(bench, bad):
    with pytest.raises(ValueError, match="--mapo-c"):
        bench.check_mapo_options(bad, None)
    with pytest.raises(ValueError, match="--mapo-temperature"):
        bench.check_mapo_options(None, bad)
    with pytest.raises(ValueError, match="--mapo-temperature"):
        bench.with_mapo_options(_tiny_cfg(), None, bad)
    with pytest.raises(ValueError, match="mapo_c"):
        dataclasses.replace(_tiny_cfg(), mapo_c=bad)


def test_mapo_parameters_reach_the_benchmark_loss(bench):
    cfg = _tiny_cfg()
    official = _mapo_step_metrics(cfg, bench=bench)
    # one step: the metrics are those of the initial model on the same (ε, t), so only c / T differ
    assert official["rewards/chosen"] == pytest.approx(1000.0 * official["mapo/win_score"], rel=1e-5)
    hot = _mapo_step_metrics(cfg, temperature=10.0, bench=bench)
    assert hot["rewards/chosen"] == pytest.approx(10.0 * hot["mapo/win_score"], rel=1e-5)
    assert hot["mapo/win_score"] == pytest.approx(official["mapo/win_score"], rel=1e-6)
    sharp = _mapo_step_metrics(cfg, c=2.0, bench=bench)
    assert sharp["mapo/chosen_err"] == pytest.approx(official["mapo/chosen_err"], rel=1e-6)
    assert sharp["mapo/win_score"] < official["mapo/win_score"]  # s(l) = cl/(e^{cl}-1) falls with c


def test_labels_and_variants(bench, tmp_path):
    official = bench.mapo_variant(0.1, None, None)
    assert official == {"w": 0.1, "T": 1000.0, "c": 0.5}
    assert bench._label("mapo@1e-3", official) == "mapo@1e-3"  # defaults keep the existing tables' names
    assert bench._label("mapo@1e-3", bench.mapo_variant(0.0, None, 100.0)) == "mapo[w=0,T=100]@1e-3"
    assert bench._label("mapo", bench.mapo_variant(0.1, 2.0, None)) == "mapo[c=2]"
    assert bench._label("sft@1e-3", bench.mapo_variant(0.0, 2.0, 100.0)) == "sft@1e-3"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"mapo_margin_weight": 1000.0}))
    (tmp_path / "script_options.json").write_text(json.dumps({"w": 1000.0, "T": 1000.0, "c": 0.1}))
    assert bench.folder_variant(tmp_path) == {"w": 1000.0, "T": 1000.0, "c": 0.1}
    assert bench.folder_variant(tmp_path / "missing") == official


def _rows(method: str, seeds=(0, 1), pref=0.5) -> list[dict]:
    return [{"setting": s, "method": m, "seed": seed, "pref_score": pref, "fidelity_iou": 0.8, "shape_acc": 1.0}
            for seed in seeds for s in ("style_0", "style_90") for m in ("reference", method)]


def test_record_options_refuses_mixing_variants(bench, tmp_path):
    bench.record_options(tmp_path, bench.mapo_variant(0.1, None, 100.0))
    bench.record_options(tmp_path, bench.mapo_variant(0.1, None, 10.0))  # no MaPO rows yet: allowed
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows("mapo@1e-3")))
    bench.record_options(tmp_path, bench.mapo_variant(0.1, None, 10.0))  # same variant: allowed
    with pytest.raises(ValueError, match="fresh --run-dir"):
        bench.record_options(tmp_path, bench.mapo_variant(0.1, 2.0, 10.0))


def test_report_only_merges_folders_into_a_doc_section(bench, tmp_path, monkeypatch):
    main, other = tmp_path / "official", tmp_path / "T100"
    for d, method, pref in ((main, "mapo@1e-3", 0.5), (other, "mapo@1e-3", 0.25)):
        d.mkdir()
        (d / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(method, pref=pref)))
    (other / "script_options.json").write_text(json.dumps({"w": 0.1, "T": 100.0, "c": 0.5}))
    doc = tmp_path / "bench.md"
    monkeypatch.setattr(sys, "argv", [
        "bench_diffusion.py", "--run-dir", str(main), "--config", str(ROOT / "configs/diffusion/benchmark.yaml"),
        "--report-only", "--doc", str(doc), "--section", "ablation", "--format", "both", "--merge", str(other),
        "settings=[style_0,style_90]", "methods=[mapo@1e-3]"])
    bench.main()
    text = doc.read_text()
    assert "<!-- ablation:start -->" in text and f"--merge {other}" in text
    assert "| mapo@1e-3 | 0.50 ± 0.00 (n=2) | 0.50 ± 0.00 (n=2) |" in text
    assert "| mapo[T=100]@1e-3 | 0.25 ± 0.00 (n=2) | 0.25 ± 0.00 (n=2) |" in text
    assert text.count("| reference |") == 4  # shared reference cells counted once per table
    monkeypatch.setattr(sys, "argv", ["bench_diffusion.py", "--run-dir", str(main), "--report-only",
                                      "--doc", str(doc), "--merge", str(tmp_path / "nowhere")])
    with pytest.raises(ValueError, match="--merge"):
        bench.main()


def test_paired_table_differences_and_baseline_check(bench, tmp_path, monkeypatch):
    from mmalign.diffusion.benchmark import BenchmarkConfig

    cfg = BenchmarkConfig(settings=["style_0", "style_90"], methods=["mapo@1e-3"])
    rows = _rows("mapo@1e-3", pref=0.5) + [
        {**r, "method": "mapo[T=100]@1e-3", "pref_score": 0.25 + 0.25 * r["seed"]} for r in _rows("x", pref=0)
        if r["method"] == "x"]
    text = bench.paired_table(bench.merged_rows([rows]), cfg, "mapo@1e-3")
    # differences per cell: -0.25 (seed 0) and 0.0 (seed 1), twice each: mean -0.125, t(4 cells) = 3.18
    half = 3.18 * 0.14433756729740643 / 2
    row = f"| mapo[T=100]@1e-3 | 4 | -0.12 ± {half:.2f} | -0.12 ± {half:.2f} | +0.00 ± 0.00 | +0.00 ± 0.00 |"
    assert row in text
    assert "| reference | 4 | +0.00 ± 0.00 |" in text  # same scores as the baseline in every cell
    assert "| mapo@1e-3 |" not in text  # the baseline itself has no row
    monkeypatch.setattr(sys, "argv", ["bench_diffusion.py", "--run-dir", str(tmp_path), "--report-only",
                                      "--baseline", "dpo_5000", "methods=[mapo@1e-3]"])
    with pytest.raises(ValueError, match="--baseline"):
        bench.main()


def test_table_compares_mapo_and_dpo_within_each_adapter_kind(bench):
    """Full fine-tuning and LoRA arms get separate "MaPO − best DPO" tables; new metrics appear when every row has
    them (rows of older runs lack pref_shape / w1_chosen)."""
    from mmalign.diffusion.benchmark import BenchmarkConfig

    methods = ["mapo", "dpo_500", "mapo+lora8@1e-2", "mapo+lora8@1e-3", "dpo_500+lora8", "dpo_5000+lora8"]
    cfg = BenchmarkConfig(settings=["style_0", "style_90"], methods=methods)
    pref = {"mapo": 0.5, "dpo_500": 0.75, "mapo+lora8@1e-2": 0.5, "mapo+lora8@1e-3": 0.375, "dpo_500+lora8": 0.25,
            "dpo_5000+lora8": 0.125}
    rows = [{"setting": s, "method": m, "seed": 0, "pref_score": pref.get(m, 0.0), "fidelity_iou": 0.8,
             "shape_acc": 0.5, "pref_shape": pref.get(m, 0.0) / 2, "w1_chosen": 30.0}
            for s in ("style_0", "style_90") for m in ["reference", *methods]]
    text = bench.table(rows, cfg)
    assert "**MaPO − best Diffusion-DPO β (per setting" in text and "| style_90 | 0.50 | 0.75 (500) | – | -0.25 |" in text
    # two MaPO lrs: the better one per setting, labelled with its lr
    assert "β (lora8)" in text and "| style_90 | 0.50 (@1e-2) | 0.25 (500+lora8) | – | +0.25 |" in text
    assert "Per-sample joint score" in text and "| dpo_500+lora8 | 0.12 (n=1) | 0.12 (n=1) |" in text
    assert "Circular W1" in text
    old = [{k: v for k, v in r.items() if k not in ("pref_shape", "w1_chosen")} for r in rows]
    assert "Circular W1" not in bench.table(old + rows[:1], cfg)


def test_ci_uses_the_t_quantile_beyond_the_table(bench):
    """Regression: above 15 values the half-width used a flat t = 2.0 (t(24) = 2.064: 25-cell paired CIs were 3%
    too narrow). The quantile now follows Student's t at every n."""
    assert bench._t975(4) == 2.78 and bench._t975(14) == 2.14
    for df, exact in ((15, 2.1314), (24, 2.0639), (29, 2.0452), (100, 1.9840)):
        assert bench._t975(df) == pytest.approx(exact, abs=2e-4)
    values = [0.0, 1.0] * 12 + [0.5]  # 25 values: mean 0.5, sample std 0.5
    half = 2.0639 * statistics.stdev(values) / 5
    assert bench._ci(values) == f"0.50 ± {half:.2f}" and f"{half:.2f}" != f"{2.0 * statistics.stdev(values) / 5:.2f}"


def test_best_lr_table_says_when_the_lr_was_picked_on_the_reported_cells(bench):
    from mmalign.diffusion.benchmark import BenchmarkConfig

    cfg = BenchmarkConfig(settings=["style_0", "style_90"], methods=["mapo@1e-3", "mapo@1e-4"])
    one = bench.best_lr_table(_rows("mapo@1e-3"), cfg)
    assert "these same cells" not in one  # one lr per method: picked elsewhere (e.g. a sweep), nothing to flag
    rows = _rows("mapo@1e-3", pref=0.5) + [r for r in _rows("mapo@1e-4", pref=0.9) if r["method"] != "reference"]
    two = bench.best_lr_table(rows, cfg)
    assert "picked by mean pref × shape over these same cells and seeds: optimistic" in two
    assert "| mapo (0.0001) | 0.90 / 0.80 / 1.00 | 0.90 / 0.80 / 1.00 | 0.90 |" in two
