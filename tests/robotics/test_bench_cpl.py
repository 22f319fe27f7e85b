"""scripts/bench_cpl.py summarises runs already in --out (densities run in separate processes): P-IQL rows, paired
differences to CPL, the CPU time line."""

from __future__ import annotations

import json
import sys


def _results(seed: int, cpl: float, piql: float) -> dict:
    rows = [{"method": "oracle SAC", "true_return": -9.5, "std": 1.0},
            {"method": "data (mean episode)", "true_return": -35.0, "std": 5.0},
            {"method": "CPL", "true_return": cpl, "std": 1.0, "train_cpu_s": 20.0},
            {"method": "P-IQL", "true_return": piql, "std": 1.0, "train_cpu_s": 100.0 + seed}]
    return {"rows": rows, "logs": {}, "label_return_agreement": 0.9, "level_returns": {}, "cpu_s": 150.0}


def test_cpl_script_summarises_existing_runs_with_piql(load_script, monkeypatch, tmp_path):
    cpl = load_script("bench_cpl")
    out = tmp_path / "o"
    out.mkdir()
    (out / "oracle_sac.safetensors").write_bytes(b"x")  # present: the script must not train one
    seeds = [10, 11, 12, 13, 14]
    for k, s in enumerate(seeds):  # CPL higher than P-IQL by 1, 2, 3, 4, 5
        (out / f"dense_seed{s}").mkdir()
        (out / f"dense_seed{s}" / "results.json").write_text(json.dumps(_results(s, -11.0, -12.0 - k)))
    doc = tmp_path / "d.md"
    doc.write_text("# page\n")
    monkeypatch.setattr(sys, "argv", ["bench_cpl.py", "--out", str(out), "--doc", str(doc), "--methods", "cpl",
                                      "piql", "--report-seeds", *map(str, seeds)])
    cpl.main()
    text = doc.read_text()
    row = next(ln for ln in text.splitlines() if ln.startswith("| dense | P-IQL |"))
    # paired CPL − P-IQL: mean 3, sd sqrt(2.5), t_{0.975,4} = 2.776 -> half-width 1.96; 5/5 seeds CPL higher
    assert "+3.00 ± 1.96 (n=5, 5/5 seeds > 0)" in row and row.rstrip(" |").endswith("112")
    assert "CPU time: 750 s over 5 runs" in text and "--methods cpl piql" in text
    assert "reporting seeds [10, 11, 12, 13, 14]" in text
