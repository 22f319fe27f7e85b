"""``mmalign vlm train``: preference-train a VLM with DPO / IPO / cDPO / robust DPO / Re-Align / RRPO / BDHS.

Model: a local ``AutoModelForImageTextToText`` checkpoint (``model_path``), or a tiny VLM of ``family`` (the
benchmark's LLaVA, or LLaVA-NeXT / Idefics3 / SmolVLM from :mod:`mmalign.vision_lm.families`), trained from scratch on
procedural scenes first when ``model_path`` is empty. Pairs: a JSONL file (``pairs_path``; fields
``prompt``, ``chosen``, ``rejected``, ``images`` = image file paths, optional ``rejected_images``,
``retrieved_images``, and ``chosen_tagged``/``rejected_tagged`` with RRPO ``<MASK>`` tags), or pairs built on the
fly from scenes by ``pair_source`` (``corrupt``, ``realign``, ``bdhs``). Reference log-probs: ``reference: lora``
(same model, adapter disabled) or ``reference: cache`` (precomputed once into ``cache_dir``, keyed by data hash).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmalign.config import Config, check_choice, check_nonnegative, check_positive, check_probability, option
from mmalign.train.config import TrainerConfig

__all__ = ["VLMTrainConfig", "run", "load_pairs_jsonl", "drop_overlong"]


@dataclass
class VLMTrainConfig(Config):
    """One preference-training run of a vision-language model."""

    method: str = option("dpo", "loss: dpo, ipo, cdpo, robust_dpo, realign (DPO + visual term) or rrpo")
    model_path: str = option("", "local AutoModelForImageTextToText checkpoint; empty = tiny VLM SFT'd on scenes")
    family: str = option("llava", "tiny model family when model_path is empty: llava, llava_next, idefics3, smolvlm")
    pairs_path: str = option("", "JSONL of preference pairs; empty = build pairs from procedural scenes")
    pair_source: str = option("corrupt", "scene pairs when pairs_path is empty: corrupt, realign or bdhs")
    n_scenes: int = option(256, "procedural scenes for generated pairs")
    sft_steps: int = option(400, "SFT steps of the tiny model when model_path is empty")
    reference: str = option("lora", "reference log-probs: lora (adapter disabled) or cache (precomputed on disk)")
    cache_dir: str = option("", "where cached reference log-probs live (default: <run_dir>/ref_cache)")
    beta: float = option(0.1, "inverse temperature of every DPO-family loss")
    eps: float = option(0.1, "cdpo label smoothing / robust_dpo flip rate")
    rrpo_alpha: float = option(0.01, "RRPO token-wise KL weight")
    visual_weight: float = option(1.0, "Re-Align visual-term weight (paper: 1)")
    bdhs_online_prob: float = option(0.0, "probability a pair's rejected answer is regenerated online by BDHS "
                                          "(1 = online BDHS, 0.5 = Mixed-DPO)")
    bdhs_rho: float = option(0.99, "BDHS fraction of image tokens hidden from attention")
    max_length: int = option(2048, "longest prompt + response in tokens; longer pairs fail or are skipped")
    skip_invalid: bool = option(False, "drop (and count) over-long pairs instead of raising")
    seed: int = option(0, "seed of scene generation, pair building and online sampling")
    trainer: TrainerConfig = option(factory=lambda: TrainerConfig.from_dict(
        {"max_steps": 50, "batch_size": 8, "lr": 1e-3, "lora": {"enabled": True, "r": 16, "alpha": 32.0}}),
        help="generic trainer settings")

    def __post_init__(self) -> None:
        from mmalign.vision_lm.objectives import METHODS

        check_choice("method", self.method, METHODS)
        check_choice("pair_source", self.pair_source, ("corrupt", "realign", "bdhs"))
        check_choice("family", self.family, ("llava", "llava_next", "idefics3", "smolvlm"))
        check_choice("reference", self.reference, ("lora", "cache"))
        for name in ("n_scenes", "beta", "max_length"):
            check_positive(name, getattr(self, name))
        check_nonnegative("sft_steps", self.sft_steps)
        check_nonnegative("rrpo_alpha", self.rrpo_alpha)
        check_probability("bdhs_online_prob", self.bdhs_online_prob)
        check_probability("bdhs_rho", self.bdhs_rho)
        if self.reference == "lora" and not self.trainer.lora.enabled:
            raise ValueError("reference='lora' needs trainer.lora.enabled=true (or use reference='cache')")
        if self.bdhs_online_prob > 0 and self.reference == "cache":
            raise ValueError("online BDHS scores fresh answers, so it needs reference='lora', got 'cache'")
        if self.method == "realign" and not self.pairs_path and self.pair_source != "realign":
            raise ValueError(f"method 'realign' needs retrieved images: set pair_source=realign, got {self.pair_source!r}")


def load_pairs_jsonl(path: str | Path, tokenizer: Any) -> list[Any]:
    """Read preference pairs; image fields are file paths (loaded with PIL); RRPO tags become segment ids."""
    import json

    from PIL import Image

    from mmalign.vision_lm.methods import tagged_segments
    from mmalign.vision_lm.objectives import PrefPair

    def imgs(paths: list[str] | None) -> list[Any] | None:
        return None if paths is None else [Image.open(Path(path).parent / p if not Path(p).is_absolute() else p)
                                           .convert("RGB") for p in paths]

    pairs = []
    for n, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        missing = {"prompt", "chosen", "rejected"} - set(row)
        if missing:
            raise ValueError(f"{path}:{n}: pair is missing field(s) {sorted(missing)}")
        cs = rs = None
        if "chosen_tagged" in row and "rejected_tagged" in row:
            plain_c, cs = tagged_segments(row["chosen_tagged"], tokenizer)
            plain_r, rs = tagged_segments(row["rejected_tagged"], tokenizer)
            row["chosen"], row["rejected"] = plain_c, plain_r
        pairs.append(PrefPair(row["prompt"], row["chosen"], row["rejected"], imgs(row.get("images", [])) or [],
                              imgs(row.get("rejected_images")), imgs(row.get("retrieved_images")), cs, rs))
    return pairs


def drop_overlong(adapter: Any, pairs: list[Any]) -> tuple[list[Any], int]:
    """Pairs whose every branch fits ``adapter.max_length``, and how many were dropped."""
    from mmalign.vision_lm.objectives import PairCollator

    probe = PairCollator(adapter, with_retrieved=False)
    old, adapter.skip_invalid = adapter.skip_invalid, False
    kept = []
    try:
        for p in pairs:
            try:
                probe([(0, p)])
                if p.retrieved_images is not None:
                    PairCollator(adapter, with_retrieved=True)([(0, p)])
            except ValueError as err:
                if "max_length" not in str(err):
                    raise
                continue
            kept.append(p)
    finally:
        adapter.skip_invalid = old
    return kept, len(pairs) - len(kept)


def run(cfg: VLMTrainConfig, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Build/load model and pairs, train with the generic trainer, write metrics and weights into ``run_dir``."""
    import numpy as np
    import torch

    from mmalign.train import Trainer
    from mmalign.vision_lm import benchmark as B
    from mmalign.vision_lm import methods as M
    from mmalign.vision_lm import scenes as S
    from mmalign.vision_lm.adapter import VLExample, VLMAdapter, load_vlm
    from mmalign.vision_lm.objectives import PairCollator, PreferenceObjective
    from mmalign.vision_lm.refcache import reference_cache

    run_dir = Path(run_dir)
    rng = np.random.default_rng(cfg.seed)
    gen = S.SceneGenerator()
    if cfg.model_path:
        model, processor = load_vlm(cfg.model_path)
        model_id = cfg.model_path
        adapter = VLMAdapter(model, processor, max_length=cfg.max_length, skip_invalid=cfg.skip_invalid)
    else:
        from mmalign.vision_lm.families import build_tiny_vlm
        from mmalign.vision_lm.tiny import build_tiny_llava

        if cfg.family == "llava":
            model, processor = build_tiny_llava(S.vocabulary(), seed=cfg.seed, patch_size=16)
        else:  # same widths/depths as the tiny LLaVA; the family's own image layout
            model, processor = build_tiny_vlm(cfg.family, S.vocabulary(), seed=cfg.seed, vision_dim=64, text_dim=96,
                                              vision_layers=2, text_layers=2, heads=4)
        adapter = VLMAdapter(model, processor, max_length=cfg.max_length, skip_invalid=cfg.skip_invalid)
        sft_scenes = [gen.sample(rng) for _ in range(max(cfg.n_scenes, 4 * cfg.trainer.batch_size))]
        sft_imgs = [S.render(s, rng=rng) for s in sft_scenes]
        bcfg = B.BenchmarkConfig(seeds=[cfg.seed], sft_steps=max(cfg.sft_steps, 1), batch_size=cfg.trainer.batch_size)
        if cfg.sft_steps > 0:
            if cfg.family == "llava":  # per-cell tower pre-training needs LLaVA's one patch per grid cell
                from mmalign.vision_lm.tiny import pretrain_vision_tower

                pretrain_vision_tower(model, sft_scenes, sft_imgs, processor, steps=100, seed=cfg.seed)
            B.train_sft(adapter, B.sft_examples(sft_scenes, sft_imgs, rng), bcfg, cfg.seed, run_dir / "sft")
        model_id = f"tiny-{cfg.family}-seed{cfg.seed}-sft{cfg.sft_steps}"
    if cfg.pairs_path:
        pairs = load_pairs_jsonl(cfg.pairs_path, adapter.tokenizer)
        stats: dict[str, float] = {}
    else:
        scenes = [gen.sample(rng) for _ in range(cfg.n_scenes)]
        images = [S.render(s, rng=rng) for s in scenes]
        bcfg = B.BenchmarkConfig(seeds=[cfg.seed], bdhs_rho=cfg.bdhs_rho)
        pairs, stats = B.build_pairs(cfg.pair_source, adapter, scenes, images, bcfg, cfg.seed)
    n_dropped = 0
    if cfg.skip_invalid:
        pairs, n_dropped = drop_overlong(adapter, pairs)
    online = None
    if cfg.bdhs_online_prob > 0:
        g, brng = torch.Generator().manual_seed(cfg.seed + 5), np.random.default_rng(cfg.seed + 6)

        def online(ad: Any, ps: list[Any]) -> list[str]:
            out, _ = M.bdhs_rejected(ad, [VLExample(p.prompt, p.chosen, p.images) for p in ps], rho=cfg.bdhs_rho,
                                     rng=brng, generator=g)
            return out

    ref = None
    if cfg.reference == "cache":
        probe = PairCollator(adapter, with_retrieved=cfg.method == "realign", with_segments=cfg.method == "rrpo")
        ref, path, hit = reference_cache(probe, pairs, cfg.cache_dir or run_dir / "ref_cache", model_id,
                                         with_logprobs=cfg.method == "rrpo")
        stats["ref_cache/hit"] = float(hit)
    collator = PairCollator(adapter, with_retrieved=cfg.method == "realign", with_segments=cfg.method == "rrpo",
                            ref_cache=ref, keep_raw=online is not None)
    objective = PreferenceObjective(adapter, cfg.method, beta=cfg.beta, eps=cfg.eps, alpha=cfg.rrpo_alpha,
                                    visual_weight=cfg.visual_weight, online=online,
                                    online_prob=cfg.bdhs_online_prob, seed=cfg.seed)
    trainer = Trainer(cfg.trainer, adapter.model, list(enumerate(pairs)), objective, run_dir, collate_fn=collator)
    out = trainer.train(resume=resume)
    return {**out, **stats, "n_pairs": len(pairs), "skipped_pairs": n_dropped}
