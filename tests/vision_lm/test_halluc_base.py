"""Testbed base model: gate computation, deterministic build, cache round trip, evaluation keys on a tiny config."""

from __future__ import annotations

import numpy as np
import pytest

from mmalign.vision_lm import halluc_base as H

TINY = dict(n_train_scenes=24, vision_steps=2, sft_epochs=1, batch_size=16, text_dim=32, patch_size=16)


def test_gates_boundaries():
    ok = {"pope_random_acc": 0.85, "blank_pope_random_acc": 0.55, "pope_adversarial_acc": 0.75}
    assert all(H.gates(ok).values())
    g = H.gates({**ok, "pope_random_acc": 0.849, "pope_adversarial_acc": 0.76, "blank_pope_random_acc": 0.39})
    assert not any(g.values())
    g = H.gates({**ok, "pope_adversarial_acc": 0.59})
    assert g == {"pope_random_violating >= 0.85": True, "blank-image POPE within 0.5 ± 0.1": True,
                 "pope_adversarial_violating in [0.60, 0.75]": False}
    assert not any(H.gates({}).values())  # a missing metric fails


def test_config_validation_and_key():
    with pytest.raises(ValueError, match="<= 1"):
        H.BaseConfig(p_invisible=0.6, p_faint=0.5)
    with pytest.raises(ValueError, match="patch_size"):
        H.BaseConfig(patch_size=4)
    assert H.BaseConfig().key() == H.BaseConfig().key() != H.BaseConfig(sft_epochs=5).key()
    gen = H.BaseConfig(p_invisible=0.2).generator()
    assert gen.modes["invisible"] == 0.2 and gen.modes["clear"] == pytest.approx(0.5)


def test_data_parts_are_independent_streams():
    cfg = H.BaseConfig(n_train_scenes=10)
    a, b = H.make_data(cfg, 3, 4, 6), H.make_data(cfg, 3, 8, 10)
    assert [s.objects for s in a.train] == [s.objects for s in b.train]  # base data unchanged by the other sizes
    assert all(np.array_equal(x, y) for x, y in zip(a.train_images, b.train_images))
    assert sum(s.consistent for s in a.test) == 3


def test_build_is_deterministic_and_cached(tmp_path):
    import torch

    cfg = H.BaseConfig(**TINY)
    data = H.make_data(cfg, 0, 4, 8)
    ad1, info1 = H.build_base(cfg, 0, data)
    ad2, info2 = H.build_base(cfg, 0, data, cache_dir=tmp_path)
    s1, s2 = ad1.model.state_dict(), ad2.model.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert info1["vision_shape_acc"] >= 0 and info1["n_sft_examples"] > 24
    files = list(tmp_path.rglob("model.safetensors"))
    assert len(files) == 1 and cfg.key() in str(files[0])
    ad3, info3 = H.build_base(cfg, 0, data, cache_dir=tmp_path)  # loaded, not retrained
    assert info3 == _json(info2)  # the stored build info, not a new build
    s3 = ad3.model.state_dict()
    assert all(torch.equal(s1[k], s3[k]) for k in s1)
    m = H.evaluate(ad3, data, 0, cfg.generator())
    for key in ("pope_random_acc", "pope_adversarial_acc", "blank_pope_random_acc", "partner_balanced_acc",
                "partner_yes_ratio", "bayes_partner_balanced_acc", "partner_violating_yes"):
        assert 0.0 <= m[key] <= 1.0, key
    # the mean yes-minus-no logit of the hallucination rate's questions: its sign agrees with the answers
    from mmalign.vision_lm import weak_scenes as W

    gap = H._yes_gap(ad3, [(f"<image> is there a {s} ?", data.test_images[i])
                           for i, s, t in W.partner_questions(data.test) if not t])
    assert m["partner_violating_gap"] == pytest.approx(gap.mean())
    assert m["partner_violating_yes"] == pytest.approx((gap > 0).mean())
    assert set(H.gates(m)) == set(H.GATES)


def _json(d):
    import json

    return json.loads(json.dumps(d))
