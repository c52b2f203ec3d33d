"""Every relative link in the project's Markdown leads to a file that exists and, with an anchor, to a heading in it.

Study narratives moved from the README to benchmarks/RESULTS.md; a link left pointing at the old place would send a
reader nowhere, silently. Anchors follow GitHub's rule: the heading lowercased, punctuation dropped, spaces to
hyphens, a repeated heading numbered -1, -2, ...
"""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _prose(path: Path) -> list[str]:
    """The lines of a Markdown file outside fenced code blocks."""
    lines, fenced = [], False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def anchors(path: Path) -> set[str]:
    seen: Counter[str] = Counter()
    out = set()
    for line in _prose(path):
        heading = re.match(r"#{1,6} (.+)", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading[1].strip().lower()).replace(" ", "-")
            out.add(slug if not seen[slug] else f"{slug}-{seen[slug]}")
            seen[slug] += 1
    return out


def broken_links(path: Path) -> list[str]:
    broken = []
    for line in _prose(path):
        for target in LINK.findall(line):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.exists():
                broken.append(f"{target} (no file {dest.name} there)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{target} (no heading with that anchor)")
    return broken


def test_anchors_follow_githubs_rule(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("# Novelty from the encoder (`uncertainty.encoders`, opt-in)\n## Issue 13's targets\n"
                   "## Notes\n## Notes\n```\n# not a heading\n```\n")
    assert anchors(doc) == {"novelty-from-the-encoder-uncertaintyencoders-opt-in", "issue-13s-targets", "notes",
                            "notes-1"}
    doc.write_text("[ok](#notes) [gone](#nowhere) [file](missing.md) [web](https://example.org/#x)\n# Notes\n"
                   "```\n[in code](#nowhere)\n```\n")
    assert broken_links(doc) == ["#nowhere (no heading with that anchor)", "missing.md (no file missing.md there)"]


def test_every_relative_link_in_the_documents_resolves() -> None:
    tracked = subprocess.run(["git", "ls-files", "*.md"], cwd=REPO, capture_output=True, text=True).stdout.split()
    docs = [REPO / name for name in tracked] or sorted(REPO.glob("**/*.md"))
    assert REPO / "README.md" in docs and REPO / "benchmarks/RESULTS.md" in docs
    broken = {str(doc.relative_to(REPO)): found for doc in docs if (found := broken_links(doc))}
    assert not broken, broken
