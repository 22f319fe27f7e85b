"""Plots and the Markdown/HTML report of the robotics jobs (matplotlib, Agg backend, PNG files)."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["plot_curves", "plot_reward_scatter", "write_report", "markdown_table"]

_COLORS = ["tab:blue", "tab:orange", "tab:gray", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
           "tab:olive", "tab:cyan"]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(curves: dict[str, Sequence[dict[str, float]]], path: str | Path, *, title: str = "",
                key: str = "eval/true_return") -> Path:
    """Learning curves (mean ± std band over evaluation episodes or seeds) of ``key`` against env steps."""
    if len(curves) > len(_COLORS):  # zip would drop the curves past the palette without a word
        raise ValueError(f"plot_curves draws at most {len(_COLORS)} curves, got {len(curves)}: {list(curves)}")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for color, (name, rows) in zip(_COLORS, curves.items()):
        x = np.array([r["step"] for r in rows])
        y = np.array([r[key] for r in rows])
        s = np.array([r.get(key + "_std", 0.0) for r in rows])
        ax.plot(x, y, label=name, color=color, marker="o", ms=3)
        ax.fill_between(x, y - s, y + s, color=color, alpha=0.15)
    ax.set_xlabel("env steps")
    ax.set_ylabel("true return")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_reward_scatter(true_r: np.ndarray, learned_r: np.ndarray, path: str | Path, *, title: str = "") -> float:
    """Learned vs true reward per step (or per segment) with the Pearson correlation; returns the correlation."""
    plt = _plt()
    corr = float(np.corrcoef(true_r, learned_r)[0, 1]) if len(true_r) > 1 and np.std(learned_r) > 0 else math.nan
    fig, ax = plt.subplots(figsize=(4.6, 4.0), dpi=110)
    ax.scatter(true_r, learned_r, s=4, alpha=0.4)
    ax.set_xlabel("true reward")
    ax.set_ylabel("learned reward (ensemble mean)")
    ax.set_title(f"{title} (Pearson r = {corr:.3f})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return corr


def markdown_table(rows: list[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub Markdown table; floats printed with 3 significant decimals."""
    if not rows:
        return ""
    columns = list(columns or rows[0].keys())

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            if v.is_integer() and abs(v) < 1e9:
                return str(int(v))
            return "nan" if math.isnan(v) else f"{v:.3f}" if abs(v) < 1000 else f"{v:.1f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_report(run_dir: str | Path, title: str, sections: list[tuple[str, str]]) -> tuple[Path, Path]:
    """Write ``report.md`` and a self-contained ``report.html`` (images inlined) from (heading, markdown) sections.

    Images are referenced in the Markdown as ``![alt](file)``; the HTML inlines PNG/GIF files as data URIs so it
    can be opened or mailed on its own.
    """
    run_dir = Path(run_dir)
    md = [f"# {title}", ""]
    for heading, body in sections:
        md += [f"## {heading}", "", body, ""]
    md_path = run_dir / "report.md"
    md_path.write_text("\n".join(md))
    html_path = run_dir / "report.html"
    html_path.write_text(_to_html(run_dir, title, sections))
    return md_path, html_path


def _to_html(run_dir: Path, title: str, sections: list[tuple[str, str]]) -> str:
    import re

    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
           "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
           "td,th{border:1px solid #ccc;padding:2px 8px}code,pre{background:#f4f4f4}</style></head><body>",
           f"<h1>{html.escape(title)}</h1>"]
    for heading, body in sections:
        out.append(f"<h2>{html.escape(heading)}</h2>")
        lines = body.splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            if line.startswith("|"):
                rows = []
                while i < len(lines) and lines[i].startswith("|"):
                    if not set(lines[i].replace("|", "").strip()) <= {"-", " "}:
                        rows.append([c.strip() for c in lines[i].strip("|").split("|")])
                    i += 1
                cells = ["<tr>" + "".join(f"<{'th' if k == 0 else 'td'}>{html.escape(c)}</{'th' if k == 0 else 'td'}>"
                                          for c in row) + "</tr>" for k, row in enumerate(rows)]
                out.append("<table>" + "".join(cells) + "</table>")
                continue
            m = re.fullmatch(r"!\[(.*)\]\((.*)\)", line.strip())
            if m:
                img = run_dir / m.group(2)
                if img.is_file():
                    mime = "image/gif" if img.suffix == ".gif" else "image/png"
                    data = base64.b64encode(img.read_bytes()).decode()
                    out.append(f"<p><img alt='{html.escape(m.group(1))}' src='data:{mime};base64,{data}'></p>")
            elif line.startswith("```"):
                i += 1
                block = []
                while i < len(lines) and not lines[i].startswith("```"):
                    block.append(lines[i])
                    i += 1
                out.append("<pre>" + html.escape("\n".join(block)) + "</pre>")
            elif line.strip():
                out.append(f"<p>{html.escape(line)}</p>")
            i += 1
    out.append("</body></html>")
    return "\n".join(out)
