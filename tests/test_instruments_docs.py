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


def test_readme_library_snippet_runs(tmp_path, monkeypatch):
    """The README's "Using the library" block runs as written (a new user copies it)."""
    readme = DOC.parent.parent / "README.md"
    text = readme.read_text()
    section = text[text.index("## Using the library"):]
    code = python_blocks(section)[0]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    exec(compile(code, "README.md library block", "exec"), namespace)
    assert namespace["out"].shape == namespace["h"].shape
