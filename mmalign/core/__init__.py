"""Shared preference-learning cores: losses, reward models, simulated humans, query selection, metrics.

Imports torch and numpy only (a test enforces it).
"""
