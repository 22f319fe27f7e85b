"""Text-form experiment: LM policy evaluation over well-formed replies, and a (slow) end-to-end job run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmalign.config import load_config
from mmalign.hindsight import market as mk
from mmalign.hindsight.config import HindsightTextConfig
from mmalign.hindsight.text import build_tiny_lm, build_tokenizer
from mmalign.hindsight.text_experiment import lm_policy_metrics, run

ROOT = Path(__file__).resolve().parents[2]


def test_lm_policy_metrics_on_a_tiny_lm() -> None:
    params = mk.MarketParams()
    tok = build_tokenizer(params)
    lm = build_tiny_lm(len(tok), seed=0, n_embd=16, n_positions=96)
    out = lm_policy_metrics(lm, tok, params, "foresight", 4, seed=0)
    assert 0.0 <= out["deception_rate"] <= 1.0 and -1.0 <= out["true_utility"] <= 1.0
    assert 0.0 <= out["purchase_rate"] <= 1.0 and 0.0 <= out["regret_rate"] <= 1.0
    # a distribution over the 108 well-formed replies
    assert 0.0 < out["lm/candidate_entropy"] <= np.log(108) + 1e-6


def test_text_config_loads() -> None:
    cfg = load_config(HindsightTextConfig, ROOT / "configs/hindsight/text.yaml")
    assert cfg.market.channels == ["foresight", "partial_hindsight"] and cfg.sft.max_steps > 0
    with pytest.raises(ValueError, match="n_embd"):
        load_config(HindsightTextConfig, None, ["n_embd=33"])
    for override in ("sft.distributed=fsdp", "dpo.distributed=deepspeed"):
        with pytest.raises(ValueError, match=r"distributed must be 'ddp' for the text experiment"):
            load_config(HindsightTextConfig, None, [override])


@pytest.mark.slow
def test_text_job_end_to_end(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = load_config(HindsightTextConfig, ROOT / "configs/hindsight/text.yaml",
                      ["market.seeds=[0]", "market.n_pairs=128", "n_sft=256", "n_eval=8", "sft.max_steps=5",
                       "dpo.max_steps=3", "sft.batch_size=16", "dpo.batch_size=16"])
    summary = run(cfg, tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "text_results.jsonl").read_text().splitlines()]
    assert {r["method"] for r in rows} == {"sft_reference", "dpo_lm"}
    assert "Text form" in (tmp_path / "text_table.md").read_text()
    assert np.isfinite(summary["eval/dpo_lm/foresight/true_utility"])
