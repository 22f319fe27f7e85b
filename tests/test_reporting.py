"""Marked Markdown sections: replaced in place, appended when absent, surrounding text kept."""

from pathlib import Path

from mmalign.reporting import write_marked_section


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
