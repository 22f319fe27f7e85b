"""The registry: lazy entries, duplicate names rejected, listing."""

from __future__ import annotations

import pytest

from mmalign.registry import LOSSES, QUERY_SELECTORS, REGISTRIES, REWARD_MODELS, TEACHERS, Registry, resolve


def test_duplicates_are_errors() -> None:
    reg = Registry("thing")
    reg.register("a", len)
    with pytest.raises(ValueError, match="thing 'a' is already registered"):
        reg.register("a", max)


def test_lazy_targets_resolve_on_use() -> None:
    reg = Registry("thing")
    reg.register("sqrt", "math:sqrt", summary="square root")
    assert reg.entry("sqrt").target == "math:sqrt"
    assert reg.get("sqrt")(9.0) == 3.0
    with pytest.raises(KeyError, match="unknown thing 'nope'; registered: sqrt"):
        reg.get("nope")


def test_decorator_form_and_bad_targets() -> None:
    reg = Registry("thing")

    @reg.register("f")
    def f() -> int:
        """Returns one."""
        return 1

    assert reg.get("f") is f and reg.entry("f").summary == "Returns one."
    with pytest.raises(ValueError, match="lazy target must look like"):
        resolve("nodots")


def test_core_parts_are_registered() -> None:
    for name in ("bradley_terry", "dpo", "ipo", "cdpo", "robust_dpo", "cpl", "diffusion_dpo", "mapo", "rrpo"):
        assert name in LOSSES, name
    assert len(TEACHERS) >= 6 and len(REWARD_MODELS) >= 1
    assert {"uniform", "disagreement", "entropy", "routing"} <= set(QUERY_SELECTORS.names())
    assert set(REGISTRIES) == {"losses", "teachers", "reward_models", "query_selectors", "jobs"}


def test_every_registered_entry_resolves() -> None:
    for reg in REGISTRIES.values():
        for entry in reg.entries():
            assert callable(entry.load()), f"{reg.kind} {entry.name}"


def test_load_all_retries_after_a_failed_import(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # a failed plugin import must not leave the registries marked complete (later calls would be silently partial)
    import mmalign.registry as reg

    monkeypatch.setattr(reg, "_loaded", False)
    monkeypatch.setattr(reg, "_PLUGIN_MODULES", (*reg._PLUGIN_MODULES, "mmalign._no_such_plugin"))
    for _ in range(2):
        with pytest.raises(ModuleNotFoundError, match="_no_such_plugin"):
            reg.load_all()
    assert reg._loaded is False
