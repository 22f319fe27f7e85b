"""Reward models: per-step networks, ensembles, and Bradley–Terry fitting on segment pairs.

Usage::

    from mmalign.core.reward_models import MLPRewardModel, RewardEnsemble, SegmentPairs, fit_reward_model
    ens = RewardEnsemble.build(lambda: MLPRewardModel(obs_dim=17, act_dim=6), size=3, seed=0)
    result = fit_reward_model(ens, SegmentPairs(obs1, obs2, labels, act1, act2), config=RewardFitConfig(epochs=20))
    result.metrics["eval/pref_accuracy"]
    r = ens.aggregate_rewards(obs, act, mode="mean")          # relabel a replay buffer
    ens.save_pretrained("reward_model"); RewardEnsemble.from_pretrained("reward_model")  # config.json + safetensors
"""

from __future__ import annotations

from mmalign.core.reward_models.data import SegmentPairs
from mmalign.core.reward_models.ensemble import AGGREGATIONS, RewardEnsemble, aggregate
from mmalign.core.reward_models.fit import (
    FitResult,
    RewardFitConfig,
    evaluate,
    fit_reward_model,
    pair_logits,
    resolve_device,
)
from mmalign.core.reward_models.nets import CNNRewardModel, FeatureRewardHead, MLPRewardModel, RewardModel, make_mlp
from mmalign.core.reward_models.pretrained import load_pretrained, save_pretrained
from mmalign.registry import REWARD_MODELS

__all__ = [
    "RewardModel",
    "MLPRewardModel",
    "CNNRewardModel",
    "FeatureRewardHead",
    "RewardEnsemble",
    "aggregate",
    "AGGREGATIONS",
    "SegmentPairs",
    "RewardFitConfig",
    "FitResult",
    "fit_reward_model",
    "evaluate",
    "pair_logits",
    "resolve_device",
    "make_mlp",
    "save_pretrained",
    "load_pretrained",
]

REWARD_MODELS.register("mlp", MLPRewardModel)
REWARD_MODELS.register("cnn", CNNRewardModel)
REWARD_MODELS.register("feature_head", FeatureRewardHead)
REWARD_MODELS.register("ensemble", RewardEnsemble)
