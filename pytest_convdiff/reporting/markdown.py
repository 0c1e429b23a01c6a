"""GitHub-flavoured Markdown for ``$GITHUB_STEP_SUMMARY``: what a reviewer sees on the run page.

Values come from model paths, prompts and exception messages, so every cell is escaped: a ``|``
would split a table row, raw HTML would render.
"""

from __future__ import annotations

import html
import os
import re
from pathlib import Path
from typing import Any

from ..core.results import ERROR, PairResult
from . import rows

MAX_FAILED_LINES = 15


def _md(text: Any) -> str:
    """A table-cell / list-item safe string: no pipes, no raw HTML, one line."""
    s = " ".join(str(text).split())
    s = s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return s.replace("\\", "\\\\").replace("|", "\\|").replace("`", "'")


def _code(text: Any) -> str:
    """An inline code span; pipes still escaped (GFM tables split on them even inside code)."""
    s = " ".join(str(text).split()).replace("`", "'").replace("|", "\\|")
    return f"`{s}`"


def _fence(text: str) -> str:
    longest = max((len(m) for m in re.findall(r"`+|~+", text)), default=0)
    fence = "~" * max(3, longest + 1)
    return f"{fence}\n{text}\n{fence}"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def failed_lines(p: PairResult, limit: int = MAX_FAILED_LINES) -> list[str]:
    """The not-passed items as list lines, about ``limit`` at most, every check name represented."""
    bad = rows.check_rows(p, failed_only=True)
    if not bad:
        return []
    groups: dict[str, list[rows.CheckRow]] = {}
    for c in bad:
        groups.setdefault(c.name, []).append(c)
    per_group = max(1, (limit - len(groups)) // len(groups))
    lines: list[str] = []
    for name, checks in groups.items():
        for c in checks[:per_group]:
            what = "error" if c.outcome == ERROR else f"{c.value} (bound {c.bound})"
            msg = rows.first_line(c.message_line, 140)
            lines.append(f"- {_code(c.id)}: {what}" + (f" — {_md(msg)}" if msg else ""))
        if len(checks) > per_group:
            lines.append(f"- … and {len(checks) - per_group} more failing {_code(name)} checks")
    if len(lines) > limit + 1:
        rest = len(lines) - limit
        lines = lines[:limit] + [f"- … {rest} more lines left out"]
    return lines


def layer_lines(table: rows.LayerTable) -> list[str]:
    head = list(table.columns) + [""]
    out = [_row(head), "|" + "---:|" * (len(head) - 1) + "---|"]
    for r in table.rows:
        flags = (["**first divergent**"] if r.first_divergent else []) + (["> bound"] if r.over else [])
        out.append(_row([str(r.index), *r.cells, ", ".join(flags)]))
    return out


def _overview_cells(h: rows.HeaderRow) -> list[str]:
    return [
        f"**{_md(h.marker)}**",
        _code(h.id),
        _md(f"{h.short_a} → {h.short_b}"),
        _md(h.backends),
        _md(h.precision_class or "-"),
        rows.fmt(h.nmse),
        rows.fmt(h.kl_mean),
        rows.fmt(h.top1, 4),
        h.max_rfn_text,
        _md(h.divergence),
        f"{h.failed} of {h.total}",
    ]


def _details(p: PairResult, h: rows.HeaderRow) -> list[str]:
    out = ["", f"### {h.marker} {_code(h.id)}", ""]
    if h.error:
        out += ["Model error:", "", _fence("\n".join(h.error.splitlines()[:6])), ""]
    failed = failed_lines(p)
    if failed and not h.error:
        out += [f"Failed checks ({h.failed}):", ""] + failed
        if h.failed_kinds:
            out += ["", f"Kind of failure: {', '.join(h.failed_kinds)}."]
    elif failed:
        out.append(f"All {h.failed} checks of this pair report this error.")
    table = rows.layer_table(p)
    if table is not None:
        label = f"Per-layer rfn (first divergent layer: {h.divergence})" if h.divergence != "-" else "Per-layer rfn"
        out += ["", "<details>", f"<summary>{html.escape(label)}</summary>", ""]
        out += layer_lines(table)
        out += ["", "</details>"]
    return out


def render(pairs: list[PairResult]) -> str:
    """One table row per pair, then for every pair that did not pass its failed checks (about 15
    lines at most) and a collapsed layer table."""
    out = ["## convdiff summary", "", rows.counts_line(pairs), ""]
    if not pairs:
        return "\n".join(out) + "\n"
    headers = [rows.header_row(p) for p in pairs]
    out.append("| verdict | pair | A → B | backends | bounds | NMSE | KL mean | top-1 | max rfn "
               "| first divergent layer | failed |")
    out.append("|---|---|---|---|---|---:|---:|---:|---:|---|---:|")
    out += [_row(_overview_cells(h)) for h in headers]
    if any(h.notes for h in headers):
        out += ["", "Notes:", ""]
        out += [f"- {_code(h.id)}: {_md(note)}" for h in headers for note in h.notes]
    for p, h in zip(pairs, headers, strict=True):
        if h.verdict != "pass":
            out += _details(p, h)
    return "\n".join(out) + "\n"


def append(path: str | os.PathLike[str], pairs: list[PairResult]) -> Path:
    """Append to the step summary file (other steps write there too); rendered before the file is opened."""
    text = render(pairs)
    path = Path(path)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(text)
    return path
