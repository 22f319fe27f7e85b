"""Marked Markdown sections of the benchmark pages (scripts/doc_sections.py): replaced in place, appended when absent,
surrounding text kept."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))  # scripts import their helpers by name
from doc_sections import write_marked_section  # noqa: E402


def test_sections_are_replaced_in_place_and_text_around_them_survives(tmp_path: Path) -> None:
    page = tmp_path / "docs" / "bench.md"
    write_marked_section(page, "a", "first A", title="# Bench")
    assert page.read_text() == "# Bench\n\n<!-- a:start -->\nfirst A\n<!-- a:end -->\n"
    page.write_text(page.read_text() + "\nhand-written discussion\n")
    write_marked_section(page, "b", "first B")
    write_marked_section(page, "a", "second A\nwith two lines")
    text = page.read_text()
    assert "first A" not in text and "second A\nwith two lines" in text
    assert text.index("second A") < text.index("hand-written discussion") < text.index("first B")
    assert text.count("<!-- a:start -->") == 1 and text.count("<!-- b:end -->") == 1


@pytest.mark.parametrize(
    "page",
    [
        "<!-- a:start -->\nstray\n\nhand-written\n\n<!-- a:start -->\nold\n<!-- a:end -->\n",  # a start copied
        "intro\n<!-- a:start -->\nold\n\nhand-written\n",  # the end marker lost
        "<!-- a:end -->\nhand-written\n<!-- a:start -->\nold\n",  # swapped
        "<!-- a:start -->\nold\n<!-- a:end -->\nhand-written\n<!-- a:start -->\nold\n<!-- a:end -->\n",  # twice
    ],
)
def test_broken_markers_are_refused_and_the_page_kept(tmp_path: Path, page: str) -> None:
    """Guessing would delete the hand-written text between a stray marker and the block (now or on the next run)."""
    path = tmp_path / "bench.md"
    path.write_text(page)
    with pytest.raises(ValueError, match="section 'a' needs one"):
        write_marked_section(path, "a", "new")
    assert path.read_text() == page


def test_body_holding_the_markers_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must not contain its own markers"):
        write_marked_section(tmp_path / "b.md", "a", "x\n<!-- a:end -->\ny")
    assert not (tmp_path / "b.md").exists()


def test_a_failed_write_leaves_the_page_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "bench.md"
    write_marked_section(path, "a", "first A", title="# Bench")
    before = path.read_text()
    with pytest.raises(UnicodeEncodeError):
        write_marked_section(path, "a", "bad \ud800 text")  # not encodable: fails while writing
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["bench.md"]  # no temporary file left behind
    path.chmod(0o640)  # neither mkstemp's 0o600 nor a new file's default 0o666 & ~umask (0o644 under umask 022)
    write_marked_section(path, "a", "second A")  # replaced through a temporary file: the page keeps its mode
    assert "second A" in path.read_text() and path.stat().st_mode & 0o777 == 0o640
