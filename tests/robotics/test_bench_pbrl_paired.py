"""scripts/bench_pbrl.py: the headline score per seed, the paired learned − true difference and the CPU total."""

from __future__ import annotations

import json


def _row(seed: int, teacher: str, final: float, init: float = -20.0) -> dict:
    return {"task": "Reacher-v5", "seed": seed, "teacher": teacher, "steps": 1000, "final_true_return": final,
            "curve": [{"step": 0, "eval/true_return": init}, {"step": 1000, "eval/true_return": final}],
            "labels": {}, "wall_s": 1.0, "cpu_s": 100.0}


def test_pbrl_per_seed_headline_paired_difference_and_cpu(load_script, monkeypatch, tmp_path):
    pbrl = load_script("bench_pbrl")
    monkeypatch.setattr(pbrl, "random_return", lambda task: -40.0)
    # seed 2: true-reward SAC (−19) gains < 10% of (true − random) over its untrained policy (−20): no headline
    rows = [_row(0, "true", -10.0), _row(1, "true", -10.0), _row(2, "true", -19.0),
            _row(0, "oracle", -12.0), _row(1, "oracle", -14.0), _row(2, "oracle", -25.0)]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = pbrl.summarize(tmp_path, None)
    line = next(ln for ln in text.splitlines() if ln.startswith("| oracle |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[-2] == "0.80, 0.60, –"  # (−12 + 20) / 10, (−14 + 20) / 10
    # learned − true per seed: −2, −4, −6 -> mean −4, s = 2, t_{0.975,2} = 4.303 -> 4.303 · 2 / sqrt(3) = 4.97
    assert cells[-1] == "-4.00 ± 4.97 (n=3, 0/3 seeds > 0)"
    assert "CPU time of these tables: 600 s (0.17 CPU-hours) over 6 runs" in text
