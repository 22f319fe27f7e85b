"""Offline reference-mismatch benchmark: MaPO vs Diffusion-DPO (β sweep) vs SFT on procedurally drawn shapes.

A tiny pixel-space conditional UNet is pretrained from scratch on shapes whose hue is mostly red (the reference).
Preference pairs then ask for a style the reference rarely or never draws:

* ``style_<d>`` (Pick-Style-like, reference-chosen mismatch): chosen hue ~ N(d, 6°), rejected ~ the reference's
  red N(0°, 12°); for d = 0 the rejected hue is N(±30°, 6°) so that the pair still carries a preference.
* ``safety`` (Pick-Safety-like, reference-rejected mismatch): 10% of pretraining images are green (the rare
  attribute); chosen = red, rejected = green, the same shape.

Scores are exact pixel statistics (:mod:`mmalign.diffusion.scorers`): the fraction of samples whose mean hue lies
within ``tolerance`` of the chosen style (style) or outside the green band (safety), and the IoU of the drawn
foreground with the prompted shape (fidelity). The preference fine-tuning loop is small and custom (see
:func:`finetune`) because a benchmark cell is a few hundred steps of a 0.25M-parameter model and hundreds of cells
run; the generic trainer's per-run checkpoints, TensorBoard and plots would dominate their cost.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmalign.config import Config, check_choice, check_positive, check_range, option
from mmalign.diffusion.shapes_eval import ShapesEval, check_setting, circular_w1, evaluate_shapes, make_pairs

__all__ = ["BenchmarkConfig", "pretrain_reference", "make_pairs", "finetune", "evaluate", "circular_w1", "run"]


@dataclass
class BenchmarkConfig(Config):
    """Settings of the offline MaPO / Diffusion-DPO / SFT reference-mismatch benchmark."""

    size: int = option(16, "image side in pixels (RGB pixel space)")
    channels: list[int] = option([16, 32], "UNet block_out_channels")
    embed_dim: int = option(32, "width of the per-class conditioning embeddings (cross_attention_dim)")
    pretrain_steps: int = option(1500, "reference pretraining steps")
    pretrain_batch: int = option(64, "reference pretraining batch size")
    pretrain_lr: float = option(2e-3, "reference pretraining learning rate (AdamW, cosine decay)")
    pretrain_init: str = option("", "weights file to continue pretraining from (a previous reference); empty: scratch")
    rare_prob: float = option(0.1, "fraction of green (rare attribute) images in pretraining")
    reference_path: str = option("", "cache file of the pretrained reference (safetensors); empty: run_dir/reference")
    settings: list[str] = option(["style_0", "style_45", "style_90", "style_180", "safety"],
                                 "preference settings: style_<hue shift in degrees> or safety")
    methods: list[str] = option(["sft", "mapo", "dpo_500", "dpo_2000", "dpo_5000"],
                                "methods: sft, mapo, dpo_<beta> (Diffusion-DPO with that beta, reference = the "
                                "pretrained model) or sftdpo_<beta> (SFT on chosen first, then Diffusion-DPO "
                                "starting from and referenced to the SFT model); a suffix +lora<r> trains rank-r "
                                "LoRA adapters on the attention projections instead of full weights (Diffusion-DPO's "
                                "reference is then the same network with adapters disabled); a suffix @<lr> "
                                "overrides finetune_lr for that method (for sftdpo: its DPO stage), e.g. "
                                "dpo_5000@1e-4 or mapo+lora8@1e-3")
    seeds: list[int] = option([0, 1, 2], "fine-tuning seeds (data, noise and evaluation draws)")
    num_pairs: int = option(512, "preference pairs per setting and seed")
    finetune_steps: int = option(200, "preference fine-tuning steps per cell")
    finetune_batch: int = option(16, "pairs per fine-tuning step")
    finetune_lr: float = option(3e-4, "fine-tuning learning rate (AdamW, constant; full weights or LoRA adapters)")
    mapo_margin_weight: float = option(0.1, "MaPO beta_mapo (weight of the margin term)")
    mapo_c: float = option(0.5, "MaPO c in s(l) = c*l/(exp(c*l)-1) (official 0.5)")
    mapo_temperature: float = option(1000.0, "MaPO temperature T on the score margin (official 1000 = timesteps)")
    samples_per_class: int = option(16, "evaluation samples per shape class")
    sample_steps: int = option(20, "DDIM steps for evaluation samples")
    tolerance: float = option(20.0, "style hit: mean hue within this many degrees of the target")
    threads: int = option(1, "torch CPU threads")
    shard: int = option(0, "id of this worker when num_shards > 1")
    num_shards: int = option(1, "number of worker processes sharing the run folder; > 1: cells are claimed "
                                "dynamically through run_dir/claims (a killed worker's claims are named at the end "
                                "of the run: delete them, then --resume)")

    def __post_init__(self) -> None:
        check_range("size", self.size, 8, 64)
        for name in ("pretrain_steps", "pretrain_batch", "pretrain_lr", "num_pairs", "finetune_steps",
                     "finetune_batch", "finetune_lr", "samples_per_class", "sample_steps", "threads", "embed_dim",
                     "mapo_c", "mapo_temperature"):
            check_positive(name, getattr(self, name))
        check_range("rare_prob", self.rare_prob, 0.0, 0.5)
        check_range("tolerance", self.tolerance, 0.0, 180.0, low_open=True)
        for s in self.settings:
            try:
                check_setting(s)
            except ValueError as err:
                raise ValueError(f"settings entries: {err}") from None
        for entry in self.methods:
            parse_method(entry)
        check_positive("num_shards", self.num_shards)
        check_range("shard", self.shard, 0, self.num_shards - 1)
        if not self.seeds:
            raise ValueError("seeds must list at least one seed, got []")


def parse_method(entry: str) -> tuple[str, int, float | None]:
    """``"dpo_5000+lora8@1e-4"`` -> ``("dpo_5000", 8, 1e-4)``: method, LoRA rank (0: full weights), lr (None: default).

    Raises ValueError naming the entry and the expected form.
    """
    m, _, lr_text = entry.partition("@")
    m, plus, adapter = m.partition("+")
    lr = None
    if lr_text:
        try:
            lr = float(lr_text)
            check_positive(f"learning rate of method {entry!r}", lr)
        except ValueError as err:
            raise ValueError(f"methods entry {entry!r}: expected <method>@<positive lr>") from err
    rank = 0
    if plus:
        digits = adapter[4:]
        if not (adapter.startswith("lora") and digits.isdigit() and int(digits) > 0):
            raise ValueError(f"methods entry {entry!r}: expected <method>+lora<positive rank>, got +{adapter!r}")
        rank = int(digits)
    if m.startswith(("dpo_", "sftdpo_")):
        try:
            check_positive(f"beta of method {m!r}", float(m.partition("_")[2]))
        except ValueError as err:
            raise ValueError(f"methods entry {entry!r}: expected dpo_<positive beta> or sftdpo_<positive beta>") from err
    else:
        check_choice(f"method of methods entry {entry!r}", m, ["sft", "mapo"])
    return m, rank, lr


def build_model(cfg: BenchmarkConfig) -> Any:
    from mmalign.diffusion.shapes import build_tiny_unet

    return build_tiny_unet(cfg.size, tuple(cfg.channels), cfg.embed_dim)


def _load_weights(model: Any, path: str | Path, what: str) -> None:
    """Load a user-given weights file into ``model``; a wrong file is one error naming ``what`` and the file."""
    from mmalign.fileio import read_safetensors

    try:
        model.load_state_dict(read_safetensors(path, what))
    except RuntimeError as err:  # other tensor names or shapes (e.g. another embed_dim or image size)
        raise ValueError(f"{what}: {str(path)!r} does not hold this benchmark's model ({str(err).splitlines()[0]}; "
                         f"check size / embed_dim against the run that wrote it)") from None


def validate(cfg: BenchmarkConfig, resume: bool = False) -> None:
    """Before the CLI makes a run folder: the weights files a user names load into this configuration's model, and a
    reference cache path that does not exist yet can be written."""
    if cfg.pretrain_init:
        _load_weights(build_model(cfg), cfg.pretrain_init, "pretrain_init")
    if cfg.reference_path:
        path = Path(cfg.reference_path)
        if path.exists():
            _load_weights(build_model(cfg), path, "reference_path")
        elif not path.parent.is_dir():
            raise ValueError(f"reference_path: {cfg.reference_path!r} does not exist, and its folder "
                             f"{str(path.parent)!r} does not either (the reference is trained and cached there)")


def pretrain_reference(cfg: BenchmarkConfig, path: Path, log: Any = print) -> Any:
    """Train (or load from ``path``) the reference model on the red-mostly pretraining distribution."""
    import torch
    from safetensors.torch import save_file
    from mmalign.diffusion.adapter import denoising_errors
    from mmalign.diffusion.shapes import SHAPES, render, sample_reference_hues, shapes_embeddings, shapes_scheduler

    model = build_model(cfg)
    if path.is_file():
        _load_weights(model, path, "reference_path")
        return model
    torch.manual_seed(0)
    model = build_model(cfg)
    if cfg.pretrain_init:
        _load_weights(model, cfg.pretrain_init, "pretrain_init")
    sched, emb = shapes_scheduler(), shapes_embeddings(cfg.embed_dim)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.0)
    warm = min(100, cfg.pretrain_steps // 10)
    lr_at = lambda s: min(1.0, (s + 1) / max(1, warm)) * 0.5 * (1 + math.cos(math.pi * s / cfg.pretrain_steps))  # noqa: E731
    sch = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    g = torch.Generator().manual_seed(1 if cfg.pretrain_init else 0)  # a continuation sees fresh images
    t0 = time.perf_counter()
    for step in range(cfg.pretrain_steps):
        cls = torch.randint(0, len(SHAPES), (cfg.pretrain_batch,), generator=g)
        hues = sample_reference_hues(cfg.pretrain_batch, g, rare_prob=cfg.rare_prob)
        x0 = render(cls, hues, cfg.size, g)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (cfg.pretrain_batch,), generator=g)
        loss = denoising_errors(model, sched, x0, noise, t, emb[cls]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sch.step()
        if step % 100 == 0 or step == cfg.pretrain_steps - 1:
            log(f"pretrain step {step} loss {loss.item():.4f} ({time.perf_counter() - t0:.0f}s)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")  # a run killed while saving must not leave a truncated reference
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, path)
    return model


def finetune(cfg: BenchmarkConfig, reference: Any, method: str, pairs: dict[str, Any], seed: int) -> Any:
    """Preference fine-tuning of a full-weight copy of ``reference``; Diffusion-DPO's reference is a frozen copy.

    ``sftdpo_<beta>`` first runs the ``sft`` arm (same steps, lr ``finetune_lr``, the same model as the ``sft``
    cell), then Diffusion-DPO from the SFT model with the SFT model as its frozen reference: the reference then
    already draws the chosen style (the reference-mismatch mechanism check). A plain loop rather than
    :class:`mmalign.train.Trainer`: see the module docstring.
    """
    import torch

    from mmalign.diffusion.adapter import PairBatch, add_lora, make_loss_fn
    from mmalign.diffusion.shapes import shapes_embeddings, shapes_scheduler

    method, rank, lr = parse_method(method)
    adapter = f"+lora{rank}" if rank else ""
    stage = 0
    if method.startswith("sftdpo_"):
        # with LoRA the SFT adapters are merged into the weights: that merged model is the DPO stage's reference
        reference, sft_metrics = finetune(cfg, reference, "sft" + adapter, pairs, seed)
        method, stage = "dpo_" + method[7:], 1
    model = copy.deepcopy(reference).train()
    frozen = None
    if rank:
        model = add_lora(model, r=rank, seed=20_000 + seed + 1_000_000 * stage)  # reference = adapters disabled
    elif method.startswith("dpo_"):
        frozen = copy.deepcopy(reference).eval().requires_grad_(False)
    name, beta = ("diffusion_dpo", float(method[4:])) if method.startswith("dpo_") else (method, 0.0)
    g = torch.Generator().manual_seed(10_000 + seed + 1_000_000 * stage)  # the DPO stage draws fresh (ε, t)
    options = {"beta": beta or 5000.0, "c": cfg.mapo_c, "temperature": cfg.mapo_temperature,
               "margin_weight": cfg.mapo_margin_weight}
    loss_fn = make_loss_fn(name, shapes_scheduler(), generator=g, ref_model=frozen, options=options, validate=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=lr if lr else cfg.finetune_lr, weight_decay=0.0)
    emb = shapes_embeddings(cfg.embed_dim)
    n = pairs["chosen"].shape[0]
    history = []
    for step in range(cfg.finetune_steps):
        idx = torch.randint(0, n, (cfg.finetune_batch,), generator=g)
        batch = PairBatch(pairs["chosen"][idx], pairs["rejected"][idx], emb[pairs["classes"][idx]])
        loss, metrics = loss_fn(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        history.append(loss.item())
    if rank:
        model = model.merge_and_unload()  # a plain UNet again: sampled, scored (and, for sftdpo, referenced) as such
    model.eval()
    out = {"final_loss": sum(history[-20:]) / len(history[-20:]), **{k: float(v) for k, v in metrics.items()}}
    if stage:
        out["sft_stage_final_loss"] = sft_metrics["final_loss"]
    return model, out


def evaluate(cfg: BenchmarkConfig, model: Any, setting: str, seed: int,
             chosen_hue: Any = None, scheduler: Any = None) -> dict[str, float]:
    """:func:`mmalign.diffusion.shapes_eval.evaluate_shapes` with this benchmark's evaluation settings."""
    spec = ShapesEval(size=cfg.size, embed_dim=cfg.embed_dim, samples_per_class=cfg.samples_per_class,
                      sample_steps=cfg.sample_steps, tolerance=cfg.tolerance)
    return evaluate_shapes(spec, model, setting, seed, chosen_hue=chosen_hue, scheduler=scheduler)


def _cells(cfg: BenchmarkConfig) -> list[tuple[str, str, int]]:
    return [(s, m, seed) for seed in cfg.seeds for s in cfg.settings for m in ["reference", *cfg.methods]]


def run(cfg: BenchmarkConfig, run_dir: Path, resume: bool = False) -> dict:
    """Pretrain (or load) the reference, then fine-tune and score every (setting, method, seed) cell.

    Rows go to ``run_dir/results.jsonl`` as they finish; cells already there are skipped (resumable). With
    ``num_shards > 1`` several processes share one folder and claim cells through ``run_dir/claims``.
    """
    import torch

    from mmalign.diffusion.scorers import shape_hue
    from mmalign.fileio import read_appended_rows

    torch.set_num_threads(cfg.threads)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ref_path = Path(cfg.reference_path) if cfg.reference_path else run_dir / "reference.safetensors"
    reference = pretrain_reference(cfg, ref_path).eval()
    out = run_dir / "results.jsonl"
    # a row cut by a kill is dropped (its cell runs again); shards share the file: another may be appending now
    done = {(row["setting"], row["method"], row["seed"]) for row in read_appended_rows(out, cfg.num_shards == 1)}
    pair_cache: dict[tuple[str, int], Any] = {}
    claims = run_dir / "claims"
    if cfg.num_shards > 1:
        claims.mkdir(exist_ok=True)
    for setting, method, seed in _cells(cfg):
        if (setting, method, seed) in done:
            continue
        if cfg.num_shards > 1:
            # several workers share the folder: the first to create the claim file runs the cell
            try:
                os.close(os.open(claims / f"{setting}-{method}-{seed}", os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                continue
        t0 = time.perf_counter()
        key = (setting, seed)
        if key not in pair_cache:
            pairs = make_pairs(setting, cfg.num_pairs, torch.Generator().manual_seed(seed * 7919 + 1), cfg.size)
            pair_cache = {key: {**pairs, "chosen_hue": shape_hue(pairs["chosen"], pairs["classes"])}}
        pairs = pair_cache[key]
        model, train = (reference, {}) if method == "reference" else finetune(cfg, reference, method, pairs, seed)
        row = {"setting": setting, "method": method, "seed": seed,
               **evaluate(cfg, model, setting, seed, chosen_hue=pairs["chosen_hue"]), **train,
               "seconds": time.perf_counter() - t0}
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    summary = summarize(out)
    if cfg.num_shards > 1:
        stored = {(r["setting"], r["method"], r["seed"]) for r in read_appended_rows(out, False)}
        pending = [c for c in _cells(cfg) if c not in stored]
        summary["cells/pending"] = float(len(pending))
        if pending:  # claimed by a worker still running, or by one that was killed: never dropped without a word
            names = ", ".join("-".join(map(str, c)) for c in pending[:10])
            print(f"[diffusion benchmark] {len(pending)} cell(s) claimed by other workers have no row yet ({names}); "
                  f"once every worker has finished, these were claimed by killed workers: delete their files in "
                  f"{claims} and run again with --resume", flush=True)
    return summary


def unique_rows(results: Path) -> list[dict]:
    """Rows of results.jsonl, the first one per (setting, method, seed) (cells are deterministic)."""
    seen, rows = set(), []
    for line in Path(results).read_text().splitlines():
        row = json.loads(line)
        key = (row["setting"], row["method"], row["seed"])
        if key not in seen:
            seen.add(key)
            rows.append(row)
    return rows


def summarize(results: Path) -> dict[str, float]:
    """Mean of pref_score and fidelity_iou per (setting, method) over seeds, as flat metric names."""
    rows = unique_rows(Path(results))
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["setting"], r["method"]), []).append(r)
    out: dict[str, float] = {}
    for (s, m), rs in sorted(groups.items()):
        out[f"{s}/{m}/pref_score"] = sum(r["pref_score"] for r in rs) / len(rs)
        out[f"{s}/{m}/fidelity_iou"] = sum(r["fidelity_iou"] for r in rs) / len(rs)
    return out
