"""The docs cannot rot: their Python snippets run, their links resolve, their pages stay within their word budgets.

Snippet convention (docs/guide/*.md and docs/methods/*.md): every fenced block whose info string is exactly
``python`` runs, the blocks of one page in order in one namespace, in a temporary working directory, offline, on
the CPU. A block that needs the Hub, a GPU or minutes carries ``<!-- not-run: <reason> -->`` on the line directly
above its fence (blank lines between are allowed) and is skipped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SNIPPET_PAGES = sorted([*DOCS.glob("guide/*.md"), *DOCS.glob("methods/*.md")])
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})(.*)$")
NOT_RUN = re.compile(r"^<!--\s*not-run:\s*\S.*-->\s*$")
# [text](target) and ![alt](target); the target ends at whitespace or ")" (titles "..." are allowed after a space)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
BUDGETS = {"README.md": 1500, "docs/methods/*.md": 1500, "docs/benchmarks/*.md": 3000}


@dataclass
class Block:
    info: str
    line: int  # 1-based line of the first code line
    code: str
    skip_reason: str | None


def fenced_blocks(text: str) -> list[Block]:
    """Every fenced code block of a Markdown page, with the ``not-run`` reason written above it (if any)."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = m.group(1), m.group(2), m.group(3).strip()
        prev = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        skip = prev if NOT_RUN.match(prev) else None
        body, j = [], i + 1
        while j < len(lines) and not (lines[j].strip().startswith(fence[0] * len(fence))
                                      and lines[j].strip().strip(fence[0]) == ""):
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j])
            j += 1
        if j == len(lines):
            raise AssertionError(f"unclosed code fence opened on line {i + 1}")
        blocks.append(Block(info, i + 2, "\n".join(body) + "\n", skip))
        i = j + 1
    return blocks


def test_fenced_blocks_parser() -> None:
    page = ("text\n```python\na = 1\n```\n\n<!-- not-run: needs the Hub -->\n\n```python\nb = 2\n```\n"
            "```bash\nls\n```\n````python\nc = '```'\n````\n")
    blocks = fenced_blocks(page)
    assert [(b.info, b.line, b.code, b.skip_reason is not None) for b in blocks] == [
        ("python", 3, "a = 1\n", False), ("python", 9, "b = 2\n", True), ("bash", 12, "ls\n", False),
        ("python", 15, "c = '```'\n", False)]
    with pytest.raises(AssertionError, match="unclosed"):
        fenced_blocks("```python\nx = 1\n")


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


@pytest.mark.parametrize("page", SNIPPET_PAGES, ids=_rel)
def test_page_snippets_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = [b for b in fenced_blocks(page.read_text()) if b.info == "python"]
    runnable = [b for b in blocks if b.skip_reason is None]
    if not runnable:
        pytest.skip(f"{_rel(page)} has no runnable python block")
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for block in runnable:
        # compiled under "page:line" so a traceback points at the page and line that broke
        code = compile(block.code, f"{_rel(page)}:{block.line}", "exec")
        try:
            exec(code, namespace)  # noqa: S102 - the repository's own documentation
        except Exception as err:
            raise AssertionError(f"{_rel(page)}: the python block starting on line {block.line} failed: "
                                 f"{type(err).__name__}: {err}") from err


def _markdown_pages() -> list[Path]:
    return sorted([ROOT / "README.md", *DOCS.rglob("*.md")])


def test_relative_links_resolve() -> None:
    broken = []
    for page in _markdown_pages():
        text = page.read_text()
        # links inside code blocks are code, not links
        for block in fenced_blocks(text):
            text = text.replace(block.code, "")
        for target in LINK.findall(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # absolute URL (https:, mailto:) or an anchor on the same page
            path = target.split("#", 1)[0]
            if not (page.parent / path).exists():
                broken.append(f"{_rel(page)}: ({target})")
    assert not broken, "relative links that resolve to nothing:\n" + "\n".join(broken)


def test_link_pattern() -> None:
    assert LINK.findall('see [a](x.md#y), ![p](img/p.png "t") and [u](https://e.org)') == [
        "x.md#y", "img/p.png", "https://e.org"]


def _words(path: Path) -> int:
    return len(path.read_text().split())  # what `wc -w` counts


@pytest.mark.parametrize("pattern,limit", BUDGETS.items())
def test_word_budgets(pattern: str, limit: int) -> None:
    pages = sorted(ROOT.glob(pattern))
    assert pages, f"no page matches {pattern}"
    over = {_rel(p): n for p in pages if (n := _words(p)) > limit}
    assert not over, f"pages over the {limit}-word budget of {pattern}: {over}"


def test_docs_have_no_generated_concatenation() -> None:
    # one page per area, linked from docs/benchmarks/README.md; a concatenation would be the same text twice
    assert not (DOCS / "benchmarks.md").exists()
    index = (DOCS / "benchmarks" / "README.md").read_text()
    for page in sorted((DOCS / "benchmarks").glob("*.md")):
        if page.name != "README.md":
            assert f"({page.name})" in index, f"docs/benchmarks/README.md does not link {page.name}"

