"""seeded_global_rng: seeded draws from torch's global RNG that leave the caller's generators alone."""

import pytest
import torch

from mmalign.core.reward_models import RewardEnsemble
from mmalign.core.reward_models.nets import MLPRewardModel
from mmalign.core.rng import seeded_global_rng


def test_draws_inside_equal_draws_after_manual_seed_and_caller_state_is_restored():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    with seeded_global_rng(7):
        inside = torch.randn(5)
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.manual_seed(7)
    assert torch.equal(inside, torch.randn(5))


def test_no_cuda_seed_is_set_or_queued_before_cuda_is_initialised(monkeypatch):
    # torch.manual_seed inside fork_rng(devices=[]) calls torch.cuda.manual_seed_all, which (before CUDA starts)
    # queues the seed for later: the caller's CUDA RNG would be reseeded when CUDA initialises
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        pytest.skip("CUDA is initialised: covered by the CUDA test (fork_rng then restores every device)")
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(seed))
    with seeded_global_rng(3):
        torch.randn(2)
    assert calls == []
    ens = RewardEnsemble.build(lambda: MLPRewardModel(3, 1, hidden=(4,)), size=2, seed=5)
    assert len(ens) == 2 and calls == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_generators_are_seeded_inside_and_restored_after():
    torch.cuda.init()
    torch.cuda.manual_seed_all(11)
    before = torch.cuda.get_rng_state()
    with seeded_global_rng(4):
        inside = torch.randn(3, device="cuda")
    assert torch.equal(torch.cuda.get_rng_state(), before)
    torch.cuda.manual_seed(4)
    assert torch.equal(inside, torch.randn(3, device="cuda"))
