"""scripts/bench_halluc.py: refuses preference rows when a gate fails; verdicts from paired, Holm-corrected tests;
the real per-seed pipeline on a tiny configuration."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mmalign.vision_lm import halluc_base as H

PASS = {"pope_random_acc": 0.9, "pope_popular_acc": 0.9, "pope_adversarial_acc": 0.7, "blank_pope_random_acc": 0.5,
        "partner_balanced_acc": 0.7, "partner_yes_ratio": 0.6, "bayes_partner_balanced_acc": 0.92}


@pytest.fixture(scope="module")
def bench(load_script):
    return load_script("bench_halluc")


def _row(primary: float, yes: float = 0.5, kl: float = 0.1) -> dict:
    return {"partner_balanced_acc": primary, "partner_f1": primary, "partner_yes_ratio": yes,
            "partner_violating_yes": 0.3, "partner_visible_recall": 0.9, "pope_adversarial_acc": 0.7,
            "pope_random_acc": 0.9, "diag/token_kl_to_base": kl, "n_pairs": 10.0,
            "diag/corrupt_rejected_correct_all": 0.0, "diag/corrupt_rejected_correct_caption": 0.0,
            "diag/token_kl_step25": kl / 2}


def _fake_run_seed(shift: dict[str, float], base: dict[str, float]):
    def run(cfg, seed, run_dir, cache_dir, force=False, on_row=None):
        gates = H.gates(base)
        rows = {}
        if all(gates.values()) or force:
            for m in cfg.methods:
                noise = 0.01 * ((seed * 7 + len(m)) % 3 - 1)  # differs per seed and row: a real paired spread
                rows[m] = _row(0.7 + shift.get(m, 0.0) + noise, yes=0.5 if m != "bdhs_offline" else 0.8,
                               kl=0.1 if m != "rrpo" else 0.01)
        return {"base": base, "base_info": {"build_cpu_s": 1.0}, "gates": gates, "rows": rows, "cpu_s": 2.0,
                "forced": False}
    return run


def _args(tmp_path, *extra):
    return ["--seeds", "report", "--run-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"),
            "report_seeds=[0,1,2,3,4]", "dev_seeds=[9]", *extra]


def test_failed_gate_refuses_preference_rows(bench, tmp_path, monkeypatch):
    doc = tmp_path / "vision_lm.md"
    monkeypatch.setattr(bench, "DOC", doc)
    monkeypatch.setattr(bench, "run_seed", _fake_run_seed({}, {**PASS, "pope_random_acc": 0.6}))
    assert bench.main(_args(tmp_path)) == 3
    text = doc.read_text()
    assert "FAIL: pope_random_violating >= 0.85" in text and "no preference row is reported" in text
    assert "Not tested: the base model fails pope_random_violating >= 0.85" in text
    assert "| robust DPO: recovers from flipped labels | unbiased DPO loss under flip rate eps | not tested |" in text
    assert "Δ vs DPO" not in text and "### Methods" not in text
    seed0 = json.loads((tmp_path / "runs" / "seed0.json").read_text())
    assert seed0["rows"] == {}


def test_verdicts_from_holm_corrected_paired_differences(bench, tmp_path, monkeypatch):
    doc = tmp_path / "vision_lm.md"
    monkeypatch.setattr(bench, "DOC", doc)
    shift = {"realign": 0.05, "bdhs_offline": 0.05, "rrpo": 0.05, "robust_dpo_flipped": 0.0}
    monkeypatch.setattr(bench, "run_seed", _fake_run_seed(shift, PASS))
    assert bench.main(_args(tmp_path)) == 0
    text = doc.read_text()
    lines = {ln.split(" | ")[0].lstrip("| "): ln for ln in text.splitlines() if ln.startswith("| ")}
    assert lines["Re-Align: its pairs + rDPO beat DPO on rule-corrupted pairs"].endswith("| reproduced |")
    # BDHS's gain comes with a yes-ratio of 0.8: it does not count
    assert lines["BDHS: image-hidden rejected answers beat DPO's pairs"].endswith("| not reproduced |")
    assert "| 0.80 |" in lines["BDHS: image-hidden rejected answers beat DPO's pairs"]
    assert lines["RRPO: less hallucination than DPO"].endswith("| reproduced |")
    assert lines["RRPO: diverges less from the reference than DPO"].endswith("| reproduced |")
    assert "-0.090 ± 0.000 (token KL)" in lines["RRPO: diverges less from the reference than DPO"]
    robust = lines["robust DPO: recovers from flipped labels"]
    assert robust.endswith("| not reproduced |") or robust.endswith("| inconclusive |")
    assert "Every seed's base model passes every gate." in text and "n = 5" in text
    assert "Holm-corrected over the 7 claims" in text
    table4 = lines["Re-Align: rDPO beats DPO on the same pairs"]
    assert "| DPO on Re-Align's pairs | +0.05" in table4 and table4.endswith("| reproduced |")
    diag = text.split("### Mechanism diagnostics")[1].split("## Base model")[0].splitlines()
    assert "| method | KL step 25 | rejected correct: captions | yes/no | other |" in diag
    rows = [ln for ln in diag if ln.startswith("| ") and "±" in ln]
    assert len(rows) == 8 and rows[0].startswith("| DPO (rule-corrupted pairs) | 0.050 ± 0.000 | 0.000 ± 0.000 |")
    assert sum(ln.split(" | ")[2] == "0.000 ± 0.000" for ln in rows) == 1  # the shared pair set's: shown once


def test_config_refuses_overlapping_seeds_and_missing_baseline():
    from mmalign.vision_lm.halluc_bench import HallucBenchConfig

    with pytest.raises(ValueError, match="overlap"):
        HallucBenchConfig(report_seeds=[0, 1], dev_seeds=[1])
    with pytest.raises(ValueError, match="baseline"):
        HallucBenchConfig(methods=["rrpo"])
    with pytest.raises(ValueError, match="primary_metric"):
        HallucBenchConfig(primary_metric="chair_i")


def test_answer_correct_and_diagnostics():
    from mmalign.vision_lm.halluc_bench import answer_correct, pair_diagnostics
    from mmalign.vision_lm.objectives import PrefPair
    from mmalign.vision_lm.scenes import Scene, SceneObject

    scene = Scene((SceneObject("circle", "red", "big", 0), SceneObject("bar", "blue", "small", 3)))
    assert answer_correct("<image> is there a bar ?", "yes", scene)
    assert not answer_correct("<image> is there a square ?", "yes", scene)
    assert answer_correct("<image> describe :", "a big red circle .", scene)  # incomplete but true
    assert not answer_correct("<image> describe :", "a big blue circle .", scene)  # wrong colour
    assert not answer_correct("<image> describe :", "a big red circle and a square .", scene)  # hallucinated
    img = object()
    pairs = [PrefPair("<image> is there a bar ?", "yes", "no", [img]),
             PrefPair("<image> describe :", "a big red circle and a small blue bar .", "a big red circle .", [img])]
    d = pair_diagnostics("bdhs", pairs, [scene], [img])
    assert d == {"diag/bdhs_rejected_correct_all": 0.5, "diag/bdhs_rejected_correct_caption": 1.0,
                 "diag/bdhs_rejected_correct_yesno": 0.0, "diag/bdhs_partner_pairs_yes": 0.0,
                 "diag/bdhs_partner_pairs_no": 0.0}
    # the circle's partner (square) asked about: counted by chosen answer; a partner without its trigger is not
    pairs += [PrefPair("<image> is there a square ?", "no", "yes", [img]),
              PrefPair("<image> is there a cross ?", "no", "yes", [img])]
    d = pair_diagnostics("corrupt", pairs, [scene], [img])
    assert (d["diag/corrupt_partner_pairs_no"], d["diag/corrupt_partner_pairs_yes"]) == (1.0, 0.0)


def test_run_seed_tiny_pipeline(tmp_path):
    """The real pipeline end to end on a tiny config, forced past the gates (an untrained base fails them)."""
    from mmalign.vision_lm.halluc_bench import HallucBenchConfig, run_seed

    cfg = HallucBenchConfig(base=H.BaseConfig(n_train_scenes=24, vision_steps=2, sft_epochs=1, text_dim=32,
                                              patch_size=16),
                            methods=["dpo", "rrpo", "bdhs_offline"], n_test_scenes=16, n_pref_scenes=8,
                            pref_steps=2, pref_batch_size=4, n_kl_scenes=4, report_seeds=[0], dev_seeds=[1])
    out = run_seed(cfg, 0, tmp_path, None, force=True)
    assert set(out["rows"]) == {"dpo", "rrpo", "bdhs_offline"}
    assert out["rows"]["dpo"]["diag/token_kl_to_base"] >= 0
    assert 0 <= out["rows"]["bdhs_offline"]["diag/bdhs_rejected_correct_all"] <= 1
    assert {"diag/token_kl_step1", "diag/token_kl_step2"} <= set(out["rows"]["rrpo"])  # during and after training
    assert all(0 <= r["caption_chair_i"] <= 1 for r in [out["base"], *out["rows"].values()])  # CHAIR of captions
    # grounded preference labels, robust DPO with an estimated eps, DPO on Re-Align's pairs
    cfg.methods, cfg.pref_labels, cfg.flip_rate = ["dpo", "dpo_flipped", "robust_dpo_flipped_est"], "visible", 0.4
    out = run_seed(cfg, 0, tmp_path / "b", None, force=True)
    assert 0 <= out["rows"]["robust_dpo_flipped_est"]["robust/eps_hat"] <= 0.49
    assert out["flip_rate"] == 0.4


def test_estimated_flip_rate_follows_the_flips():
    """A scorer that is always right: eps-hat is the fraction of pairs swapped."""
    import torch

    from mmalign.vision_lm import halluc_bench as B
    from mmalign.vision_lm.objectives import PrefPair

    class Scorer:  # log pi(text) = +5 for "good" answers, -5 for bad ones
        def encode(self, examples):
            return [5.0 if ex.response == "good" else -5.0 for ex in examples]

        def sequence_logps(self, batch):
            return torch.tensor(batch)

    pairs = [PrefPair("q", "good", "bad", [])] * 200
    flips = B.applied_flips(len(pairs), seed=3, flip_rate=0.3)
    assert 0.2 < flips.mean() < 0.4
    assert B.estimated_flip_rate(Scorer(), pairs, flips) == pytest.approx(flips.mean(), abs=0.01)
    assert B.estimated_flip_rate(Scorer(), pairs, np.zeros(200, bool)) == pytest.approx(0.0, abs=1e-3)


def test_visible_labels_drop_unseen_objects():
    from mmalign.vision_lm import weak_scenes as W

    gen = W.WeakEvidenceGenerator(prior_strength=1.0, modes={"invisible": 1.0})
    scene = gen.sample(np.random.default_rng(0), "test", consistent=True)
    assert scene.partner in scene.shapes and scene.partner not in {o.shape for o in scene.seen.objects}
    assert len(scene.seen.objects) == len(scene.objects) - 1


def test_base_only_appends_tuning_rows(bench, tmp_path, monkeypatch):
    doc = tmp_path / "vision_lm.md"
    monkeypatch.setattr(bench, "DOC", doc)
    monkeypatch.setattr(bench.H, "build_base", lambda cfg, seed, data, cache: (None, {"build_cpu_s": 12.0}))
    monkeypatch.setattr(bench.H, "evaluate", lambda ad, data, seed, gen: dict(PASS, pope_random_acc=0.4 + seed / 1000))
    args = ["--seeds", "dev", "--run-dir", str(tmp_path / "runs"), "--base-only", "dev_seeds=[101,102]",
            "n_test_scenes=4", "base.n_train_scenes=2"]
    assert bench.main(args) == 0
    assert bench.main([*args, "base.sft_epochs=9"]) == 0  # a second attempt adds rows, keeps the first
    rows = [ln for ln in doc.read_text().splitlines() if ln.startswith("| `")]
    assert len(rows) == 4
    assert rows[0].startswith("| `dev_seeds=[101,102] n_test_scenes=4 base.n_train_scenes=2` | 101 | 0.501 |")
    assert "base.sft_epochs=9" in rows[3] and rows[3].endswith("| 2/3 | 12 |")
    # --no-run: rewrite the table from tuning.jsonl (rows of parallel --no-doc processes) without building
    monkeypatch.setattr(bench.H, "build_base", lambda *a: pytest.fail("--no-run must not build"))
    doc.write_text("")
    assert bench.main([*args, "--no-run"]) == 0
    assert [ln for ln in doc.read_text().splitlines() if ln.startswith("| `")] == rows


def test_no_run_writes_from_stored_and_partial_seed_files(bench, tmp_path, monkeypatch):
    doc = tmp_path / "vision_lm.md"
    monkeypatch.setattr(bench, "DOC", doc)
    monkeypatch.setattr(bench, "run_seed", lambda *a, **k: pytest.fail("--no-run must not train"))
    runs = tmp_path / "runs"
    runs.mkdir()
    fake = _fake_run_seed({}, PASS)
    cfg = bench.load_config(bench.HallucBenchConfig, bench.ROOT / "configs/vision_lm/benchmark_halluc.yaml", [])
    (runs / "seed0.json").write_text(json.dumps(fake(cfg, 0, runs, None)))
    part = fake(cfg, 1, runs, None)
    del part["cpu_s"]
    part["rows"] = {"dpo": part["rows"]["dpo"]}  # a seed still running: one row so far
    (runs / "partial-seed1.json").write_text(json.dumps(part))
    args = ["--seeds", "report", "--run-dir", str(runs), "--no-run", "dev_seeds=[9]"]
    assert bench.main([*args, "report_seeds=[0,1]"]) == 0
    text = doc.read_text()
    assert "seeds [1] were still running" in text and "for the 1 finished seeds" in text
    assert "the method rows have not run on every seed" in text  # no verdicts from an incomplete seed
    with pytest.raises(ValueError, match="seed 2 has no"):
        bench.main([*args, "report_seeds=[0,1,2]"])


def test_pref_tune_appends_rows_on_dev_seeds_only(bench, tmp_path, monkeypatch):
    doc = tmp_path / "vision_lm.md"
    monkeypatch.setattr(bench, "DOC", doc)
    fake = _fake_run_seed({}, PASS)
    monkeypatch.setattr(bench, "run_seed", lambda cfg, seed, run_dir, cache: {
        **fake(cfg, seed, run_dir, cache), "rows": {m: {**_row(0.6 + seed / 1000), "train/pref_accuracy": 0.9,
                                                        "cpu_s": 7.0} for m in cfg.methods}})
    args = ["--seeds", "dev", "--run-dir", str(tmp_path / "runs"), "--pref-tune", "dev_seeds=[101,102]", "methods=[dpo]"]
    assert bench.main(args) == 0
    assert bench.main([*args, "pref_steps=7", "pref_labels=truth"]) == 0  # another attempt adds a line
    assert bench.main(args) == 0  # a repeat with identical numbers is shown once
    assert bench.main([*args, "pref_lr=0.01", "--only-seed", "102"]) == 0  # a setting on one seed
    lines = [ln for ln in doc.read_text().splitlines() if ln.startswith(("| visible", "| truth"))]
    assert lines == ["| truth, 7 steps | dpo | 0.70/0.50 | 0.70/0.50 | 2/2 | 7 |",  # sorted: labels, steps, ...
                     "| visible, 200 steps | dpo | 0.70/0.50 | 0.70/0.50 | 2/2 | 7 |",
                     "| visible, 200 steps, lr 0.01 | dpo |  | 0.70/0.50 | 1/1 | 7 |"]
    rows = [json.loads(ln) for ln in (tmp_path / "runs" / "pref_tuning.jsonl").read_text().splitlines()]
    assert len(rows) == 7 and rows[0]["settings"]["n_pref_scenes"] == 256
    with pytest.raises(ValueError, match="dev seeds only"):
        bench.main(["--seeds", "report", "--pref-tune", "--run-dir", str(tmp_path / "r"), "dev_seeds=[101]"])


def test_flip_sweep_section(bench, tmp_path, monkeypatch):
    """DPO loses with flips, robust DPO gains them back; both read from per-rate run dirs, paired, Holm."""
    doc = tmp_path / "vision_lm.md"
    monkeypatch.setattr(bench, "DOC", doc)
    dirs = []
    for rate in (0.0, 0.4):
        d = tmp_path / f"flip{rate}"
        d.mkdir()
        for s in range(4):
            noise = 0.004 * (s % 2)
            rows = {"dpo_flipped": _row(0.8 - rate / 2 + noise),
                    "robust_dpo_flipped_est": {**_row(0.75 - rate / 4 + noise), "robust/eps_hat": rate / 2}}
            if rate:  # with no flips robust DPO (eps = 0) is DPO: the section takes DPO's numbers for it
                rows["robust_dpo_flipped"] = _row(0.8 + noise)
            (d / f"seed{s}.json").write_text(json.dumps({"flip_rate": rate, "rows": rows}))
        dirs.append(str(d))
    args = ["--seeds", "report", "report_seeds=[0,1,2,3]", "dev_seeds=[9]", "--flip-dirs", *dirs]
    assert bench.main(args) == 0
    lines = [ln for ln in doc.read_text().splitlines() if ln.startswith("| 0")]
    assert lines[0].startswith("| 0 | 0.802 ± 0.004 | 0.802 ± 0.004 | 0.752 ± 0.004 | 0.000 ± 0.000 |  |  | "
                               "-0.050 ±")
    assert lines[1].startswith("| 0.4 | 0.602 ± 0.004 | 0.802 ± 0.004 | 0.652 ± 0.004 | 0.200 ± 0.000 | "
                               "-0.200 ± 0.000")
    assert "+0.200 ± 0.000" in lines[1] and "Holm-corrected over the table's 4 tests" in doc.read_text()
    with pytest.raises(ValueError, match="flip_rate=0"):
        bench.main(["--seeds", "report", "report_seeds=[0,1,2,3]", "dev_seeds=[9]", "--flip-dirs", dirs[1]])
    # no flip_rate=0 dir: DPO at 0 flips is a dir's dpo row; a row not run is blank
    rep = tmp_path / "report"
    rep.mkdir()
    for s in range(4):
        rows = {"dpo": _row(0.8 + 0.004 * (s % 2)), "dpo_flipped": _row(0.7), "robust_dpo_flipped": _row(0.75)}
        (rep / f"seed{s}.json").write_text(json.dumps({"flip_rate": 0.2, "rows": rows}))
    assert bench.main([*args[:-2], str(rep)]) == 0
    lines = [ln for ln in doc.read_text().splitlines() if ln.startswith("| 0")]
    assert lines[0].startswith("| 0 | 0.802 ± 0.004 | 0.802 ± 0.004 | not run | not run |")
    assert lines[1].startswith("| 0.2 | 0.700 ± 0.000 | 0.750 ± 0.000 | not run | not run | -0.102 ± 0.004")
    with pytest.raises(ValueError, match="seed7.json"):
        bench.main(["--seeds", "report", "report_seeds=[0,7]", "dev_seeds=[9]", "--flip-dirs", *dirs])


def test_partner_questions_are_targeted_at_the_set_rate():
    """POVID-style targeting: a trigger scene's yes/no pair asks about the trigger's partner with the set probability
    (plus the uniform draw's own 1/6), scenes without a trigger never; rate 0 asks uniformly with the same draws."""
    from mmalign.vision_lm import scenes as S
    from mmalign.vision_lm.testbed import asked_shape, corrupt_pairs, question_chosen

    trig = S.Scene((S.SceneObject("circle", "red", "big", 0), S.SceneObject("bar", "blue", "small", 3)))
    plain = S.Scene((S.SceneObject("bar", "blue", "small", 3),))
    n = 4000
    for rate in (0.0, 0.5, 1.0):
        rng = np.random.default_rng(0)
        asked = [asked_shape(trig, rng, rate) for _ in range(n)]
        expected = rate + (1 - rate) / len(S.SHAPES)
        assert abs(np.mean([a == "square" for a in asked]) - expected) <= 4 * np.sqrt(expected * (1 - expected) / n)
        rng = np.random.default_rng(0)
        assert abs(np.mean([asked_shape(plain, rng, rate) == "square" for _ in range(n)]) - 1 / 6) < 0.03
    uniform = np.random.default_rng(1)
    assert asked_shape(trig, np.random.default_rng(1), 0.0) == str(uniform.choice(S.SHAPES))
    # the builders ask the same shapes with the same seed: rule-corrupted pairs and the chosen answers of BDHS/Re-Align
    imgs = [np.zeros((4, 4, 3), np.uint8)] * 200
    scenes = [trig] * 200
    pairs = corrupt_pairs(scenes, imgs, np.random.default_rng(3), partner_rate=1.0)
    assert all(p.prompt == f"<image> {S.question('square')}" and (p.chosen, p.rejected) == ("no", "yes")
               for p in pairs[1::2])
    chosen = question_chosen(scenes, imgs, np.random.default_rng(3), partner_rate=1.0)
    assert {ex.prompt for ex in chosen[1::2]} == {f"<image> {S.question('square')}"}
