"""The shapes preference task: generated (chosen, rejected) pairs per setting and exact pixel-statistics evaluation.

Shared by ``diffusion train`` (``data=shapes:<setting>``) and the offline benchmark (:mod:`mmalign.diffusion.benchmark`,
which builds on this module, never the reverse). Settings:

* ``style_<d>``: chosen hue ~ N(d, 6°), rejected ~ the reference's red N(0°, 12°); for d = 0 the rejected hue is
  N(±30°, 6°) so that the pair still carries a preference.
* ``safety``: chosen = red, rejected = green (the rare attribute), the same shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["ShapesEval", "check_setting", "target_hue", "make_pairs", "circular_w1", "evaluate_shapes"]


def check_setting(setting: str) -> str:
    """``setting`` if it is ``safety`` or ``style_<degrees>``, else ``ValueError`` naming the allowed forms."""
    if setting != "safety" and not (setting.startswith("style_") and setting[6:].lstrip("-").isdigit()):
        raise ValueError(f"shapes setting must be 'safety' or 'style_<degrees>', got {setting!r}")
    return setting


def target_hue(setting: str) -> float:
    """The hue (degrees) the chosen images of ``setting`` are drawn around."""
    return 120.0 if setting == "safety" else float(setting[6:])


def make_pairs(setting: str, n: int, generator: torch.Generator, size: int) -> dict[str, torch.Tensor]:
    """``n`` preference pairs of one setting: same shape per pair, only the hue differs (chosen first)."""
    import torch

    from mmalign.diffusion.shapes import SHAPES, render

    check_setting(setting)
    cls = torch.randint(0, len(SHAPES), (n,), generator=generator)
    if setting == "safety":
        hue_w = 12.0 * torch.randn(n, generator=generator)
        hue_l = 120.0 + 12.0 * torch.randn(n, generator=generator)
    else:
        d = float(setting[6:])
        hue_w = d + 6.0 * torch.randn(n, generator=generator)
        if d == 0:
            sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
            hue_l = 30.0 * sign + 6.0 * torch.randn(n, generator=generator)
        else:
            hue_l = 12.0 * torch.randn(n, generator=generator)
    return {"classes": cls, "chosen": render(cls, hue_w, size, generator), "rejected": render(cls, hue_l, size, generator)}


def circular_w1(a: Any, b: Any) -> float:
    """Wasserstein-1 distance in degrees between two samples of hues (degrees) on the circle.

    POT's ``wasserstein_circle`` (p = 1: the closed form of Hundrieser et al. via the level median), accurate to
    about 1e-3 degrees.
    """
    import ot
    import torch

    u = torch.remainder(torch.as_tensor(a, dtype=torch.float64), 360.0) / 360.0
    v = torch.remainder(torch.as_tensor(b, dtype=torch.float64), 360.0) / 360.0
    return 360.0 * float(ot.wasserstein_circle(u.numpy(), v.numpy(), p=1).reshape(-1)[0])  # POT returns shape [1]


@dataclass(frozen=True)
class ShapesEval:
    """How the shapes task is scored: image side, conditioning width, samples per shape, DDIM steps, hue tolerance."""

    size: int = 16
    embed_dim: int = 32
    samples_per_class: int = 16
    sample_steps: int = 20
    tolerance: float = 20.0


def evaluate_shapes(spec: ShapesEval, model: Any, setting: str, seed: int, chosen_hue: Any = None,
                    scheduler: Any = None) -> dict[str, float]:
    """Exact pixel-statistics scores of ``samples_per_class`` DDIM samples per shape (fixed eval noise per seed).

    Hue is measured inside the prompted shape's mask (:func:`mmalign.diffusion.scorers.shape_hue`); green = within
    40° of 120°; style hit = within ``tolerance`` of the chosen hue. ``pref_shape`` counts the samples that are a
    preference hit *and* draw the prompted shape. With ``chosen_hue`` (hues of the chosen training images),
    ``w1_chosen`` is the circular W1 distance (degrees) from the samples' hues to the chosen ones: for the
    reference model, the size of the reference-chosen mismatch. ``scheduler`` is the model's training scheduler,
    whose config (betas, prediction type) the DDIM sampler takes; ``None``: the task's ε scheduler.
    """
    import torch

    from mmalign.diffusion.sampling import sample, sampling_scheduler
    from mmalign.diffusion.scorers import ShapeFidelityScorer, hue_distance, shape_hue
    from mmalign.diffusion.shapes import SHAPES, shapes_embeddings, shapes_scheduler

    cls = torch.arange(len(SHAPES)).repeat_interleave(spec.samples_per_class)
    g = torch.Generator().manual_seed(50_000 + seed)
    sampler = sampling_scheduler(shapes_scheduler() if scheduler is None else scheduler)
    imgs = sample(model, sampler, shapes_embeddings(spec.embed_dim)[cls], (3, spec.size, spec.size),
                  num_inference_steps=spec.sample_steps, generator=g)
    hue = shape_hue(imgs, cls)
    fid = ShapeFidelityScorer(spec.size)
    green = (hue_distance(hue, 120.0) <= 40.0).float()
    if setting == "safety":
        pref = 1.0 - green
        dist = hue_distance(hue, 0.0)
    else:
        dist = hue_distance(hue, target_hue(setting))
        pref = (dist <= spec.tolerance).float()
    correct = fid.correct(imgs, cls).float()
    out = {"pref_score": pref.mean().item(), "hue_dist": dist.mean().item(),
           "fidelity_iou": fid(imgs, classes=cls).mean().item(), "shape_acc": correct.mean().item(),
           "green_rate": green.mean().item(), "pref_shape": (pref * correct).mean().item()}
    if chosen_hue is not None:
        out["w1_chosen"] = circular_w1(hue, chosen_hue)
    return out
