"""What the bench scripts share: writing a generated table into a Markdown file between two markers."""

from __future__ import annotations

from pathlib import Path


def write_between(md: Path, begin: str, end: str, body: str) -> None:
    """Replace what lies between ``begin`` and ``end`` in ``md`` by ``body``; the rest of the file is kept."""
    text = md.read_text(encoding="utf-8")
    if begin not in text or end not in text:
        raise SystemExit(f"{md} has no {begin} ... {end} markers")
    head, rest = text.split(begin, 1)
    md.write_text(head + begin + "\n" + body + "\n" + end + rest.split(end, 1)[1], encoding="utf-8")
