"""Fixtures of the diffusion tests (one torch thread, tiny UNets)."""

from __future__ import annotations

import pytest
import torch

from diffusion_fixtures import tiny_sd_unet, tiny_sdxl_unet


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def sd_unet():
    return tiny_sd_unet()


@pytest.fixture
def sdxl_unet():
    return tiny_sdxl_unet()
