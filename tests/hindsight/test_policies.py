"""Seller policies and the DPO / BT reward model / PPO trainers on the market."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmalign.hindsight import market as mk
from mmalign.hindsight.policies import (
    ActionRewardModel,
    PPOSettings,
    ReferenceSeller,
    SellerPolicy,
    log_prob,
    sample_actions,
    train_dpo,
    train_ppo,
    train_reward_model,
)

PARAMS = mk.MarketParams()


def setup(n: int = 256, seed: int = 0) -> tuple[SellerPolicy, torch.Tensor, mk.Scenarios]:
    torch.manual_seed(seed)
    ref = ReferenceSeller(PARAMS, truthful=0.6, silent=0.3)
    policy = SellerPolicy(ref, PARAMS.n_features + 2 * PARAMS.n_items, hidden=16)
    sc = mk.sample_scenarios(np.random.default_rng(seed), n, PARAMS)
    return policy, torch.as_tensor(mk.seller_observation(sc, PARAMS)), sc


def test_reference_claim_probabilities_and_policy_starts_at_reference() -> None:
    policy, obs, sc = setup()
    rec, claims = sample_actions(policy.reference, obs, torch.Generator().manual_seed(0))
    truthful = np.where(sc.status == 1, mk.CLAIM_HAS, mk.CLAIM_LACKS)
    assert (claims.numpy() == truthful).mean() == pytest.approx(0.6, abs=0.05)
    assert (claims.numpy() == mk.SILENT).mean() == pytest.approx(0.3, abs=0.05)
    torch.testing.assert_close(log_prob(policy, obs, rec, claims), log_prob(policy.reference, obs, rec, claims))
    with pytest.raises(ValueError, match="truthful"):
        ReferenceSeller(PARAMS, truthful=0.8, silent=0.3)


def test_dpo_raises_chosen_over_rejected() -> None:
    policy, obs, sc = setup()
    honest = (torch.full((256,), 3), torch.as_tensor(np.where(sc.status == 1, mk.CLAIM_HAS, mk.CLAIM_LACKS)))
    liar = (torch.full((256,), 3), torch.full((256, 3), mk.CLAIM_HAS))
    losses = train_dpo(policy, obs, honest, liar, steps=30, batch_size=64, lr=1e-2,
                       gen=torch.Generator().manual_seed(0))
    assert losses[0] == pytest.approx(float(np.log(2)), abs=1e-5) and losses[-1] < 0.5 * losses[0]
    gap = log_prob(policy, obs, *honest) - log_prob(policy, obs, *liar)
    ref_gap = log_prob(policy.reference, obs, *honest) - log_prob(policy.reference, obs, *liar)
    differ = ref_gap != 0  # honest == liar where every item has the feature
    assert bool((gap[differ] > ref_gap[differ]).all())


def test_reward_model_learns_preference_and_ppo_follows_it() -> None:
    policy, obs, sc = setup(512)
    gen = torch.Generator().manual_seed(1)
    first = sample_actions(policy.reference, obs, gen)
    second = sample_actions(policy.reference, obs, gen)
    silent = lambda a: (a[1] == mk.SILENT).sum(1).float()  # noqa: E731
    labels = (torch.sign(silent(first) - silent(second)) + 1) / 2  # teacher: more silence is better
    answered = torch.ones(512, dtype=torch.bool)
    m = PARAMS.n_items
    rm = ActionRewardModel(obs.shape[1] + m + 1 + 3 * m, m, hidden=32)
    losses = train_reward_model(rm, obs, first, second, labels, answered, steps=150, batch_size=128, lr=1e-2,
                                gen=gen)
    assert losses[-1] < 0.6 * losses[0]
    rm.requires_grad_(False)
    before = float(silent(sample_actions(policy, obs, gen)).mean())
    train_ppo(policy, lambda o, r, c: rm(o, r, c), lambda n: obs[:n], PPOSettings(iterations=15, batch_size=256,
              kl_coef=0.01, lr=1e-2), gen=gen)
    after = float(silent(sample_actions(policy, obs, gen)).mean())
    assert after > before + 0.5
