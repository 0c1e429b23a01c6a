"""The ``convdiff summary`` section of the terminal report: a compact table per pair.

Lines only (no pytest here), so the plugin prints them and tests read them without a terminal.
"""

from __future__ import annotations

from ..core.results import PairResult
from . import rows

INDENT = " " * 6


def _header(h: rows.HeaderRow) -> str:
    where = (f"{h.backend_a}" + (f" on {h.device_a}" if h.device_a else "") + f" -> {h.backend_b}"
             + (f" on {h.device_b}" if h.device_b else ""))
    if h.precision_class:
        where += f", bounds: {h.precision_class}"
    if h.cached:
        where += f", {h.cache_text}"
    line = f"{h.marker:5} {h.id}  [{where}]"
    if h.failed_kinds and not h.error:
        line += f"  failed: {', '.join(h.failed_kinds)}"
    return line


def pair_lines(p: PairResult) -> list[str]:
    """One pair: header, per check group items/failed/worst value/bound, curves, divergence, notes, metrics."""
    h = rows.header_row(p)
    lines = [_header(h)]
    if h.error:
        lines.append(f"{INDENT}error: {h.error_line or ''}")
        return lines
    quality = rows.quality_line(p)
    if quality:  # where the user looks first: a correct file of poor quality passes, and says so here
        lines.append(f"{INDENT}{quality}")
    lines.append(f"{INDENT}{'check':<12}{'items':>7}{'failed':>8}  {'worst value':<22}{'bound':<10}")
    for g in rows.group_rows(p):
        lines.append(f"{INDENT}{g.name:<12}{g.items:>7}{g.failed:>8}  {g.worst:<22}{g.bound:<10}")
    curve = rows.layer_curve(p, "rfn")
    if curve:
        lines.append(f"{INDENT}rfn by layer  {curve}")
    swap = rows.layer_curve(p, "rfn_swap")
    if swap:
        lines.append(f"{INDENT}rfn, layer swap {swap}")
    if p.first_divergent_layer is not None:
        sub = f" ({p.divergent_sublayer} first)" if p.divergent_sublayer else ""
        lines.append(f"{INDENT}first divergent layer: {p.first_divergent_layer}{sub}")
    lines += [f"{INDENT}note: {note}" for note in h.notes]
    metrics = rows.metrics_line(p)
    if metrics:
        lines.append(f"{INDENT}{metrics}")
    return lines


def summary_lines(pairs: list[PairResult]) -> list[str]:
    """Every pair's lines, in the order given (the plugin passes command-line order)."""
    return [line for p in pairs for line in pair_lines(p)]
