"""Config of the RLHS marketplace experiment (light module: dataclasses only, imported by ``mmalign ... --help``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from mmalign.config import Config, check_choice, check_positive, check_probability, check_range, option
from mmalign.train.config import TrainerConfig

__all__ = ["HindsightMarketConfig", "HindsightTextConfig", "METHODS", "CHANNELS"]

METHODS = ("dpo", "ppo")
CHANNELS = ("foresight", "partial_hindsight", "full_hindsight", "world_model_hindsight")


@dataclass
class HindsightMarketConfig(Config):
    """Seller trained with DPO and with a BT reward model + PPO on foresight vs hindsight feedback, plus sweeps."""

    seeds: list[int] = option([0, 1, 2, 3, 4], "seeds; each draws its own preference data, init and evaluation")
    methods: list[str] = option(["dpo", "ppo"], "training methods: dpo (offline pairs) and ppo (BT reward model + PPO)")
    channels: list[str] = option(
        ["foresight", "partial_hindsight", "full_hindsight"], "feedback channels of the main table (at trust)"
    )
    trust: float = option(0.8, "customer trust in claims for the main table (0.5 = claims ignored)")
    trust_sweep: list[float] = option([0.5, 0.8, 1.0], "trust values of the trust sweep ([] to skip)")
    trust_sweep_channels: list[str] = option(["foresight", "partial_hindsight"], "channels of the trust sweep")
    accuracy_sweep: list[float] = option(
        [0.5, 0.7, 0.9, 1.0], "world-model accuracies a of the world-model hindsight sweep, at trust ([] to skip)"
    )
    n_features: int = option(8, "K, number of possible required features")
    rationality: float = option(5.0, "customer's Boltzmann inverse temperature when deciding what to buy")
    rec_bonus: float = option(0.3, "extra appeal of the recommended item (scaled by 2*trust-1)")
    prior: float = option(0.5, "customer's belief that an item has the feature when the seller is silent")
    u_none: float = option(0.0, "true utility of not buying")
    regret_penalty: float = option(0.5, "full hindsight: rating penalty per unit of regret")
    lie_penalty: float = option(0.25, "full hindsight: rating penalty per claim revealed to be false")
    world_model_accuracy: float = option(0.8, "world-model accuracy when world_model_hindsight is in channels")
    hindsight_horizon: int = option(1, "consequence steps the hindsight teacher rolls forward")
    reveal_prob: float = option(1.0, "probability per consequence step that the bought item's feature shows")
    n_pairs: int = option(4000, "preference pairs per run (two reference actions per scenario)")
    judge_beta: float = option(math.inf, "judge rationality on score differences (.inf = rational, ties 0.5)")
    flip_rate: float = option(0.0, "probability that a pairwise label is flipped (annotator noise)")
    ref_truthful: float = option(0.6, "reference seller: probability of the true claim per item")
    ref_silent: float = option(0.3, "reference seller: probability of silence per item (the rest: false claim)")
    hidden: int = option(64, "hidden width of policy and reward-model MLPs")
    dpo_loss: str = option("dpo", "core DPO-family loss by registry name: dpo, ipo, cdpo or robust_dpo")
    beta: float = option(0.1, "DPO beta (KL temperature)")
    dpo_eps: float = option(0.0, "eps of cdpo / robust_dpo (assumed flip rate)")
    dpo_steps: int = option(200, "DPO optimizer steps")
    rm_steps: int = option(200, "reward-model optimizer steps")
    batch_size: int = option(256, "minibatch size of DPO and reward-model training")
    lr: float = option(3e-3, "Adam learning rate (DPO, reward model, PPO)")
    ppo_iterations: int = option(60, "PPO iterations (each samples ppo_batch fresh scenarios)")
    ppo_batch: int = option(512, "PPO rollouts per iteration")
    ppo_epochs: int = option(4, "PPO epochs per iteration")
    ppo_clip: float = option(0.2, "PPO ratio clip")
    kl_coef: float = option(0.1, "PPO per-sample KL penalty to the reference (plays DPO's beta)")
    n_eval: int = option(4000, "evaluation scenarios per run (actions sampled from the trained policy)")
    threads: int = option(1, "torch CPU threads per process")
    workers: int = option(1, "processes running conditions in parallel (spawned; 1 = in this process)")
    plots: bool = option(True, "write PNG plots into the run folder")

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ValueError("seeds must list at least one seed, got []")
        for m in self.methods:
            check_choice("methods[]", m, METHODS)
        for name in ("channels", "trust_sweep_channels"):
            for c in getattr(self, name):
                check_choice(f"{name}[]", c, CHANNELS)
        check_range("trust", self.trust, 0.5, 1.0)
        for t in self.trust_sweep:
            check_range("trust_sweep[]", t, 0.5, 1.0)
        for a in self.accuracy_sweep:
            check_probability("accuracy_sweep[]", a)
        check_probability("world_model_accuracy", self.world_model_accuracy)
        check_probability("prior", self.prior)
        check_range("reveal_prob", self.reveal_prob, 0.0, 1.0, low_open=True)
        check_range("flip_rate", self.flip_rate, 0.0, 0.5, high_open=True)
        check_range("dpo_eps", self.dpo_eps, 0.0, 0.5, high_open=True)
        check_choice("dpo_loss", self.dpo_loss, ("dpo", "ipo", "cdpo", "robust_dpo"))
        if not (self.judge_beta > 0):
            raise ValueError(f"judge_beta must be > 0 (.inf for a rational judge), got {self.judge_beta!r}")
        for name in ("n_features", "hidden", "n_pairs", "dpo_steps", "rm_steps", "batch_size", "ppo_iterations",
                     "ppo_batch", "ppo_epochs", "n_eval", "threads", "workers", "hindsight_horizon"):
            check_positive(name, getattr(self, name))
        for name in ("rationality", "beta", "lr", "ppo_clip"):
            check_positive(name, getattr(self, name))
        for name in ("rec_bonus", "regret_penalty", "lie_penalty", "kl_coef"):
            check_range(name, getattr(self, name), 0.0, math.inf, high_open=True)
        if not (0 < self.ref_truthful and 0 < self.ref_silent and self.ref_truthful + self.ref_silent < 1):
            raise ValueError(
                f"ref_truthful and ref_silent must be > 0 with sum < 1, got {self.ref_truthful} and {self.ref_silent}"
            )


def _sft_trainer() -> TrainerConfig:
    return TrainerConfig(max_steps=1500, batch_size=32, lr=3e-3, log_every=50, save_every=0, progress=False,
                         plots=False, lr_schedule="cosine", warmup_steps=20)


def _dpo_trainer() -> TrainerConfig:
    return TrainerConfig(max_steps=100, batch_size=32, lr=1e-3, log_every=25, save_every=0, progress=False,
                         plots=False)


def _text_market() -> HindsightMarketConfig:
    return HindsightMarketConfig(seeds=[0], n_pairs=1024, trust_sweep=[], accuracy_sweep=[])


@dataclass
class HindsightTextConfig(Config):
    """Text form: a tiny GPT-2 seller, SFT on the reference seller's replies, then DPO on foresight vs hindsight."""

    market: HindsightMarketConfig = option(
        factory=_text_market, help="market, feedback and pair settings (seeds, channels, trust, n_pairs, beta, ...)"
    )
    n_sft: int = option(4096, "reference-seller dialogues for supervised fine-tuning of the tiny LM")
    n_eval: int = option(100, "evaluation scenarios; each scores all (M+1)*3^M candidate replies")
    n_layer: int = option(2, "GPT-2 layers")
    n_embd: int = option(64, "GPT-2 width")
    sft: TrainerConfig = option(factory=_sft_trainer, help="trainer settings of the SFT stage")
    dpo: TrainerConfig = option(factory=_dpo_trainer, help="trainer settings of the DPO stage")

    def __post_init__(self) -> None:
        for name in ("n_sft", "n_eval", "n_layer", "n_embd"):
            check_positive(name, getattr(self, name))
        if self.n_embd % 2:
            raise ValueError(f"n_embd must be even (2 attention heads), got {self.n_embd}")
        for name in ("sft", "dpo"):
            strategy = getattr(self, name).distributed
            if strategy != "ddp":
                raise ValueError(
                    f"{name}.distributed must be 'ddp' for the text experiment, got {strategy!r}: it scores, copies "
                    "and evaluates its models outside the trainer, which a sharded model (fsdp, deepspeed) does not "
                    "allow; the tiny GPT-2 needs no sharding")
