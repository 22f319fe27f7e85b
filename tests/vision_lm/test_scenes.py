"""Scene generator ground truth, caption grammar and exact CHAIR / POPE metrics on constructed cases."""

from __future__ import annotations

import numpy as np
import pytest

from mmalign.vision_lm import scenes as S
from mmalign.vision_lm.scenes import Scene, SceneObject


def _scene(*objs):
    return Scene(tuple(SceneObject(*o) for o in objs))


def test_render_draws_the_ground_truth():
    scene = _scene(("circle", "red", "big", 0), ("square", "blue", "small", 3))
    img = S.render(scene, size=32)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert tuple(img[7, 7]) == (230, 40, 40)  # centre of cell 0
    assert tuple(img[24, 24]) == (50, 80, 240)  # centre of cell 3
    assert img[7, 24].sum() == 0 and img[24, 7].sum() == 0  # empty cells stay black
    assert img[0, 0].sum() == 0  # a circle leaves its cell corner empty; a big square would not
    assert (img[:16, :16].any(-1)).sum() > (img[16:, 16:].any(-1)).sum()  # big covers more than small


def test_shapes_are_distinguishable_pixelwise():
    masks = {s: S.render(_scene((s, "red", "big", 0)), size=32)[:16, :16].any(-1) for s in S.SHAPES}
    for a in S.SHAPES:
        for b in S.SHAPES:
            if a < b:
                assert (masks[a] != masks[b]).sum() >= 10, (a, b)


def test_caption_roundtrip_and_parse():
    scene = _scene(("circle", "red", "big", 0), ("bar", "green", "small", 2))
    text = S.caption(scene)
    assert text == "a big red circle and a small green bar ."
    assert S.parse_caption(text) == [("big", "red", "circle"), ("small", "green", "bar")]
    assert S.parse_caption("a blue square") == [(None, "blue", "square")]


def test_priors_hold_in_train_and_are_violated_in_test():
    rng = np.random.default_rng(0)
    gen = S.SceneGenerator(prior_strength=0.9)
    train = [gen.sample(rng, "train") for _ in range(1500)]
    with_circle = [s for s in train if "circle" in s.shapes]
    frac = np.mean(["square" in s.shapes for s in with_circle])
    assert frac > 0.8
    test = [gen.sample(rng, "test") for _ in range(500)]
    for s in test:
        triggers = [t for t in S.PRIOR_PAIRS if t in s.shapes]
        assert triggers and all(S.PRIOR_PAIRS[t] not in s.shapes for t in triggers)
        assert len({o.cell for o in s.objects}) == len(s.objects) <= 3
    with pytest.raises(ValueError, match="split"):
        gen.sample(rng, "val")


def test_chair_metrics_hand_computed():
    scenes = [_scene(("circle", "red", "big", 0), ("diamond", "blue", "small", 1)),
              _scene(("triangle", "green", "big", 0))]
    caps = ["a big red circle and a small red square .",  # square hallucinated
            "a big yellow triangle ."]  # present shape, wrong colour
    m = S.chair_metrics(caps, scenes)
    assert m["chair_i"] == pytest.approx(1 / 3)
    assert m["chair_s"] == pytest.approx(1 / 2)
    assert m["attr_error"] == pytest.approx(1 / 2)
    assert m["recall"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="equally long"):
        S.chair_metrics(caps, scenes[:1])


def test_pope_questions_and_metrics():
    train = [_scene(("circle", "red", "big", 0), ("square", "blue", "big", 1))] * 5 + [
        _scene(("bar", "red", "big", 0))] * 3
    scenes = [_scene(("circle", "red", "big", 0))]
    adv = S.pope_questions(scenes, "adversarial", np.random.default_rng(0), train)
    assert adv == [(0, "circle", True), (0, "square", False)]
    pop = S.pope_questions(scenes, "popular", np.random.default_rng(0), train)
    assert pop[1] == (0, "square", False)  # square (5) is more frequent than bar (3)
    rnd = S.pope_questions(scenes, "random", np.random.default_rng(0), train)
    assert rnd[1][1] != "circle" and not rnd[1][2]
    m = S.pope_metrics(np.array([True, True, False, False]), np.array([True, False, True, False]))
    assert m == pytest.approx({"acc": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5, "yes_ratio": 0.5})
