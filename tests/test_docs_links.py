"""The documentation's relative links resolve, and the ADR index lists every record."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
FENCE = re.compile(r"^[ \t]*(```|~~~).*?^[ \t]*\1", flags=re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"(`+).+?\1")
# [text](target), with an optional "title", 'title' or (title); <target with spaces>;
# the text may hold brackets. Reference-style links ([text][ref]) are not used here.
LINK = re.compile(
    r"\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)"
    r"""(?:\s+(?:"[^"]*"|'[^']*'|\([^)]*\)))?\s*\)"""
)


def _prose(document: Path) -> str:
    """The document without its fenced code blocks (a `#` there is a comment)."""
    return FENCE.sub("", document.read_text())


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading's anchor, with GitHub's `-1`, `-2` suffixes for repeats."""
    seen: Counter[str] = Counter()
    found: set[str] = set()
    for heading in re.findall(r"^#+ (.+)$", text, flags=re.MULTILINE):
        slug = _slug(heading)
        found.add(slug if seen[slug] == 0 else f"{slug}-{seen[slug]}")
        seen[slug] += 1
    return found


def broken_links(document: Path) -> list[str]:
    broken: list[str] = []
    for raw in LINK.findall(CODE_SPAN.sub("", _prose(document))):  # code spans are not links
        target = raw.strip("<>")
        if re.match(r"[a-z]+:", target):
            continue  # http:, https:, mailto:
        path, _, anchor = target.partition("#")
        base = ROOT if path.startswith("/") else document.parent
        linked = (base / unquote(path).lstrip("/")).resolve() if path else document
        missing_anchor = bool(anchor) and linked.suffix == ".md" and linked.exists()
        if not linked.exists() or (missing_anchor and anchor not in anchors(_prose(linked))):
            broken.append(target)
    return broken


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(document: Path) -> None:
    assert broken_links(document) == []


def test_the_link_check_sees_what_github_renders(tmp_path: Path) -> None:
    (tmp_path / "other doc.md").write_text("# Same\n\n# Same\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Top\n\n```sh\n# not a heading\n[x](fenced-links-are-not-checked.md)\n```\n\n"
        "1. a step\n\n   ```sh\n   [y](indented-fences-too.md)\n   ```\n\n"
        '[a](#top) [b](#not-a-heading) [c](nope.md "title") [d](<other doc.md#same-1>)\n'
        "[`k[0]`](gone.md) [e](other%20doc.md#same) [f](other%20doc.md#same-2)\n"
        "[g](single.md 'title') [h](paren.md (title)) `[code](not-a-link.md)`\n"
    )
    assert broken_links(page) == [
        "#not-a-heading",
        "nope.md",
        "gone.md",
        "other%20doc.md#same-2",
        "single.md",
        "paren.md",
    ]


def test_the_adr_index_lists_every_record() -> None:
    index = (ROOT / "docs" / "adr" / "README.md").read_text()
    records = sorted(p.name for p in (ROOT / "docs" / "adr").glob("[0-9][0-9][0-9][0-9]-*.md"))
    assert len(records) >= 4
    assert [name for name in records if f"({name})" not in index] == []
