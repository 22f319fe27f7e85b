"""Run logging: a JSONL metrics file, TensorBoard scalars and PNG plots of the curves."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch

__all__ = ["MetricsLogger", "plot_metrics", "read_metrics"]


def _scalar(value: Any) -> float | None:
    if torch.is_tensor(value):
        if value.numel() != 1:
            return None
        value = value.detach().float().item()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _same(a: Any, b: float) -> bool:
    return a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


class MetricsLogger:
    """Appends ``{"step": s, name: value, ...}`` rows to ``metrics.jsonl`` and mirrors them to TensorBoard.

    A row is logged once per (step, metric names): logging the same names at a step the file already holds (e.g. the
    final evaluation again when a finished run is resumed) appends nothing; should the values differ, a warning
    says so and the first row stays.
    """

    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.enabled = enabled
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
            except ImportError:  # tensorboard is a declared dependency; keep logging to JSONL if it is absent
                self._tb = None
        self._logged: set[tuple[int, frozenset[str]]] = set()
        self._names: dict[frozenset[str], frozenset[str]] = {}  # one shared key set per kind of row
        if enabled:
            self._remember(read_metrics(self.path))

    def _key(self, step: int, names: Any) -> tuple[int, frozenset[str]]:
        names = frozenset(n for n in names if n != "step")
        return step, self._names.setdefault(names, names)

    def _remember(self, rows: list[dict[str, Any]]) -> None:
        self._logged = {self._key(row.get("step", 0), row) for row in rows}

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after ``step`` (used when resuming from a checkpoint at ``step``)."""
        if not self.enabled or not self.path.exists():
            return
        keep = [row for row in read_metrics(self.path) if row.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))
        self._remember(keep)

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
        row = {k: v for k, v in ((k, _scalar(v)) for k, v in metrics.items()) if v is not None}
        if not self.enabled:
            return row
        key = self._key(step, row)
        if key in self._logged:
            earlier = next((r for r in reversed(read_metrics(self.path)) if self._key(r.get("step", 0), r) == key), {})
            if any(not _same(earlier.get(k), v) for k, v in row.items()):
                warnings.warn(f"{self.path} already holds step {step}'s {sorted(row)} with other values; the first "
                              f"row is kept: {earlier} (now {row})", stacklevel=2)
            return row
        self._logged.add(key)
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"step": step, **row}) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
        return row

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metrics(metrics_path: Path, out_dir: Path) -> list[Path]:
    """One PNG per metric group (the part of the name before '/'), curves against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    series: dict[str, tuple[list[float], list[float]]] = {}
    for row in rows:
        for k, v in row.items():
            if k == "step" or not isinstance(v, (int, float)):
                continue
            xs, ys = series.setdefault(k, ([], []))
            xs.append(row["step"])
            ys.append(v)
    groups: dict[str, list[str]] = {}
    for name in series:
        groups.setdefault(name.split("/")[0] if "/" in name else "misc", []).append(name)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for group, names in sorted(groups.items()):
        fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3), squeeze=False)
        for ax, name in zip(axes[0], sorted(names)):
            xs, ys = series[name]
            ax.plot(xs, ys)
            ax.set_title(name)
            ax.set_xlabel("step")
        fig.tight_layout()
        path = out_dir / f"{group}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written
