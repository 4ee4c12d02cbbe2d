"""Text from experiments (notes, docstrings, definitions) and docs/claims.md rendered as Markdown.

markdown-it-py (CommonMark) in safe mode: raw HTML in the text is escaped, never passed through;
links with an unsafe scheme (javascript:, ...) are refused by markdown-it; links to other sites are
written as their text followed by the address, so the report never references anything outside
itself. RST-style ``double backticks`` are code spans in CommonMark too, so docstrings written for
Sphinx render without leftover markup.

    render_markdown("Choices:\\n\\n* Data: ``mnist``")   -> Markup('<p>Choices:</p>\\n<ul>...')
    render_inline("the ``lr`` field")                    -> Markup('the <code>lr</code> field')
    doc = render_claims(text)                            -> ClaimsDoc(html, anchors={"d8a", ...})
"""

from __future__ import annotations

import functools
import inspect
import re
from dataclasses import dataclass

from markupsafe import Markup

__all__ = ["ClaimsDoc", "claim_anchor", "claim_id_of", "render_claims", "render_inline", "render_markdown"]

# A claim id as the experiments write it: "D.8", "D.8a", "D.10", optionally followed by text.
_CLAIM_ID = re.compile(r"^\s*(D\.\d+[a-z]?)(?=$|[\s:.,)])")
# Explicit anchors in docs/claims.md (GitHub renders them): <a id="d8a"></a> or <a name="d8a"></a>
_RAW_ANCHOR = re.compile(r"""<a\s+(?:id|name)\s*=\s*["']([A-Za-z0-9_.-]+)["']\s*>\s*</a>""")
_ANCHOR_MARK = "BNLABANCHOR{}BNLABEND"
_ANCHOR_MARK_RE = re.compile(r"BNLABANCHOR([A-Za-z0-9_.-]+)BNLABEND")
ANCHOR_PREFIX = "claims-"  # ids of the embedded claims document, kept apart from the report's own


@functools.lru_cache(maxsize=1)
def _md():
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False, "typographer": False}).enable("table")


def _external(href: str) -> bool:
    return href.startswith(("http:", "https:", "//", "ftp:", "mailto:"))


def _unlink_external(tokens) -> None:
    """Links to other sites become "text (address)": the page stays self-contained."""
    for tok in tokens:
        if tok.children:
            stack: list[str | None] = []
            for child in tok.children:
                if child.type == "link_open":
                    href = str(child.attrGet("href") or "")
                    stack.append(href if _external(href) else None)
                    if _external(href):
                        child.type, child.tag, child.content, child.attrs = "text", "", "", {}
                elif child.type == "link_close":
                    href = stack.pop() if stack else None
                    if href is not None:
                        child.type, child.tag, child.content = "text", "", f" ({href})"


def _render(text: str, inline: bool = False) -> str:
    md = _md()
    if inline:
        tokens = md.parseInline(text)
        _unlink_external(tokens)
        return md.renderer.render(tokens[0].children or [], md.options, {}) if tokens else ""
    tokens = md.parse(text)
    _unlink_external(tokens)
    return md.renderer.render(tokens, md.options, {})


def render_markdown(text: str | None) -> Markup:
    """Block Markdown (paragraphs, lists, code, tables) -> safe HTML. Docstring indentation is
    removed first (``inspect.cleandoc``)."""
    if not text:
        return Markup("")
    return Markup(_render(inspect.cleandoc(str(text))))


def render_inline(text: str | None) -> Markup:
    """One line of Markdown (code spans, emphasis) -> safe HTML without a paragraph."""
    if not text:
        return Markup("")
    return Markup(_render(" ".join(str(text).split()), inline=True))


def claim_id_of(row: dict) -> str | None:
    """The claim id of a verdict row: ``claim_id``, else a leading "D.8a" in ``claim``."""
    cid = row.get("claim_id")
    if cid:
        return str(cid)
    m = _CLAIM_ID.match(str(row.get("claim") or ""))
    return m.group(1) if m else None


def claim_anchor(claim_id: str) -> str:
    """The anchor docs/claims.md has for a claim id: "D.8a" -> "d8a"."""
    return re.sub(r"[^a-z0-9]", "", claim_id.lower())


@dataclass
class ClaimsDoc:
    html: Markup
    anchors: set[str]  # anchors (without ANCHOR_PREFIX) present in ``html``


def render_claims(text: str) -> ClaimsDoc:
    """docs/claims.md -> HTML whose claim anchors are ids ``claims-<anchor>``: explicit
    ``<a id="d8a"></a>`` anchors are kept (as empty spans), and a heading that starts with a claim
    id ("## D.8a ...") gets that claim's anchor."""
    md = _md()
    anchors: set[str] = set()

    def mark(m: re.Match) -> str:
        anchors.add(m.group(1).lower())
        return _ANCHOR_MARK.format(m.group(1).lower())

    tokens = md.parse(_RAW_ANCHOR.sub(mark, text))
    _unlink_external(tokens)
    for i, tok in enumerate(tokens):
        if tok.type == "heading_open" and i + 1 < len(tokens):
            m = _CLAIM_ID.match(tokens[i + 1].content)
            if m:
                anchor = claim_anchor(m.group(1))
                if anchor not in anchors:
                    anchors.add(anchor)
                    tok.attrSet("id", ANCHOR_PREFIX + anchor)
    # Links inside the document ("[D.8a](#D.8a)") point at the prefixed ids of this embedded copy.
    for tok in tokens:
        for child in tok.children or []:
            href = str(child.attrGet("href") or "") if child.type == "link_open" else ""
            if href.startswith("#"):
                target = href[1:].lower()
                if target not in anchors and claim_anchor(target) in anchors:
                    target = claim_anchor(target)
                child.attrSet("href", "#" + ANCHOR_PREFIX + target)
    html = md.renderer.render(tokens, md.options, {})
    # A marker alone in a paragraph becomes an empty anchor span.
    html = re.sub(r"<p>\s*((?:BNLABANCHOR[A-Za-z0-9_.-]+BNLABEND\s*)+)</p>",
                  lambda m: "".join(f'<span id="{ANCHOR_PREFIX}{a}"></span>'
                                    for a in _ANCHOR_MARK_RE.findall(m.group(1))), html)
    html = _ANCHOR_MARK_RE.sub(lambda m: f'<span id="{ANCHOR_PREFIX}{m.group(1)}"></span>', html)
    return ClaimsDoc(Markup(html), anchors)
