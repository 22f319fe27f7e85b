"""One seed of the hallucination testbed: base model, gates, each method's LoRA preference run, diagnostics.

``scripts/bench_halluc.py`` runs seeds and reports. Per seed: weak-evidence scenes (:mod:`weak_scenes`), the cached
base model (:mod:`halluc_base`), its metrics and gates; only when every gate passes (or ``force``) each method row of
:data:`ROWS` is trained from the base with LoRA on pairs built from fresh train-split scenes (annotated with every
present object, or only the visible ones: ``pref_labels``), then evaluated. Per-method diagnostics test each paper's
mechanism: how often BDHS's image-hidden "rejected" answer is in fact correct for the image, how often Re-Align's
retrieval refill is in fact wrong for it, the token-level KL of every trained model to the base (RRPO claims less
divergence than DPO), and robust DPO's estimated flip rate when it is not told the true one.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mmalign.config import Config, check_choice, check_positive, option
from mmalign.vision_lm import halluc_base as H
from mmalign.vision_lm.benchmark import METHOD_ROWS, applied_flips

__all__ = ["HallucBenchConfig", "PRIMARY_METRICS", "ROWS", "PREF_LABELS", "baseline_of", "answer_correct",
           "pair_diagnostics", "token_kl", "applied_flips", "pair_margins", "run_seed"]

PRIMARY_METRICS = ("partner_balanced_acc", "pope_adversarial_acc", "pope_random_acc")
PREF_LABELS = ("truth", "visible")
# row -> (the METHOD_ROWS row whose loss and label flipping it trains with, pair source)
ROWS: dict[str, tuple[str, str]] = {
    **{row: (row, spec[1]) for row, spec in METHOD_ROWS.items()},
    # robust DPO with eps estimated from the base model's margins on the flipped pairs, not told the flip rate
    "robust_dpo_flipped_est": ("robust_dpo_flipped", "corrupt"),
    # plain DPO on Re-Align's own pairs (the paper's Table 4 ablation: the visual term alone)
    "dpo_realign_pairs": ("dpo", "realign"),
}


def baseline_of(row: str) -> str:
    """The row a method is compared with: DPO on the same pairs (flipped pairs for the flipped rows)."""
    return "dpo_flipped" if "_flipped" in row else "dpo"


@dataclass
class HallucBenchConfig(Config):
    """The hallucination testbed's benchmark; ``primary_metric`` is declared here, before any run."""

    base: H.BaseConfig = option(factory=H.BaseConfig, help="scenes and training of the base model")
    primary_metric: str = option("partner_balanced_acc", f"the one metric verdicts are read from, {PRIMARY_METRICS}")
    report_seeds: list[int] = option(list(range(10)), "seeds of the reported numbers (never used for tuning)")
    dev_seeds: list[int] = option([100, 101], "seeds for tuning the base model and the methods' settings")
    methods: list[str] = option(["dpo", "realign", "bdhs_offline", "rrpo", "dpo_flipped", "robust_dpo_flipped"],
                                f"rows, from {list(ROWS)}")
    pref_labels: str = option("truth", "annotation of the preference pairs: 'truth' names every present object (as "
                                       "the SFT data does), 'visible' only what the pixels show (a grounded "
                                       "annotator)")
    n_test_scenes: int = option(2000, "balanced test scenes per seed (half prior-violating)")
    n_pref_scenes: int = option(256, "fresh train-split scenes the preference pairs are built from")
    partner_question_rate: float = option(0.5, "probability that a trigger scene's yes/no pair asks about the "
                                               "trigger's co-occurring partner (POVID-style targeting), else a "
                                               "uniformly random shape; the same for every pair source")
    pref_steps: int = option(50, "preference-training optimizer steps per method")
    pref_lr: float = option(1e-3, "preference-training learning rate (LoRA)")
    pref_batch_size: int = option(16, "pairs per preference-training step")
    beta: float = option(0.1, "DPO beta (also Re-Align's, RRPO's)")
    rrpo_alpha: float = option(0.01, "RRPO token-wise KL weight")
    flip_rate: float = option(0.2, "swapped fraction in the *_flipped rows (robust DPO's eps)")
    bdhs_rho: float = option(0.99, "BDHS: fraction of image tokens hidden")
    realign_top_k: int = option(5, "Re-Align: retrieved images tried per example")
    lora_r: int = option(16, "LoRA rank")
    n_kl_scenes: int = option(200, "test scenes whose ground-truth answers score the token KL to the base")
    n_caption_scenes: int = option(500, "test scenes whose greedy captions score CHAIR_i / CHAIR_s (0: none)")

    def __post_init__(self) -> None:
        if isinstance(self.base, dict):
            self.base = H.BaseConfig(**self.base)
        check_choice("primary_metric", self.primary_metric, PRIMARY_METRICS)
        check_choice("pref_labels", self.pref_labels, PREF_LABELS)
        bad = [m for m in self.methods if m not in ROWS]
        if bad:
            raise ValueError(f"methods must be among {list(ROWS)}, got unknown {bad}")
        if not 0 <= self.partner_question_rate <= 1:
            raise ValueError(f"partner_question_rate must be in [0, 1], got {self.partner_question_rate}")
        if not 0 <= self.flip_rate < 0.5:
            raise ValueError(f"flip_rate must be in [0, 0.5), got {self.flip_rate}")
        missing = sorted({baseline_of(m) for m in self.methods} - set(self.methods))
        if missing:
            raise ValueError(f"methods must include each row's DPO baseline, missing {missing}")
        overlap = sorted(set(self.report_seeds) & set(self.dev_seeds))
        if overlap:
            raise ValueError(f"report_seeds and dev_seeds must not overlap, both hold {overlap}")
        if self.n_caption_scenes < 0:
            raise ValueError(f"n_caption_scenes must be >= 0, got {self.n_caption_scenes}")
        for name in ("n_test_scenes", "n_pref_scenes", "pref_steps", "pref_lr", "pref_batch_size", "beta",
                     "lora_r", "n_kl_scenes"):
            check_positive(name, getattr(self, name))
        if self.n_test_scenes % 2:
            raise ValueError(f"n_test_scenes must be even (half prior-violating), got {self.n_test_scenes}")

    def method_config(self, seed: int) -> Any:
        """The :class:`benchmark.BenchmarkConfig` whose preference settings ``train_method`` reads."""
        from mmalign.vision_lm.benchmark import BenchmarkConfig

        return BenchmarkConfig(seeds=[seed], methods=sorted({ROWS[m][0] for m in self.methods}),
                               pref_steps=self.pref_steps,
                               pref_lr=self.pref_lr, pref_batch_size=self.pref_batch_size, beta=self.beta,
                               rrpo_alpha=self.rrpo_alpha, flip_rate=self.flip_rate, bdhs_rho=self.bdhs_rho,
                               realign_top_k=self.realign_top_k, lora_r=self.lora_r,
                               patch_size=self.base.patch_size)


def answer_correct(prompt: str, answer: str, scene: Any) -> bool:
    """Whether ``answer`` is true of ``scene`` (ground truth): a yes/no answer matches; a caption mentions at least
    one object and only present shapes with attributes some object of that shape has."""
    from mmalign.vision_lm import scenes as S

    words = prompt.split()
    if "?" in words:
        shape = words[words.index("?") - 1]
        return answer.strip() == ("yes" if shape in scene.shapes else "no")
    mentions = S.parse_caption(answer)
    return bool(mentions) and all(
        any(o.shape == sh and size in (None, o.size) and color in (None, o.color) for o in scene.objects)
        for size, color, sh in mentions)


def pair_diagnostics(source: str, pairs: Sequence[Any], scenes: Sequence[Any], images: Sequence[Any]) -> dict:
    """Mechanism checks of a pair set: the fraction of rejected answers that are correct for their image (BDHS
    assumes they are not), overall and for captions / yes-no answers separately; and how many yes/no pairs ask
    about the partner of a trigger in the scene (the test's critical question), by chosen answer (``no`` pairs are
    the only direct evidence against the hallucinated "yes")."""
    from mmalign.vision_lm.scenes import PRIOR_PAIRS

    index = {id(im): k for k, im in enumerate(images)}
    flags: dict[str, list[bool]] = {"all": [], "caption": [], "yesno": []}
    partner = {"yes": 0, "no": 0}
    for p in pairs:
        scene = scenes[index[id(p.images[0])]]
        ok = answer_correct(p.prompt, p.rejected, scene)
        flags["all"].append(ok)
        words = p.prompt.split()
        flags["yesno" if "?" in words else "caption"].append(ok)
        if "?" in words and p.chosen.strip() in partner:
            asked = words[words.index("?") - 1]
            if any(PRIOR_PAIRS[t] == asked for t in PRIOR_PAIRS if t in scene.shapes):
                partner[p.chosen.strip()] += 1
    out = {f"diag/{source}_rejected_correct_{k}": float(np.mean(v)) for k, v in flags.items() if v}
    if flags["yesno"]:
        out.update({f"diag/{source}_partner_pairs_{a}": float(n) for a, n in partner.items()})
    return out


def token_kl(adapter: Any, reference: Any, examples: Sequence[Any], batch_size: int = 64) -> float:
    """Mean over response tokens of KL(pi_ref(.|prefix) || pi_theta(.|prefix)) on ``examples`` (their ground-truth
    responses as prefixes); ``adapter.model`` is pi_theta, ``reference`` the base model."""
    import torch

    policy = adapter.model
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = adapter.encode(examples[start:start + batch_size])
            _, mask, logits_p = adapter.token_logps(batch, return_logits=True)
            adapter.model = reference
            try:
                _, _, logits_r = adapter.token_logps(batch, return_logits=True)
            finally:
                adapter.model = policy
            lr, lp = logits_r.log_softmax(-1), logits_p.log_softmax(-1)
            kl = (lr.exp() * (lr - lp)).sum(-1)
            total += float((kl * mask).sum())
            count += int(mask.sum())
    return total / max(count, 1)


def pair_margins(adapter: Any, pairs: Sequence[Any], batch_size: int = 64) -> np.ndarray:
    """``log pi(chosen) - log pi(rejected)`` (summed over response tokens) of the model in ``adapter``, per pair."""
    import torch

    from mmalign.vision_lm.adapter import VLExample

    out = []
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            chosen, rejected = (adapter.sequence_logps(adapter.encode([VLExample(p.prompt, getattr(p, side), p.images)
                                                                        for p in chunk]))
                                for side in ("chosen", "rejected"))
            out.append((chosen - rejected).double().numpy())
    return np.concatenate(out)


def estimated_flip_rate(adapter: Any, pairs: Sequence[Any], flips: np.ndarray) -> float:
    """robust DPO's eps when the flip rate is not told: the maximum-likelihood estimate
    (:func:`mmalign.core.losses.estimate_flip_rate`) with the base model's margins on the observed (``flips``
    swapped) pairs as the clean-preference logits. Its own errors count as flips (a conservative estimate)."""
    import torch

    from mmalign.core.losses import estimate_flip_rate

    margins = np.where(flips, -1.0, 1.0) * pair_margins(adapter, pairs)
    return float(estimate_flip_rate(torch.as_tensor(margins)))


def _kl_examples(data: H.TestbedData, n: int) -> list[Any]:
    from mmalign.vision_lm import scenes as S
    from mmalign.vision_lm.adapter import VLExample

    out = []
    for scene, img in list(zip(data.test, data.test_images))[:n]:
        out.append(VLExample(H.DESCRIBE, S.caption(scene.scene), [img]))
        if scene.partner:
            out.append(VLExample(f"<image> {S.question(scene.partner)}",
                                 "yes" if scene.partner in scene.shapes else "no", [img]))
    return out


def _logged(path: Path, key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of every row of a trainer's ``metrics.jsonl`` that holds ``key``."""
    import json

    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(int(r["step"]), float(r[key])) for r in rows if key in r]


def run_seed(cfg: HallucBenchConfig, seed: int, run_dir: Path, cache_dir: Path | None,
             force: bool = False, on_row: Any = None) -> dict[str, Any]:
    """``{"base": metrics, "gates": {gate: passed}, "rows": {row: metrics}, "cpu_s": ...}`` for one seed.

    Rows are trained only when every gate passes, or with ``force`` (then the result is marked ``forced``).
    """
    from mmalign.vision_lm.benchmark import train_method
    from mmalign.vision_lm.testbed import build_pairs

    t0 = time.process_time()
    gen = cfg.base.generator()
    data = H.make_data(cfg.base, seed, cfg.n_pref_scenes, cfg.n_test_scenes)
    adapter, info = H.build_base(cfg.base, seed, data, cache_dir)
    base_model = adapter.model
    out: dict[str, Any] = {"base": H.evaluate(adapter, data, seed, gen, captions=cfg.n_caption_scenes),
                           "base_info": info, "rows": {}, "flip_rate": cfg.flip_rate}
    out["gates"] = H.gates(out["base"])
    out["forced"] = force and not all(out["gates"].values())
    if not all(out["gates"].values()) and not force:
        out["cpu_s"] = time.process_time() - t0
        return out
    kl_examples = _kl_examples(data, cfg.n_kl_scenes)
    few = kl_examples[: max(2, len(kl_examples) // 4)]

    def kl_during(model: Any) -> dict[str, float]:
        """Token KL of the policy being trained (LoRA active) to the base, on a quarter of the KL examples."""
        from mmalign.vision_lm.adapter import VLMAdapter

        return {"eval/token_kl_to_base": token_kl(VLMAdapter(model, adapter.processor, max_length=96), base_model,
                                                  few)}

    # the preference annotation: every present object (like the SFT data) or only what the pixels show
    pref_plain = [s.scene if cfg.pref_labels == "truth" else s.seen for s in data.pref]
    mcfg = cfg.method_config(seed)
    pair_cache: dict[str, tuple[list[Any], dict[str, float]]] = {}
    for row in cfg.methods:
        train_row, source = ROWS[row]
        adapter.model = base_model
        if source not in pair_cache:
            pairs, stats = build_pairs(source, adapter, pref_plain, data.pref_images, seed=seed,
                                       bdhs_rho=cfg.bdhs_rho, realign_top_k=cfg.realign_top_k,
                                       partner_rate=cfg.partner_question_rate)
            stats = {**stats, **pair_diagnostics(source, pairs, pref_plain, data.pref_images)}
            pair_cache[source] = (pairs, stats)
        pairs, stats = pair_cache[source]
        eps = None
        if row == "robust_dpo_flipped_est":
            eps = estimated_flip_rate(adapter, pairs, applied_flips(len(pairs), seed, cfg.flip_rate))
            stats = {**stats, "robust/eps_hat": eps}
        adapter.model = copy.deepcopy(base_model)
        t_row = time.process_time()
        row_dir = run_dir / f"seed{seed}" / row
        res = train_method(train_row, adapter, pairs, mcfg, seed, row_dir, eval_fn=kl_during,
                           eval_every=max(1, cfg.pref_steps // 2), eps=eps)
        model = adapter.model
        adapter.model = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
        adapter.model.eval()
        metrics = H.evaluate(adapter, data, seed, gen, captions=cfg.n_caption_scenes)
        metrics["diag/token_kl_to_base"] = token_kl(adapter, base_model, kl_examples)
        during = _logged(row_dir / "metrics.jsonl", "eval/token_kl_to_base")
        metrics.update({f"diag/token_kl_step{step}": v for step, v in during})
        out["rows"][row] = {**metrics, **stats, "n_pairs": float(len(pairs)),
                            "train/pref_accuracy": float(res.get("train/pref_accuracy", float("nan"))),
                            "cpu_s": time.process_time() - t_row}
        if on_row is not None:
            on_row(out)
    adapter.model = base_model
    out["cpu_s"] = time.process_time() - t0
    return out
