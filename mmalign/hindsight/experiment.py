"""The RLHS marketplace experiment: does foresight feedback teach the seller to deceive, and hindsight not?

For every seed, pairs of reference-seller actions on the same scenarios are rolled out (the customer buys or not)
and labelled by one feedback channel through the core hindsight teacher; the seller is then trained two ways, DPO on
the pairs and a Bradley–Terry reward model + PPO, and evaluated on fresh scenarios: mean rating, mean true utility,
regret rate, deception rate (RLHS Table 1's measures). Sweeps: customer trust τ (τ = 0.5 is the control where claims
carry no information) and world-model accuracy ``a``. Writes ``results.jsonl``, ``table.md`` and plots.
Job ``hindsight.market``; see ``docs/methods/rlhs.md`` and ``docs/benchmarks/hindsight.md``.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmalign.hindsight import market as mk
from mmalign.hindsight.config import HindsightMarketConfig
from mmalign.hindsight.feedback import Interaction, label_pairs, market_teacher
from mmalign.hindsight.policies import (
    ActionRewardModel,
    PPOSettings,
    ReferenceSeller,
    SellerPolicy,
    sample_actions,
    to_tensor_actions,
    train_dpo,
    train_ppo,
    train_reward_model,
)

__all__ = ["HindsightMarketConfig", "run", "run_condition", "collect_pairs", "market_params", "evaluate",
           "interaction_metrics", "conditions"]

METRICS = ("rating", "foresight_rating", "hindsight_rating", "true_utility", "regret_rate", "deception_rate",
           "withholding_rate", "purchase_rate", "corr_rating_utility")
_RATING_KEY = {"foresight": "foresight_rating", "partial_hindsight": "hindsight_rating",
               "full_hindsight": "full_hindsight_rating", "world_model_hindsight": "world_model_rating"}


def market_params(cfg: HindsightMarketConfig, trust: float, accuracy: float | None = None) -> mk.MarketParams:
    """The market of one condition (everything from the config except trust and world-model accuracy)."""
    return mk.MarketParams(
        n_features=cfg.n_features, trust=trust, prior=cfg.prior, rationality=cfg.rationality,
        rec_bonus=cfg.rec_bonus, u_none=cfg.u_none, u_none_missed=cfg.u_none, regret_penalty=cfg.regret_penalty,
        lie_penalty=cfg.lie_penalty,
        world_model_accuracy=cfg.world_model_accuracy if accuracy is None else accuracy,
    )


def _obs(scen: mk.Scenarios, params: mk.MarketParams) -> torch.Tensor:
    return torch.as_tensor(mk.seller_observation(scen, params))


def _rollout(policy: torch.nn.Module, scen: mk.Scenarios, params: mk.MarketParams, gen: torch.Generator,
             rng: np.random.Generator) -> Interaction:
    rec, claims = sample_actions(policy, _obs(scen, params), gen)
    rec_np, claims_np = rec.numpy(), claims.numpy()
    return Interaction(scen, rec_np, claims_np, mk.simulate(rng, scen, rec_np, claims_np, params))


def interaction_metrics(inter: Interaction, params: mk.MarketParams, channel: str) -> dict[str, float]:
    """RLHS Table 1 measures of a batch of interactions; ratings normalised to [-1, 1] as (r - 3) / 2."""
    info = mk.episode_info(inter.scen, inter.recommend, inter.claims, inter.outcome, params)
    norm = {k: (info[k] - 3) / 2.0 for k in _RATING_KEY.values()}
    rating = norm[_RATING_KEY[channel]]
    u = info["true_utility"]
    corr = float(np.corrcoef(rating, u)[0, 1]) if rating.std() > 0 and u.std() > 0 else float("nan")
    return {
        "rating": float(rating.mean()),
        "foresight_rating": float(norm["foresight_rating"].mean()),
        "hindsight_rating": float(norm["hindsight_rating"].mean()),
        "true_utility": float(u.mean()),
        "regret_rate": float((info["regret"] > 1e-9).mean()),
        "deception_rate": float(info["deception"].mean()),
        "withholding_rate": float(info["withholding"].mean()),
        "purchase_rate": float((info["purchase"] < params.n_items).mean()),
        "corr_rating_utility": corr,
    }


def evaluate(policy: torch.nn.Module, params: mk.MarketParams, channel: str, n: int, seed: int) -> dict[str, float]:
    """Sample the policy on ``n`` fresh scenarios (drawn from ``seed``) and measure the outcomes."""
    rng = np.random.default_rng([seed, 777])
    gen = torch.Generator().manual_seed(seed * 1000 + 777)
    scen = mk.sample_scenarios(rng, n, params)
    return interaction_metrics(_rollout(policy, scen, params, gen, rng), params, channel)


def collect_pairs(
    cfg: HindsightMarketConfig, params: mk.MarketParams, channel: str, trust: float, seed: int
) -> dict[str, Any]:
    """Two reference-seller rollouts per scenario, labelled by ``channel`` through the core hindsight teacher.

    Scenarios, actions and purchases depend on (seed, trust) only, so every channel labels the same pairs.
    """
    reference = ReferenceSeller(params, cfg.ref_truthful, cfg.ref_silent)
    rng = np.random.default_rng([seed, int(round(trust * 1000))])
    gen = torch.Generator().manual_seed(seed)
    scen = mk.sample_scenarios(rng, cfg.n_pairs, params)
    first = _rollout(reference, scen, params, gen, rng)
    second = _rollout(reference, scen, params, gen, rng)
    teacher = market_teacher(channel, params, judge_beta=cfg.judge_beta, flip_rate=cfg.flip_rate,
                             horizon=cfg.hindsight_horizon, reveal_prob=cfg.reveal_prob)
    labels = label_pairs(teacher, first, second, params, torch.Generator().manual_seed(seed * 7919 + 1))
    return {"scen": scen, "first": first, "second": second, "labels": labels}


def _order(first_wins: torch.Tensor, a: tuple[torch.Tensor, torch.Tensor],
           b: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair, ``a``'s action where the first side won, else ``b``'s: (recommend [B], claims [B, M])."""
    return torch.where(first_wins, a[0], b[0]), torch.where(first_wins[:, None], a[1], b[1])


def run_condition(
    cfg: HindsightMarketConfig, method: str, channel: str, trust: float, accuracy: float | None, seed: int
) -> dict[str, Any]:
    """Collect labelled pairs, train one seller, evaluate it. ``method='reference'`` evaluates the untrained seller."""
    torch.manual_seed(seed)
    params = market_params(cfg, trust, accuracy)
    reference = ReferenceSeller(params, cfg.ref_truthful, cfg.ref_silent)
    policy = SellerPolicy(reference, cfg.n_features + 2 * params.n_items, cfg.hidden)
    start, cpu_start = time.perf_counter(), time.process_time()
    extra: dict[str, float] = {}
    if method != "reference":
        data = collect_pairs(cfg, params, channel, trust, seed)
        scen, first, second, labels = data["scen"], data["first"], data["second"], data["labels"]
        extra = {k: float(v) for k, v in labels.metrics.items()}
        obs = _obs(scen, params)
        a1 = to_tensor_actions(first.recommend, first.claims)
        a2 = to_tensor_actions(second.recommend, second.claims)
        train_gen = torch.Generator().manual_seed(seed + 31)
        if method == "dpo":
            keep = labels.answered & (labels.labels != 0.5)
            first_wins = labels.labels[keep] > 0.5
            o = obs[keep]
            b1, b2 = (a1[0][keep], a1[1][keep]), (a2[0][keep], a2[1][keep])
            chosen, rejected = _order(first_wins, b1, b2), _order(first_wins, b2, b1)
            losses = train_dpo(policy, o, chosen, rejected, loss_name=cfg.dpo_loss, beta=cfg.beta, eps=cfg.dpo_eps,
                               steps=cfg.dpo_steps, batch_size=cfg.batch_size, lr=cfg.lr, gen=train_gen)
            extra.update({"train/pairs": float(keep.sum()), "train/loss_first": losses[0], "train/loss": losses[-1]})
        elif method == "ppo":
            rm = ActionRewardModel(obs.shape[1] + params.n_items + 1 + 3 * params.n_items, params.n_items, cfg.hidden)
            losses = train_reward_model(rm, obs, a1, a2, labels.labels.float(), labels.answered, steps=cfg.rm_steps,
                                        batch_size=cfg.batch_size, lr=cfg.lr, gen=train_gen)
            rm.requires_grad_(False)
            with torch.no_grad():
                ref_r = torch.cat([rm(obs, *a1), rm(obs, *a2)])
            mean, std = float(ref_r.mean()), float(ref_r.std()) + 1e-6
            ppo_rng = np.random.default_rng([seed, 4242])

            def sample_obs(n: int) -> torch.Tensor:
                return _obs(mk.sample_scenarios(ppo_rng, n, params), params)

            settings = PPOSettings(iterations=cfg.ppo_iterations, batch_size=cfg.ppo_batch, epochs=cfg.ppo_epochs,
                                   clip=cfg.ppo_clip, kl_coef=cfg.kl_coef, lr=cfg.lr)
            shaped = train_ppo(policy, lambda o, r, c: (rm(o, r, c) - mean) / std, sample_obs, settings, gen=train_gen)
            extra.update({"rm/loss": losses[-1], "ppo/shaped_reward_last": shaped[-1]})
        else:
            raise ValueError(f"method must be 'dpo', 'ppo' or 'reference', got {method!r}")
    policy.eval()
    metrics = evaluate(policy, params, channel, cfg.n_eval, seed)
    return {"method": method, "channel": channel, "trust": trust, "accuracy": accuracy, "seed": seed,
            "seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu_start, **metrics, **extra}


def conditions(cfg: HindsightMarketConfig) -> list[tuple[str, str, float, float | None, int]]:
    """Every (method, channel, trust, world-model accuracy, seed) the config asks for, without duplicates."""
    out: list[tuple[str, str, float, float | None, int]] = []

    def acc(ch: str) -> float | None:
        return cfg.world_model_accuracy if ch == "world_model_hindsight" else None

    trusts = sorted({cfg.trust, *cfg.trust_sweep})
    for seed in cfg.seeds:
        for t in trusts:
            out.append(("reference", "foresight", t, None, seed))
        for m in cfg.methods:
            for ch in cfg.channels:
                out.append((m, ch, cfg.trust, acc(ch), seed))
            for t in cfg.trust_sweep:
                for ch in cfg.trust_sweep_channels:
                    out.append((m, ch, t, acc(ch), seed))
            for a in cfg.accuracy_sweep:
                out.append((m, "world_model_hindsight", cfg.trust, a, seed))
    return list(dict.fromkeys(out))


def _mean_std(values: list[float]) -> tuple[float, ...]:
    """``(mean, std)`` over the finite values; ``(mean, std, n)`` when NaNs were left out (tables then say n=)."""
    finite = [v for v in values if v == v]  # NaN (e.g. a constant rating has no correlation) is left out
    if not finite:
        return float("nan"), float("nan")
    stat = (float(np.mean(finite)), float(np.std(finite)))
    return stat if len(finite) == len(values) else (*stat, float(len(finite)))


def _aggregate(rows: list[dict[str, Any]]) -> dict[tuple, dict[str, tuple[float, float]]]:
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["method"], r["channel"], r["trust"], r["accuracy"])].append(r)
    out = {}
    for key, rs in groups.items():
        out[key] = {m: _mean_std([r[m] for r in rs]) for m in METRICS}
        out[key]["n"] = (float(len(rs)), 0.0)
    return out


def _fmt(stat: tuple[float, ...]) -> str:
    return f"{stat[0]:+.2f} ± {stat[1]:.2f}" + (f" (n={int(stat[2])})" if len(stat) > 2 else "")


def tables(cfg: HindsightMarketConfig, rows: list[dict[str, Any]]) -> str:
    """Markdown tables: main (at ``cfg.trust``), trust sweep, world-model accuracy sweep (mean ± std over seeds)."""
    agg = _aggregate(rows)
    cols = ("rating", "foresight_rating", "hindsight_rating", "true_utility", "regret_rate", "deception_rate",
            "withholding_rate", "corr_rating_utility")
    head = "| method | feedback | " + " | ".join(cols) + " |\n|" + "---|" * (len(cols) + 2) + "\n"
    lines = [f"### Main table (trust τ = {cfg.trust}, {len(cfg.seeds)} seeds, mean ± std over seeds)\n", head]
    keys: list[tuple[str, str, float, float | None]] = [("reference", "foresight", cfg.trust, None)]
    keys += [(m, ch, cfg.trust, cfg.world_model_accuracy if ch == "world_model_hindsight" else None)
             for m in cfg.methods for ch in cfg.channels]
    for k in keys:
        if k in agg:
            name = "reference (untrained)" if k[0] == "reference" else k[0].upper()
            lines.append(f"| {name} | {'—' if k[0] == 'reference' else k[1]} | "
                         + " | ".join(_fmt(agg[k][c]) for c in cols) + " |\n")
    if cfg.trust_sweep:
        sc = ("rating", "true_utility", "deception_rate", "regret_rate")
        lines.append("\n### Trust sweep (τ = 0.5: claims ignored, the control)\n\n")
        lines.append("| τ | method | feedback | " + " | ".join(sc) + " |\n|" + "---|" * (len(sc) + 3) + "\n")
        for t in cfg.trust_sweep:
            for k in [("reference", "foresight", t, None)] + [(m, ch, t, None) for m in cfg.methods
                                                             for ch in cfg.trust_sweep_channels]:
                if k in agg:
                    lines.append(f"| {t} | {k[0]} | {'—' if k[0] == 'reference' else k[1]} | "
                                 + " | ".join(_fmt(agg[k][c]) for c in sc) + " |\n")
    if cfg.accuracy_sweep:
        sc = ("rating", "true_utility", "deception_rate", "regret_rate")
        lines.append(f"\n### World-model hindsight: accuracy sweep (τ = {cfg.trust})\n\n")
        lines.append("| a | method | " + " | ".join(sc) + " |\n|" + "---|" * (len(sc) + 2) + "\n")
        for a in cfg.accuracy_sweep:
            for m in cfg.methods:
                k = (m, "world_model_hindsight", cfg.trust, a)
                if k in agg:
                    lines.append(f"| {a} | {m} | " + " | ".join(_fmt(agg[k][c]) for c in sc) + " |\n")
    return "".join(lines)


def plots(cfg: HindsightMarketConfig, rows: list[dict[str, Any]], run_dir: Path) -> list[str]:
    """PNG plots: main bars, trust sweep and accuracy sweep (true utility and deception rate)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = _aggregate(rows)
    written = []
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    labels = ["reference"]
    keys: list[tuple[str, str, float, float | None]] = [("reference", "foresight", cfg.trust, None)]
    for m in cfg.methods:
        for ch in cfg.channels:
            labels.append(f"{m}\n{ch.replace('_hindsight', '')}")
            keys.append((m, ch, cfg.trust, cfg.world_model_accuracy if ch == "world_model_hindsight" else None))
    keys_labels = [(k, lab) for k, lab in zip(keys, labels) if k in agg]
    for ax, metric in zip(axes, ("rating", "true_utility", "deception_rate")):
        vals = [agg[k][metric] for k, _ in keys_labels]
        ax.bar(range(len(vals)), [v[0] for v in vals], yerr=[v[1] for v in vals], color="tab:blue")
        ax.set_xticks(range(len(vals)), [lab for _, lab in keys_labels], fontsize=7)
        ax.set_title(metric)
        ax.axhline(0, color="k", lw=0.5)
    fig.suptitle(f"HindsightMarket-v0, trust {cfg.trust}")
    fig.tight_layout()
    fig.savefig(run_dir / "main.png", dpi=120)
    plt.close(fig)
    written.append("main.png")
    for name, xs, keyf, series in (
        ("trust_sweep.png", cfg.trust_sweep, lambda m, ch, x: (m, ch, x, None),
         [(m, ch) for m in cfg.methods for ch in cfg.trust_sweep_channels]),
        ("accuracy_sweep.png", cfg.accuracy_sweep, lambda m, ch, x: (m, ch, cfg.trust, x),
         [(m, "world_model_hindsight") for m in cfg.methods]),
    ):
        if not xs:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
        for ax, metric in zip(axes, ("true_utility", "deception_rate")):
            for m, ch in series:
                pts = [(x, agg[keyf(m, ch, x)][metric]) for x in xs if keyf(m, ch, x) in agg]
                if pts:
                    ax.errorbar([p[0] for p in pts], [p[1][0] for p in pts], yerr=[p[1][1] for p in pts],
                                marker="o", capsize=3, label=f"{m} {ch}")
            ax.set_title(metric)
            ax.set_xlabel("trust τ" if name.startswith("trust") else "world-model accuracy a")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(run_dir / name, dpi=120)
        plt.close(fig)
        written.append(name)
    return written


def _run_in_worker(job: tuple[dict[str, Any], tuple]) -> dict[str, Any]:
    cfg_dict, cond = job
    cfg = HindsightMarketConfig.from_dict(cfg_dict)
    torch.set_num_threads(cfg.threads)
    return run_condition(cfg, *cond)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The complete rows of ``results.jsonl`` (:func:`mmalign.fileio.read_appended_rows`: a last line cut short by a
    kill is dropped from the file too, so the rows appended after it start on a line of their own)."""
    from mmalign.fileio import read_appended_rows

    return read_appended_rows(path)


def run(cfg: HindsightMarketConfig, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Run every condition (resuming from ``results.jsonl``), then write ``table.md`` and plots; return a summary."""
    torch.set_num_threads(cfg.threads)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    results_path = run_dir / "results.jsonl"
    rows = read_rows(results_path) if resume else []
    done = {(r["method"], r["channel"], r["trust"], r["accuracy"], r["seed"]) for r in rows}
    todo = [c for c in conditions(cfg) if c not in done]
    start = time.perf_counter()
    with results_path.open("a" if resume else "w") as fh:
        if cfg.workers > 1:
            # spawn, not fork: forking a process whose torch thread pools are running can deadlock
            from concurrent.futures import ProcessPoolExecutor
            from multiprocessing import get_context

            with ProcessPoolExecutor(cfg.workers, mp_context=get_context("spawn")) as pool:
                results = pool.map(_run_in_worker, [(cfg.to_dict(), c) for c in todo])
                for row in results:
                    rows.append(row)
                    fh.write(json.dumps(row) + "\n")
                    fh.flush()
        else:
            for cond in todo:
                row = run_condition(cfg, *cond)
                rows.append(row)
                fh.write(json.dumps(row) + "\n")
                fh.flush()
    wall = time.perf_counter() - start
    (run_dir / "table.md").write_text(tables(cfg, rows))
    written = plots(cfg, rows, run_dir) if cfg.plots else []
    agg = _aggregate(rows)
    cpu = sum(r.get("cpu_seconds", 0.0) for r in rows)
    summary: dict[str, Any] = {"wall_seconds": wall, "cpu_seconds_in_runs": cpu, "runs": len(rows),
                               "workers": cfg.workers, "plots": written}
    for (m, ch, t, a), stats in agg.items():
        if t == cfg.trust and (a is None or a == cfg.world_model_accuracy):
            for metric in ("rating", "true_utility", "deception_rate", "regret_rate"):
                summary[f"eval/{m}/{ch}/{metric}"] = stats[metric][0]
    return summary
