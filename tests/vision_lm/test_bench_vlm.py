"""scripts/bench_vlm.py: family option, per-row partial results, default run dir / page section per family."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def bench(load_script):
    return load_script("bench_vlm")


def _fake_results(bench, seed: int, rows: list[str]) -> dict[str, dict[str, float]]:
    out = {}
    for j, r in enumerate(rows):
        out[r] = {k: 0.1 * seed + 0.01 * j for k, _ in bench.COLUMNS}
        out[r]["eval/pope_adversarial_f1"] = 0.5 + 0.1 * seed
        out[r]["n_pairs"] = 8.0
    return out


def test_family_run_writes_partial_rows_and_its_own_section(bench, tmp_path, monkeypatch):
    doc = tmp_path / "vision_lm.md"
    doc.write_text("# Vision-language benchmarks\n\n<!-- results:start -->\nLLaVA table\n<!-- results:end -->\n")
    monkeypatch.setattr(bench, "DOC", doc)
    calls = []

    def fake_run_seed(cfg, seed, run_dir, on_row=None):
        calls.append((cfg.family, seed))
        res = {}
        for row in ["sft", *cfg.methods]:
            res[row] = _fake_results(bench, seed, [row])[row]
            on_row(res)
            # the partial file holds every finished row, before the seed is done
            assert set(json.loads((run_dir / f"partial-seed{seed}.json").read_text())) == set(res)
        return res

    monkeypatch.setattr(bench, "run_seed", fake_run_seed)
    run_dir = tmp_path / "runs"
    bench.main(["--family", "idefics3", "--run-dir", str(run_dir), "seeds=[0,1]", "methods=[dpo,rrpo]"])
    assert calls == [("idefics3", 0), ("idefics3", 1)]
    assert sorted(p.name for p in run_dir.iterdir()) == ["results-seed0.json", "results-seed1.json"]
    text = doc.read_text()
    assert "LLaVA table" in text  # the LLaVA section is untouched
    section = text[text.index("<!-- results_idefics3:start -->"):text.index("<!-- results_idefics3:end -->")]
    assert "## Results: offline hallucination benchmark, tiny idefics3" in section
    assert "--family idefics3" in section and "Model: tiny idefics3 (Idefics3ForConditionalGeneration" in section
    assert "| DPO (rule-corrupted pairs) |" in section and "| RRPO (diff phrases + token KL) |" in section
    assert "0.550 ± 0.071" in section  # POPE-a F1 over seeds 0 and 1: mean 0.55, sample std 0.0707

    # a re-run skips finished seeds; an unfinished seed's partial rows enter the table, rows it lacks are named
    (run_dir / "partial-seed2.json").write_text(json.dumps(_fake_results(bench, 2, ["sft", "dpo"])))
    calls.clear()
    bench.main(["--family", "idefics3", "--run-dir", str(run_dir), "seeds=[0,1]", "methods=[dpo,rrpo]"])
    assert calls == []
    assert set(bench.load_results(run_dir)) == {"0", "1", "2"}
    text = doc.read_text()
    assert "seeds [0, 1, 2]" in text and "| RRPO" not in text.split("Paired change")[0].split("results_idefics3")[1]
    assert "Not run in every seed (did not fit the time budget): rrpo." in text


def test_family_is_validated():
    from mmalign.vision_lm.benchmark import BenchmarkConfig

    assert BenchmarkConfig().family == "llava"
    with pytest.raises(ValueError, match="family"):
        BenchmarkConfig(family="qwen2_vl")


def test_family_comparison_reads_each_run_dir(bench, tmp_path, monkeypatch):
    doc = tmp_path / "vision_lm.md"
    monkeypatch.setattr(bench, "DOC", doc)
    for fam, n_seeds in (("llava", 2), ("idefics3", 3)):
        (tmp_path / fam).mkdir()
        for s in range(n_seeds):
            res = _fake_results(bench, s, ["sft", "dpo"])
            res["dpo"]["eval/chair_i"] = res["sft"]["eval/chair_i"] - (0.1 if fam == "idefics3" else 0.0)
            (tmp_path / fam / f"results-seed{s}.json").write_text(json.dumps(res))
    bench.main(["methods=[dpo]", "--compare-families", f"llava={tmp_path / 'llava'}",
                f"idefics3={tmp_path / 'idefics3'}"])
    text = doc.read_text()
    assert "llava_next" not in text  # only the named families
    assert "| method | Δ CHAIR_i llava | Δ CHAIR_i idefics3 |" in text
    row = next(line for line in text.splitlines() if line.startswith("| DPO"))
    assert row.split(" | ")[1:3] == ["0.000 ± 0.000", "-0.100 ± 0.000"]
    assert "idefics3" in text and "seeds [0, 1, 2]" in text and "seeds [0, 1]" in text
    with pytest.raises(ValueError, match="FAMILY=DIR"):
        bench.main(["--compare-families", "qwen=x"])


def test_family_comparison_counts_seeds_that_lack_a_method(bench, tmp_path, monkeypatch):
    """Regression: a method missing from some seed files (an unfinished seed's partial file) was averaged over the
    other seeds under a header naming all of them; the cell now says n=."""
    doc = tmp_path / "vision_lm.md"
    monkeypatch.setattr(bench, "DOC", doc)
    (tmp_path / "llava").mkdir()
    for s in range(3):
        res = _fake_results(bench, s, ["sft", "dpo"] if s < 2 else ["sft"])
        (tmp_path / "llava" / f"results-seed{s}.json").write_text(json.dumps(res))
    bench.main(["methods=[dpo]", "--compare-families", f"llava={tmp_path / 'llava'}"])
    row = next(line for line in doc.read_text().splitlines() if line.startswith("| DPO"))
    assert all(c.endswith("(n=2)") for c in row.strip(" |").split(" | ")[1:])
