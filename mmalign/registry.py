"""One small registry of pluggable parts: losses, teachers, reward models, query selectors, jobs.

Entries map a name to a callable/class, or to a lazy import string ``"package.module:attr"`` that is resolved on
first use, so ``mmalign list`` and config validation never import heavy libraries. Registering a name twice is an
error. Gymnasium environments are *not* kept here: they live in gymnasium's own registry under ``mmalign/``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

__all__ = [
    "Registry",
    "Entry",
    "LOSSES",
    "TEACHERS",
    "REWARD_MODELS",
    "QUERY_SELECTORS",
    "JOBS",
    "REGISTRIES",
    "load_all",
    "resolve",
]


def resolve(target: str) -> Any:
    """Import ``"package.module:attr"`` (or ``"package.module.attr"``) and return the attribute."""
    if ":" in target:
        module_name, attr = target.split(":", 1)
    else:
        module_name, _, attr = target.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"lazy target must look like 'package.module:attr', got {target!r}")
    module = importlib.import_module(module_name)
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass
class Entry:
    """One registered part: its name, the object or lazy import string, a one-line summary and extra fields."""

    name: str
    target: Any
    summary: str = ""
    extra: dict | None = None

    def load(self) -> Any:
        if isinstance(self.target, str):
            self.target = resolve(self.target)
        return self.target


class Registry:
    """Names to callables/classes for one kind of part; duplicate names raise ``ValueError``.

    Examples:
        >>> import torch
        >>> from mmalign.registry import LOSSES, Registry
        >>> loss, _ = LOSSES.get("dpo")(*[torch.zeros(2)] * 4)  # the DPO loss, looked up by its config name
        >>> round(loss.item(), 4)
        0.6931
        >>> parts = Registry("part")
        >>> @parts.register("double", summary="twice the input")
        ... def double(x):
        ...     return 2 * x
        >>> parts.get("double")(3), parts.names()
        (6, ['double'])
        >>> parts.register("late", "math:sqrt")  # a lazy target, imported on first use
        'math:sqrt'
        >>> parts.get("late")(9.0)
        3.0
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(
        self, name: str, target: Any = None, *, summary: str = "", **extra: Any
    ) -> Callable[[Any], Any] | Any:
        """Register ``target`` under ``name``; without ``target``, return a decorator.

        ``target`` may be an object or a lazy ``"package.module:attr"`` string.
        """
        if not name or not isinstance(name, str):
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")

        def _add(obj: Any) -> Any:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered ({self._entries[name].target!r})")
            doc = summary
            if not doc and not isinstance(obj, str):
                lines = (getattr(obj, "__doc__", None) or "").strip().splitlines()
                doc = lines[0] if lines else ""
            self._entries[name] = Entry(name, obj, doc, dict(extra) or None)
            return obj

        if target is None:
            return _add
        return _add(target)

    def entry(self, name: str) -> Entry:
        load_all()
        if name not in self._entries:
            known = ", ".join(sorted(self._entries)) or "none"
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {known}")
        return self._entries[name]

    def get(self, name: str) -> Any:
        """Return the registered object for ``name`` (resolving a lazy import string)."""
        return self.entry(name).load()

    def names(self) -> list[str]:
        load_all()
        return sorted(self._entries)

    def entries(self) -> Iterator[Entry]:
        load_all()
        for name in sorted(self._entries):
            yield self._entries[name]

    def __contains__(self, name: object) -> bool:
        load_all()
        return name in self._entries

    def __len__(self) -> int:
        load_all()
        return len(self._entries)


LOSSES = Registry("loss")
TEACHERS = Registry("teacher")
REWARD_MODELS = Registry("reward model")
QUERY_SELECTORS = Registry("query selector")
JOBS = Registry("job")

REGISTRIES: dict[str, Registry] = {
    "losses": LOSSES,
    "teachers": TEACHERS,
    "reward_models": REWARD_MODELS,
    "query_selectors": QUERY_SELECTORS,
    "jobs": JOBS,
}

# Modules whose import registers entries. They must be light (torch/numpy at most): heavy libraries are
# registered as lazy strings. Each domain adds its module here.
_PLUGIN_MODULES: tuple[str, ...] = (
    "mmalign.core",
    "mmalign.jobs",
)
_loaded = False


def load_all() -> None:
    """Import every plugin module once so that all registries are filled."""
    global _loaded
    if _loaded:
        return
    for module in _PLUGIN_MODULES:
        importlib.import_module(module)
    _loaded = True  # only once every import succeeded: a failed one is retried (and raises again) next time
