"""Check that every relative link in README.md and docs/**/*.md points to an existing file, and that
a #fragment into a Markdown file names one of its headings (GitHub's heading anchors).

    python scripts/check_doc_links.py          # prints each broken link; exit status 1 if any
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")  # [text](target); images are checked the same way below
IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~)")


def anchors(md: Path) -> set[str]:
    """GitHub's anchors for the headings of a Markdown file (lowercase, punctuation dropped, spaces to -)."""
    seen: dict[str, int] = {}
    out = set()
    in_fence = False
    for line in md.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        m = None if in_fence else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m[1].lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(md: Path):
    in_fence = False
    for no, line in enumerate(md.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        for m in list(LINK.finditer(line)) + list(IMAGE.finditer(line)):
            yield no, m[1]


def main() -> int:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    bad = []
    for md in files:
        for no, target in links(md):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path, _, frag = target.partition("#")
            dest = (md.parent / path).resolve() if path else md
            where = f"{md.relative_to(ROOT)}:{no}: {target}"
            if not dest.exists():
                bad.append(f"{where}: no such file")
            elif frag and dest.suffix == ".md" and frag not in anchors(dest):
                bad.append(f"{where}: no heading with anchor #{frag}")
    print("\n".join(bad) if bad else f"{len(files)} files: every relative link resolves")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
