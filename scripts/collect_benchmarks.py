"""Assemble docs/benchmarks.md from the per-area sections that the benchmark scripts write.

Each benchmark script writes its own section to docs/benchmarks/<area>.md (command, seeds, machine, table); this
script concatenates them, in a fixed order, under one header. Run: python scripts/collect_benchmarks.py
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["training", "core_losses", "core_teachers", "core_routing", "robotics_feedback", "robotics_cpl", "robotics_imitation",
         "robotics_overhead",
         "hindsight", "vision_lm", "diffusion", "visuomotor"]

HEADER = """# Benchmarks

Every number here was measured by a script in `scripts/`; each section names the command, seeds, machine and date.
Sections are written by their scripts into `docs/benchmarks/<area>.md` and collected here by
`python scripts/collect_benchmarks.py`. Unless a section says otherwise, the machine is a shared 2-core x86-64 CPU
(no GPU) on which other jobs were running at the same time, so absolute timings are noisy; ratios measured within one
run are the meaningful numbers.

"""


def main() -> None:
    parts = sorted((ROOT / "docs" / "benchmarks").glob("*.md"), key=lambda p: (
        ORDER.index(p.stem) if p.stem in ORDER else len(ORDER), p.stem))
    # sections link their images relative to docs/benchmarks/; the combined page lives one folder up
    body = "\n\n".join(re.sub(r"\]\((?!https?:|/|benchmarks/)([^)]+\.(?:png|gif|svg))\)", r"](benchmarks/\1)",
                                p.read_text().strip()) for p in parts)
    # the section markers belong to the per-area pages the scripts write; here they would only repeat (two areas
    # both have a "perf" section) and invite edits to a generated page
    body = re.sub(r"^<!-- [\w.-]+:(?:start|end) -->(?:\n|$)", "", body, flags=re.MULTILINE)
    (ROOT / "docs" / "benchmarks.md").write_text(HEADER + body + "\n")
    print(f"wrote docs/benchmarks.md from {len(parts)} sections: {', '.join(p.stem for p in parts)}")


if __name__ == "__main__":
    main()
