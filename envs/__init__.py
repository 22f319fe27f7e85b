"""Gymnasium environments of mmalign, registered under the ``mmalign/`` namespace.

Installed as the package ``mmalign.envs`` (pyproject maps this folder to it). Importing it registers every id with
string entry points, so nothing heavy (mujoco) is imported until an env is made::

    import gymnasium as gym
    import mmalign.envs
    gym.register_envs(mmalign.envs)
    env = gym.make("mmalign/HindsightMarket-v0")
"""

from __future__ import annotations

from mmalign.envs.registration import register_envs

register_envs()
