"""Three pictures per pair that say where it goes wrong, as inline SVG (no plotting library needed):

* the weights map: decoder layer × tensor role, each cell the tensor's score against what a correct
  conversion of A gives (1.0 is the bound: its twin, or the type's expected error where no twin exists);
* rfn by layer, with the attention and MLP sub-block outputs, the bound and the first divergent layer;
* KL by position bucket (mean and 99th percentile), where rope and window bugs grow.

Each function returns ``None`` when the pair has nothing to draw (no weights compared, no layers, ...).
"""

from __future__ import annotations

import html
import math
from typing import Any

from ..core.results import PairResult

__all__ = ["kl_by_position", "rfn_by_layer", "weights_map"]

_W, _H = 360, 220  # plot area of the line and bar charts
_PAD_L, _PAD_B, _PAD_T = 48, 34, 24
_COLOURS = {"rfn": "#0969da", "rfn_attn": "#bf8700", "rfn_mlp": "#8250df"}
_LABELS = {"rfn": "layer output", "rfn_attn": "attention", "rfn_mlp": "MLP"}


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def _cell_colour(score: float | None) -> str:
    """Green well inside the bound, yellow near it, red beyond it; grey when not scored."""
    if score is None:
        return "#eaeef2"
    if not math.isfinite(score) or score > 1.0:
        return "#cf222e"
    if score > 0.5:
        return "#d4a72c"
    return "#2da44e" if score > 0.1 else "#aceebb"


def weights_map(p: PairResult) -> str | None:
    """Layer × role cells from the weights items' per-tensor scores; None without a compared layer."""
    grid: dict[int, dict[str, float | None]] = {}
    for c in p.checks:
        if c.name != "weights" or not c.param.startswith("layer-"):
            continue
        scores = (c.details or {}).get("scores")
        if not isinstance(scores, dict):
            continue
        layer = int(c.param.split("-", 1)[1])
        grid[layer] = {role: (None if s is None else float(s)) for role, s in scores.items()}
    if not grid:
        return None
    roles = sorted({r for cells in grid.values() for r in cells})
    layers = sorted(grid)
    cw, ch, left, top = 26, 16, 150, 42
    width, height = max(left + cw * len(layers), left + 4 * 80) + 10, top + ch * len(roles) + 40
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="figure" width="{width}" height="{height}" '
           f'role="img" aria-label="weights map of {_e(p.id)}">',
           '<text x="4" y="16" font-size="12" font-weight="600">Weights against a correct conversion '
           '(1 = the bound)</text>']
    for j, layer in enumerate(layers):
        out.append(f'<text x="{left + cw * j + cw / 2}" y="{top - 4}" font-size="9" text-anchor="middle">{layer}</text>')
    for i, role in enumerate(roles):
        y = top + ch * i
        label = role.removesuffix(".weight")
        out.append(f'<text x="{left - 4}" y="{y + ch - 4}" font-size="9" text-anchor="end">{_e(label)}</text>')
        for j, layer in enumerate(layers):
            s = grid[layer].get(role, None) if role in grid[layer] else None
            shown = "not compared" if role not in grid[layer] else ("no score" if s is None else _fmt(s))
            out.append(f'<rect x="{left + cw * j}" y="{y}" width="{cw - 1}" height="{ch - 1}" '
                       f'fill="{_cell_colour(s)}"><title>layer {layer} {_e(label)}: {shown}</title></rect>')
    y = top + ch * len(roles) + 16
    for k, (text, colour) in enumerate((("≤ 0.1", "#aceebb"), ("≤ 0.5", "#2da44e"), ("≤ 1", "#d4a72c"),
                                        ("> 1 (fails)", "#cf222e"))):
        x = left + 80 * k
        out.append(f'<rect x="{x}" y="{y - 9}" width="10" height="10" fill="{colour}"/>'
                   f'<text x="{x + 14}" y="{y}" font-size="9">{_e(text)}</text>')
    out.append(f'<text x="{left}" y="{y + 14}" font-size="9">decoder layer →</text></svg>')
    return "".join(out)


def _axes(title: str, ymin: float, ymax: float, log: bool) -> tuple[list[str], Any]:
    """The frame, title and y ticks; returns the SVG parts and a function value -> y pixel."""
    lo, hi = (math.log10(ymin), math.log10(ymax)) if log else (ymin, ymax)
    if hi <= lo:
        hi = lo + 1.0

    def y_of(v: float) -> float:
        t = ((math.log10(v) if log else v) - lo) / (hi - lo)
        return _PAD_T + _H * (1.0 - min(1.0, max(0.0, t)))

    parts = [f'<text x="4" y="16" font-size="12" font-weight="600">{_e(title)}</text>',
             f'<rect x="{_PAD_L}" y="{_PAD_T}" width="{_W}" height="{_H}" fill="none" stroke="#d0d7de"/>']
    ticks = [10 ** k for k in range(math.floor(lo), math.ceil(hi) + 1)] if log else [lo + (hi - lo) * k / 4
                                                                                  for k in range(5)]
    for t in ticks:
        if (ymin <= t <= ymax) or not log:
            y = y_of(t)
            parts.append(f'<line x1="{_PAD_L - 3}" x2="{_PAD_L + _W}" y1="{y}" y2="{y}" stroke="#eaeef2"/>'
                         f'<text x="{_PAD_L - 5}" y="{y + 3}" font-size="9" text-anchor="end">{_fmt(t)}</text>')
    return parts, y_of


def _positive(values: list[Any]) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v) and v > 0]


def rfn_by_layer(p: PairResult) -> str | None:
    """rfn of each layer's output, and of its attention and MLP outputs, on a log scale."""
    layers = p.layers or []
    if not layers:
        return None
    series = {k: [layer.get(k) for layer in layers] for k in ("rfn", "rfn_attn", "rfn_mlp")
              if any(k in layer for layer in layers)}
    bound = (p.bounds or {}).get("rfn")
    pos = _positive([v for vals in series.values() for v in vals] + ([bound] if bound else []))
    if not pos:
        return None
    parts, y_of = _axes("rfn by layer (log)", min(pos) / 1.5, max(pos) * 1.5, log=True)
    n = len(layers)

    def x_of(i: int) -> float:
        return _PAD_L + (_W * (i + 0.5) / n)

    if bound and bound > 0:
        y = y_of(bound)
        parts.append(f'<line x1="{_PAD_L}" x2="{_PAD_L + _W}" y1="{y}" y2="{y}" stroke="#cf222e" '
                     f'stroke-dasharray="4 3"/><text x="{_PAD_L + _W - 2}" y="{y - 3}" font-size="9" '
                     f'text-anchor="end" fill="#cf222e">bound {_fmt(bound)}</text>')
    if p.first_divergent_layer is not None and p.first_divergent_layer < n:
        x = x_of(p.first_divergent_layer)
        parts.append(f'<line x1="{x}" x2="{x}" y1="{_PAD_T}" y2="{_PAD_T + _H}" stroke="#9a6700" '
                     f'stroke-dasharray="2 2"/><text x="{x + 3}" y="{_PAD_T + 10}" font-size="9" fill="#9a6700">'
                     f'first divergent: {p.first_divergent_layer}</text>')
    for k, (key, vals) in enumerate(series.items()):
        pts = [(x_of(i), y_of(float(v))) for i, v in enumerate(vals)
               if isinstance(v, (int, float)) and math.isfinite(v) and v > 0]
        if pts:
            parts.append(f'<polyline fill="none" stroke="{_COLOURS[key]}" stroke-width="1.6" points="'
                         + " ".join(f"{x:.1f},{y:.1f}" for x, y in pts) + '"/>')
        lx = _PAD_L + 110 * k
        parts.append(f'<rect x="{lx}" y="{_PAD_T + _H + 20}" width="10" height="3" fill="{_COLOURS[key]}"/>'
                     f'<text x="{lx + 14}" y="{_PAD_T + _H + 24}" font-size="9">{_LABELS[key]}</text>')
    step = max(1, n // 12)
    for i in range(0, n, step):
        parts.append(f'<text x="{x_of(i)}" y="{_PAD_T + _H + 11}" font-size="9" text-anchor="middle">{i}</text>')
    return _svg(p, "rfn by layer", parts)


def kl_by_position(p: PairResult) -> str | None:
    """Mean and 99th-percentile KL in each position bucket, on a log scale."""
    prof = ((p.metrics or {}).get("position_profile") or {}).get("all") or []
    buckets = [b for b in prof if b.get("positions")]
    if not buckets:
        return None
    pos = _positive([b.get("kl_mean") for b in buckets] + [b.get("kl_p99") for b in buckets])
    if not pos:
        return None
    parts, y_of = _axes("KL(P_A ‖ P_B) by position (log)", min(pos) / 1.5, max(pos) * 1.5, log=True)
    slot = _W / len(buckets)
    for i, b in enumerate(buckets):
        for k, (key, colour) in enumerate((("kl_mean", "#0969da"), ("kl_p99", "#a5d6ff"))):
            v = b.get(key)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                continue
            x = _PAD_L + slot * i + slot * (0.15 + 0.35 * k)
            y = y_of(float(v))
            parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{slot * 0.33:.1f}" height="{_PAD_T + _H - y:.1f}" '
                         f'fill="{colour}"><title>{_e(b["bucket"])}: {key.replace("kl_", "KL ")} {_fmt(v)} '
                         f'({b["positions"]} positions)</title></rect>')
        parts.append(f'<text x="{_PAD_L + slot * (i + 0.5):.1f}" y="{_PAD_T + _H + 11}" font-size="9" '
                     f'text-anchor="middle">{_e(b["bucket"])}</text>')
    for k, (text, colour) in enumerate((("mean", "#0969da"), ("99th percentile", "#a5d6ff"))):
        lx = _PAD_L + 110 * k
        parts.append(f'<rect x="{lx}" y="{_PAD_T + _H + 18}" width="10" height="8" fill="{colour}"/>'
                     f'<text x="{lx + 14}" y="{_PAD_T + _H + 26}" font-size="9">{text}</text>')
    return _svg(p, "KL by position", parts)


def _svg(p: PairResult, what: str, parts: list[str]) -> str:
    width, height = _PAD_L + _W + 12, _PAD_T + _H + _PAD_B
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="figure" width="{width}" height="{height}" role="img" '
            f'aria-label="{_e(what)} of {_e(p.id)}">' + "".join(parts) + "</svg>")

