"""One self-contained HTML page (plots embedded as data URIs): a report to attach to a CI run.

Self-contained so it survives being downloaded as a single artifact; no scripts, every value escaped.
"""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..core.results import PairResult
from ..store.atomic import write_text
from . import figures, rows

# A plot for the page: a PNG file written earlier, or the PNG bytes themselves.
PlotSource = Path | bytes

_CSS = """
body{font-family:-apple-system,BlinkMacSystemFont,"Segoe UI",Helvetica,Arial,sans-serif;margin:24px;color:#1f2328;
     max-width:1400px}
h1{font-size:1.5em} h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #d0d7de;padding-bottom:.3em}
h3{font-size:1.05em;margin-top:1.4em}
table{border-collapse:collapse;margin:.5em 0 1em 0;font-size:13px}
th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f6f8fa} td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.failed td,tr.error td{background:#fff1f0} tr.skipped td{color:#6e7781}
tr.divergent td{background:#fff8c5} td.over{color:#cf222e;font-weight:600}
pre{margin:0;white-space:pre-wrap;font-size:12px;max-width:760px}
pre.error{background:#fff8c5;padding:8px;border:1px solid #d4a72c;max-width:none}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;color:#fff;font-weight:600;font-size:12px}
.badge.pass{background:#1a7f37} .badge.fail{background:#cf222e} .badge.error{background:#9a6700}
.badge.other{background:#6e7781} .meta{color:#57606a;font-size:13px} img{max-width:100%;border:1px solid #d0d7de}
.figures{display:flex;flex-wrap:wrap;gap:16px;margin:.5em 0 1em 0} svg.figure{border:1px solid #d0d7de;background:#fff}
summary{cursor:pointer;color:#57606a;font-size:13px}
.lead{border:1px solid #cf222e;background:#fff1f0;padding:6px 10px;margin:.4em 0} .lead pre{margin-top:4px;max-width:none}
"""


def _e(v: Any) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def _badge(h: rows.HeaderRow) -> str:
    cls = h.verdict if h.verdict in rows.MARKER else "other"
    return f'<span class="badge {cls}">{_e(h.marker)}</span>'


def _num_td(text: str, extra: str = "") -> str:
    return f'<td class="num{extra}">{_e(text)}</td>'


def _overview(headers: list[rows.HeaderRow]) -> list[str]:
    out = ['<table class="overview">',
           "<tr><th>verdict</th><th>pair</th><th>A → B</th><th>backends</th><th>bounds</th><th>NMSE</th>"
           "<th>KL mean</th><th>top-1</th><th>max rfn</th><th>first divergent layer</th><th>failed</th></tr>"]
    for i, h in enumerate(headers):
        cells = [
            f"<td>{_badge(h)}</td>",
            f'<td><a href="#pair-{i}">{_e(h.id)}</a></td>',
            f'<td title="{_e(h.model_a)} → {_e(h.model_b)}">{_e(h.short_a)} → {_e(h.short_b)}</td>',
            f"<td>{_e(h.backends)}</td>",
            f"<td>{_e(h.precision_class or '-')}</td>",
            _num_td(rows.fmt(h.nmse)),
            _num_td(rows.fmt(h.kl_mean)),
            _num_td(rows.fmt(h.top1, 4)),
            _num_td(h.max_rfn_text),
            f"<td>{_e(h.divergence)}</td>",
            _num_td(f"{h.failed} of {h.total}"),
        ]
        out.append(f'<tr class="{_e(h.verdict)}">' + "".join(cells) + "</tr>")
    out.append("</table>")
    return out


def _check_table(checks: list[rows.CheckRow]) -> list[str]:
    out = ['<table class="checks">',
           "<tr><th>outcome</th><th>check</th><th>value</th><th>bound</th><th>message</th></tr>"]
    for c in checks:
        out.append(f'<tr class="{_e(c.outcome)}"><td>{_e(c.outcome)}</td><td><code>{_e(c.id)}</code></td>'
                   f"{_num_td(c.value)}{_num_td(c.bound)}<td><pre>{_e(c.message)}</pre></td></tr>")
    out.append("</table>")
    return out


def _checks(p: PairResult) -> list[str]:
    """The items that did not pass, open; the passed and skipped ones folded away."""
    checks = rows.check_rows(p)
    if not checks:
        return ['<p class="meta">No checks.</p>']
    bad = [c for c in checks if c.outcome in ("failed", "error")]
    rest = [c for c in checks if c.outcome not in ("failed", "error")]
    out = _check_table(bad) if bad else []
    if rest:
        out += [f"<details><summary>{len(rest)} passed or skipped item{'s' if len(rest) != 1 else ''}</summary>",
                *_check_table(rest), "</details>"]
    return out


def _lead(pairs: list[PairResult], headers: list[rows.HeaderRow]) -> list[str]:
    """At the top of the page: each failed or errored pair with what failed first, so the reason is on the
    first screen however many pairs passed."""
    out = []
    for i, (p, h) in enumerate(zip(pairs, headers, strict=True)):
        if h.verdict == "pass":
            continue
        if h.error:
            why = h.error_line or ""
        else:
            first = next((c for c in p.checks if c.outcome in ("failed", "error")), None)
            why = f"{first.check_id}: {first.message}" if first else ""
        out.append(f'<div class="lead">{_badge(h)} <a href="#pair-{i}">{_e(h.id)}</a>'
                   f"<pre>{_e(why)}</pre></div>")
    return out


def _figures(p: PairResult) -> list[str]:
    drawn = [svg for svg in (figures.weights_map(p), figures.rfn_by_layer(p), figures.kl_by_position(p)) if svg]
    return ['<div class="figures">', *drawn, "</div>"] if drawn else []


def _layers(p: PairResult) -> list[str]:
    table = rows.layer_table(p)
    if table is None:
        return []
    out = ['<table class="layers">', "<tr>" + "".join(f"<th>{_e(c)}</th>" for c in table.columns) + "</tr>"]
    for r in table.rows:
        rfn, *rest = r.cells
        cells = [_num_td(f"{r.index}{' ← first divergent' if r.first_divergent else ''}"),
                 _num_td(rfn, " over" if r.over else "")] + [_num_td(c) for c in rest]
        tr = '<tr class="divergent">' if r.first_divergent else "<tr>"
        out.append(tr + "".join(cells) + "</tr>")
    out.append("</table>")
    if table.bound is not None:
        out.append(f'<p class="meta">rfn bound {_e(rows.fmt(table.bound))}; values above it in red.</p>')
    return out


def _metrics(p: PairResult) -> list[str]:
    metric = rows.metric_rows(p)
    if not metric:
        return []
    body = []
    for key, value in metric:
        td = f"<td>{_e(value)}</td>" if key in rows.TOPK_KEYS or key.startswith("llama: ") else _num_td(value)
        body.append(f"<tr><th>{_e(key)}</th>{td}</tr>")
    return ['<table class="metrics">', *body, "</table>"]


def _plot(h: rows.HeaderRow, plots: Mapping[str, PlotSource] | None) -> list[str]:
    if not plots or h.id not in plots:
        return []
    src = plots[h.id]
    if isinstance(src, bytes):
        data = src
    else:
        try:
            data = Path(src).read_bytes()
        except OSError as exc:
            return [f'<p class="meta">Plot {_e(src)} could not be read: {_e(exc)}</p>']
    b64 = base64.b64encode(data).decode("ascii")
    return [f'<img alt="rfn and KL plot for {_e(h.id)}" src="data:image/png;base64,{b64}">']


def _pair(i: int, p: PairResult, h: rows.HeaderRow, plots: Mapping[str, PlotSource] | None) -> list[str]:
    out = [f'<h2 id="pair-{i}">{_badge(h)} {_e(h.id)}</h2>']
    meta = f"bounds: {h.precision_class or '-'}; first divergent layer: {h.divergence}"
    if h.cached:
        meta += f"; {h.cache_text}"
    if h.failed_kinds and not h.error:
        meta += f"; failed: {', '.join(h.failed_kinds)}"
    on_a, on_b = (f" on {d}" if d else "" for d in (h.device_a, h.device_b))
    out.append(f'<p class="meta">A: {_e(h.model_a)} ({_e(p.backend_a)}{_e(on_a)})<br>'
               f"B: {_e(h.model_b)} ({_e(p.backend_b)}{_e(on_b)})<br>{_e(meta)}</p>")
    if h.notes:
        out.append('<ul class="notes">' + "".join(f"<li>{_e(n)}</li>" for n in h.notes) + "</ul>")
    if h.error:
        out.append(f'<pre class="error">{_e(h.error)}</pre>')
    out += ["<h3>Checks</h3>", *_checks(p)]  # what failed first, with its whole message
    out += _figures(p)
    out += _plot(h, plots)
    metrics = _metrics(p)
    if metrics:
        out += ["<h3>Metrics</h3>", *metrics]
    layers = _layers(p)
    if layers:
        out += ["<h3>Layers</h3>", *layers]
    return out


def render(pairs: list[PairResult], plots: Mapping[str, PlotSource] | None = None) -> str:
    """The page, failed and errored pairs first: an overview table, then per pair its failing items with
    their messages (passed ones folded), the pictures (weights map, rfn by layer, KL by position), its plot
    (when ``plots`` has one for the pair id), metrics and layer table."""
    pairs = sorted(pairs, key=lambda p: p.verdict == "pass")  # stable: otherwise in the order given
    headers = [rows.header_row(p) for p in pairs]
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           "<title>convdiff report</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
           "<h1>convdiff report</h1>", f'<p class="meta">{_e(rows.counts_line(pairs))}</p>']
    out += _lead(pairs, headers)
    out += _overview(headers)
    for i, (p, h) in enumerate(zip(pairs, headers, strict=True)):
        out += _pair(i, p, h, plots)
    out += ["</body>", "</html>"]
    return "\n".join(out) + "\n"


def write(path: str | os.PathLike[str], pairs: list[PairResult],
          plots: Mapping[str, PlotSource] | None = None) -> Path:
    """Render, then write atomically: a failure leaves the previous page (and no temporary file)."""
    path = Path(path)
    write_text(path, render(pairs, plots))
    return path
