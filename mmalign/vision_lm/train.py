"""``mmalign vlm train``: preference-train a vision-language model on the user's data, hand back loadable artifacts.

Model: ``model_path`` = a local ``AutoModelForImageTextToText`` folder or a Hub id (offline only when
``HF_HUB_OFFLINE`` is set; ``trust_remote_code`` off unless asked), or, when empty, a tiny VLM of ``family`` trained
from scratch on procedural scenes first (the testbed). Data: ``data`` = any source :mod:`mmalign.data` reads (JSONL,
Parquet, a ``datasets`` folder, a Hub id) in TRL's standard or conversational vision format, other layouts through
``columns`` (e.g. ``columns.prompt=question columns.images=image``); every row is validated and every prompt put in the
model's chat template before any training. Without ``data`` pairs are built from scenes by ``pair_source``.
Method: any pairwise loss of the LOSSES registry (``dpo``, ``ipo``, ``cdpo``, ``robust_dpo`` or one a user
registers), ``realign`` or ``rrpo``. Reference log-probs: ``reference: lora`` (adapter disabled) or ``reference: cache``
(precomputed once into ``cache_dir``). Artifacts (see :mod:`mmalign.vision_lm.artifacts`): ``adapter/`` (+
``merged/`` with ``merge=true``) or ``model/`` in the run folder at the end, and under ``artifacts/step-N/`` at every
``trainer.save_every``. ``--resume`` continues at the phase reached: a finished SFT phase is not repeated.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmalign.config import (Config, check_choice, check_nonnegative, check_positive, check_probability, check_range,
                            option)
from mmalign.train.config import TrainerConfig

__all__ = ["VLMTrainConfig", "run", "prepare_pairs", "validate"]

# validate() hands its checked pairs to run() of the same config object (the CLI calls both): no second pass
_PREPARED: dict[int, tuple[Any, list[Any], list[int], dict[str, float]]] = {}


@dataclass
class VLMTrainConfig(Config):
    """One preference-training run of a vision-language model."""

    method: str = option("dpo", "loss: a pairwise loss of the LOSSES registry (dpo, ipo, cdpo, robust_dpo, ...), "
                                "realign (DPO + visual term) or rrpo")
    model_path: str = option("", "local AutoModelForImageTextToText folder or Hub id; empty = tiny VLM SFT'd on scenes")
    dtype: str = option("auto", "model dtype: auto (bf16 on GPUs that support it, else fp32), float32, bfloat16")
    trust_remote_code: bool = option(False, "let transformers run the model repository's own code (off: safer)")
    family: str = option("llava", "tiny model family when model_path is empty: llava, llava_next, idefics3, smolvlm")
    data: str = option("", "preference data: .jsonl/.json/.parquet, a datasets folder or a Hub id; empty = pairs "
                           "built from procedural scenes")
    columns: dict[str, str] = option({}, "column mapping {expected field: column}, e.g. columns.prompt=question "
                                         "columns.images=image")
    split: str = option("", "split of a datasets folder or Hub data set (empty: its only split / train)")
    allow_outside_paths: bool = option(False, "let image paths in the data leave the data file's folder")
    max_oov_rate: float = option(0.05, "refuse data whose prompt/response tokens are more than this fraction "
                                       "out of the tokenizer's vocabulary (unknown token)")
    merge: bool = option(False, "with LoRA, also write merged/ (the adapter folded into the model)")
    push_to_hub: str = option("", "Hub repository id to upload the final artifact to (empty: no upload)")
    pair_source: str = option("corrupt", "scene pairs when data is empty: corrupt, realign or bdhs")
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
    skip_invalid: bool = option(False, "drop (and count) invalid rows and over-long pairs instead of raising")
    cpu_return_memory: bool = option(False, "on the CPU (glibc), give freed activation memory back to the OS at "
                                            "once: a lower peak, slower steps (page faults)")
    seed: int = option(0, "seed of scene generation, pair building and online sampling")
    trainer: TrainerConfig = option(factory=lambda: TrainerConfig.from_dict(
        {"max_steps": 50, "batch_size": 8, "lr": 1e-3, "lora": {"enabled": True, "r": 16, "alpha": 32.0}}),
        help="generic trainer settings")

    def __post_init__(self) -> None:
        from mmalign.vision_lm.objectives import check_method

        check_method(self.method)
        check_choice("dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        check_range("max_oov_rate", self.max_oov_rate, 0.0, 1.0)
        if self.merge and not self.trainer.lora.enabled:
            raise ValueError("merge=true needs trainer.lora.enabled=true (a fully fine-tuned model is already whole)")
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
        if self.method == "realign" and not self.data and self.pair_source != "realign":
            raise ValueError(f"method 'realign' needs retrieved images: set pair_source=realign, got {self.pair_source!r}")


def prepare_pairs(cfg: VLMTrainConfig, processor: Any) -> tuple[list[Any], list[int], dict[str, float]]:
    """Read, validate and template the user's data (before any model is built): ``(pairs, row numbers, stats)``.

    Nothing is tokenized here: lengths and unknown tokens come from the one encoding pass of :func:`_check_pairs`."""
    from mmalign.data import load_preference_data
    from mmalign.vision_lm.pairs import pairs_from_data
    from mmalign.vision_lm.prompts import image_token_of

    image_token = image_token_of(processor)
    data = load_preference_data(cfg.data, "text", columns=cfg.columns, split=cfg.split or None,
                                skip_invalid=cfg.skip_invalid, allow_outside=cfg.allow_outside_paths,
                                image_token=image_token)
    pairs = pairs_from_data(data, processor, image_token=image_token)
    rows = [data.row_number(i) for i in range(len(pairs))]
    if cfg.method == "realign":
        missing = [r for p, r in zip(pairs, rows) if p.retrieved_images is None]
        if missing:
            raise ValueError(f"method 'realign' needs retrieved_images on every pair; rows {missing[:10]} of "
                             f"{cfg.data} have none")
    if cfg.method in ("realign", "rrpo"):
        soft = [r for p, r in zip(pairs, rows) if p.label < 1]
        if soft:
            raise ValueError(f"method {cfg.method!r} has no soft-label form; rows {soft[:10]} of {cfg.data} have "
                             "labels strictly between 0 and 1")
    stats = {"data/rows": float(data.report.total), "data/invalid_rows": float(data.report.total - data.report.kept),
             "data/soft_labels": float(sum(p.label < 1 for p in pairs))}
    return pairs, rows, stats


def checked_pairs(cfg: VLMTrainConfig, processor: Any, model: Any = None
                  ) -> tuple[list[Any], list[int], dict[str, float], int]:
    """:func:`prepare_pairs`, then every pair encoded once as training will (lengths, unknown tokens), before any
    weights load: ``(pairs, row numbers, stats, pairs dropped)``. ``model``: the tiny model when no ``model_path``;
    a user's model is read as its skeleton on the meta device (config and forward only)."""
    from mmalign.vision_lm.adapter import VLMAdapter
    from mmalign.vision_lm.loading import model_skeleton

    pairs, rows, stats = prepare_pairs(cfg, processor)
    if model is None:
        model = model_skeleton(cfg.model_path, trust_remote_code=cfg.trust_remote_code)
    probe = VLMAdapter(model, processor, max_length=cfg.max_length, skip_invalid=cfg.skip_invalid)
    pairs, rows, n_dropped, stats["data/oov_rate"] = _check_pairs(cfg, probe, pairs, rows)
    return pairs, rows, stats, n_dropped


def validate(cfg: VLMTrainConfig, resume: bool = False) -> None:
    """Check the model source and every data row before the run folder is made (the CLI calls this first)."""
    model = None
    if cfg.model_path:
        from mmalign.vision_lm.loading import load_processor

        processor = load_processor(cfg.model_path, trust_remote_code=cfg.trust_remote_code)
    else:
        from mmalign.vision_lm.testbed import build_tiny

        model, processor = build_tiny(cfg.family, cfg.seed)
    if cfg.data:
        _PREPARED[id(cfg)] = (processor, *checked_pairs(cfg, processor, model))


def _sft_phase(cfg: VLMTrainConfig, adapter: Any, model: Any, processor: Any, run_dir: Path, resume: bool) -> None:
    """The testbed's SFT of the tiny model; with ``resume`` a finished phase is loaded, an unfinished one resumed."""
    import numpy as np

    from mmalign.vision_lm import scenes as S
    from mmalign.vision_lm.testbed import pretrain_vision_tower, sft_examples, train_sft

    sft_dir = run_dir / "sft"
    if resume and (sft_dir / "model.safetensors").is_file():
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(sft_dir / "model.safetensors")))
        print(f"[mmalign] SFT phase already finished in {sft_dir}: loaded its weights")
        return
    rng = np.random.default_rng(cfg.seed + 1)
    gen = S.SceneGenerator()
    scenes = [gen.sample(rng) for _ in range(max(cfg.n_scenes, 4 * cfg.trainer.batch_size))]
    images = [S.render(s, rng=rng) for s in scenes]
    if cfg.family == "llava":  # per-cell tower pre-training needs LLaVA's one patch per grid cell
        pretrain_vision_tower(model, scenes, images, processor, steps=100, seed=cfg.seed)
    train_sft(adapter, sft_examples(scenes, images, rng), steps=cfg.sft_steps, batch_size=cfg.trainer.batch_size,
              lr=2e-3, seed=cfg.seed, run_dir=sft_dir, resume=resume and (sft_dir / "checkpoints").is_dir())


def _scene_pairs(cfg: VLMTrainConfig, adapter: Any) -> tuple[list[Any], dict[str, float]]:
    import numpy as np

    from mmalign.vision_lm import scenes as S
    from mmalign.vision_lm.testbed import build_pairs

    rng = np.random.default_rng(cfg.seed)
    gen = S.SceneGenerator()
    scenes = [gen.sample(rng) for _ in range(cfg.n_scenes)]
    images = [S.render(s, rng=rng) for s in scenes]
    return build_pairs(cfg.pair_source, adapter, scenes, images, seed=cfg.seed, bdhs_rho=cfg.bdhs_rho)


def run(cfg: VLMTrainConfig, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Validate data and model, build/load the model, train with the generic trainer, write artifacts."""
    import time

    import numpy as np
    import torch

    from mmalign.vision_lm import methods as M
    from mmalign.vision_lm.adapter import VLExample, VLMAdapter
    from mmalign.vision_lm.loading import check_model_source, load_processor, load_vlm
    from mmalign.vision_lm.objectives import PairCollator, PreferenceObjective
    from mmalign.vision_lm.refcache import reference_cache

    run_dir = Path(run_dir)
    # on the CPU (glibc): freed activations unmapped at once, the heap trimmed after every update (ArtifactTrainer)
    cpu_heap = (cfg.cpu_return_memory and (cfg.trainer.cpu or not torch.cuda.is_available())
                and _return_freed_heap_memory())
    # 1. everything the user passed is checked before any model is built or trained
    if cfg.model_path:
        local = check_model_source(cfg.model_path)
        processor = load_processor(cfg.model_path, trust_remote_code=cfg.trust_remote_code)
    else:
        from mmalign.vision_lm.testbed import build_tiny

        model, processor = build_tiny(cfg.family, cfg.seed)
    stats: dict[str, float] = {}
    pairs: list[Any] = []
    n_dropped = 0
    if cfg.data:
        prepared = _PREPARED.pop(id(cfg), None)
        if prepared is not None:  # checked by validate() with an equal processor
            _, pairs, rows, stats, n_dropped = prepared
        else:
            pairs, rows, stats, n_dropped = checked_pairs(cfg, processor, None if cfg.model_path else model)
    # 2. the model
    if cfg.model_path:
        model, _ = load_vlm(cfg.model_path, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
        base_name = str(Path(cfg.model_path).resolve()) if local else cfg.model_path
        model_id = cfg.model_path
    adapter = VLMAdapter(model, processor, max_length=cfg.max_length, skip_invalid=cfg.skip_invalid)
    if not cfg.model_path:
        if cfg.sft_steps > 0:
            _sft_phase(cfg, adapter, model, processor, run_dir, resume)
            model = adapter.model
        base_name = str((run_dir / "base_model").resolve())  # the adapter's base: the (SFT'd) tiny model
        from mmalign.train.compat import process_state

        state = process_state(cfg.trainer.cpu)
        if state.is_main_process:  # one writer when launched on several processes
            model.save_pretrained(run_dir / "base_model")
            processor.save_pretrained(run_dir / "base_model")
        state.wait_for_everyone()
        model_id = f"tiny-{cfg.family}-seed{cfg.seed}-sft{cfg.sft_steps}"
    if not cfg.data:
        pairs, stats = _scene_pairs(cfg, adapter)
        if cfg.skip_invalid:
            pairs, _, n_dropped, _ = _check_pairs(cfg, adapter, pairs, list(range(len(pairs))))
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
        t0 = time.perf_counter()
        ref, path, hit = reference_cache(probe, pairs, cfg.cache_dir or run_dir / "ref_cache", model_id,
                                         with_logprobs=cfg.method == "rrpo")
        stats["ref_cache/hit"] = float(hit)
        stats["time/ref_precompute_s"] = time.perf_counter() - t0  # one-off, outside the training rate
    collator = PairCollator(adapter, with_retrieved=cfg.method == "realign", with_segments=cfg.method == "rrpo",
                            ref_cache=ref, keep_raw=online is not None)
    objective = PreferenceObjective(adapter, cfg.method, beta=cfg.beta, eps=cfg.eps, alpha=cfg.rrpo_alpha,
                                    visual_weight=cfg.visual_weight, online=online,
                                    online_prob=cfg.bdhs_online_prob, seed=cfg.seed)
    trainer = _artifact_trainer()(cfg.trainer, model, list(enumerate(pairs)), objective, run_dir, collate_fn=collator)
    if cfg.merge and trainer.strategy != "ddp":
        raise ValueError(f"merge=true needs whole parameters; trainer.distributed={cfg.trainer.distributed} shards "
                         "them (load run/adapter onto the base and merge there)")
    trainer.artifact_args = (processor, base_name)
    trainer.trim_each_step = cpu_heap
    out = trainer.train(resume=resume)
    artifacts = _write_artifacts(trainer, processor, run_dir, base_name, merge=cfg.merge, push_to_hub=cfg.push_to_hub)
    return {**out, **stats, "n_pairs": len(pairs), "skipped_pairs": n_dropped,
            **{f"artifact/{k}": v for k, v in artifacts.items()}}


CPU_MMAP_THRESHOLD = 1024 * 1024  # bytes: blocks from this size up are mmapped and returned on free


def _return_freed_heap_memory() -> bool:
    """Training on the CPU with ``cpu_return_memory``: glibc gives freed activation memory back to the OS at once.

    On the CPU every activation is a heap block. glibc serves blocks from 128 KiB up with their own ``mmap`` (unmapped
    on free), but raises that threshold to the size of each such block freed, up to 32 MiB: after the first step,
    activations come from the heap, whose freed blocks stay in the process and fragment, so each step's peak adds
    to the last one's leftovers. Fixing the threshold (``mallopt(M_MMAP_THRESHOLD)``, which turns the raising off)
    keeps the large blocks returned, at the price of page faults on every fresh one. 1 MiB: activations (MBs per
    tensor at real sizes) are returned while the many small blocks stay in the heap; glibc's own 128 KiB lowered the
    peak a little more at about twice the page-fault time. The trainer also trims the heap after every update
    (:func:`~mmalign.train.memory.trim_heap`), so the small blocks' free pages do not pile up from step to step
    (peak RSS and step rates in docs/benchmarks/vlm_training.md). Returns whether the setting was made (False
    outside glibc).
    """
    from mmalign.train.memory import fix_mmap_threshold

    return fix_mmap_threshold(CPU_MMAP_THRESHOLD)


def _check_pairs(cfg: VLMTrainConfig, adapter: Any, pairs: list[Any], rows: list[int]
                 ) -> tuple[list[Any], list[int], int, float]:
    """Lengths and unknown tokens of every pair in one encoding pass (see :func:`~mmalign.vision_lm.pairs.scan_pairs`):
    ``(kept pairs, their rows, number dropped, OOV rate)``; too many unknown tokens refuse the data."""
    from mmalign.vision_lm.pairs import scan_pairs

    scan = scan_pairs(adapter, pairs, rows, with_retrieved=cfg.method == "realign", skip_invalid=cfg.skip_invalid,
                      source=cfg.data)
    if cfg.data and scan.oov_rate > cfg.max_oov_rate:
        raise ValueError(f"{scan.oov_rate:.1%} of the prompt/response tokens of {cfg.data} are unknown to the "
                         f"tokenizer (max_oov_rate={cfg.max_oov_rate}); e.g. {scan.oov_words}: wrong tokenizer or "
                         "data?")
    return scan.pairs, scan.rows, scan.dropped, scan.oov_rate


def _write_artifacts(trainer: Any, processor: Any, out_dir: Path, base_name: str, **kw: Any) -> dict[str, str]:
    """Artifacts of the trainer's model on the main process (the weights gathered first when they are sharded)."""
    from mmalign.vision_lm.artifacts import save_artifacts

    state = trainer.full_model_state() if trainer.strategy != "ddp" else None  # collective when sharded
    if not trainer.is_main:
        return {}
    return save_artifacts(trainer.unwrapped_model(), processor, out_dir, base_name=base_name, state_dict=state, **kw)


def _artifact_trainer() -> type:
    from mmalign.train import Trainer
    from mmalign.train.memory import trim_heap

    class ArtifactTrainer(Trainer):
        """The generic trainer that also writes loadable artifacts at every intermediate ``save_every`` checkpoint."""

        artifact_args: tuple[Any, str] = (None, "")
        trim_each_step = False  # cpu_return_memory: the heap's free pages go back to the OS after every update

        def _optimizer_step(self) -> None:
            super()._optimizer_step()
            if self.trim_each_step:
                trim_heap()

        def save(self) -> Path:
            path = super().save()
            if self.step < self.cfg.max_steps:  # the final ones are written after training
                processor, base_name = self.artifact_args
                _write_artifacts(self, processor, self.run_dir / "artifacts" / f"step-{self.step:06d}", base_name)
            return path

    return ArtifactTrainer
