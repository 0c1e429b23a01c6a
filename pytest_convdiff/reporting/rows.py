"""The rows every report shows, built once from ``PairResult`` objects.

The terminal summary, the Markdown step summary, the HTML page and the plots all describe the same
pairs; building their rows here (plain text, not yet escaped or laid out) keeps them from telling
different stories, e.g. a worst value from one check next to the bound of another.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..core.results import ERROR, FAILED, LOWER, PASSED, SKIPPED, CheckResult, PairResult

MARKER = {"pass": "PASS", "fail": "FAIL", "error": "ERROR"}
# Metric keys worth a row of their own in a detailed report, in reading order.
METRIC_KEYS = ("positions", "nmse", "nmse_db", "nmse_label", "max_abs", "mean_abs", "kl_mean", "kl_p99",
               "kl_max", "ppl_a", "ppl_b", "ppl_ratio", "delta_p_mean")
TOPK_KEYS = ("topk_ordered", "topk_overlap")


# --------------------------------------------------------------------------- formatting


def fmt(v: Any, digits: int = 3) -> str:
    """A value as a short string (``-`` when missing), the same in every report."""
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


def first_line(text: Any, limit: int | None = None) -> str:
    """The first non-blank line, clipped to ``limit`` characters: a summary has one line per thing."""
    lines = [s.strip() for s in str(text or "").splitlines() if s.strip()]
    line = lines[0] if lines else ""
    return line if limit is None or len(line) <= limit else line[: limit - 1] + "…"


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def short_model(path: Any) -> str:
    """The last path component: full paths are long and the pair id already says which run it is."""
    s = str(path or "?").rstrip("/\\")
    return re.split(r"[/\\]", s)[-1] or s


def counts_line(pairs: list[PairResult]) -> str:
    """``3 pairs: 1 passed, 1 failed, 1 error.``"""
    n = {v: sum(p.verdict == v for p in pairs) for v in ("pass", "fail", "error")}
    return (f"{plural(len(pairs), 'pair')}: {n['pass']} passed, {n['fail']} failed, "
            f"{plural(n['error'], 'error')}.")


# --------------------------------------------------------------------------- pair-level facts


def rfn_bound(p: PairResult) -> float | None:
    """The tightest rfn bound of the pair: the line a layer's rfn must stay under."""
    thr = [c.threshold for c in p.checks if c.name == "rfn" and finite(c.threshold)]
    return min(thr) if thr else None


def kl_bounds(p: PairResult) -> dict[str, float]:
    """``{"mean": 0.002, "p99": 0.01}``: each KL summary against its own bound."""
    return {c.param: float(c.threshold) for c in p.checks if c.name == "kl" and finite(c.threshold)}


def max_rfn(p: PairResult) -> tuple[float, int] | None:
    vals = [(layer["rfn"], layer.get("index", i)) for i, layer in enumerate(p.layers) if finite(layer.get("rfn"))]
    return max(vals) if vals else None


def top1(p: PairResult) -> float | None:
    m = p.metrics or {}
    for key in TOPK_KEYS:
        d = m.get(key)
        v = d.get("1", d.get(1)) if isinstance(d, dict) else None
        if v is not None:
            return v
    return None


def divergence(p: PairResult) -> str:
    """``2 (attention)`` / ``2`` / ``-``."""
    if p.first_divergent_layer is None:
        return "-"
    sub = p.divergent_sublayer
    return f"{p.first_divergent_layer} ({sub})" if sub else str(p.first_divergent_layer)


@dataclass(frozen=True)
class HeaderRow:
    """One pair in one line: what was compared, the verdict, and why at a glance."""

    verdict: str  # pass / fail / error, from PairResult.verdict only
    marker: str  # PASS / FAIL / ERROR
    id: str
    model_a: str
    model_b: str
    short_a: str
    short_b: str
    backend_a: str
    backend_b: str
    device_a: str | None  # where each model ran (cpu, cuda:0, gpu 0 (all layers offloaded)), as its backend says
    device_b: str | None
    precision_class: str | None
    cached: tuple[str, ...]  # the sides ("A", "B") whose run came from the cache
    error: str | None  # the whole pair error, for reports with room for it
    error_line: str | None
    failed_kinds: tuple[str, ...]
    failed: int
    total: int
    nmse: Any
    kl_mean: Any
    top1: Any
    max_rfn: tuple[float, int] | None
    divergence: str
    notes: tuple[str, ...]

    @property
    def backends(self) -> str:
        return f"{self.backend_a} → {self.backend_b}"

    @property
    def max_rfn_text(self) -> str:
        return f"{fmt(self.max_rfn[0])} (layer {self.max_rfn[1]})" if self.max_rfn else "-"

    @property
    def cache_text(self) -> str:
        return ", ".join(f"{side} from cache" for side in self.cached)


def _device(info: Any) -> str | None:
    extra = info.get("extra") if isinstance(info, dict) else None
    return str(extra["device"]) if isinstance(extra, dict) and extra.get("device") else None


def header_row(p: PairResult) -> HeaderRow:
    m = p.metrics or {}
    verdict = p.verdict
    return HeaderRow(
        verdict=verdict, marker=MARKER.get(verdict, verdict.upper()), id=str(p.id),
        model_a=str(p.model_a), model_b=str(p.model_b), short_a=short_model(p.model_a), short_b=short_model(p.model_b),
        backend_a=p.backend_a or "?", backend_b=p.backend_b or "?", device_a=_device(p.info_a),
        device_b=_device(p.info_b), precision_class=p.precision_class,
        cached=tuple(side for side, hit in (p.from_cache or {}).items() if hit),
        error=p.error or None, error_line=(first_line(p.error) or None) if p.error else None,
        failed_kinds=tuple(p.failed_kinds()), failed=len(p.failed), total=len(p.checks),
        nmse=m.get("nmse"), kl_mean=m.get("kl_mean"), top1=top1(p), max_rfn=max_rfn(p),
        divergence=divergence(p), notes=tuple(str(n) for n in p.notes or ()),
    )


# --------------------------------------------------------------------------- check groups


def _badness(c: CheckResult, relative: bool) -> float:
    """How far a value is on the wrong side of its bound: larger is worse, NaN worst of all.

    Relative to each item's own bound when asked, so items with different bounds (``kl[mean]`` and
    ``kl[p99]``) compare fairly; a LOWER bound's worst value is its smallest.
    """
    v = float(c.value)  # type: ignore[arg-type]
    if math.isnan(v):
        return math.inf
    lower = c.direction == LOWER
    if not relative:
        return -v if lower else v
    t = float(c.threshold)  # type: ignore[arg-type]
    d = t - v if lower else v - t
    return d / abs(t) if t != 0 else d


def worst_check(checks: Iterable[CheckResult]) -> CheckResult | None:
    """The item closest to (or furthest beyond) its own bound; the first such in plan order."""
    valued = [c for c in checks if c.value is not None]
    if not valued:
        return None
    relative = all(finite(c.threshold) for c in valued)
    best = valued[0]
    score = _badness(best, relative)
    for c in valued[1:]:
        s = _badness(c, relative)
        if s > score:
            best, score = c, s
    return best


@dataclass(frozen=True)
class GroupRow:
    """One check name (``kl``, ``rfn``...) of a pair: how many items, how many failed, the worst."""

    name: str
    items: int
    failed: int
    worst: str  # ``0.008 (p99)``: the value and, where it tells which item, its param
    bound: str  # that same item's bound, with its direction (``≤ 0.01``)
    worst_check: CheckResult | None


def group_rows(p: PairResult) -> list[GroupRow]:
    groups: dict[str, list[CheckResult]] = {}
    for c in p.checks:
        groups.setdefault(c.name, []).append(c)
    out = []
    for name, checks in groups.items():
        w = worst_check(checks)
        if w is None:
            worst = "-"
            bound = next((c.bound_text() for c in checks if c.threshold is not None), "-")
        else:
            valued = [c for c in checks if c.value is not None]
            differ = len({repr(c.value) for c in valued}) > 1 or len({repr(c.threshold) for c in valued}) > 1
            worst = fmt(w.value) + (f" ({w.param})" if w.param and len(checks) > 1 and differ else "")
            bound = w.bound_text()
        out.append(GroupRow(name, len(checks), sum(c.not_passed for c in checks), worst, bound, w))
    return out


# --------------------------------------------------------------------------- single checks


@dataclass(frozen=True)
class CheckRow:
    """One item: what a reader needs to see why it failed."""

    id: str
    name: str
    outcome: str
    value: str
    bound: str
    message: str
    message_line: str
    not_passed: bool


_OUTCOME_ORDER = {ERROR: 0, FAILED: 1, PASSED: 2, SKIPPED: 3}


def check_row(c: CheckResult) -> CheckRow:
    return CheckRow(c.id, c.name, c.outcome, fmt(c.value, 4), c.bound_text(), c.message or "",
                    first_line(c.message), c.not_passed)


def check_rows(p: PairResult, *, failed_only: bool = False) -> list[CheckRow]:
    """Items in plan order (``failed_only``), or all of them with the not-passed ones first."""
    if failed_only:
        return [check_row(c) for c in p.failed]
    checks = sorted(p.checks, key=lambda c: _OUTCOME_ORDER.get(c.outcome, 1))
    return [check_row(c) for c in checks]


# --------------------------------------------------------------------------- layers


def layer_keys(layers: list[dict[str, Any]]) -> list[str]:
    """The per-layer series present (``rfn_attn``, ``rfn_mlp``, ``rfn_swap``, ``share_*``), rfn ones first."""
    keys: list[str] = []
    for layer in layers:
        for k in layer:
            if k.startswith(("rfn_", "share_")) and k not in keys:
                keys.append(k)
    return sorted(keys, key=lambda k: (not k.startswith("rfn_"), k))


@dataclass(frozen=True)
class LayerRow:
    index: int
    cells: tuple[str, ...]  # rfn, then one per extra column, then the baseline rfn when there is one
    first_divergent: bool
    over: bool  # rfn above the pair's rfn bound (or not a number)


@dataclass(frozen=True)
class LayerTable:
    columns: tuple[str, ...]  # "layer", "rfn", extra series..., ["baseline rfn"]
    rows: tuple[LayerRow, ...]
    bound: float | None


def layer_table(p: PairResult) -> LayerTable | None:
    """The per-layer rfn table, or None when the pair has no per-layer hidden states."""
    layers = p.layers or []
    if not layers:
        return None
    keys = layer_keys(layers)
    base = list(p.baseline_rfn) if p.baseline_rfn else []
    bound = rfn_bound(p)
    rows = []
    for i, layer in enumerate(layers):
        idx = layer.get("index", i)
        rfn = layer.get("rfn")
        cells = [fmt(rfn)] + [fmt(layer.get(k)) for k in keys]
        if base:
            cells.append(fmt(base[i]) if i < len(base) else "-")
        over = bound is not None and (not finite(rfn) or rfn > bound)
        rows.append(LayerRow(idx, tuple(cells), idx == p.first_divergent_layer, over))
    columns = ("layer", "rfn", *keys, *(("baseline rfn",) if base else ()))
    return LayerTable(columns, tuple(rows), bound)


def layer_curve(p: PairResult, key: str = "rfn") -> str | None:
    """``0:0.001 1:0.002 ...``: one series across the layers, or None when no layer has it."""
    if not any(key in layer for layer in p.layers or []):
        return None
    return " ".join(f"{layer.get('index', i)}:{fmt(layer.get(key))}" for i, layer in enumerate(p.layers))


# --------------------------------------------------------------------------- metrics


def metrics_line(p: PairResult) -> str | None:
    """``NMSE 1.6e-05 (-47.9 dB, excellent match), KL mean 7.4e-06, PPL A 817 B 817``."""
    m = p.metrics or {}
    if m.get("nmse") is None and not m.get("base_file"):
        return None
    nmse = f"NMSE {fmt(m['nmse'])} ({fmt(m.get('nmse_db'))} dB, {m.get('nmse_label')}), " if m.get("nmse") is not None \
        else ""  # none against a llama-perplexity base file (it holds no logits)
    return f"{nmse}KL mean {fmt(m.get('kl_mean'))}, PPL A {fmt(m.get('ppl_a'))} B {fmt(m.get('ppl_b'))}"


def costliest_module(p: PairResult) -> str | None:
    """The layer that adds most to the hidden state's error against A, and its larger sub-block: where a
    correct but lossy quantisation costs most (``layer 28 mlp``)."""
    layers = p.layers or []
    if not layers:
        return None
    best, gain = None, -1.0
    prev = 0.0
    for row in layers:
        r = row.get("rfn")
        if not finite(r):
            return None
        if r - prev > gain:
            best, gain = row, r - prev
        prev = r
    if best is None:
        return None
    subs = {k[len("rfn_"):]: v for k, v in best.items() if k.startswith("rfn_") and k != "rfn_swap" and finite(v)}
    sub = max(subs, key=lambda k: subs[k]) if subs else None
    return f"layer {best['index']}" + (f" {sub}" if sub else "") + f" (adds {fmt(gain)} rfn)"


def quality_line(p: PairResult) -> str | None:
    """B's quality against A in llama-perplexity's terms, and the module that costs most:
    ``quality: PPL ratio 1.83, KL mean 0.31, same top-1 71.2 %, costliest layer 28 mlp (adds 0.12 rfn)``."""
    m = p.metrics or {}
    if m.get("ppl_a") is None or m.get("ppl_b") is None:
        return None
    lp = m.get("llama") or {}
    if lp:  # llama-perplexity's figures, each with its standard error, as people compare them
        parts = [f"PPL ratio {fmt(lp['ppl_ratio'], 4)} ± {fmt(lp['ppl_ratio_err'], 2)}",
                 f"KLD {fmt(lp['kld_mean'])} ± {fmt(lp['kld_err'], 2)}",
                 f"RMS Δp {fmt(scaled(lp['rms_p_diff'], 100))} ± {fmt(scaled(lp['rms_p_diff_err'], 100), 2)} %",
                 f"same top p {100 * lp['same_top']:.1f} ± {100 * lp['same_top_err']:.1f} %"]  # never NaN
    else:
        parts = [f"PPL ratio {fmt(m['ppl_b'] / m['ppl_a']) if m['ppl_a'] else 'n/a'}",
                 f"KL mean {fmt(m.get('kl_mean'))}"]
        top = m.get("topk_ordered") or {}
        t1 = top.get("1", top.get(1)) if isinstance(top, dict) else None
        if finite(t1):
            parts.append(f"same top-1 {100 * t1:.1f} %")
    cost = costliest_module(p)
    if cost:
        parts.append(f"costliest {cost}")
    return "quality: " + ", ".join(parts)


def metric_rows(p: PairResult) -> list[tuple[str, str]]:
    """``(name, value)`` for every logit metric present, top-K agreements as ``K=1: ..., K=2: ...``."""
    m = p.metrics or {}
    rows = [(key, fmt(m[key], 6)) for key in METRIC_KEYS if m.get(key) is not None]
    for key in TOPK_KEYS:
        d = m.get(key)
        if isinstance(d, dict) and d:
            rows.append((key, ", ".join(f"K={k}: {fmt(v, 4)}" for k, v in d.items())))
    return rows + llama_rows(m.get("llama") or {})


# llama-perplexity's statistics: (row name, value key, error key, scale to its printed unit, unit)
LLAMA_ROWS = (("llama: PPL(Q)/PPL(base)", "ppl_ratio", "ppl_ratio_err", 1, ""),
              ("llama: ln(PPL(Q)/PPL(base))", "ln_ppl_ratio", "ln_ppl_ratio_err", 1, ""),
              ("llama: mean KLD", "kld_mean", "kld_err", 1, ""),
              ("llama: mean Δp", "p_diff_mean", "p_diff_err", 100, " %"),
              ("llama: RMS Δp", "rms_p_diff", "rms_p_diff_err", 100, " %"),
              ("llama: same top p", "same_top", "same_top_err", 100, " %"))


def scaled(x: Any, scale: float) -> Any:
    """``scale * x``, or None for a statistic that was NaN (a NaN in B): JSON brings NaN back as None."""
    return None if x is None else scale * x


def llama_rows(lp: dict[str, Any]) -> list[tuple[str, str]]:
    """llama-perplexity's final statistics as ``(name, "value ± error")`` rows, in its units, and its percentiles."""
    if not lp:
        return []
    out = [(name, f"{fmt(scaled(lp[v], scale), 6)} ± {fmt(scaled(lp[e], scale), 3)}{unit}")
           for name, v, e, scale, unit in LLAMA_ROWS]
    out.append(("llama: KLD percentiles", ", ".join(f"{k}: {fmt(v, 4)}" for k, v in lp["kld_quantiles"].items())))
    out.append(("llama: Δp percentiles", ", ".join(f"{k}: {fmt(scaled(v, 100), 4)} %"
                                                   for k, v in lp["p_diff_quantiles"].items())))
    out.append(("llama: scored tokens", str(lp["count"])))
    return out
