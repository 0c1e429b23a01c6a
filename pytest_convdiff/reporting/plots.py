"""One PNG per pair: rfn by layer (where it breaks) and the KL figures against their bounds.

matplotlib is an optional extra; it is imported only when a plot is drawn, so importing the
reporting package stays cheap and works without it.
"""

from __future__ import annotations

import io
import os
import re
import textwrap
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..core.results import PairResult
from ..errors import ConvdiffError
from ..store.atomic import write_bytes
from . import rows

_VERDICT_COLOUR = {"pass": "#1a7f37", "fail": "#cf222e", "error": "#9a6700"}
INSTALL_HINT = "pip install 'pytest-convdiff[plot]'"


class PlotDependencyError(ConvdiffError, ImportError):
    """matplotlib, needed for plots, is not installed."""


def require_matplotlib() -> None:
    """Raise :class:`PlotDependencyError` (naming the extra) before anything is drawn or written."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    except ImportError as exc:
        raise PlotDependencyError(f"convdiff plots need matplotlib, which is not installed: {INSTALL_HINT}.") from exc


def safe_name(pid: Any) -> str:
    """A file name from a pair id: ids hold paths, pipes and ``..``."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", str(pid)).strip("._-")
    return s[:120] or "pair"


def _positive(values: Iterable[Any]) -> list[float | None]:
    """Values a log axis can show (None where the value is missing, zero, negative or not finite)."""
    return [float(v) if rows.finite(v) and v > 0 else None for v in values]


def _mpl(text: str) -> str:
    """Text matplotlib shows as is (``$`` would start mathtext)."""
    return text.replace("$", r"\$")


def _wrap(text: str, width: int) -> list[str]:
    out: list[str] = []
    for line in text.splitlines() or [""]:
        out += textwrap.wrap(line, width) or [""]
    return out


def _plot_rfn(ax: Any, p: PairResult) -> None:
    layers = p.layers or []
    if not layers:
        ax.text(0.5, 0.5, "no per-layer hidden states", ha="center", va="center", transform=ax.transAxes,
                color="#666666")
        ax.set_axis_off()
        return
    xs = [layer.get("index", i) for i, layer in enumerate(layers)]
    bound = rows.rfn_bound(p)
    fdl = p.first_divergent_layer

    def line(values: Iterable[Any], **kw: Any) -> list[tuple[int, float]]:
        pts = [(x, y) for x, y in zip(xs, _positive(values), strict=True) if y is not None]
        if pts:
            ax.plot([x for x, _ in pts], [y for _, y in pts], **kw)
        return pts

    pts = line([layer.get("rfn") for layer in layers], color="#0969da", marker="o", lw=2.2, ms=6,
               label="rfn (layer output)", zorder=4)
    if any("rfn_attn" in layer for layer in layers):
        line([layer.get("rfn_attn") for layer in layers], color="#bf8700", marker="^", lw=1.2, ms=5,
             alpha=0.85, label="rfn_attn (attention out)", zorder=3)
    if any("rfn_mlp" in layer for layer in layers):
        line([layer.get("rfn_mlp") for layer in layers], color="#8250df", marker="s", lw=1.2, ms=4,
             alpha=0.85, label="rfn_mlp (MLP out)", zorder=3)
    styles = ("-.", (0, (1, 1)), (0, (5, 2, 1, 2)))
    extra = [k for k in rows.layer_keys(layers) if k.startswith("rfn_") and k not in ("rfn_attn", "rfn_mlp")]
    for j, key in enumerate(extra):  # e.g. rfn_swap: other per-layer comparisons the backend adds
        line([layer.get(key) for layer in layers], color="#1b7c83", ls=styles[j % len(styles)], lw=1.2,
             marker="x", ms=4, label=key, zorder=3)
    base = list(p.baseline_rfn or [])
    if base:
        bx = xs[: len(base)] if len(base) <= len(xs) else list(range(len(base)))
        bp = [(x, y) for x, y in zip(bx, _positive(base), strict=True) if y is not None]
        if bp:
            ax.plot([x for x, _ in bp], [y for _, y in bp], color="#6e7781", ls="--", lw=1.5, marker=".",
                    label="baseline rfn", zorder=2)
    if bound is not None and bound > 0:
        ax.axhline(bound, color="#cf222e", ls=":", lw=1.6, label=f"rfn bound {rows.fmt(bound)}", zorder=1)
        over = [(x, y) for x, y in pts if y > bound]
        if over:
            ax.scatter([x for x, _ in over], [y for _, y in over], s=90, facecolors="none",
                       edgecolors="#cf222e", linewidths=1.8, zorder=5, label="above bound")
    if fdl is not None:
        sub = p.divergent_sublayer
        ax.axvspan(fdl - 0.4, fdl + 0.4, color="#cf222e", alpha=0.10, zorder=0)
        ax.axvline(fdl, color="#cf222e", lw=1.0, alpha=0.6, zorder=0)
        # errors grow after the divergence, so the bottom next to the marker is free; the side away
        # from the right edge keeps the label inside the axes
        right_half = fdl > (min(xs) + max(xs)) / 2
        ax.annotate(f"first divergent: layer {fdl}" + (f"\n({sub} first)" if sub else ""),
                    xy=(fdl, 0.0), xycoords=("data", "axes fraction"), xytext=(-6 if right_half else 6, 6),
                    textcoords="offset points", ha="right" if right_half else "left", va="bottom",
                    fontsize=9, color="#cf222e", fontweight="bold")
    ax.set_yscale("log")
    shown = [y for ys in (_positive(line_.get_ydata()) for line_ in ax.get_lines()
                          if line_.get_transform() is ax.transData) for y in ys if y is not None]
    if shown:
        lo = min(shown + ([bound] if bound else []))
        hi = max(shown + ([bound] if bound else []))
        ax.set_ylim(lo / 2.5, hi * 2.5)
    ax.set_xticks(xs if len(xs) <= 40 else xs[:: max(1, len(xs) // 20)])
    ax.set_xlim(min(xs) - 0.6, max(xs) + 0.6)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("‖h_B − h_A‖ / ‖h_A‖  (log)")
    ax.set_title("Hidden-state error by layer", fontsize=10)
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.12)
    ax.legend(fontsize=7.5, loc="upper left", framealpha=0.85)


def _kl_info(p: PairResult) -> str:
    m = p.metrics or {}
    info = []
    t1 = rows.top1(p)
    if t1 is not None:
        info.append(f"top-1 {rows.fmt(t1, 4)}")
    if m.get("nmse") is not None:
        db = f" ({rows.fmt(m['nmse_db'])} dB)" if m.get("nmse_db") is not None else ""
        info.append(f"NMSE {rows.fmt(m['nmse'])}{db}")
    if m.get("ppl_ratio") is not None:
        info.append(f"PPL B/A {rows.fmt(m['ppl_ratio'], 5)}")
    return ("\n" + "  ·  ".join(info)) if info else ""


def _kl_hist(p: PairResult) -> tuple[list[float], list[float]] | None:
    """``metrics["kl_hist"] = {"edges": [...], "counts": [...]}`` when a backend kept the histogram."""
    hist = (p.metrics or {}).get("kl_hist")
    if isinstance(hist, dict) and hist.get("edges") and hist.get("counts") \
            and len(hist["edges"]) == len(hist["counts"]) + 1:
        return [float(e) for e in hist["edges"]], [float(c) for c in hist["counts"]]
    return None


def _plot_kl_hist(ax: Any, p: PairResult, edges: list[float], counts: list[float]) -> None:
    m = p.metrics or {}
    ax.stairs(counts, edges, fill=True, color="#0969da", alpha=0.6)
    if edges[0] > 0 and edges[-1] / edges[0] > 100:
        ax.set_xscale("log")
    if max(counts, default=0) > 0 and max(counts) / max(min(c for c in counts if c > 0), 1) > 100:
        ax.set_yscale("log")
    for key, colour, ls in (("kl_mean", "#1a7f37", "-"), ("kl_p99", "#bf8700", "--"), ("kl_max", "#cf222e", ":")):
        v = m.get(key)
        if rows.finite(v) and v > 0:
            ax.axvline(v, color=colour, ls=ls, lw=1.3, label=f"{key.replace('kl_', '')} {rows.fmt(v)}")
    ax.set_xlabel("KL(P_A ‖ P_B) per position")
    ax.set_ylabel("positions")
    ax.set_title("Per-position KL divergence" + _kl_info(p), fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7.5, loc="upper right")


def _plot_kl(ax: Any, p: PairResult) -> None:
    hist = _kl_hist(p)
    if hist is not None:
        _plot_kl_hist(ax, p, *hist)
        return
    m = p.metrics or {}
    vals = [(label, m[key]) for key, label in (("kl_mean", "mean"), ("kl_p99", "p99"), ("kl_max", "max"))
            if rows.finite(m.get(key))]
    if not vals:
        ax.text(0.5, 0.5, "no logits compared", ha="center", va="center", transform=ax.transAxes, color="#666666")
        ax.set_axis_off()
        return
    bounds = rows.kl_bounds(p)
    ys = list(range(len(vals)))[::-1]
    plotted = [max(v, 1e-12) for _, v in vals]
    colours = ["#cf222e" if bounds.get(label) is not None and v > bounds[label] else "#0969da" for label, v in vals]
    ax.barh(ys, plotted, color=colours, alpha=0.75, height=0.55)
    ax.set_xscale("log")
    ax.set_xlim(min(plotted + list(bounds.values())) / 10, max(plotted + list(bounds.values())) * 30)
    for (label, v), y, pv in zip(vals, ys, plotted, strict=True):
        ax.text(pv * 1.25, y, rows.fmt(v), va="center", fontsize=8.5)
        b = bounds.get(label)
        if b is not None:
            ax.plot([b, b], [y - 0.38, y + 0.38], color="#cf222e", lw=2)
            ax.text(b, y + 0.42, f"bound {rows.fmt(b)}", ha="center", va="bottom", fontsize=7.5, color="#cf222e")
    ax.set_yticks(ys)
    ax.set_yticklabels([f"KL {label}" for label, _ in vals])
    ax.set_ylim(-0.7, len(vals) - 0.2)
    ax.set_xlabel("KL(P_A ‖ P_B)  (log)")
    ax.set_title("KL divergence over all positions: mean, 99th percentile, max" + _kl_info(p), fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)


def _figure(p: PairResult) -> Any:
    from matplotlib.figure import Figure

    h = rows.header_row(p)
    fig = Figure(figsize=(12, 4.6), dpi=100, layout="constrained")
    fig.suptitle(_mpl(f"{h.marker}  {h.id}   ({h.failed} of {h.total} checks not passed)"),
                 fontsize=12, fontweight="bold", color=_VERDICT_COLOUR.get(h.verdict, "#333333"))
    sub = _mpl(f"A: {h.short_a}   →   B: {h.short_b}    [{h.backends}; bounds: {h.precision_class or '-'}]")
    if h.error:
        fig.text(0.5, 0.5, _mpl("Model error:\n" + "\n".join(_wrap(h.error, 110)[:12])), ha="center",
                 va="center", multialignment="left", fontsize=9, family="monospace", color="#9a6700")
        fig.text(0.5, 0.88, sub, ha="center", fontsize=9, color="#444444")
        return fig
    sf = fig.subfigures(1, 1)
    sf.suptitle(sub, fontsize=9, color="#444444")
    ax1, ax2 = sf.subplots(1, 2, gridspec_kw={"width_ratios": [1.25, 1]})
    _plot_rfn(ax1, p)
    _plot_kl(ax2, p)
    return fig


def render_png(p: PairResult) -> bytes:
    """One pair's figure as PNG bytes. Left: rfn per layer on a log axis (rfn_attn/rfn_mlp, other
    ``rfn_*`` series and the baseline when present), the rfn bound and the first divergent layer.
    Right: KL mean/p99/max against their bounds, or the KL histogram, with top-1, NMSE, PPL ratio."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = _figure(p)
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", facecolor="white")
    return buf.getvalue()


def plot_pairs(pairs: list[PairResult], out_dir: str | os.PathLike[str]) -> list[Path]:
    """One PNG per pair in ``out_dir`` (created), in the order of ``pairs``; returns the paths.

    Each file is rendered in memory, then written atomically; nothing is created without matplotlib.
    """
    require_matplotlib()
    out = Path(out_dir)
    paths: list[Path] = []
    used: set[str] = set()
    for p in pairs:
        stem = safe_name(p.id)
        name, k = stem, 2
        while name.lower() in used:
            name, k = f"{stem}-{k}", k + 1
        used.add(name.lower())
        path = out / f"{name}.png"
        write_bytes(path, render_png(p))
        paths.append(path)
    return paths
