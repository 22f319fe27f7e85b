"""The ``Examples`` sections of the public API's docstrings run and print what they show (doctest)."""

from __future__ import annotations

import doctest
import importlib
import inspect

import pytest

from mmalign.core import losses

MODULES = [
    "mmalign.core.losses.preference",
    "mmalign.core.losses.dpo",
    "mmalign.core.losses.flip_rate",
    "mmalign.core.losses.cpl",
    "mmalign.core.losses.diffusion",
    "mmalign.core.losses.rrpo",
    "mmalign.core.losses.realign",
    "mmalign.core.losses.gaussian",
    "mmalign.core.teachers.bpref",
    "mmalign.core.teachers.wrappers",
    "mmalign.core.reward_models.nets",
    "mmalign.core.reward_models.ensemble",
    "mmalign.core.reward_models.fit",
    "mmalign.robotics.ot",
    "mmalign.registry",
    "mmalign.timing",
    "mmalign.fileio",
    "mmalign.stats",
]


@pytest.mark.parametrize("name", MODULES)
def test_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no docstring examples"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {name} failed (printed above)"


@pytest.mark.parametrize("name", [n for n in losses.__all__ if n != "LOSS_FUNCTIONS"])
def test_every_core_loss_function_has_examples(name: str) -> None:
    assert ">>> " in (inspect.getdoc(getattr(losses, name)) or ""), f"{name} has no Examples section"
