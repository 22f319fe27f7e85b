"""The offline hallucination benchmark: scenes with planted priors -> tiny LLaVA SFT -> each method -> CHAIR/POPE.

Pipeline per seed: sample train-split scenes (priors hold) and test-split scenes (priors violated); train a tiny
LLaVA from scratch on captions and yes/no questions (the SFT reference); build each method's preference pairs from
fresh train-split scenes; train LoRA adapters on the SFT model with the generic trainer (reference = LoRA disabled);
score greedy captions (CHAIR_i, CHAIR_s, attribute errors, recall) and yes/no logits (POPE random / popular /
adversarial) on the test split. ``scripts/bench_vlm.py`` runs this for several seeds and writes the table.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from mmalign.config import Config, check_choice, check_positive, check_probability, option
from mmalign.vision_lm.families import FAMILIES
from mmalign.vision_lm.testbed import (DESCRIBE, corrupt_pairs, question_chosen, sft_examples, sft_trainer_config,
                                       train_sft)

__all__ = ["BenchmarkConfig", "run", "METHOD_ROWS", "DESCRIBE", "corrupt_pairs", "question_chosen", "applied_flips"]

# Row name -> (loss method, pair source, online probability, flipped labels)
METHOD_ROWS: dict[str, tuple[str, str, float, bool]] = {
    "dpo": ("dpo", "corrupt", 0.0, False),
    "dpo_flipped": ("dpo", "corrupt", 0.0, True),
    "robust_dpo_flipped": ("robust_dpo", "corrupt", 0.0, True),
    "realign": ("realign", "realign", 0.0, False),
    "bdhs_offline": ("dpo", "bdhs", 0.0, False),
    "bdhs_online": ("dpo", "bdhs", 1.0, False),
    "bdhs_mixed": ("dpo", "bdhs", 0.5, False),
    "rrpo": ("rrpo", "corrupt", 0.0, False),
}


@dataclass
class BenchmarkConfig(Config):
    """Sizes and hyperparameters of the offline VLM hallucination benchmark (defaults fit a shared 2-core CPU)."""

    seeds: list[int] = option([0, 1, 2], "seeds; every seed re-samples scenes and retrains SFT and every method")
    methods: list[str] = option(list(METHOD_ROWS), f"rows to run, from {list(METHOD_ROWS)}")
    prior_strength: float = option(0.9, "P(partner shape | trigger shape) in the train split")
    n_sft_scenes: int = option(2000, "train-split scenes for SFT (one caption + yes/no questions each)")
    sft_steps: int = option(300, "SFT optimizer steps")
    sft_lr: float = option(2e-3, "SFT learning rate")
    batch_size: int = option(32, "batch size for SFT and preference training")
    n_pref_scenes: int = option(256, "fresh train-split scenes the preference pairs are built from")
    pref_steps: int = option(50, "preference-training optimizer steps per method")
    pref_lr: float = option(1e-3, "preference-training learning rate (LoRA)")
    pref_batch_size: int = option(16, "pairs per preference-training step")
    beta: float = option(0.1, "DPO beta (also Re-Align's, RRPO's)")
    rrpo_alpha: float = option(0.01, "RRPO token-wise KL weight")
    flip_rate: float = option(0.2, "fraction of swapped pairs in the *_flipped rows (robust DPO uses eps = flip_rate)")
    bdhs_rho: float = option(0.99, "BDHS: fraction of image tokens hidden from attention")
    realign_top_k: int = option(5, "Re-Align: retrieved images tried per example")
    lora_r: int = option(16, "LoRA rank of the preference-trained adapters")
    n_test_scenes: int = option(200, "test-split (prior-violating) scenes for CHAIR and POPE")
    vision_steps: int = option(150, "supervised per-cell pre-training steps of the vision tower (CLIP stand-in)")
    patch_size: int = option(16, "vision patch size of the tiny VLM (32x32 images; 16 = one patch per grid cell)")
    family: str = option("llava", "tiny VLM family: llava, llava_next, idefics3 or smolvlm (same widths and depths)")

    def __post_init__(self) -> None:
        for name in ("n_sft_scenes", "sft_steps", "sft_lr", "batch_size", "n_pref_scenes", "pref_steps", "pref_lr",
                     "pref_batch_size", "beta", "lora_r", "n_test_scenes", "realign_top_k"):
            check_positive(name, getattr(self, name))
        if 32 % self.patch_size:
            raise ValueError(f"patch_size must divide the 32-pixel image size, got {self.patch_size}")
        check_probability("prior_strength", self.prior_strength)
        check_choice("family", self.family, FAMILIES)
        check_probability("bdhs_rho", self.bdhs_rho)
        if not 0 <= self.flip_rate < 0.5:
            raise ValueError(f"flip_rate must be in [0, 0.5), got {self.flip_rate}")
        bad = [m for m in self.methods if m not in METHOD_ROWS]
        if bad:
            raise ValueError(f"methods must be among {list(METHOD_ROWS)}, got unknown {bad}")
        if not self.seeds:
            raise ValueError("seeds must name at least one seed, got []")


# ---------------------------------------------------------------------------------------------- evaluation
def evaluate(adapter: Any, test_scenes: Sequence[Any], test_images: Sequence[np.ndarray],
             train_scenes: Sequence[Any], seed: int) -> dict[str, float]:
    """CHAIR-family metrics of greedy captions and POPE metrics from yes/no logits on the test split."""
    import torch

    from mmalign.vision_lm import scenes as S
    from mmalign.vision_lm.adapter import VLExample

    caps: list[str] = []
    for start in range(0, len(test_scenes), 64):
        chunk = [VLExample(DESCRIBE, "", [im]) for im in test_images[start:start + 64]]
        caps += adapter.generate(chunk, max_new_tokens=24, stop_words=(".",))
    out = {f"eval/{k}": v for k, v in S.chair_metrics(caps, test_scenes).items()}
    tok = adapter.tokenizer
    yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
    rng = np.random.default_rng(seed + 12345)
    for split in ("random", "popular", "adversarial"):
        qs = S.pope_questions(test_scenes, split, rng, train_scenes)
        preds = []
        with torch.no_grad():
            for start in range(0, len(qs), 128):
                chunk = qs[start:start + 128]
                logits = adapter.next_token_logits(
                    [VLExample(f"<image> {S.question(s)}", "", [test_images[i]]) for i, s, _ in chunk])
                preds.append((logits[:, yes] > logits[:, no]).cpu().numpy())
        m = S.pope_metrics(np.concatenate(preds), np.array([t for _, _, t in qs]))
        out.update({f"eval/pope_{split}_{k}": v for k, v in m.items()})
    return out


# ---------------------------------------------------------------------------------------------- training
def applied_flips(n_pairs: int, seed: int, flip_rate: float) -> np.ndarray:
    """Which of ``n_pairs`` pairs a ``*_flipped`` row of :func:`train_method` swaps (drawn from the row's seed)."""
    return np.random.default_rng(seed + 31).random(n_pairs) < flip_rate


def train_method(row: str, adapter: Any, pairs: list[Any], cfg: BenchmarkConfig, seed: int,
                 run_dir: Path, resume: bool = False, eval_fn: Callable[[Any], dict[str, Any]] | None = None,
                 eval_every: int = 0, eps: float | None = None) -> dict[str, Any]:
    """LoRA preference training of the SFT model for one table row; the adapter ends up holding the merged model.

    ``eval_fn`` / ``eval_every``: the trainer's evaluation hook (logged to ``run_dir/metrics.jsonl``). ``eps``: robust
    DPO's flip rate when it differs from the one applied (an estimate); default ``cfg.flip_rate``."""
    import torch

    from mmalign.train import Trainer
    from mmalign.vision_lm import methods as M
    from mmalign.vision_lm.objectives import PairCollator, PreferenceObjective

    method, _, online_prob, flipped = METHOD_ROWS[row]
    if flipped:
        from mmalign.vision_lm.objectives import PrefPair

        flip = applied_flips(len(pairs), seed, cfg.flip_rate)
        pairs = [PrefPair(p.prompt, p.rejected, p.chosen, p.images) if f else p for p, f in zip(pairs, flip)]
    online = None
    if online_prob > 0:
        gen = torch.Generator().manual_seed(seed + 5)
        bdhs_rng = np.random.default_rng(seed + 6)

        def online(ad: Any, ps: list[Any]) -> list[str]:
            from mmalign.vision_lm.adapter import VLExample

            out, _ = M.bdhs_rejected(ad, [VLExample(p.prompt, p.chosen, p.images) for p in ps], rho=cfg.bdhs_rho,
                                     rng=bdhs_rng, generator=gen)
            return out

    objective = PreferenceObjective(adapter, method, beta=cfg.beta, eps=cfg.flip_rate if eps is None else eps,
                                    alpha=cfg.rrpo_alpha, online=online, online_prob=online_prob, seed=seed)
    collator = PairCollator(adapter, with_retrieved=method == "realign", with_segments=method == "rrpo",
                            keep_raw=online is not None)
    dataset = list(enumerate(pairs))
    base = adapter.model
    trainer = Trainer(sft_trainer_config(seed, cfg.pref_steps, cfg.pref_batch_size, cfg.pref_lr, cfg.lora_r,
                                         eval_every), base, dataset, objective, run_dir, collate_fn=collator,
                      eval_fn=eval_fn)
    t0 = time.perf_counter()
    out = trainer.train(resume=resume and (Path(run_dir) / "checkpoints").is_dir())
    out["time/train_s"] = time.perf_counter() - t0
    adapter.model = trainer.unwrapped_model()
    return out


def run_seed(cfg: BenchmarkConfig, seed: int, run_dir: Path,
             on_row: Callable[[dict[str, dict[str, float]]], None] | None = None,
             done: dict[str, dict[str, float]] | None = None) -> dict[str, dict[str, float]]:
    """SFT + every configured row for one seed; returns {row: metrics} (row "sft" included).

    ``on_row(results_so_far)`` is called after every finished row, so a caller can store partial results. With
    ``done`` (the rows an interrupted run stored) those rows are taken as they are and the SFT and preference
    trainers resume from their checkpoints in ``run_dir``.
    """
    import copy

    import torch

    from mmalign.vision_lm import scenes as S
    from mmalign.vision_lm.adapter import VLMAdapter
    from mmalign.vision_lm.testbed import build_pairs, build_tiny
    from mmalign.vision_lm.testbed import pretrain_vision_tower

    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    gen = S.SceneGenerator(prior_strength=cfg.prior_strength)
    sft_scenes = [gen.sample(rng, "train") for _ in range(cfg.n_sft_scenes)]
    pref_scenes = [gen.sample(rng, "train") for _ in range(cfg.n_pref_scenes)]
    test_scenes = [gen.sample(rng, "test") for _ in range(cfg.n_test_scenes)]
    render = lambda scs: [S.render(s, rng=rng) for s in scs]  # noqa: E731
    sft_images, pref_images, test_images = render(sft_scenes), render(pref_scenes), render(test_scenes)

    model, processor = build_tiny(cfg.family, seed, patch_size=cfg.patch_size)
    adapter = VLMAdapter(model, processor, max_length=64)
    resume, done = done is not None, done or {}
    results: dict[str, dict[str, float]] = {}
    t0 = time.perf_counter()
    vision_acc = pretrain_vision_tower(model, sft_scenes, sft_images, processor, steps=cfg.vision_steps, seed=seed)
    sft_dir = run_dir / f"seed{seed}" / "sft"
    train_sft(adapter, sft_examples(sft_scenes, sft_images, rng), steps=cfg.sft_steps, batch_size=cfg.batch_size,
              lr=cfg.sft_lr, seed=seed, run_dir=sft_dir, resume=resume and (sft_dir / "checkpoints").is_dir())
    sft_model = adapter.model
    results["sft"] = done.get("sft") or {**evaluate(adapter, test_scenes, test_images, sft_scenes, seed),
                                         "time/train_s": time.perf_counter() - t0,
                                         "vision/pretrain_shape_acc": vision_acc}
    if on_row is not None:
        on_row(results)
    pair_cache: dict[str, tuple[list[Any], dict[str, float]]] = {}
    for row in cfg.methods:
        if row in done:
            results[row] = done[row]
            continue
        source = METHOD_ROWS[row][1]
        adapter.model = sft_model
        if source not in pair_cache:
            pair_cache[source] = build_pairs(source, adapter, pref_scenes, pref_images, seed=seed,
                                             bdhs_rho=cfg.bdhs_rho, realign_top_k=cfg.realign_top_k)
        pairs, stats = pair_cache[source]
        adapter.model = copy.deepcopy(sft_model)  # each row starts from the SFT weights
        out = train_method(row, adapter, pairs, cfg, seed, run_dir / f"seed{seed}" / row, resume)
        model = adapter.model
        adapter.model = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
        metrics = evaluate(adapter, test_scenes, test_images, sft_scenes, seed)
        results[row] = {**metrics, **stats, "time/train_s": out["time/train_s"], "n_pairs": float(len(pairs)),
                        "train/pref_accuracy": float(out.get("train/pref_accuracy", float("nan")))}
        if on_row is not None:
            on_row(results)
    return results


def run(cfg: BenchmarkConfig, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Run every seed; write ``results.json`` into ``run_dir`` after every row; return mean metrics per row.

    With ``resume`` the rows already in ``results.json`` are kept and only the missing ones run.
    """
    import json

    from mmalign.fileio import atomic_write_text

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "results.json"
    stored = json.loads(path.read_text()) if resume and path.is_file() else {}
    per_seed: dict[int, dict[str, dict[str, float]]] = {int(k): v for k, v in stored.items()}

    def store(results: dict[str, dict[str, float]], seed: int) -> None:
        # over the stored rows: a resumed seed reports its rows one by one, and the file must never hold fewer
        per_seed[seed] = {**stored.get(str(seed), {}), **results}
        atomic_write_text(path, json.dumps({str(k): v for k, v in per_seed.items()}, indent=1))

    for seed in cfg.seeds:
        per_seed[seed] = run_seed(cfg, seed, run_dir, on_row=lambda r, s=seed: store(r, s),
                                  done=stored.get(str(seed), {}) if resume else None)
    rows = per_seed[cfg.seeds[0]].keys()
    return {f"{row}/{k}": float(np.mean([per_seed[s][row][k] for s in cfg.seeds]))
            for row in rows for k in per_seed[cfg.seeds[0]][row]
            if k.startswith(("eval/chair", "eval/pope_adversarial_acc", "eval/pope_random_acc"))}
