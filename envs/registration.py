"""Every ``mmalign/`` gymnasium id, with its string entry point. A registered version never changes behaviour."""

from __future__ import annotations

from typing import Any

# id -> (entry point, kwargs for gymnasium.register). Each domain adds its ids here.
ENV_SPECS: dict[str, tuple[str, dict[str, Any]]] = {}


def register_envs() -> None:
    """Register every id in :data:`ENV_SPECS` with gymnasium (idempotent)."""
    import gymnasium

    for env_id, (entry_point, kwargs) in ENV_SPECS.items():
        if env_id not in gymnasium.registry:
            gymnasium.register(id=env_id, entry_point=entry_point, **kwargs)
