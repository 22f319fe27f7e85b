"""Weak-evidence scenes: planted probabilities match their settings, test split balance, evidence visibility, and
the Bayes-optimal answer against empirical conditional frequencies."""

from __future__ import annotations

import numpy as np
import pytest

from mmalign.vision_lm import weak_scenes as W
from mmalign.vision_lm.scenes import GRID, PRIOR_PAIRS, SceneObject

MODES = {"clear": 0.3, "small": 0.1, "faint": 0.2, "noisy": 0.1, "invisible": 0.3}


def _binom_ok(k: int, n: int, p: float) -> bool:
    """k successes in n draws lie within 4.5 standard errors of p (false alarm < 1e-5 per check; fixed seeds)."""
    return abs(k / n - p) <= 4.5 * np.sqrt(p * (1 - p) / n) + 1e-12


def test_train_split_frequencies_match_the_settings():
    gen = W.WeakEvidenceGenerator(prior_strength=0.8, p_trigger=0.6, modes=MODES)
    scenes = gen.sample_split(np.random.default_rng(0), 4000, "train")
    with_trigger = [s for s in scenes if s.trigger]
    assert _binom_ok(len(with_trigger), len(scenes), 0.6)
    with_partner = [s for s in with_trigger if s.partner in s.shapes]
    assert _binom_ok(len(with_partner), len(with_trigger), 0.8)
    modes = [s.partner_mode() for s in with_partner]
    for mode, p in MODES.items():
        assert _binom_ok(modes.count(mode), len(modes), p), mode
    for s in scenes:
        assert len({o.cell for o in s.objects}) == len(s.objects) <= GRID * GRID
        assert sum(t in s.shapes for t in PRIOR_PAIRS) <= 1  # at most one trigger
        # only the trigger's partner is ever rendered weakly
        assert all(m == "clear" for o, m in zip(s.objects, s.modes) if o.shape != s.partner)
        assert all(o.size == "small" for o, m in zip(s.objects, s.modes) if m == "small")


def test_test_split_is_balanced_and_always_holds_a_trigger():
    gen = W.WeakEvidenceGenerator(modes=MODES)
    scenes = gen.sample_split(np.random.default_rng(1), 400, "test")
    assert all(s.trigger for s in scenes)
    assert sum(s.consistent for s in scenes) == 200
    assert all((s.partner in s.shapes) == s.consistent for s in scenes)
    qs = W.partner_questions(scenes)
    assert len(qs) == 400 and sum(t for *_, t in qs) == 200
    with pytest.raises(ValueError, match="consistent"):
        gen.sample(np.random.default_rng(0), "test")


def test_visible_modes_leave_evidence_and_invisible_leaves_none():
    rng = np.random.default_rng(2)
    for mode in W.MODES:
        diffs = []
        for k in range(20):
            obj = SceneObject("square", "blue", "small" if mode == "small" else "big", 0)
            img = W.render_weak(W.WeakScene((obj,), (mode,)), rng=rng).astype(float)
            cell, empty = img[:16, :16], img[16:, 16:]
            diffs.append(abs(cell.mean() - empty.mean()) / (8.0 / np.sqrt(cell.size)))  # in noise sds of a mean
        if mode == "invisible":
            assert np.median(diffs) < 3.0
        else:
            assert min(diffs) > 20.0, mode


def test_bayes_answer_matches_empirical_posterior():
    """Among train scenes whose trigger is visible and partner is not, the partner is present with the frequency
    bayes_yes predicts; visible shapes are certain, other unseen shapes impossible."""
    gen = W.WeakEvidenceGenerator(prior_strength=0.9, modes=MODES)
    scenes = gen.sample_split(np.random.default_rng(3), 6000, "train")
    unseen = [s for s in scenes if s.trigger and s.partner not in s.visible_shapes]
    p = W.bayes_yes(gen, unseen[0], unseen[0].partner, "train")
    assert p == pytest.approx(0.9 * 0.3 / (0.9 * 0.3 + 0.1))
    assert _binom_ok(sum(s.partner in s.shapes for s in unseen), len(unseen), p)
    s = unseen[0]
    assert W.bayes_yes(gen, s, s.trigger, "train") == 1.0
    other = next(x for x in ("diamond", "bar", "cross", "square") if x not in s.shapes and x != s.partner)
    assert W.bayes_yes(gen, s, other, "train") == 0.0
    assert W.bayes_yes(gen, s, s.partner, "test") == pytest.approx(0.3 / 1.3)  # balanced split: q = 0.5


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="summing to 1"):
        W.WeakEvidenceGenerator(modes={"clear": 0.5, "faint": 0.4})
    with pytest.raises(ValueError, match="summing to 1"):
        W.WeakEvidenceGenerator(modes={"clear": 0.5, "blurry": 0.5})
    with pytest.raises(ValueError, match="prior_strength"):
        W.WeakEvidenceGenerator(prior_strength=1.5)
    with pytest.raises(ValueError, match="noisy"):
        W.render_weak(W.WeakScene((SceneObject("square", "red", "big", 0),), ("noisy",)))
