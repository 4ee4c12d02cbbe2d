"""Every ```python block of docs/instruments.md runs, in order, in one namespace (in a temporary
directory, so the figure it saves lands there)."""
from __future__ import annotations

from pathlib import Path

from markdown_it import MarkdownIt

DOC = Path(__file__).resolve().parent.parent / "docs" / "instruments.md"


def python_blocks(text: str) -> list[str]:
    return [t.content for t in MarkdownIt().parse(text) if t.type == "fence" and t.info.strip() == "python"]


def test_tutorial_snippets_run(tmp_path, monkeypatch, capsys):
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) >= 8
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "docs_instruments"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"{DOC.name} block {i}", "exec"), namespace)
    out = capsys.readouterr().out
    assert "['3.relu#0', '3.relu#1', '4.relu#0', '4.relu#1']" in out
    assert (tmp_path / "instruments_along_gradient.png").stat().st_size > 5000
    # the images the doc shows are the ones its code makes
    for line in DOC.read_text().splitlines():
        if line.startswith("![") and "](" in line:
            assert (DOC.parent / line.split("](")[1].rstrip(")")).exists()
