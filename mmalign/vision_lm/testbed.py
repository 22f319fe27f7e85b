"""The procedural testbed: tiny VLMs trained from scratch on rendered scenes, and scene-built preference pairs.

Used by the offline benchmark and, when no ``model_path`` is given, by ``vlm train``; training code never imports
the benchmark. Pairs: ``corrupt`` (rule-corrupted captions and flipped yes/no answers), ``bdhs`` (answers
regenerated with image tokens hidden) and ``realign`` (retrieval-filled rejected answers with retrieved images).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["DESCRIBE", "build_tiny", "sft_examples", "asked_shape", "corrupt_pairs", "question_chosen",
           "sft_trainer_config", "train_sft", "build_pairs", "pretrain_vision_tower"]

DESCRIBE = "<image> describe :"


def build_tiny(family: str, seed: int, patch_size: int = 16) -> tuple[Any, Any]:
    """``(model, processor)``: the testbed's tiny VLM of ``family`` over the scene vocabulary (seeded)."""
    from mmalign.vision_lm import scenes as S

    if family == "llava":
        from mmalign.vision_lm.tiny import build_tiny_llava

        return build_tiny_llava(S.vocabulary(), seed=seed, patch_size=patch_size)
    from mmalign.vision_lm.families import build_tiny_vlm

    # the tiny LLaVA's widths and depths in the family's own architecture and image layout
    return build_tiny_vlm(family, S.vocabulary(), seed=seed, patch_size=patch_size, vision_dim=64, text_dim=96,
                          vision_layers=2, text_layers=2, heads=4, max_positions=256)


def sft_examples(scenes: Sequence[Any], images: Sequence[np.ndarray], rng: np.random.Generator) -> list[Any]:
    """One caption and up to two yes / two no questions per scene."""
    from mmalign.vision_lm import scenes as S
    from mmalign.vision_lm.adapter import VLExample

    out = []
    for scene, img in zip(scenes, images):
        out.append(VLExample(DESCRIBE, S.caption(scene), [img]))
        present = sorted(scene.shapes)
        absent = [s for s in S.SHAPES if s not in scene.shapes]
        for s in rng.permutation(present)[:2]:
            out.append(VLExample(f"<image> {S.question(str(s))}", "yes", [img]))
        for s in rng.permutation(absent)[:2]:
            out.append(VLExample(f"<image> {S.question(str(s))}", "no", [img]))
    return out


def asked_shape(scene: Any, rng: np.random.Generator, partner_rate: float = 0.0) -> str:
    """The shape a scene's yes/no question asks about: a uniformly random one, or, with probability
    ``partner_rate`` when the scene holds a trigger, the trigger's co-occurring partner.

    POVID builds its rejected answers from the objects a model is prone to hallucinate, those that co-occur with
    what is shown; asked uniformly over six shapes, only about one question in nine would concern the partner (the
    question the testbed scores). With ``partner_rate`` 0 nothing beyond the uniform draw is taken from ``rng``.
    """
    from mmalign.vision_lm import scenes as S

    partners = sorted({S.PRIOR_PAIRS[t] for t in scene.shapes if t in S.PRIOR_PAIRS})
    if partner_rate > 0 and partners and rng.random() < partner_rate:
        return str(rng.choice(partners))
    return str(rng.choice(S.SHAPES))


def corrupt_pairs(scenes: Sequence[Any], images: Sequence[np.ndarray], rng: np.random.Generator,
                  partner_rate: float = 0.0) -> list[Any]:
    """Rule-based pairs (the plain DPO baseline): caption with one shape or colour replaced; flipped yes/no answer
    (the question's shape from :func:`asked_shape`)."""
    from mmalign.vision_lm import scenes as S
    from mmalign.vision_lm.objectives import PrefPair

    pairs = []
    for scene, img in zip(scenes, images):
        words = S.caption(scene).split()
        slots = [i for i, w in enumerate(words) if w in S.SHAPES or w in S.COLORS]
        i = int(rng.choice(slots))
        pool = [w for w in (S.SHAPES if words[i] in S.SHAPES else S.COLORS) if w != words[i]]
        if words[i] in S.SHAPES:
            pool = [w for w in pool if w not in scene.shapes] or pool
        bad = list(words)
        bad[i] = str(rng.choice(pool))
        pairs.append(PrefPair(DESCRIBE, " ".join(words), " ".join(bad), [img]))
        shape = asked_shape(scene, rng, partner_rate)
        truth = "yes" if shape in scene.shapes else "no"
        pairs.append(PrefPair(f"<image> {S.question(shape)}", truth, "no" if truth == "yes" else "yes", [img]))
    return pairs


def question_chosen(scenes: Sequence[Any], images: Sequence[np.ndarray], rng: np.random.Generator,
                    partner_rate: float = 0.0) -> list[Any]:
    """(prompt, ground-truth answer, image) examples, captions and one yes/no question per scene (its shape from
    :func:`asked_shape`)."""
    from mmalign.vision_lm import scenes as S
    from mmalign.vision_lm.adapter import VLExample

    out = []
    for scene, img in zip(scenes, images):
        out.append(VLExample(DESCRIBE, S.caption(scene), [img]))
        shape = asked_shape(scene, rng, partner_rate)
        out.append(VLExample(f"<image> {S.question(shape)}", "yes" if shape in scene.shapes else "no", [img]))
    return out


def sft_trainer_config(seed: int, steps: int, batch: int, lr: float, lora_r: int = 0, eval_every: int = 0) -> Any:
    """The trainer settings of the testbed's SFT and LoRA preference runs (CPU, cosine schedule, no plots)."""
    from mmalign.train import TrainerConfig

    lora = {"enabled": lora_r > 0, "r": max(lora_r, 1), "alpha": 2.0 * max(lora_r, 1),
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
    return TrainerConfig.from_dict({
        "seed": seed, "max_steps": steps, "batch_size": batch, "lr": lr, "lr_schedule": "cosine",
        "warmup_steps": min(20, steps // 10), "log_every": max(1, steps // 10), "cpu": True, "progress": False,
        "plots": False, "keep_checkpoints": 1, "lora": lora, "mixed_precision": "no", "eval_every": eval_every,
    })


def train_sft(adapter: Any, examples: list[Any], *, steps: int, batch_size: int, lr: float, seed: int, run_dir: Path,
              resume: bool = False) -> dict[str, Any]:
    """Next-token cross-entropy on the response tokens (mean over tokens) with the generic trainer.

    ``resume``: continue from the latest checkpoint in ``run_dir`` (an interrupted SFT phase).
    """
    from mmalign.train import Trainer

    def loss_fn(model: Any, batch: Any) -> tuple[Any, dict[str, Any]]:
        adapter.model = model
        logps, mask, _ = adapter.token_logps(batch)
        return -logps.sum() / mask.sum(), {}

    trainer = Trainer(sft_trainer_config(seed, steps, batch_size, lr), adapter.model, examples, loss_fn, run_dir,
                      collate_fn=adapter.encode)
    out = trainer.train(resume=resume)
    adapter.model = trainer.unwrapped_model()
    return out


def build_pairs(source: str, adapter: Any, scenes: list[Any], images: list[np.ndarray], *, seed: int,
                bdhs_rho: float = 0.99, realign_top_k: int = 5,
                partner_rate: float = 0.0) -> tuple[list[Any], dict[str, float]]:
    """The method's preference pairs from ``scenes`` using the SFT model in ``adapter``; every source asks its
    yes/no questions about the same shapes (``partner_rate``: :func:`asked_shape`)."""
    import torch

    from mmalign.vision_lm import methods as M
    from mmalign.vision_lm import scenes as S
    from mmalign.vision_lm.objectives import PrefPair

    rng = np.random.default_rng(seed + 777)
    if source == "corrupt":
        return corrupt_pairs(scenes, images, rng, partner_rate), {}
    chosen = question_chosen(scenes, images, rng, partner_rate)
    if source == "bdhs":
        gen = torch.Generator().manual_seed(seed + 99)
        rejected, stats = M.bdhs_rejected(adapter, chosen, rho=bdhs_rho, rng=rng, generator=gen)
        return [PrefPair(ex.prompt, ex.response, r, ex.images) for ex, r in zip(chosen, rejected)], stats
    # Re-Align: image index from the SFT model's own vision tower; captions and answers are maskable.
    index = M.ImageIndex(M.vision_embeddings(adapter, images))
    maskable = {**{w: "shape" for w in S.SHAPES}, **{w: "color" for w in S.COLORS}, "yes": "answer", "no": "answer"}
    builder = M.RealignBuilder(adapter, index, maskable, top_k=realign_top_k)
    img_of = [i // 2 for i in range(len(chosen))]  # question_chosen emits two examples per scene
    pairs, tries = [], []
    for k, ex in enumerate(chosen):
        words = ex.response.split()
        for t, j in enumerate(index.topk(img_of[k], realign_top_k), start=1):
            filled = builder.fill(ex.prompt, words, images[j])
            if M.bow_cosine(ex.response, filled) < builder.threshold:
                pairs.append(PrefPair(ex.prompt, ex.response, filled, ex.images, retrieved_images=[images[j]]))
                tries.append(t)
                break
    return pairs, {"realign/accepted_fraction": len(pairs) / len(chosen), "realign/mean_tries": float(np.mean(tries))}


def pretrain_vision_tower(model: Any, scenes: Sequence[Any], images: Sequence[Any], processor: Any, *,
                          steps: int = 150, batch_size: int = 64, lr: float = 3e-3, seed: int = 0) -> float:
    """Supervised per-cell pre-training of a tiny VLM's vision tower (stand-in for CLIP / SigLIP pre-training).

    Real VLMs start from a pretrained vision encoder; a from-scratch 2-layer ViT inside the LLaVA wiring learns
    far too slowly on a shared CPU. Every patch token of the whole-image view is classified into the (shape or
    empty, colour, size) of the grid cell it lies in (one or several patches per cell) by a linear head that is
    thrown away afterwards; ``scenes`` give the labels (pass only what the pixels show).
    Any family of :mod:`mmalign.vision_lm.families` (the view: see ``whole_image_patch_features``). Returns the final
    training accuracy of the shape head.
    """
    import numpy as np
    import torch

    from mmalign.core.rng import seeded_global_rng
    from mmalign.vision_lm import scenes as S
    from mmalign.vision_lm.families import whole_image_patch_features

    tower, pix, tower_features = whole_image_patch_features(model, processor, images)
    cfg = tower.config
    side = cfg.image_size // cfg.patch_size  # patches per row
    if side % S.GRID:
        raise ValueError(f"pretrain_vision_tower needs a whole number of patches per grid cell ({S.GRID} cells per "
                         f"row), got {side} patches per row")
    # patch k (row-major) lies in grid cell cell_of[k]; with several patches per cell each is labelled by its cell
    per = side // S.GRID
    cell_of = torch.as_tensor([(k // side) // per * S.GRID + (k % side) // per for k in range(side * side)])
    n_out = (len(S.SHAPES) + 1) + len(S.COLORS) + len(S.SIZES)
    # Seeded: torch's global generator starts from a different seed in every process, which made the whole
    # benchmark (vision tower -> SFT -> every method) differ from run to run.
    with seeded_global_rng(seed):
        head = torch.nn.Linear(cfg.hidden_size, n_out)
    params = list(tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr)
    cells = S.GRID * S.GRID
    shape_t = torch.full((len(scenes), cells), len(S.SHAPES), dtype=torch.long)
    color_t = torch.full((len(scenes), cells), -100, dtype=torch.long)
    size_t = torch.full((len(scenes), cells), -100, dtype=torch.long)
    for i, sc in enumerate(scenes):
        for o in sc.objects:
            shape_t[i, o.cell] = S.SHAPES.index(o.shape)
            color_t[i, o.cell] = S.COLORS.index(o.color)
            size_t[i, o.cell] = S.SIZES.index(o.size)
    shape_t, color_t, size_t = shape_t[:, cell_of], color_t[:, cell_of], size_t[:, cell_of]
    rng = np.random.default_rng(seed)
    ce = torch.nn.functional.cross_entropy
    acc = 0.0
    tower.train()
    for _ in range(steps):
        idx = torch.as_tensor(rng.integers(0, len(scenes), batch_size))
        feats = tower_features(pix[idx])
        out = head(feats)
        k = len(S.SHAPES) + 1
        loss = (ce(out[..., :k].reshape(-1, k), shape_t[idx].reshape(-1))
                + ce(out[..., k:k + len(S.COLORS)].reshape(-1, len(S.COLORS)), color_t[idx].reshape(-1))
                + ce(out[..., k + len(S.COLORS):].reshape(-1, len(S.SIZES)), size_t[idx].reshape(-1)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        acc = float((out[..., :k].argmax(-1) == shape_t[idx]).float().mean())
    return acc
