"""The grounded base model of the hallucination testbed: data, deterministic cached training, evaluation, gates.

A tiny LLaVA (real ``transformers`` classes, :func:`testbed.build_tiny`) is trained from scratch on weak-evidence
scenes (:mod:`weak_scenes`) in up to three stages: per-patch supervised pre-training of the vision tower (the
stand-in for CLIP pre-training; it sees only what the pixels show), an optional connector stage (projector only,
towers frozen, on the SFT data), and SFT on captions and yes/no questions. Training is a plain seeded loop over
batches encoded once, so a base model is a pure function of ``(config, seed)``; it is cached as safetensors under a
key of the fields that shape it and reloaded in seconds by the preference runs.

The base must pass :func:`gates` before preference rows are reported: POPE-random >= 0.85 on prior-violating test
scenes (it sees), blank-image POPE accuracy within 0.1 of 0.5 (it answers from the image, not the question), and
POPE-adversarial within [0.60, 0.75] on prior-violating scenes (a hallucination gap is left to close).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mmalign.config import Config, check_positive, check_probability, option
from mmalign.vision_lm import weak_scenes as W

__all__ = ["BaseConfig", "TestbedData", "make_data", "sft_examples", "build_base", "evaluate", "gates", "GATES"]

# gate name -> (metric key, low, high)
GATES: dict[str, tuple[str, float, float]] = {
    "pope_random_violating >= 0.85": ("pope_random_acc", 0.85, 1.0),
    "blank-image POPE within 0.5 ± 0.1": ("blank_pope_random_acc", 0.4, 0.6),
    "pope_adversarial_violating in [0.60, 0.75]": ("pope_adversarial_acc", 0.60, 0.75),
}
DESCRIBE = "<image> describe :"


@dataclass
class BaseConfig(Config):
    """Scenes and training of the testbed's base (SFT) model; every field enters the cache key."""

    prior_strength: float = option(0.95, "P(partner | trigger) in the train split")
    p_trigger: float = option(0.7, "P(a train scene holds a trigger shape)")
    max_distractors: int = option(1, "distractor shapes per trigger scene: 0..max_distractors")
    p_small: float = option(0.1, "P(a present partner is rendered tiny)")
    p_faint: float = option(0.1, "P(a present partner is rendered at 30% contrast)")
    p_noisy: float = option(0.1, "P(a present partner is rendered with heavy pixel noise)")
    p_invisible: float = option(0.15, "P(a present partner is rendered at 0% contrast: named but unseen)")
    n_train_scenes: int = option(3000, "train-split scenes for the vision tower and SFT")
    patch_size: int = option(8, "vision patch size (32x32 images): 8 = 16 image tokens, 16 = 4")
    text_dim: int = option(96, "decoder width")
    text_layers: int = option(2, "decoder layers")
    vision_steps: int = option(300, "per-patch pre-training steps of the vision tower")
    freeze_vision: bool = option(True, "keep the pre-trained vision tower frozen in SFT")
    connector_steps: int = option(0, "projector-only steps before SFT (0 = no connector stage)")
    sft_epochs: int = option(4, "SFT epochs over the examples")
    sft_lr: float = option(2e-3, "SFT learning rate (AdamW, cosine)")
    batch_size: int = option(32, "SFT batch size")
    questions_per_scene: int = option(2, "yes questions (present shapes) and as many no questions per train scene")

    def __post_init__(self) -> None:
        for name in ("n_train_scenes", "text_dim", "text_layers", "sft_epochs", "sft_lr", "batch_size",
                     "questions_per_scene", "vision_steps"):
            check_positive(name, getattr(self, name))
        for name in ("prior_strength", "p_trigger", "p_small", "p_faint", "p_noisy", "p_invisible"):
            check_probability(name, getattr(self, name))
        if self.p_small + self.p_faint + self.p_noisy + self.p_invisible > 1:
            raise ValueError("p_small + p_faint + p_noisy + p_invisible must be <= 1 (the rest is 'clear'), got "
                             f"{self.p_small + self.p_faint + self.p_noisy + self.p_invisible}")
        if self.patch_size not in (8, 16):
            raise ValueError(f"patch_size must be 8 or 16 (whole patches per grid cell), got {self.patch_size}")

    def generator(self) -> W.WeakEvidenceGenerator:
        weak = {"small": self.p_small, "faint": self.p_faint, "noisy": self.p_noisy, "invisible": self.p_invisible}
        return W.WeakEvidenceGenerator(self.prior_strength, self.p_trigger, self.max_distractors,
                                       {"clear": 1.0 - sum(weak.values()), **weak})

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class TestbedData:
    """One seed's scenes and rendered images: train (base + preference pairs) and the balanced test split."""

    train: list[W.WeakScene]
    train_images: list[np.ndarray]
    pref: list[W.WeakScene]
    pref_images: list[np.ndarray]
    test: list[W.WeakScene]
    test_images: list[np.ndarray]


def make_data(cfg: BaseConfig, seed: int, n_pref: int, n_test: int) -> TestbedData:
    """Scenes of ``seed``: base-training scenes, ``n_pref`` fresh train-split scenes for pairs, ``n_test`` test ones.

    Each part has its own stream, so changing ``n_pref`` or ``n_test`` leaves the base model's data unchanged.
    """
    gen = cfg.generator()
    out = []
    for part, (n, split) in enumerate(((cfg.n_train_scenes, "train"), (n_pref, "train"), (n_test, "test"))):
        rng = np.random.default_rng([seed, part])
        scenes = gen.sample_split(rng, n, split)
        out += [scenes, [W.render_weak(s, rng=rng) for s in scenes]]
    return TestbedData(*out)


def sft_examples(scenes: Sequence[W.WeakScene], images: Sequence[np.ndarray], rng: np.random.Generator,
                 questions: int) -> list[Any]:
    """A caption and up to ``questions`` yes / ``questions`` no questions per scene; the ground truth names every
    present object, unseen ones included (the annotation the model learns the prior from)."""
    from mmalign.vision_lm import scenes as S
    from mmalign.vision_lm.adapter import VLExample

    out = []
    for scene, img in zip(scenes, images):
        out.append(VLExample(DESCRIBE, S.caption(scene.scene), [img]))
        present = sorted(scene.shapes)
        absent = [s for s in S.SHAPES if s not in scene.shapes]
        for s in rng.permutation(present)[:questions]:
            out.append(VLExample(f"<image> {S.question(str(s))}", "yes", [img]))
        for s in rng.permutation(absent)[:questions]:
            out.append(VLExample(f"<image> {S.question(str(s))}", "no", [img]))
    return out


def _train_loop(adapter: Any, batches: list[Any], params: list[Any], epochs: int, lr: float, seed: int) -> float:
    """AdamW with a cosine schedule over ``epochs`` passes in a seeded order; returns the last epoch's mean loss."""
    import torch

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    total = max(1, epochs * len(batches))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + np.cos(np.pi * min(k, total) / total)))
    order_rng = np.random.default_rng(seed + 101)
    adapter.model.train()
    last = 0.0
    for _ in range(epochs):
        losses = []
        for j in order_rng.permutation(len(batches)):
            logps, mask, _ = adapter.token_logps(batches[j])
            loss = -logps.sum() / mask.sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        last = float(np.mean(losses))
    adapter.model.eval()
    return last


def build_base(cfg: BaseConfig, seed: int, data: TestbedData, cache_dir: Path | None = None) -> tuple[Any, dict]:
    """``(adapter, info)``: the seed's base model, loaded from ``cache_dir`` when built before, else trained (and
    stored there). ``info`` holds the training losses, the vision tower's shape accuracy and the build CPU time."""
    from safetensors.torch import load_model, save_model

    from mmalign.core.rng import seeded_global_rng
    from mmalign.vision_lm.adapter import VLMAdapter
    from mmalign.vision_lm import scenes as S
    from mmalign.vision_lm.testbed import pretrain_vision_tower
    from mmalign.vision_lm.tiny import build_tiny_llava

    model, processor = build_tiny_llava(S.vocabulary(), seed=seed, patch_size=cfg.patch_size, text_dim=cfg.text_dim,
                                        text_layers=cfg.text_layers, max_positions=256)
    adapter = VLMAdapter(model, processor, max_length=96)
    where = Path(cache_dir) / cfg.key() / f"seed{seed}" if cache_dir is not None else None
    if where is not None and (where / "model.safetensors").exists():
        load_model(model, str(where / "model.safetensors"))
        model.eval()
        return adapter, json.loads((where / "info.json").read_text())
    t0 = time.process_time()
    info: dict[str, Any] = {}
    info["vision_shape_acc"] = pretrain_vision_tower(model, [s.seen for s in data.train], data.train_images, processor,
                                                     steps=cfg.vision_steps, seed=seed)
    inner = model.model
    examples = sft_examples(data.train, data.train_images, np.random.default_rng([seed, 7]), cfg.questions_per_scene)
    batches = [adapter.encode(examples[i:i + cfg.batch_size]) for i in range(0, len(examples), cfg.batch_size)]
    with seeded_global_rng(seed):
        if cfg.connector_steps > 0:
            projector = list(inner.multi_modal_projector.parameters())
            epochs = max(1, round(cfg.connector_steps / len(batches)))
            info["connector_loss"] = _train_loop(adapter, batches, projector, epochs, cfg.sft_lr, seed)
        if cfg.freeze_vision:
            inner.vision_tower.requires_grad_(False)
        params = [p for p in model.parameters() if p.requires_grad]
        info["sft_loss"] = _train_loop(adapter, batches, params, cfg.sft_epochs, cfg.sft_lr, seed + 1)
    model.requires_grad_(True)
    info["build_cpu_s"] = time.process_time() - t0
    info["n_sft_examples"] = len(examples)
    if where is not None:
        where.mkdir(parents=True, exist_ok=True)
        save_model(model, str(where / "model.safetensors"))
        (where / "info.json").write_text(json.dumps(info, indent=1))
        (where.parent / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    return adapter, info


def _yes_gap(adapter: Any, prompts: list[tuple[str, np.ndarray]]) -> np.ndarray:
    """The ``yes`` logit minus the ``no`` logit of the answer's first token, per prompt (> 0: the answer is yes)."""
    import torch

    from mmalign.vision_lm.adapter import VLExample

    tok = adapter.tokenizer
    yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
    out = []
    with torch.no_grad():
        for start in range(0, len(prompts), 256):
            logits = adapter.next_token_logits([VLExample(p, "", [im]) for p, im in prompts[start:start + 256]])
            out.append((logits[:, yes] - logits[:, no]).double().cpu().numpy())
    return np.concatenate(out)


def _yes(adapter: Any, prompts: list[tuple[str, np.ndarray]]) -> np.ndarray:
    """Answers by comparing the ``yes`` and ``no`` logits (no text parsing)."""
    return _yes_gap(adapter, prompts) > 0


def evaluate(adapter: Any, data: TestbedData, seed: int, gen: W.WeakEvidenceGenerator,
             captions: int = 0) -> dict[str, float]:
    """Testbed metrics of the model in ``adapter`` on the seed's test split (see docs/benchmarks/vision_lm.md).

    ``pope_<split>_*``: POPE on the prior-violating test scenes (the gates); ``blank_pope_random_acc``: the same
    random questions on blank (noise-only) images; ``partner_*``: the partner question of every balanced test scene
    (primary metric ``partner_balanced_acc``), with the Bayes-optimal observer's value ``bayes_partner_balanced_acc``;
    ``partner_visible_*`` / ``partner_unseen_*``: consistent scenes whose partner is visible / invisible
    (recall), ``partner_violating_yes``: hallucination rate, ``partner_violating_gap``: its mean yes-minus-no logit.
    ``captions``: ``caption_*``, CHAIR of the greedy captions of the first ``captions`` test scenes (balanced: the
    split alternates), against the ground truth.
    """
    from mmalign.vision_lm import scenes as S
    from mmalign.vision_lm.stats import binary_metrics

    out: dict[str, float] = {}
    violating = [i for i, s in enumerate(data.test) if not s.consistent]
    train_plain = [s.scene for s in data.train]
    rng = np.random.default_rng([seed, 12345])
    blank_rng = np.random.default_rng([seed, 999])
    for split in ("random", "popular", "adversarial"):
        qs = S.pope_questions([data.test[i].scene for i in violating], split, rng, train_plain)
        pred = _yes(adapter, [(f"<image> {S.question(s)}", data.test_images[violating[i]]) for i, s, _ in qs])
        m = binary_metrics(pred, np.array([t for *_, t in qs]))
        out.update({f"pope_{split}_{k}": v for k, v in m.items()})
        if split == "random":
            blank = [np.clip(blank_rng.normal(0, 8.0, data.test_images[0].shape), 0, 255).astype(np.uint8)
                     for _ in qs]
            pb = _yes(adapter, [(f"<image> {S.question(s)}", blank[j]) for j, (_, s, _) in enumerate(qs)])
            out["blank_pope_random_acc"] = float((pb == np.array([t for *_, t in qs])).mean())
            out["blank_pope_random_yes_ratio"] = float(pb.mean())
    pq = W.partner_questions(data.test)
    gap = _yes_gap(adapter, [(f"<image> {S.question(s)}", data.test_images[i]) for i, s, _ in pq])
    pred, truth = gap > 0, np.array([t for *_, t in pq])
    out.update({f"partner_{k}": v for k, v in binary_metrics(pred, truth).items()})
    bayes = np.array([W.bayes_yes(gen, data.test[i], s, "test") > 0.5 for i, s, _ in pq])
    out["bayes_partner_balanced_acc"] = binary_metrics(bayes, truth)["balanced_acc"]
    unseen = np.array([data.test[i].partner_mode() == "invisible" for i, _, _ in pq])
    out["partner_visible_recall"] = float(pred[truth & ~unseen].mean())
    out["partner_unseen_yes"] = float(pred[truth & unseen].mean()) if (truth & unseen).any() else float("nan")
    out["partner_violating_yes"] = float(pred[~truth].mean())
    # how far the hallucinated "yes" is from flipping: a continuous view of the all-or-nothing partner answer
    out["partner_violating_gap"] = float(gap[~truth].mean())
    if captions:
        from mmalign.vision_lm.adapter import VLExample

        n = min(int(captions), len(data.test))
        caps: list[str] = []
        for start in range(0, n, 128):
            chunk = [VLExample(DESCRIBE, "", [im]) for im in data.test_images[start:min(start + 128, n)]]
            caps += adapter.generate(chunk, max_new_tokens=24, stop_words=(".",))
        out.update({f"caption_{k}": v for k, v in S.chair_metrics(caps, [s.scene for s in data.test[:n]]).items()})
    return out


def gates(metrics: dict[str, float]) -> dict[str, bool]:
    """Each gate of :data:`GATES` -> passed; a missing metric fails its gate."""
    return {name: key in metrics and lo <= metrics[key] <= hi for name, (key, lo, hi) in GATES.items()}
