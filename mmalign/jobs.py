"""Registered jobs: what ``mmalign <domain> <job>`` runs.

A job is a pair of lazy targets: a config dataclass (a :class:`mmalign.config.Config`) and a function
``run(cfg, run_dir: pathlib.Path) -> dict`` that does the work, writes into ``run_dir`` and returns summary metrics.
Job names are ``<domain>.<job>``. Targets are import strings so that the CLI imports a domain only when it runs it.
"""

from __future__ import annotations

from mmalign.registry import JOBS


def job(name: str, run: str, config: str, summary: str, default_config: str | None = None) -> None:
    """Register a job; ``default_config`` is the YAML under ``configs/`` its docs and README point to."""
    JOBS.register(name, run, summary=summary, config=config, default_config=default_config)


job(
    "train.demo",
    "mmalign.train.demo:run",
    "mmalign.train.demo:DemoConfig",
    "DPO-family training of a tiny policy on generated preference pairs (exercises the trainer end to end)",
)
