"""A small end-to-end preference-optimisation job that exercises the trainer on any DPO-family core loss.

A softmax policy over ``n_responses`` candidate answers, conditioned on a context vector, is tuned from generated
preference pairs (``prompt`` = context, ``chosen``/``rejected`` = answer ids) labelled by a hidden linear utility,
optionally with flipped labels. The reference policy is the initial policy; its log-probs are precomputed once.
Evaluation reports the true utility of the greedy answer on held-out contexts and the implicit-reward preference
accuracy on held-out clean pairs. Used by the trainer's tests (kill/resume, multi-process) and as a quick sanity
job: ``mmalign train demo loss=robust_dpo flip_rate=0.2 eps=0.2``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmalign.config import Config, check_positive, check_range, option
from mmalign.train.config import TrainerConfig


def _demo_trainer() -> TrainerConfig:
    return TrainerConfig(max_steps=200, batch_size=64, lr=3e-3, log_every=20, save_every=100, eval_every=100)


@dataclass
class DemoConfig(Config):
    """Settings of the ``train demo`` job."""

    loss: str = option("dpo", "registered DPO-family loss: dpo, ipo, cdpo or robust_dpo")
    beta: float = option(0.5, "KL temperature beta of the loss")
    eps: float = option(0.0, "assumed label flip rate (robust_dpo) or label smoothing (cdpo), in [0, 0.5)")
    flip_rate: float = option(0.0, "fraction of training labels flipped when the data are generated, in [0, 0.5)")
    n_pairs: int = option(4096, "number of generated training pairs")
    n_features: int = option(16, "dimension of the context vector")
    n_responses: int = option(32, "number of candidate responses the policy chooses from")
    hidden: int = option(64, "hidden width of the policy MLP")
    dropout: float = option(0.0, "dropout inside the policy MLP")
    data_seed: int = option(1234, "seed of the generated data (separate from trainer.seed)")
    trainer: TrainerConfig = option(factory=_demo_trainer, help="trainer settings")

    def __post_init__(self) -> None:
        if self.loss not in {"dpo", "ipo", "cdpo", "robust_dpo"}:
            raise ValueError(f"loss must be one of ['dpo', 'ipo', 'cdpo', 'robust_dpo'], got {self.loss!r}")
        check_positive("beta", self.beta)
        check_range("eps", self.eps, 0.0, 0.5, high_open=True)
        check_range("flip_rate", self.flip_rate, 0.0, 0.5, high_open=True)
        for name in ("n_pairs", "n_features", "n_responses", "hidden"):
            check_positive(name, getattr(self, name))
        check_range("dropout", self.dropout, 0.0, 1.0, high_open=True)


def _policy(cfg: DemoConfig) -> Any:
    import torch

    return torch.nn.Sequential(
        torch.nn.Linear(cfg.n_features, cfg.hidden),
        torch.nn.Tanh(),
        torch.nn.Dropout(cfg.dropout),
        torch.nn.Linear(cfg.hidden, cfg.n_responses),
    )


def make_data(cfg: DemoConfig) -> dict[str, Any]:
    """Generated contexts, answer embeddings, hidden utility and train/held-out pairs (explicit generator)."""
    import torch

    g = torch.Generator().manual_seed(cfg.data_seed)
    w = torch.randn(cfg.n_features, cfg.n_responses, generator=g) / cfg.n_features**0.5

    def pairs(n: int, flip: float) -> dict[str, torch.Tensor]:
        x = torch.randn(n, cfg.n_features, generator=g)
        a = torch.randint(cfg.n_responses, (n,), generator=g)
        b = (a + 1 + torch.randint(cfg.n_responses - 1, (n,), generator=g)) % cfg.n_responses
        u = x @ w
        first_better = u.gather(1, a[:, None])[:, 0] > u.gather(1, b[:, None])[:, 0]
        flipped = torch.rand(n, generator=g) < flip
        keep_order = first_better ^ flipped
        chosen, rejected = torch.where(keep_order, a, b), torch.where(keep_order, b, a)
        return {"prompt": x, "chosen": chosen, "rejected": rejected}

    return {"w": w, "train": pairs(cfg.n_pairs, cfg.flip_rate), "eval": pairs(1024, 0.0)}


class _PairDataset:
    def __init__(self, tensors: dict[str, Any]) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors["chosen"])

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {k: v[i] for k, v in self.tensors.items()}


def run(cfg: DemoConfig, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    import torch

    from mmalign.registry import LOSSES
    from mmalign.train.trainer import Trainer, seed_everything

    loss_fn_core = LOSSES.get(cfg.loss)
    data = make_data(cfg)
    seed_everything(cfg.trainer.seed)
    model = _policy(cfg)
    with torch.no_grad():
        ref_logp = torch.log_softmax(model.eval()(data["train"]["prompt"]), -1)
    train = dict(data["train"])
    train["ref_chosen"] = ref_logp.gather(1, train["chosen"][:, None])[:, 0]
    train["ref_rejected"] = ref_logp.gather(1, train["rejected"][:, None])[:, 0]
    extra: dict[str, Any] = {"beta": cfg.beta}
    if cfg.loss in {"cdpo", "robust_dpo"}:
        extra["eps"] = cfg.eps

    def loss_fn(m: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        logp = torch.log_softmax(m(batch["prompt"]), -1)
        pc = logp.gather(1, batch["chosen"][:, None])[:, 0]
        pr = logp.gather(1, batch["rejected"][:, None])[:, 0]
        kw = dict(extra)
        if cfg.loss == "ipo":
            kw["chosen_lengths"] = torch.ones_like(pc)
            kw["rejected_lengths"] = torch.ones_like(pr)
        return loss_fn_core(pc, pr, batch["ref_chosen"], batch["ref_rejected"], **kw)

    def eval_fn(m: torch.nn.Module) -> dict[str, float]:
        ev = data["eval"]
        logits = m(ev["prompt"])
        u = ev["prompt"] @ data["w"]
        greedy = u.gather(1, logits.argmax(-1, keepdim=True))[:, 0]
        acc = (logits.gather(1, ev["chosen"][:, None]) > logits.gather(1, ev["rejected"][:, None])).float().mean()
        return {"eval/true_utility": greedy.mean().item(), "eval/best_utility": u.max(-1).values.mean().item(),
                "eval/pref_accuracy": acc.item()}

    trainer = Trainer(cfg.trainer, model.train(), _PairDataset(train), loss_fn, run_dir, eval_fn=eval_fn)
    return trainer.train(resume=resume)
