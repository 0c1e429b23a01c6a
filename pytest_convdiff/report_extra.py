"""Extra reports built from the JSON ``pairs`` list (see ``report.build_pairs``).

* :func:`markdown_summary` -- GitHub-flavoured Markdown for ``$GITHUB_STEP_SUMMARY``.
* :func:`plot_pairs` -- one PNG per pair: rfn by layer and the KL summary (needs matplotlib).
* :func:`html_report` -- one self-contained HTML page, plots embedded as data URIs.

All three are pure functions of the ``pairs`` list (dicts as written to the JSON report), so they
work the same on a live run and on a JSON file read back later. Optional keys a caller may add to a
pair dict: ``baseline_rfn`` (a list of floats, one per layer, drawn dashed) and ``kl_hist``
(``{"edges": [...], "counts": [...]}``, drawn as a histogram instead of the KL summary bars).
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import ConvdiffError

# Checks whose value must be at least the bound; every other built-in check must stay at or below it.
HIGHER_IS_BETTER = frozenset({"topk"})
LOWER_IS_BETTER = frozenset({"tokens", "tokenizer", "finite", "nmse", "kl", "ppl", "rfn", "causality"})
MAX_FAILED_LINES = 15
NOT_PASSED = ("failed", "error")
_MARKER = {"pass": "PASS", "fail": "FAIL", "error": "ERROR"}
_VERDICT_COLOUR = {"pass": "#1a7f37", "fail": "#cf222e", "error": "#9a6700"}


class PlotDependencyError(ConvdiffError, ImportError):
    """matplotlib, needed for plots, is not installed."""


# --------------------------------------------------------------------------- shared helpers


def _num(v: Any, digits: int = 3) -> str:
    """A value as a short string; ``-`` for missing."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, (int, float)):
        f = float(v)
        if math.isnan(f):
            return "nan"
        if math.isinf(f):
            return "inf" if f > 0 else "-inf"
        if isinstance(v, int) or f.is_integer() and abs(f) < 1e6:
            return str(int(f))
        return f"{f:.{digits}g}"
    return str(v)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _check_id(c: dict[str, Any]) -> str:
    return f"{c.get('name')}[{c['param']}]" if c.get("param") not in (None, "") else str(c.get("name"))


def _bound(c: dict[str, Any]) -> str:
    thr = c.get("threshold")
    if thr is None:
        return "-"
    name = c.get("name")
    op = "≥ " if name in HIGHER_IS_BETTER else "≤ " if name in LOWER_IS_BETTER else ""
    return op + _num(thr)


def _first_line(text: Any, limit: int = 160) -> str:
    lines = [s.strip() for s in str(text or "").splitlines() if s.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _not_passed(p: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in p.get("checks") or [] if c.get("outcome") in NOT_PASSED]


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _max_rfn(p: dict[str, Any]) -> tuple[float, int] | None:
    vals = [(layer["rfn"], layer.get("index", i)) for i, layer in enumerate(p.get("layers") or [])
            if _finite(layer.get("rfn"))]
    return max(vals) if vals else None


def _rfn_bound(p: dict[str, Any]) -> float | None:
    thr = [c["threshold"] for c in p.get("checks") or []
           if c.get("name") == "rfn" and _finite(c.get("threshold"))]
    return min(thr) if thr else None


def _top1(p: dict[str, Any]) -> float | None:
    m = p.get("metrics") or {}
    for key in ("topk_ordered", "topk_overlap"):
        d = m.get(key) or {}
        v = d.get("1", d.get(1)) if isinstance(d, dict) else None
        if v is not None:
            return v
    return None


def _divergence(p: dict[str, Any]) -> str:
    fdl = p.get("first_divergent_layer")
    if fdl is None:
        return "-"
    sub = p.get("divergent_sublayer")
    return f"{fdl} ({sub})" if sub else str(fdl)


def _short_model(path: Any) -> str:
    s = str(path or "?").rstrip("/\\")
    return re.split(r"[/\\]", s)[-1] or s


def _backends(p: dict[str, Any]) -> str:
    return f"{p.get('backend_a') or '?'} → {p.get('backend_b') or '?'}"


def _layer_keys(layers: list[dict[str, Any]]) -> list[str]:
    keys: list[str] = []
    for layer in layers:
        for k in layer:
            if k.startswith(("rfn_", "share_")) and k not in keys:
                keys.append(k)
    return sorted(keys, key=lambda k: (not k.startswith("rfn_"), k))


def _baseline(p: dict[str, Any]) -> list[Any]:
    b = p.get("baseline_rfn")
    return list(b) if isinstance(b, (list, tuple)) else []


# --------------------------------------------------------------------------- Markdown


def _md(text: Any) -> str:
    """A table-cell / list-item safe string: no pipes, no raw HTML, one line."""
    s = " ".join(str(text).split())
    s = s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return s.replace("\\", "\\\\").replace("|", "\\|").replace("`", "'")


def _md_code(text: Any) -> str:
    """An inline code span; pipes still escaped (GFM tables split on them even inside code)."""
    s = " ".join(str(text).split()).replace("`", "'").replace("|", "\\|")
    return f"`{s}`"


def _fence(text: str) -> str:
    longest = max((len(m) for m in re.findall(r"`+|~+", text)), default=0)
    fence = "~" * max(3, longest + 1)
    return f"{fence}\n{text}\n{fence}"


def _md_failed_lines(p: dict[str, Any]) -> list[str]:
    bad = _not_passed(p)
    if not bad:
        return []
    groups: dict[str, list[dict[str, Any]]] = {}
    for c in bad:
        groups.setdefault(str(c.get("name")), []).append(c)
    per_group = max(1, (MAX_FAILED_LINES - len(groups)) // len(groups))
    lines: list[str] = []
    for name, checks in groups.items():
        for c in checks[:per_group]:
            what = "error" if c.get("outcome") == "error" else f"{_num(c.get('value'), 4)} (bound {_bound(c)})"
            msg = _first_line(c.get("message"), 140)
            lines.append(f"- {_md_code(_check_id(c))}: {what}" + (f" — {_md(msg)}" if msg else ""))
        if len(checks) > per_group:
            lines.append(f"- … and {len(checks) - per_group} more failing {_md_code(name)} checks")
    if len(lines) > MAX_FAILED_LINES + 1:
        rest = len(lines) - MAX_FAILED_LINES
        lines = lines[:MAX_FAILED_LINES] + [f"- … {rest} more lines left out"]
    return lines


def _md_layer_table(p: dict[str, Any]) -> list[str]:
    layers = p.get("layers") or []
    keys = _layer_keys(layers)
    base = _baseline(p)
    bound = _rfn_bound(p)
    fdl = p.get("first_divergent_layer")
    head = ["layer", "rfn"] + keys + (["baseline rfn"] if base else []) + [""]
    out = ["| " + " | ".join(head) + " |", "|" + "---:|" * (len(head) - 1) + "---|"]
    for i, layer in enumerate(layers):
        idx = layer.get("index", i)
        rfn = layer.get("rfn")
        flags = []
        if idx == fdl:
            flags.append("**first divergent**")
        if bound is not None and (not _finite(rfn) or rfn > bound):
            flags.append("> bound")
        row = [str(idx), _num(rfn)] + [_num(layer.get(k)) for k in keys]
        if base:
            row.append(_num(base[i]) if i < len(base) else "-")
        row.append(_md(", ".join(flags)).replace("&gt;", ">") if flags else "")
        out.append("| " + " | ".join(row) + " |")
    return out


def markdown_summary(pairs: list[dict[str, Any]]) -> str:
    """GitHub-flavoured Markdown for ``$GITHUB_STEP_SUMMARY``: one table row per pair, then details
    for every pair that did not pass (failed checks, at most about 15 lines, and a collapsed layer table)."""
    n = {v: sum(p.get("verdict") == v for p in pairs) for v in ("pass", "fail", "error")}
    out = ["## convdiff summary", ""]
    out.append(f"{_plural(len(pairs), 'pair')}: "
               f"{n['pass']} passed, {n['fail']} failed, {_plural(n['error'], 'error')}.")
    out.append("")
    if not pairs:
        return "\n".join(out) + "\n"
    out.append("| verdict | pair | A → B | backends | bounds | NMSE | KL mean | top-1 | max rfn "
               "| first divergent layer | failed |")
    out.append("|---|---|---|---|---|---:|---:|---:|---:|---|---:|")
    for p in pairs:
        m = p.get("metrics") or {}
        mr = _max_rfn(p)
        checks = p.get("checks") or []
        row = [
            f"**{_MARKER.get(p.get('verdict'), _md(str(p.get('verdict')).upper()))}**",
            _md_code(p.get("id")),
            _md(f"{_short_model(p.get('model_a'))} → {_short_model(p.get('model_b'))}"),
            _md(_backends(p)),
            _md(p.get("precision_class") or "-"),
            _num(m.get("nmse")),
            _num(m.get("kl_mean")),
            _num(_top1(p), 4),
            f"{_num(mr[0])} (layer {mr[1]})" if mr else "-",
            _md(_divergence(p)),
            f"{len(_not_passed(p))} of {len(checks)}",
        ]
        out.append("| " + " | ".join(row) + " |")
    noted = [p for p in pairs if p.get("notes")]
    if noted:
        out += ["", "Notes:", ""]
        for p in noted:
            out += [f"- {_md_code(p.get('id'))}: {_md(note)}" for note in p["notes"]]
    for p in pairs:
        if p.get("verdict") == "pass":
            continue
        out += ["", f"### {_MARKER.get(p.get('verdict'), str(p.get('verdict')).upper())} {_md_code(p.get('id'))}", ""]
        if p.get("error"):
            err = "\n".join(str(p["error"]).splitlines()[:6])
            out += ["Model error:", "", _fence(err), ""]
        failed = _md_failed_lines(p)
        if failed and not p.get("error"):
            out += [f"Failed checks ({len(_not_passed(p))}):", ""] + failed
        elif failed:
            out.append(f"All {len(_not_passed(p))} checks of this pair report this error.")
        if p.get("layers"):
            fdl = _divergence(p)
            label = f"Per-layer rfn (first divergent layer: {fdl})" if fdl != "-" else "Per-layer rfn"
            out += ["", "<details>", f"<summary>{html.escape(label)}</summary>", ""]
            out += _md_layer_table(p)
            out += ["", "</details>"]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- plots


def _safe_name(pid: Any) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", str(pid)).strip("._-")
    return s[:120] or "pair"


def _positive(values: Iterable[Any]) -> list[float | None]:
    """Values a log axis can show (None where the value is missing, zero, negative or not finite)."""
    return [float(v) if _finite(v) and v > 0 else None for v in values]


def _plot_rfn(ax, p: dict[str, Any]) -> None:
    layers = p.get("layers") or []
    if not layers:
        ax.text(0.5, 0.5, "no per-layer hidden states", ha="center", va="center", transform=ax.transAxes,
                color="#666666")
        ax.set_axis_off()
        return
    xs = [layer.get("index", i) for i, layer in enumerate(layers)]
    bound = _rfn_bound(p)
    fdl = p.get("first_divergent_layer")

    def line(values, **kw):
        ys = _positive(values)
        pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
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
    extra = [k for k in _layer_keys(layers) if k.startswith("rfn_") and k not in ("rfn_attn", "rfn_mlp")]
    for j, key in enumerate(extra):  # e.g. rfn_swap: other per-layer comparisons the backend adds
        line([layer.get(key) for layer in layers], color="#1b7c83", ls=styles[j % len(styles)], lw=1.2,
             marker="x", ms=4, label=key, zorder=3)
    base = _baseline(p)
    if base:
        bx = xs[: len(base)] if len(base) <= len(xs) else list(range(len(base)))
        ys = _positive(base)
        bp = [(x, y) for x, y in zip(bx, ys, strict=True) if y is not None]
        if bp:
            ax.plot([x for x, _ in bp], [y for _, y in bp], color="#6e7781", ls="--", lw=1.5, marker=".",
                    label="baseline rfn", zorder=2)
    if bound is not None and bound > 0:
        ax.axhline(bound, color="#cf222e", ls=":", lw=1.6, label=f"rfn bound {_num(bound)}", zorder=1)
        over = [(x, y) for x, y in pts if y > bound]
        if over:
            ax.scatter([x for x, _ in over], [y for _, y in over], s=90, facecolors="none",
                       edgecolors="#cf222e", linewidths=1.8, zorder=5, label="above bound")
    if fdl is not None:
        sub = p.get("divergent_sublayer")
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


def _kl_bounds(p: dict[str, Any]) -> dict[str, float]:
    out = {}
    for c in p.get("checks") or []:
        if c.get("name") == "kl" and _finite(c.get("threshold")):
            out[str(c.get("param"))] = float(c["threshold"])
    return out


def _plot_kl(ax, p: dict[str, Any]) -> None:
    m = p.get("metrics") or {}
    top1 = _top1(p)
    info = []
    if top1 is not None:
        info.append(f"top-1 {_num(top1, 4)}")
    if m.get("nmse") is not None:
        info.append(f"NMSE {_num(m['nmse'])}" + (f" ({_num(m.get('nmse_db'))} dB)" if m.get("nmse_db") is not None else ""))
    if m.get("ppl_ratio") is not None:
        info.append(f"PPL B/A {_num(m['ppl_ratio'], 5)}")
    hist = p.get("kl_hist")
    if isinstance(hist, dict) and hist.get("edges") and hist.get("counts") \
            and len(hist["edges"]) == len(hist["counts"]) + 1:
        edges = [float(e) for e in hist["edges"]]
        counts = [float(c) for c in hist["counts"]]
        ax.stairs(counts, edges, fill=True, color="#0969da", alpha=0.6)
        if edges[0] > 0 and edges[-1] / edges[0] > 100:
            ax.set_xscale("log")
        if max(counts, default=0) > 0 and max(counts) / max(min(c for c in counts if c > 0), 1) > 100:
            ax.set_yscale("log")
        for key, colour, ls in (("kl_mean", "#1a7f37", "-"), ("kl_p99", "#bf8700", "--"), ("kl_max", "#cf222e", ":")):
            v = m.get(key)
            if _finite(v) and v > 0:
                ax.axvline(v, color=colour, ls=ls, lw=1.3, label=f"{key.replace('kl_', '')} {_num(v)}")
        ax.set_xlabel("KL(P_A ‖ P_B) per position")
        ax.set_ylabel("positions")
        ax.set_title("Per-position KL divergence" + ("\n" + "  ·  ".join(info) if info else ""), fontsize=10)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7.5, loc="upper right")
    else:
        names = [("kl_mean", "mean"), ("kl_p99", "p99"), ("kl_max", "max")]
        vals = [(label, m.get(key), key) for key, label in names if _finite(m.get(key))]
        if not vals:
            ax.text(0.5, 0.5, "no logits compared", ha="center", va="center", transform=ax.transAxes,
                    color="#666666")
            ax.set_axis_off()
            return
        bounds = _kl_bounds(p)
        ys = list(range(len(vals)))[::-1]
        plotted = [max(v, 1e-12) for _, v, _ in vals]
        colours = ["#cf222e" if bounds.get(label) is not None and v > bounds[label] else "#0969da"
                   for label, v, _ in vals]
        ax.barh(ys, plotted, color=colours, alpha=0.75, height=0.55)
        ax.set_xscale("log")
        lo = min(plotted + list(bounds.values())) / 10
        hi = max(plotted + list(bounds.values())) * 30
        ax.set_xlim(lo, hi)
        for (label, v, _), y, pv in zip(vals, ys, plotted, strict=True):
            ax.text(pv * 1.25, y, _num(v), va="center", fontsize=8.5)
            b = bounds.get(label)
            if b is not None:
                ax.plot([b, b], [y - 0.38, y + 0.38], color="#cf222e", lw=2)
                ax.text(b, y + 0.42, f"bound {_num(b)}", ha="center", va="bottom", fontsize=7.5, color="#cf222e")
        ax.set_yticks(ys)
        ax.set_yticklabels([f"KL {label}" for label, _, _ in vals])
        ax.set_ylim(-0.7, len(vals) - 0.2)
        ax.set_xlabel("KL(P_A ‖ P_B)  (log)")
        ax.set_title("KL divergence over positions" + ("\n" + "  ·  ".join(info) if info else ""), fontsize=10)
        ax.grid(True, axis="x", alpha=0.3)


def _figure_for(p: dict[str, Any]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.6), dpi=100, layout="constrained")
    verdict = str(p.get("verdict") or "?")
    colour = _VERDICT_COLOUR.get(verdict, "#333333")
    fail_n = len(_not_passed(p))
    total = len(p.get("checks") or [])
    fig.suptitle(_mpl(f"{_MARKER.get(verdict, verdict.upper())}  {p.get('id')}   ({fail_n} of {total} checks not passed)"),
                 fontsize=12, fontweight="bold", color=colour)
    sub = _mpl(f"A: {_short_model(p.get('model_a'))}   →   B: {_short_model(p.get('model_b'))}    "
               f"[{_backends(p)}; bounds: {p.get('precision_class') or '-'}]")
    if p.get("error"):
        fig.text(0.5, 0.5, _mpl("Model error:\n" + "\n".join(_wrap(str(p["error"]), 110)[:12])), ha="center",
                 va="center", multialignment="left", fontsize=9, family="monospace", color="#9a6700")
        fig.text(0.5, 0.88, sub, ha="center", fontsize=9, color="#444444")
        return fig
    sf = fig.subfigures(1, 1)
    sf.suptitle(sub, fontsize=9, color="#444444")
    ax1, ax2 = sf.subplots(1, 2, gridspec_kw={"width_ratios": [1.25, 1]})
    _plot_rfn(ax1, p)
    _plot_kl(ax2, p)
    return fig


def _mpl(text: str) -> str:
    """Text matplotlib shows as is ($ would start mathtext)."""
    return text.replace("$", r"\$")


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    out: list[str] = []
    for line in text.splitlines() or [""]:
        out += textwrap.wrap(line, width) or [""]
    return out


def plot_pairs(pairs: list[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """One PNG per pair in ``out_dir`` (created), in the order of ``pairs``; returns the paths.

    Left panel: rfn per layer on a log axis (with rfn_attn/rfn_mlp and a dashed ``baseline_rfn`` when
    present), the rfn bound and the first divergent layer; right panel: KL mean/p99/max against their
    bounds (or the ``kl_hist`` histogram when the pair has one) with top-1, NMSE and PPL ratio.
    """
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError as exc:
        raise PlotDependencyError(
            "convdiff plots need matplotlib, which is not installed: pip install 'pytest-convdiff[plot]'."
        ) from exc
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    used: set[str] = set()
    for p in pairs:
        stem = _safe_name(p.get("id"))
        name, k = stem, 2
        while name.lower() in used:
            name, k = f"{stem}-{k}", k + 1
        used.add(name.lower())
        fig = _figure_for(p)
        FigureCanvasAgg(fig)
        path = out / f"{name}.png"
        fig.savefig(path, format="png", facecolor="white")
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- HTML

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
"""


def _e(v: Any) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def _badge(verdict: Any) -> str:
    v = str(verdict)
    cls = v if v in _MARKER else "other"
    return f'<span class="badge {cls}">{_e(_MARKER.get(v, v.upper()))}</span>'


def _h_overview(pairs: list[dict[str, Any]]) -> list[str]:
    out = ["<table class=\"overview\">",
           "<tr><th>verdict</th><th>pair</th><th>A → B</th><th>backends</th><th>bounds</th><th>NMSE</th>"
           "<th>KL mean</th><th>top-1</th><th>max rfn</th><th>first divergent layer</th><th>failed</th></tr>"]
    for i, p in enumerate(pairs):
        m = p.get("metrics") or {}
        mr = _max_rfn(p)
        cells = [
            f"<td>{_badge(p.get('verdict'))}</td>",
            f'<td><a href="#pair-{i}">{_e(p.get("id"))}</a></td>',
            f'<td title="{_e(p.get("model_a"))} → {_e(p.get("model_b"))}">'
            f"{_e(_short_model(p.get('model_a')))} → {_e(_short_model(p.get('model_b')))}</td>",
            f"<td>{_e(_backends(p))}</td>",
            f"<td>{_e(p.get('precision_class') or '-')}</td>",
            f'<td class="num">{_e(_num(m.get("nmse")))}</td>',
            f'<td class="num">{_e(_num(m.get("kl_mean")))}</td>',
            f'<td class="num">{_e(_num(_top1(p), 4))}</td>',
            f'<td class="num">{_e(f"{_num(mr[0])} (layer {mr[1]})" if mr else "-")}</td>',
            f"<td>{_e(_divergence(p))}</td>",
            f'<td class="num">{len(_not_passed(p))} of {len(p.get("checks") or [])}</td>',
        ]
        out.append(f'<tr class="{_e(p.get("verdict"))}">' + "".join(cells) + "</tr>")
    out.append("</table>")
    return out


def _h_checks(p: dict[str, Any]) -> list[str]:
    order = {"error": 0, "failed": 1, "passed": 2, "skipped": 3}
    checks = sorted(p.get("checks") or [], key=lambda c: order.get(c.get("outcome"), 1))
    if not checks:
        return ["<p class=\"meta\">No checks.</p>"]
    out = ["<table class=\"checks\">",
           "<tr><th>outcome</th><th>check</th><th>value</th><th>bound</th><th>message</th></tr>"]
    for c in checks:
        oc = str(c.get("outcome"))
        out.append(f'<tr class="{_e(oc)}"><td>{_e(oc)}</td><td><code>{_e(_check_id(c))}</code></td>'
                   f'<td class="num">{_e(_num(c.get("value"), 4))}</td><td class="num">{_e(_bound(c))}</td>'
                   f"<td><pre>{_e(c.get('message') or '')}</pre></td></tr>")
    out.append("</table>")
    return out


def _h_layers(p: dict[str, Any]) -> list[str]:
    layers = p.get("layers") or []
    if not layers:
        return []
    keys = _layer_keys(layers)
    base = _baseline(p)
    bound = _rfn_bound(p)
    fdl = p.get("first_divergent_layer")
    head = ["layer", "rfn"] + keys + (["baseline rfn"] if base else [])
    out = ["<table class=\"layers\">", "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
    for i, layer in enumerate(layers):
        idx = layer.get("index", i)
        rfn = layer.get("rfn")
        over = bound is not None and (not _finite(rfn) or rfn > bound)
        cls = ' class="divergent"' if idx == fdl else ""
        cells = [f'<td class="num">{_e(idx)}{" ← first divergent" if idx == fdl else ""}</td>',
                 f'<td class="num{" over" if over else ""}">{_e(_num(rfn))}</td>']
        cells += [f'<td class="num">{_e(_num(layer.get(k)))}</td>' for k in keys]
        if base:
            cells.append(f'<td class="num">{_e(_num(base[i]) if i < len(base) else "-")}</td>')
        out.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
    out.append("</table>")
    if bound is not None:
        out.append(f'<p class="meta">rfn bound {_e(_num(bound))}; values above it in red.</p>')
    return out


def _h_metrics(p: dict[str, Any]) -> list[str]:
    m = p.get("metrics") or {}
    if not m:
        return []
    rows = []
    for key in ("positions", "nmse", "nmse_db", "nmse_label", "max_abs", "mean_abs", "kl_mean", "kl_p99", "kl_max",
                "ppl_a", "ppl_b", "ppl_ratio", "delta_p_mean"):
        if m.get(key) is not None:
            rows.append(f'<tr><th>{_e(key)}</th><td class="num">{_e(_num(m[key], 6))}</td></tr>')
    for key in ("topk_ordered", "topk_overlap"):
        d = m.get(key)
        if isinstance(d, dict) and d:
            vals = ", ".join(f"K={_e(k)}: {_e(_num(v, 4))}" for k, v in d.items())
            rows.append(f"<tr><th>{_e(key)}</th><td>{vals}</td></tr>")
    return ["<table class=\"metrics\">"] + rows + ["</table>"] if rows else []


def _h_plot(p: dict[str, Any], plots: dict[str, Path] | None) -> list[str]:
    if not plots or p.get("id") not in plots:
        return []
    path = Path(plots[p["id"]])
    try:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
    except OSError as exc:
        return [f'<p class="meta">Plot {_e(path)} could not be read: {_e(exc)}</p>']
    return [f'<img alt="rfn and KL plot for {_e(p.get("id"))}" src="data:image/png;base64,{data}">']


def html_report(pairs: list[dict[str, Any]], plots: dict[str, Path] | None = None) -> str:
    """One self-contained HTML page: an overview table, then per pair its plot (embedded when ``plots``
    maps the pair id to a PNG), metrics, checks (failed first, messages in ``<pre>``) and layer table."""
    n = {v: sum(p.get("verdict") == v for p in pairs) for v in ("pass", "fail", "error")}
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           "<title>convdiff report</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
           "<h1>convdiff report</h1>",
           f'<p class="meta">{_plural(len(pairs), "pair")}: {n["pass"]} passed, '
           f'{n["fail"]} failed, {_plural(n["error"], "error")}.</p>']
    out += _h_overview(pairs)
    for i, p in enumerate(pairs):
        out.append(f'<h2 id="pair-{i}">{_badge(p.get("verdict"))} {_e(p.get("id"))}</h2>')
        cache = p.get("from_cache") or {}
        cached = ", ".join(f"{k} from cache" for k, v in cache.items() if v)
        out.append(f'<p class="meta">A: {_e(p.get("model_a"))} ({_e(p.get("backend_a"))})<br>'
                   f'B: {_e(p.get("model_b"))} ({_e(p.get("backend_b"))})<br>'
                   f'bounds: {_e(p.get("precision_class") or "-")}; first divergent layer: {_e(_divergence(p))}'
                   f'{"; " + _e(cached) if cached else ""}</p>')
        if p.get("notes"):
            out.append("<ul class=\"notes\">" + "".join(f"<li>{_e(n)}</li>" for n in p["notes"]) + "</ul>")
        if p.get("error"):
            out.append(f'<pre class="error">{_e(p["error"])}</pre>')
        out += _h_plot(p, plots)
        metrics = _h_metrics(p)
        if metrics:
            out += ["<h3>Metrics</h3>"] + metrics
        out += ["<h3>Checks</h3>"] + _h_checks(p)
        layers = _h_layers(p)
        if layers:
            out += ["<h3>Layers</h3>"] + layers
    out += ["</body>", "</html>"]
    return "\n".join(out) + "\n"
