"""Procedural scenes of coloured shapes with planted co-occurrence priors, and exact hallucination metrics.

The offline stand-in for COCO + CHAIR + POPE (see docs/benchmarks/vision_lm.md). Every scene carries its ground
truth (shape, colour, size, grid cell per object), so captions and yes/no answers are scored exactly: the grammar is
closed, so there are no synonym lists and no disputed labels.

Priors are planted on purpose, because they are what makes a small model hallucinate: in the ``train`` split a
``circle`` is accompanied by a ``square`` (and a ``triangle`` by a ``cross``) with probability ``prior_strength``,
and circles are mostly red, squares mostly blue. The ``test`` split violates the priors: every scene holds a trigger
shape, no trigger ever appears with its partner,
and colours are uniform.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from mmalign.vision_lm.pope import pope_metrics  # noqa: F401  (re-exported: the benchmark's POPE)

__all__ = [
    "SHAPES", "COLORS", "SIZES", "PRIOR_PAIRS", "SceneObject", "Scene", "SceneGenerator", "render",
    "caption", "parse_caption", "question", "vocabulary", "chair_metrics", "pope_questions", "pope_metrics",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "diamond", "bar")
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow")
SIZES: tuple[str, ...] = ("small", "big")
PRIOR_PAIRS: dict[str, str] = {"circle": "square", "triangle": "cross"}
_PRIOR_COLOR: dict[str, str] = {"circle": "red", "square": "blue"}
_RGB: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 240), "yellow": (235, 220, 40)
}
_SHAPE_MARGINAL = np.array([0.3, 0.1, 0.25, 0.1, 0.15, 0.1])  # skewed, so "popular" negatives differ from random
GRID = 2  # 2 x 2 cells


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    cell: int  # row-major index into the GRID x GRID layout


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]

    @property
    def shapes(self) -> set[str]:
        return {o.shape for o in self.objects}


def vocabulary() -> list[str]:
    """Every word the captions, questions and answers use (special tokens excluded)."""
    words = ["a", "and", ".", "?", "is", "there", "describe", ":", "yes", "no", "<mask>"]
    return words + list(SIZES) + list(COLORS) + list(SHAPES)


class SceneGenerator:
    """Samples scenes; ``split="train"`` follows the planted priors, ``split="test"`` violates them."""

    def __init__(self, prior_strength: float = 0.9, color_prior: float = 0.8, max_objects: int = 3) -> None:
        if not 0.0 <= prior_strength <= 1.0:
            raise ValueError(f"prior_strength must be in [0, 1], got {prior_strength}")
        if not 0.0 <= color_prior <= 1.0:
            raise ValueError(f"color_prior must be in [0, 1], got {color_prior}")
        if not 2 <= max_objects <= GRID * GRID:
            raise ValueError(f"max_objects must be in [2, {GRID * GRID}], got {max_objects}")
        self.prior_strength = prior_strength
        self.color_prior = color_prior
        self.max_objects = max_objects

    def _color(self, shape: str, rng: np.random.Generator, follow_prior: bool) -> str:
        if follow_prior and shape in _PRIOR_COLOR and rng.random() < self.color_prior:
            return _PRIOR_COLOR[shape]
        return str(rng.choice(COLORS))

    def sample(self, rng: np.random.Generator, split: str = "train") -> Scene:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        n = int(rng.integers(1, self.max_objects + 1))
        shapes: list[str] = []
        if split == "train":
            while len(shapes) < n:
                shapes.append(str(rng.choice(SHAPES, p=_SHAPE_MARGINAL)))
                partner = PRIOR_PAIRS.get(shapes[-1])
                if partner and len(shapes) < self.max_objects and rng.random() < self.prior_strength:
                    shapes.append(partner)
            shapes = shapes[: self.max_objects]
        else:
            # Every trigger present lacks its partner, and a partner never joins a scene holding its trigger.
            shapes = [str(rng.choice(list(PRIOR_PAIRS)))]
            while len(shapes) < n:
                banned = {PRIOR_PAIRS[t] for t in shapes if t in PRIOR_PAIRS}
                banned |= {t for t, p in PRIOR_PAIRS.items() if p in shapes}
                shapes.append(str(rng.choice([s for s in SHAPES if s not in banned])))
        cells = rng.permutation(GRID * GRID)[: len(shapes)]
        objs = [
            SceneObject(s, self._color(s, rng, split == "train"), str(rng.choice(SIZES)), int(c))
            for s, c in zip(shapes, cells)
        ]
        return Scene(tuple(sorted(objs, key=lambda o: o.cell)))


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    ax, ay = np.abs(dx), np.abs(dy)
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return (ax <= 0.85 * r) & (ay <= 0.85 * r)
    if shape == "triangle":
        return (dy <= r) & (dy >= -r) & (ax <= (dy + r) / 2)
    if shape == "cross":
        return ((ax <= r / 3) & (ay <= r)) | ((ay <= r / 3) & (ax <= r))
    if shape == "diamond":
        return ax + ay <= r
    if shape == "bar":
        return (ax <= r) & (ay <= r / 3)
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


def render(scene: Scene, size: int = 32, rng: np.random.Generator | None = None, noise: float = 8.0) -> np.ndarray:
    """Draw ``scene`` as a ``(size, size, 3)`` uint8 image; pixel noise only when ``rng`` is given."""
    img = np.zeros((size, size, 3), dtype=np.float32)
    cell = size / GRID
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    for obj in scene.objects:
        cy, cx = (obj.cell // GRID + 0.5) * cell - 0.5, (obj.cell % GRID + 0.5) * cell - 0.5
        r = cell * (0.42 if obj.size == "big" else 0.25)
        img[_shape_mask(obj.shape, xs - cx, ys - cy, r)] = _RGB[obj.color]
    if rng is not None and noise > 0:
        img = img + rng.normal(0.0, noise, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def caption(scene: Scene) -> str:
    """The ground-truth caption, objects in cell order: ``"a big red circle and a small blue square ."``."""
    return " and ".join(f"a {o.size} {o.color} {o.shape}" for o in scene.objects) + " ."


def question(shape: str) -> str:
    return f"is there a {shape} ?"


def parse_caption(text: str) -> list[tuple[str | None, str | None, str]]:
    """Object mentions ``(size, colour, shape)`` of a caption in the closed grammar; missing attributes are None."""
    out: list[tuple[str | None, str | None, str]] = []
    size = color = None
    for word in text.split():
        if word in SIZES:
            size = word
        elif word in COLORS:
            color = word
        elif word in SHAPES:
            out.append((size, color, word))
            size = color = None
        elif word in ("and", "."):
            size = color = None
    return out


def chair_metrics(captions: Sequence[str], scenes: Sequence[Scene]) -> dict[str, float]:
    """CHAIR_i, CHAIR_s, attribute error rate, object recall and mean caption length, from ground truth.

    CHAIR_i = hallucinated shape mentions / all shape mentions; CHAIR_s = captions with >= 1 hallucinated shape /
    captions; attr_error = mentions of a present shape whose (size, colour) matches no object of that shape / mentions
    of present shapes; recall = distinct ground-truth shapes mentioned / distinct ground-truth shapes.
    """
    if len(captions) != len(scenes) or not captions:
        raise ValueError(f"captions and scenes must be non-empty and equally long, got {len(captions)} and {len(scenes)}")
    mentions = halluc = caps_h = attr_n = attr_err = gt_n = gt_hit = words = 0
    for text, scene in zip(captions, scenes):
        parsed = parse_caption(text)
        bad = [m for m in parsed if m[2] not in scene.shapes]
        mentions += len(parsed)
        halluc += len(bad)
        caps_h += bool(bad)
        for size, color, shape in parsed:
            if shape in scene.shapes:
                attr_n += 1
                ok = any(o.shape == shape and size in (None, o.size) and color in (None, o.color) for o in scene.objects)
                attr_err += not ok
        said = {m[2] for m in parsed}
        gt_n += len(scene.shapes)
        gt_hit += len(scene.shapes & said)
        words += len(text.split())
    return {
        "chair_i": halluc / max(mentions, 1),
        "chair_s": caps_h / len(captions),
        "attr_error": attr_err / max(attr_n, 1),
        "recall": gt_hit / max(gt_n, 1),
        "caption_len": words / len(captions),
    }


def shape_statistics(scenes: Sequence[Scene]) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    """Shape frequencies and ordered co-occurrence counts over ``scenes`` (the POPE popular/adversarial source)."""
    freq = {s: 0 for s in SHAPES}
    co = {(a, b): 0 for a in SHAPES for b in SHAPES if a != b}
    for scene in scenes:
        for a in scene.shapes:
            freq[a] += 1
            for b in scene.shapes:
                if a != b:
                    co[(a, b)] += 1
    return freq, co


def pope_questions(
    scenes: Sequence[Scene], split: str, rng: np.random.Generator, train_scenes: Sequence[Scene]
) -> list[tuple[int, str, bool]]:
    """POPE-style ``(scene index, shape, answer)`` triples: every present shape (yes) and as many absent ones (no).

    ``split`` picks the absent shapes: ``random`` uniformly, ``popular`` the most frequent shapes of
    ``train_scenes``, ``adversarial`` the shapes that co-occur most with the present ones in ``train_scenes``.
    """
    if split not in ("random", "popular", "adversarial"):
        raise ValueError(f"split must be 'random', 'popular' or 'adversarial', got {split!r}")
    freq, co = shape_statistics(train_scenes)
    out: list[tuple[int, str, bool]] = []
    for i, scene in enumerate(scenes):
        present = sorted(scene.shapes)
        absent = [s for s in SHAPES if s not in scene.shapes]
        if split == "random":
            absent = [absent[j] for j in rng.permutation(len(absent))]
        elif split == "popular":
            absent.sort(key=lambda s: -freq[s])
        else:
            absent.sort(key=lambda s: -sum(co[(p, s)] for p in present))
        out += [(i, s, True) for s in present] + [(i, s, False) for s in absent[: len(present)]]
    return out
