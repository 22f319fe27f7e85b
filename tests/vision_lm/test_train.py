"""Smoke runs of every method through the generic trainer, plus objective sanity at initialisation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mmalign.vision_lm.testbed import corrupt_pairs
from mmalign.vision_lm.objectives import PairCollator, PreferenceObjective
from mmalign.vision_lm.train import VLMTrainConfig, run


def _cfg(**kw):
    base = {"sft_steps": 0, "n_scenes": 8, "max_length": 64,
            "trainer": {"max_steps": 2, "batch_size": 4, "lr": 1e-3, "progress": False, "plots": False, "cpu": True,
                        "log_every": 1, "lora": {"enabled": True, "r": 4, "alpha": 8.0}}}
    base.update(kw)
    return VLMTrainConfig.from_dict(base)


@pytest.mark.parametrize("kw", [
    {"method": "dpo"},
    {"method": "ipo"},
    {"method": "realign", "pair_source": "realign"},
    {"method": "rrpo"},
    {"method": "dpo", "pair_source": "bdhs", "bdhs_online_prob": 0.5},
    {"method": "robust_dpo", "eps": 0.2, "reference": "cache",
     "trainer": {"max_steps": 2, "batch_size": 4, "progress": False, "plots": False, "cpu": True}},
], ids=["dpo", "ipo", "realign", "rrpo", "bdhs_mixed", "robust_dpo_cached_ref"])
def test_method_smoke_runs(kw, tmp_path):
    out = run(_cfg(**kw), tmp_path)
    assert out["step"] == 2 and math.isfinite(out["train/loss"])
    assert (tmp_path / "model.safetensors").is_file()
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()  # every row here trains LoRA adapters
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("rewards/margin" in x for x in lines)
    if kw.get("reference") == "cache":
        assert list((tmp_path / "ref_cache").glob("ref_logps-*.safetensors"))


def test_objectives_at_init_equal_reference(llava, images, tmp_path):
    """With LoRA at its zero init the policy is the reference: DPO gives log 2, RRPO's KL is 0, cached == live."""
    from peft import LoraConfig, get_peft_model

    from mmalign.vision_lm.refcache import reference_cache

    scenes, imgs = images
    pairs = corrupt_pairs(scenes, imgs, np.random.default_rng(0))
    items = list(enumerate(pairs))[:6]
    live = {}
    model = get_peft_model(llava.model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    try:
        llava.model = model
        for method in ("dpo", "cdpo", "rrpo"):
            col = PairCollator(llava, with_segments=method == "rrpo")
            loss, m = PreferenceObjective(llava, method, eps=0.1)(model, col(items))
            live[method] = loss.item()
            assert loss.item() == pytest.approx(math.log(2), abs=1e-5)
            if method == "rrpo":
                assert abs(float(m["rrpo/token_kl"])) < 1e-6 and float(m["rrpo/num_phrases"]) >= 1
        base = model.get_base_model()
        llava.model = base
        # a fresh folder: a cache left in a shared /tmp by an earlier run (other model, same key) would be a hit
        cache, _, hit = reference_cache(PairCollator(llava), [p for _, p in items], tmp_path, "tiny-test")
        assert not hit
        loss, _ = PreferenceObjective(llava, "dpo")(base, PairCollator(llava, ref_cache=cache)(items))
        assert loss.item() == pytest.approx(live["dpo"], abs=1e-5)
    finally:
        llava.model = model.unload()


def test_config_validation():
    with pytest.raises(ValueError, match="method"):
        _cfg(method="simpo")
    with pytest.raises(ValueError, match="lora"):
        VLMTrainConfig.from_dict({"reference": "lora", "trainer": {"lora": {"enabled": False}}})
    with pytest.raises(ValueError, match="pair_source=realign"):
        _cfg(method="realign")


def test_jsonl_pairs_with_tags_and_overlong_rows(llava, images, tmp_path):
    """RRPO tags become segment ids; an over-long pair is an error naming its row, or dropped with skip_invalid."""
    from PIL import Image

    from mmalign.data import DataValidationError
    from mmalign.vision_lm.adapter import VLMAdapter
    from mmalign.vision_lm.pairs import scan_pairs

    _, imgs = images
    Image.fromarray(imgs[0]).save(tmp_path / "a.png")
    Image.fromarray(imgs[1]).save(tmp_path / "b.png")
    rows = [{"prompt": "<image> describe :", "chosen_tagged": "a big <MASK> red </MASK> circle .",
             "rejected_tagged": "a big <MASK> blue </MASK> circle .", "chosen": "x", "rejected": "y",
             "images": ["a.png"], "retrieved_images": ["b.png"]},
            {"prompt": "<image> describe :", "chosen": "a small green bar . " * 6, "rejected": "a", "images": ["a.png"]}]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = _cfg(data=str(tmp_path / "pairs.jsonl"))
    from mmalign.vision_lm.train import prepare_pairs

    pairs, rownums, stats = prepare_pairs(cfg, llava.processor)
    assert pairs[0].chosen == "a big red circle ." and pairs[0].chosen_segments == [0, 0, 1, 0, 0]
    assert pairs[0].rejected_segments == [0, 0, 1, 0, 0] and pairs[0].retrieved_images[0].load().size == (32, 32)
    assert rownums == [0, 1]
    short = VLMAdapter(llava.model, llava.processor, max_length=40)
    with pytest.raises(DataValidationError, match="row 1: over-long pair"):
        scan_pairs(short, pairs, rownums, with_retrieved=False, skip_invalid=False)
    scan = scan_pairs(short, pairs, rownums, with_retrieved=False, skip_invalid=True)
    assert scan.dropped == 1 and scan.pairs == pairs[:1] and scan.rows == [0] and scan.oov_rate == 0
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "x"}))
    with pytest.raises(DataValidationError, match="missing field 'chosen'"):
        prepare_pairs(_cfg(data=str(tmp_path / "bad.jsonl")), llava.processor)
