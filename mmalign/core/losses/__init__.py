"""Core preference losses: pure functions ``(tensors...) -> (loss, detached metrics)``, registered in
:data:`mmalign.registry.LOSSES` under short names (``mmalign list`` shows them; trainers look them up by name).

| name | function | paper |
|---|---|---|
| ``bradley_terry`` | :func:`bradley_terry_loss` | Bradley & Terry 1952; margin (Llama 2), centring (Eisenstein 2023) |
| ``dpo`` | :func:`dpo_loss` | Rafailov et al. 2023 |
| ``ipo`` | :func:`ipo_loss` | Azar et al. 2023 |
| ``cdpo`` | :func:`conservative_dpo_loss` | Mitchell 2023 (label smoothing) |
| ``robust_dpo`` | :func:`robust_dpo_loss` | Chowdhury et al. 2024 |
| ``cpl`` | :func:`cpl_loss` | Hejna et al. 2024 |
| ``diffusion_dpo`` | :func:`diffusion_dpo_loss` | Wallace et al. 2024 |
| ``mapo`` | :func:`mapo_loss` | Hong et al. 2024 |
| ``rrpo`` | :func:`rrpo_loss` | Sarkar & Etemad 2025 |
| ``realign`` | :func:`realign_loss` | Xing et al. 2025 (Re-Align's "rDPO") |
| ``gaussian_bt`` | :func:`gaussian_bt_loss` | Liu et al. 2024 (PEARL's robust reward learning) |
"""

from __future__ import annotations

from mmalign.core.losses.cpl import cpl_loss, discounted_segment_score
from mmalign.core.losses.diffusion import diffusion_dpo_loss, mapo_loss, mapo_score
from mmalign.core.losses.dpo import conservative_dpo_loss, dpo_loss, ipo_loss, robust_dpo_loss
from mmalign.core.losses.flip_rate import estimate_flip_rate
from mmalign.core.losses.gaussian import gaussian_bt_loss, gaussian_pair_uncertainty
from mmalign.core.losses.preference import bradley_terry_loss
from mmalign.core.losses.realign import realign_loss, visual_dpo_loss
from mmalign.core.losses.rrpo import rrpo_loss, tokenwise_kl
from mmalign.registry import LOSSES

__all__ = [
    "bradley_terry_loss",
    "dpo_loss",
    "ipo_loss",
    "conservative_dpo_loss",
    "robust_dpo_loss",
    "estimate_flip_rate",
    "cpl_loss",
    "discounted_segment_score",
    "diffusion_dpo_loss",
    "mapo_loss",
    "mapo_score",
    "rrpo_loss",
    "tokenwise_kl",
    "visual_dpo_loss",
    "realign_loss",
    "gaussian_bt_loss",
    "gaussian_pair_uncertainty",
    "LOSS_FUNCTIONS",
]

#: Registry name -> loss function (also registered in ``mmalign.registry.LOSSES``).
LOSS_FUNCTIONS = {
    "bradley_terry": bradley_terry_loss,
    "dpo": dpo_loss,
    "ipo": ipo_loss,
    "cdpo": conservative_dpo_loss,
    "robust_dpo": robust_dpo_loss,
    "cpl": cpl_loss,
    "diffusion_dpo": diffusion_dpo_loss,
    "mapo": mapo_loss,
    "rrpo": rrpo_loss,
    "realign": realign_loss,
    "gaussian_bt": gaussian_bt_loss,
}

for _name, _fn in LOSS_FUNCTIONS.items():
    LOSSES.register(_name, _fn)
