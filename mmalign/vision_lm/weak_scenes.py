"""Scenes where the prior-predicted object's visual evidence is weak with set probabilities (the hallucination testbed).

Real hallucination comes from training annotations that name objects the pixels barely support (tiny, faint,
occluded), next to strong co-occurrence: a model learns to say "square" because a circle is there. This generator
plants exactly that, with every probability set, so the Bayes-optimal answer to a yes/no question is computable:

- A scene holds at most one *trigger* (``circle`` or ``triangle``, see :data:`scenes.PRIOR_PAIRS`) with probability
  ``p_trigger`` (train) and always (test), and 0..``max_distractors`` *distractors* drawn from the shapes that are
  neither a trigger nor the trigger's partner, all rendered clearly.
- Train split: the trigger's *partner* (``square`` / ``cross``) is present with probability ``prior_strength``.
  Test split: exactly half the scenes hold the partner (*prior-consistent*), half do not (*prior-violating*).
- A present partner is rendered in an evidence mode drawn from ``modes`` (probabilities): ``clear``; ``small``
  (radius 0.15 of a cell); ``faint`` (30% contrast); ``noisy`` (per-pixel noise of sd 60 on the object);
  ``invisible`` (0% contrast: the annotation names an object the pixels do not show). Clear, small, faint and
  noisy objects stay visible to an ideal observer (tested: their cells differ from an empty cell by many noise sds);
  an invisible one is not.

Ground truth (captions, POPE answers) always names every present object, invisible ones included, as an annotator
would. The Bayes-optimal probability that the partner is present, given what is visible, is
``1`` when it is visible and ``q p_inv / (q p_inv + 1 - q)`` otherwise, with ``q`` = P(partner | trigger) of the
split (``prior_strength`` in train, 0.5 in test) and ``p_inv`` = ``modes["invisible"]`` (:func:`bayes_yes`). A model
that has learned the train posterior says "yes" to the partner on prior-violating scenes whenever
``prior_strength * p_inv > 1 - prior_strength``: the hallucination the preference methods are meant to remove.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from mmalign.vision_lm import scenes as S
from mmalign.vision_lm.scenes import GRID, PRIOR_PAIRS, SHAPES, SIZES, COLORS, Scene, SceneObject

__all__ = ["MODES", "WeakScene", "WeakEvidenceGenerator", "render_weak", "bayes_yes", "partner_questions"]

MODES: tuple[str, ...] = ("clear", "small", "faint", "noisy", "invisible")
_VISIBLE = frozenset(MODES) - {"invisible"}
_CONTRAST = {"clear": 1.0, "small": 1.0, "faint": 0.3, "noisy": 1.0, "invisible": 0.0}
_RADIUS = {"big": 0.42, "small": 0.25}
_TINY_RADIUS = 0.15  # the "small" evidence mode: below the smallest regular size
NOISY_SD = 60.0


@dataclass(frozen=True)
class WeakScene:
    """A scene with one evidence mode per object (``modes[i]`` belongs to ``objects[i]``).

    ``consistent`` is True / False for test scenes that do / do not hold their trigger's partner (None in train).
    """

    objects: tuple[SceneObject, ...]
    modes: tuple[str, ...]
    consistent: bool | None = None
    trigger: str | None = field(default=None)

    def __post_init__(self) -> None:
        if len(self.modes) != len(self.objects):
            raise ValueError(f"modes must give one mode per object, got {len(self.modes)} for {len(self.objects)}")
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise ValueError(f"modes must be among {MODES}, got {bad}")

    @property
    def scene(self) -> Scene:
        """The ground truth as a plain :class:`scenes.Scene` (captions, CHAIR, POPE take it)."""
        return Scene(self.objects)

    @property
    def seen(self) -> Scene:
        """What the pixels show as a plain :class:`scenes.Scene`: every object but the invisible ones (the labels of
        a grounded annotator, and of the vision tower's pre-training)."""
        return Scene(tuple(o for o, m in zip(self.objects, self.modes) if m != "invisible"))

    @property
    def shapes(self) -> set[str]:
        return {o.shape for o in self.objects}

    @property
    def visible_shapes(self) -> set[str]:
        return {o.shape for o, m in zip(self.objects, self.modes) if m in _VISIBLE}

    @property
    def partner(self) -> str | None:
        return PRIOR_PAIRS[self.trigger] if self.trigger else None

    def partner_mode(self) -> str | None:
        """The evidence mode of the trigger's partner, None when the scene does not hold it."""
        return next((m for o, m in zip(self.objects, self.modes) if o.shape == self.partner), None)


class WeakEvidenceGenerator:
    """Samples :class:`WeakScene` s; see the module docstring for the generative process."""

    def __init__(self, prior_strength: float = 0.9, p_trigger: float = 0.7, max_distractors: int = 2,
                 modes: dict[str, float] | None = None) -> None:
        modes = dict(modes if modes is not None else
                     {"clear": 0.4, "small": 0.1, "faint": 0.1, "noisy": 0.1, "invisible": 0.3})
        for name, value in (("prior_strength", prior_strength), ("p_trigger", p_trigger)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if not 0 <= max_distractors <= GRID * GRID - 2:
            raise ValueError(f"max_distractors must be in [0, {GRID * GRID - 2}], got {max_distractors}")
        unknown = sorted(set(modes) - set(MODES))
        if unknown or any(p < 0 for p in modes.values()) or abs(sum(modes.values()) - 1.0) > 1e-9:
            raise ValueError(f"modes must map names among {MODES} to probabilities summing to 1, got {modes}")
        self.prior_strength, self.p_trigger, self.max_distractors = prior_strength, p_trigger, max_distractors
        self.modes = {m: float(modes.get(m, 0.0)) for m in MODES}

    def _object(self, shape: str, cell: int, rng: np.random.Generator, mode: str) -> SceneObject:
        size = "small" if mode == "small" else str(rng.choice(SIZES))
        return SceneObject(shape, str(rng.choice(COLORS)), size, cell)

    def sample(self, rng: np.random.Generator, split: str = "train", consistent: bool | None = None) -> WeakScene:
        """One scene. ``split="test"`` needs ``consistent`` (partner present or not); train draws it."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if split == "test" and consistent is None:
            raise ValueError("a test scene needs consistent=True (partner present) or False (prior-violating)")
        trigger = str(rng.choice(list(PRIOR_PAIRS))) if split == "test" or rng.random() < self.p_trigger else None
        shapes: list[tuple[str, str]] = []
        if trigger is not None:
            shapes.append((trigger, "clear"))
            with_partner = consistent if split == "test" else bool(rng.random() < self.prior_strength)
            if with_partner:
                mode = str(rng.choice(MODES, p=[self.modes[m] for m in MODES]))
                shapes.append((PRIOR_PAIRS[trigger], mode))
            pool = [s for s in SHAPES if s not in PRIOR_PAIRS and s != PRIOR_PAIRS[trigger]]
        else:
            pool = [s for s in SHAPES if s not in PRIOR_PAIRS]
        n_extra = int(rng.integers(0, self.max_distractors + 1)) if trigger else int(rng.integers(1, 3))
        extra = rng.choice(pool, size=min(n_extra, len(pool)), replace=False)
        shapes += [(str(s), "clear") for s in extra]
        cells = rng.permutation(GRID * GRID)[: len(shapes)]
        objs = [(self._object(s, int(c), rng, m), m) for (s, m), c in zip(shapes, cells)]
        objs.sort(key=lambda om: om[0].cell)
        return WeakScene(tuple(o for o, _ in objs), tuple(m for _, m in objs),
                         consistent if split == "test" else None, trigger)

    def sample_split(self, rng: np.random.Generator, n: int, split: str) -> list[WeakScene]:
        """``n`` scenes; a test split alternates prior-consistent and prior-violating scenes (balanced exactly
        for even ``n``)."""
        if n <= 0:
            raise ValueError(f"n must be > 0, got {n}")
        if split == "test":
            return [self.sample(rng, "test", consistent=i % 2 == 0) for i in range(n)]
        return [self.sample(rng, split) for _ in range(n)]

    def partner_prior(self, split: str) -> float:
        """P(partner present | trigger present) in ``split``."""
        return self.prior_strength if split == "train" else 0.5


def render_weak(scene: WeakScene, size: int = 32, rng: np.random.Generator | None = None,
                noise: float = 8.0) -> np.ndarray:
    """Draw ``scene`` as ``(size, size, 3)`` uint8 with each object's evidence mode; background noise only with
    ``rng`` (the ``noisy`` mode also needs ``rng``)."""
    img = np.zeros((size, size, 3), dtype=np.float32)
    cell = size / GRID
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    for obj, mode in zip(scene.objects, scene.modes):
        cy, cx = (obj.cell // GRID + 0.5) * cell - 0.5, (obj.cell % GRID + 0.5) * cell - 0.5
        r = cell * (_TINY_RADIUS if mode == "small" else _RADIUS[obj.size])
        mask = S._shape_mask(obj.shape, xs - cx, ys - cy, r)
        colour = _CONTRAST[mode] * np.asarray(S._RGB[obj.color], dtype=np.float32)
        img[mask] = colour
        if mode == "noisy":
            if rng is None:
                raise ValueError("render_weak needs rng for a scene with a 'noisy' object")
            img[mask] += rng.normal(0.0, NOISY_SD, (int(mask.sum()), 3))
    if rng is not None and noise > 0:
        img = img + rng.normal(0.0, noise, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def bayes_yes(gen: WeakEvidenceGenerator, scene: WeakScene, shape: str, split: str) -> float:
    """P(``shape`` is in the scene | the visible objects) under ``split``'s generative process (an ideal observer).

    Only the partner of a visible trigger can be present unseen; every other shape is present iff visible.
    """
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    if shape in scene.visible_shapes:
        return 1.0
    if scene.trigger is None or shape != scene.partner:
        return 0.0
    q, p_inv = gen.partner_prior(split), gen.modes["invisible"]
    return q * p_inv / (q * p_inv + 1.0 - q) if q * p_inv + 1.0 - q > 0 else 0.0


def partner_questions(scenes: Sequence[WeakScene]) -> list[tuple[int, str, bool]]:
    """The critical question of every trigger scene, ``(scene index, partner shape, partner present)``."""
    return [(i, sc.partner, sc.partner in sc.shapes) for i, sc in enumerate(scenes) if sc.partner is not None]
