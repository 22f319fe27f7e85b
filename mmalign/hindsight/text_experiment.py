"""The marketplace in text: a tiny GPT-2 seller trained with the DPO core on foresight vs hindsight pairs.

1. Supervised fine-tuning (the generic trainer) of a tiny GPT-2, built from config with a local word-level
   tokenizer, on the reference seller's replies: the LM becomes the reference seller in text.
2. For each seed and channel, the *same* pairs the tabular experiment uses (:func:`collect_pairs`) are rendered as
   ``prompt / chosen / rejected`` dialogues and the SFT model is trained with the registered DPO-family loss
   (reference log-probabilities precomputed from the frozen SFT model).
3. Evaluation: for each held-out scenario the LM scores every well-formed reply ((M+1)·3^M of them); a reply is
   sampled from the LM's distribution restricted to that set, parsed back into an action and rolled out in the
   market, giving the same measures as the tabular table.

Job ``hindsight.text``; results in ``text_results.jsonl`` / ``text_table.md`` of the run folder.
"""

from __future__ import annotations

import copy
import itertools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmalign.hindsight import market as mk
from mmalign.hindsight.config import HindsightTextConfig
from mmalign.hindsight.experiment import _mean_std, _rollout, collect_pairs, interaction_metrics, market_params
from mmalign.hindsight.feedback import Interaction
from mmalign.hindsight.policies import ReferenceSeller
from mmalign.hindsight.text import (
    build_tiny_lm,
    candidate_logps,
    build_tokenizer,
    encode_replies,
    render_prompt,
    render_reply,
    sequence_logps,
)
from mmalign.registry import LOSSES

__all__ = ["HindsightTextConfig", "run", "lm_policy_metrics"]

_KEYS = ("input_ids", "attention_mask", "target_mask")


class _Rows:
    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


def _replies(inter: Interaction) -> list[str]:
    return [render_reply(int(r), c.tolist()) for r, c in zip(inter.recommend, inter.claims)]


@torch.no_grad()
def _score_all(model: torch.nn.Module, enc: dict[str, torch.Tensor], chunk: int = 2048) -> torch.Tensor:
    model.eval()
    out = [sequence_logps(model, *(enc[k][i : i + chunk] for k in _KEYS)) for i in range(0, len(enc["input_ids"]),
                                                                                     chunk)]
    return torch.cat(out)


def lm_policy_metrics(model: torch.nn.Module, tokenizer: Any, params: mk.MarketParams, channel: str, n: int,
                      seed: int) -> dict[str, float]:
    """Sample replies from the LM (restricted to well-formed replies) on ``n`` scenarios and measure outcomes."""
    rng = np.random.default_rng([seed, 777])
    gen = torch.Generator().manual_seed(seed * 1000 + 777)
    scen = mk.sample_scenarios(rng, n, params)
    m = params.n_items
    actions = list(itertools.product(range(m + 1), *[range(3)] * m))
    cands = [render_reply(a[0], list(a[1:])) for a in actions]
    model.eval()
    with torch.no_grad():
        logps = torch.stack([candidate_logps(model, tokenizer, render_prompt(scen, i), cands) for i in range(n)])
    u = torch.rand(logps.shape, generator=gen).clamp_(1e-12, 1 - 1e-12)
    pick = (logps - torch.log(-torch.log(u))).argmax(1).numpy()
    chosen = np.array([actions[k] for k in pick])
    rec, claims = chosen[:, 0], chosen[:, 1:]
    inter = Interaction(scen, rec, claims, mk.simulate(rng, scen, rec, claims, params))
    probs = torch.softmax(logps, 1)
    out = interaction_metrics(inter, params, channel)
    out["lm/candidate_entropy"] = float(-(probs * torch.log(probs.clamp_min(1e-30))).sum(1).mean())
    return out


def run(cfg: HindsightTextConfig, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    """SFT once, then DPO per (seed, channel); writes ``text_results.jsonl`` and ``text_table.md``."""
    from mmalign.train import Trainer

    mc = cfg.market
    torch.set_num_threads(mc.threads)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    params = market_params(mc, mc.trust)
    tok = build_tokenizer(params)
    width = 96
    torch.manual_seed(mc.seeds[0])
    lm = build_tiny_lm(len(tok), seed=mc.seeds[0], n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_positions=width)

    # 1. SFT on the reference seller's replies
    rng = np.random.default_rng([mc.seeds[0], 99])
    scen = mk.sample_scenarios(rng, cfg.n_sft, params)
    ref_inter = _rollout(ReferenceSeller(params, mc.ref_truthful, mc.ref_silent), scen, params,
                         torch.Generator().manual_seed(99), rng)
    sft_data = encode_replies(tok, [render_prompt(scen, i) for i in range(len(scen))], _replies(ref_inter), width)

    def sft_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        lp = sequence_logps(model, *(batch[k] for k in _KEYS))
        return -(lp.sum() / batch["target_mask"][:, 1:].sum()), {}

    sft_result = Trainer(cfg.sft, lm, _Rows(sft_data), sft_loss, run_dir / "sft").train(resume=resume)
    sft_model = lm.eval()
    rows: list[dict[str, Any]] = []
    for seed in mc.seeds:
        ref_metrics = lm_policy_metrics(sft_model, tok, params, "foresight", cfg.n_eval, seed)
        rows.append({"method": "sft_reference", "channel": "—", "seed": seed, **ref_metrics})
    loss_core = LOSSES.get(mc.dpo_loss)
    kwargs: dict[str, Any] = {"beta": mc.beta}
    if mc.dpo_loss in ("cdpo", "robust_dpo"):
        kwargs["eps"] = mc.dpo_eps

    # 2. DPO per seed and channel on the tabular experiment's pairs, rendered as text
    for seed in mc.seeds:
        for channel in mc.channels:
            data = collect_pairs(mc, params, channel, mc.trust, seed)
            labels = data["labels"]
            keep = (labels.answered & (labels.labels != 0.5)).numpy()
            first_wins = (labels.labels > 0.5).numpy()[keep]
            sc = data["scen"].take(np.nonzero(keep)[0])
            r1, r2 = np.array(_replies(data["first"]))[keep], np.array(_replies(data["second"]))[keep]
            chosen, rejected = np.where(first_wins, r1, r2).tolist(), np.where(first_wins, r2, r1).tolist()
            prompts = [render_prompt(sc, i) for i in range(len(sc))]
            enc_w = encode_replies(tok, prompts, chosen, width)
            enc_l = encode_replies(tok, prompts, rejected, width)
            tensors = {f"w_{k}": enc_w[k] for k in _KEYS} | {f"l_{k}": enc_l[k] for k in _KEYS}
            tensors["ref_w"], tensors["ref_l"] = _score_all(sft_model, enc_w), _score_all(sft_model, enc_l)

            def dpo_loss(model: torch.nn.Module, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
                pw = sequence_logps(model, *(b[f"w_{k}"] for k in _KEYS))
                pl = sequence_logps(model, *(b[f"l_{k}"] for k in _KEYS))
                return loss_core(pw, pl, b["ref_w"], b["ref_l"], **kwargs)

            policy = copy.deepcopy(sft_model).train()
            torch.manual_seed(seed)
            dpo_cfg = copy.deepcopy(cfg.dpo)
            dpo_cfg.seed = seed
            result = Trainer(dpo_cfg, policy, _Rows(tensors), dpo_loss, run_dir / f"dpo-{channel}-s{seed}").train(
                resume=resume)
            metrics = lm_policy_metrics(policy.eval(), tok, params, channel, cfg.n_eval, seed)
            rows.append({"method": "dpo_lm", "channel": channel, "seed": seed, "train/pairs": int(keep.sum()),
                         "train/loss": result.get("train/loss"), **metrics})
    wall = time.perf_counter() - start
    with (run_dir / "text_results.jsonl").open("w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    cols = ("rating", "foresight_rating", "hindsight_rating", "true_utility", "regret_rate", "deception_rate")
    lines = [f"### Text form: tiny GPT-2 seller (SFT on the reference, then DPO), trust {mc.trust}, "
             f"{len(mc.seeds)} seed(s), mean ± std\n\n",
             "| model | feedback | " + " | ".join(cols) + " |\n|" + "---|" * (len(cols) + 2) + "\n"]
    summary: dict[str, Any] = {"wall_seconds": wall, "sft/loss": sft_result.get("train/loss")}
    for method, channel in [("sft_reference", "—")] + [("dpo_lm", ch) for ch in mc.channels]:
        group = [r for r in rows if r["method"] == method and r["channel"] == channel]
        stats = {c: _mean_std([r[c] for r in group]) for c in cols}
        lines.append(f"| {method} | {channel} | " + " | ".join(f"{stats[c][0]:+.2f} ± {stats[c][1]:.2f}"
                                                                 for c in cols) + " |\n")
        for c in ("true_utility", "deception_rate", "rating"):
            summary[f"eval/{method}/{channel}/{c}"] = stats[c][0]
    (run_dir / "text_table.md").write_text("".join(lines))
    return summary
