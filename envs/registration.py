"""Every ``mmalign/`` gymnasium id, with its string entry point. A registered version never changes behaviour."""

from __future__ import annotations

from typing import Any

# id -> (entry point, kwargs for gymnasium.register). Each domain adds its ids here.
ENV_SPECS: dict[str, tuple[str, dict[str, Any]]] = {
    "mmalign/HindsightMarket-v0": ("mmalign.envs.hindsight_market:HindsightMarketEnv", {}),  # one step, ends itself
    "mmalign/HindsightMarketMultiTurn-v0": (
        "mmalign.envs.hindsight_market_multiturn:HindsightMarketMultiTurnEnv",
        {},  # ends itself after num_turns (a kwarg), so no fixed TimeLimit
    ),
}


# Push-and-avoid visuomotor task (RAPL/PEARL): two embodiments x two related layouts, state or pixel observations.
for _emb, _name in (("point", "PushAvoidPoint"), ("arm", "PushAvoidArm")):
    for _layout, _suffix in (("up", ""), ("right", "Right")):
        ENV_SPECS[f"mmalign/{_name}{_suffix}-v0"] = (
            "mmalign.envs.push_avoid_v0:PushAvoidEnv",
            {"kwargs": {"embodiment": _emb, "layout": _layout}},
        )


# Learned-reward wrapper (robotics PbRL): any Box task with its reward replaced by a reward-ensemble checkpoint.
# No TimeLimit here: the wrapped env_id brings its own.
ENV_SPECS["mmalign/LearnedReward-v0"] = ("mmalign.envs.learned_reward:LearnedRewardEnv", {})

def register_envs() -> None:
    """Register every id in :data:`ENV_SPECS` with gymnasium (idempotent)."""
    import gymnasium

    for env_id, (entry_point, kwargs) in ENV_SPECS.items():
        if env_id not in gymnasium.registry:
            gymnasium.register(id=env_id, entry_point=entry_point, **kwargs)
