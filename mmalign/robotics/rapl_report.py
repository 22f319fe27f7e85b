"""Writes the sections of docs/benchmarks/visuomotor.md (used by scripts/bench_rapl.py, bench_pearl.py, bench_ot.py)."""

from __future__ import annotations

import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "benchmarks" / "visuomotor.md"
HEADER = "# Visuomotor rewards: RAPL and PEARL benchmarks\n\nEach section is written by the script it names.\n"


def machine() -> str:
    try:
        cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("Model name")), "?")
    except OSError:
        model = platform.processor() or "?"
    return f"{model}, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def write_section(name: str, body: str, doc: Path = DOC) -> None:
    """Insert or replace the section between ``<!-- name:start -->`` and ``<!-- name:end -->``."""
    from mmalign.reporting import write_marked_section

    write_marked_section(doc, name, body, HEADER)
