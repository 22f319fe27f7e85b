"""Shared preference-learning cores: losses, reward models, simulated humans, query selection, metrics.

Imports torch and numpy only (a test enforces it).
"""
from mmalign.core import teachers  # noqa: F401  (registers TEACHERS)
from mmalign.core import losses  # noqa: F401  (registers LOSSES)
from mmalign.core import reward_models  # noqa: F401  (registers REWARD_MODELS)
from mmalign.core import query  # noqa: F401  (registers QUERY_SELECTORS)
from mmalign.core import metrics  # noqa: F401
