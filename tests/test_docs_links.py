"""Every relative link in the README and the docs leads somewhere: the file exists and, for a
``#fragment`` into a Markdown file, a heading (by GitHub's slug rule) or an ``<a id=...>`` there
has that name. The docs cite benchmark outputs and each other's sections by link, so a renamed
heading or a moved file must not leave a dead link behind."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"#{1,6} (.+)")
EXPLICIT_ANCHOR = re.compile(r"<a (?:id|name)=\"([^\"]+)\"")


def heading_slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but ``-`` and ``_`` dropped, spaces
    as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The fragment names a Markdown text defines; a repeated heading's slug gets ``-1``, ``-2``."""
    names: set[str] = set(EXPLICIT_ANCHOR.findall(text))
    seen: dict[str, int] = {}
    in_code = False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        match = None if in_code else HEADING.match(line)
        if match:
            slug = heading_slug(match.group(1))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            names.add(slug if count == 0 else f"{slug}-{count}")
    return names


def dead_links(markdown: Path) -> list[str]:
    """The relative links in ``markdown`` whose file or fragment does not exist."""
    dead = []
    for target in LINK.findall(markdown.read_text()):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        destination = (markdown.parent / path).resolve() if path else markdown
        if not destination.exists():
            dead.append(f"{target} (no such file)")
        elif fragment and destination.suffix == ".md":
            if fragment not in anchors(destination.read_text()):
                dead.append(f"{target} (no such heading)")
    return dead


DOCUMENTS = [
    ROOT / "README.md",
    ROOT / "runs" / "README.md",
    *sorted((ROOT / "docs").rglob("*.md")),
]


@pytest.mark.parametrize("markdown", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_lead_to_files_and_headings(markdown: Path):
    assert dead_links(markdown) == []


def test_the_checker_finds_dead_files_and_headings(tmp_path: Path):
    (tmp_path / "other.md").write_text('# A heading (with `code`)\n<a id="kept"></a>\n## Again\n')
    page = tmp_path / "page.md"
    page.write_text(
        "# Top\n## Top\n"
        "[ok](other.md#a-heading-with-code) [ok](other.md#kept) [ok](#top-1) [ok](other.md)\n"
        "[web](https://example.org/x#y) [gone](missing.md) [gone](other.md#nothing)\n"
        "[gone](#top-2)\n"
    )
    assert dead_links(page) == [
        "missing.md (no such file)",
        "other.md#nothing (no such heading)",
        "#top-2 (no such heading)",
    ]
