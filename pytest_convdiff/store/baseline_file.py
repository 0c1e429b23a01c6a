"""Regression mode: compare each pair's metrics with the values stored for that pair last time.

A model zoo must not get worse when the converter changes, even where every pair is still inside
its absolute bounds. The baseline file (JSON) maps a pair id to a snapshot of its metrics; the pair
id comes from the file names, so re-converting a model in place is compared with its previous
conversion. Tolerances follow pytest-benchmark's style: ``nmse:50%`` (relative) or
``kl_mean:abs:1e-3`` (absolute); ``rfn`` applies per layer to the whole curve.

Only storage and the pure comparison live here; what a regression means for a test item (its
message, its outcome) is the baseline check family's business.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..core.results import PairResult, clean
from ..errors import ConvdiffError
from .atomic import write_json

VERSION = 1
# metric -> True when larger is worse
METRICS: dict[str, bool] = {"nmse": True, "kl_mean": True, "kl_p99": True, "ppl_ratio": True, "rfn": True,
                            "top1": False, "top5": False}
DEFAULT_TOLERANCES = "nmse:50%,kl_mean:50%,kl_p99:50%,ppl_ratio:abs:0.01,top1:abs:0.01,top5:abs:0.01,rfn:25%"


def parse_tolerances(text: str, where: str = "--convdiff-baseline-tolerance") -> dict[str, tuple[str, float]]:
    """``"nmse:50%,kl_mean:abs:1e-3"`` -> {"nmse": ("rel", 0.5), "kl_mean": ("abs", 0.001)} on top of the defaults."""
    out: dict[str, tuple[str, float]] = {}
    for source in (DEFAULT_TOLERANCES, text or ""):
        for part in re.split(r"[,\s]+", source.strip()):
            if not part:
                continue
            bits = part.split(":")
            name = bits[0]
            if name not in METRICS:
                raise ValueError(f"{where}: unknown metric {name!r}; known: {', '.join(METRICS)}")
            try:
                if len(bits) == 2 and bits[1].endswith("%"):
                    out[name] = ("rel", float(bits[1][:-1]) / 100.0)
                elif len(bits) == 3 and bits[1] == "abs":
                    out[name] = ("abs", float(bits[2]))
                else:
                    raise ValueError
            except ValueError:
                raise ValueError(f"{where}: {part!r} is not NAME:PCT% or NAME:abs:VALUE") from None
            if out[name][1] < 0 or math.isnan(out[name][1]):
                raise ValueError(f"{where}: {part!r}: the tolerance must be a non-negative number")
    return out


def snapshot(pair: PairResult) -> dict[str, Any] | None:
    """The metrics a baseline keeps for this pair, JSON-safe (NaN becomes null, which ``regressions``
    counts as worse); None when the pair has neither logit metrics nor layers to keep. Against a
    llama-perplexity base file there is no NMSE and no layers, but KL, top-K and PPL are kept."""
    m = pair.metrics or {}
    if m.get("nmse") is None and not pair.layers and not m.get("base_file"):
        return None

    def at(d: dict[Any, Any] | None, k: int) -> Any:
        d = d or {}  # live results key top-k by int, results read back from JSON by str
        return d.get(str(k), d.get(k))

    return clean({
        "nmse": m.get("nmse"), "kl_mean": m.get("kl_mean"), "kl_p99": m.get("kl_p99"),
        "ppl_ratio": m.get("ppl_ratio"), "top1": at(m.get("topk_ordered"), 1), "top5": at(m.get("topk_overlap"), 5),
        "rfn": [layer.get("rfn") for layer in pair.layers],
        "model_a": pair.model_a, "model_b": pair.model_b, "recorded": time.strftime("%Y-%m-%d %H:%M:%S"),
    })


def load(path: Path) -> dict[str, Any]:
    """The stored baselines by pair id; an absent file is an empty baseline, a damaged one an error naming it."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConvdiffError(f"{path}: the baseline file is unreadable ({exc}); fix it or delete it and "
                            "run with --convdiff-baseline-update.") from exc
    if not isinstance(data, dict) or data.get("version") != VERSION or not isinstance(data.get("pairs"), dict):
        raise ConvdiffError(f"{path}: not a convdiff baseline (version {VERSION}); delete it and rerun with "
                            "--convdiff-baseline-update.")
    return data["pairs"]


def update(path: Path, pairs: Iterable[PairResult]) -> list[str]:
    """Store the snapshots of these pairs (others in the file are kept); returns the ids written.

    A pair that errored is not recorded: it measured nothing. The file is replaced atomically, so a
    failing write leaves the previous baseline intact.
    """
    path = Path(path)
    stored = load(path)
    written = []
    for pair in pairs:
        snap = snapshot(pair)
        if snap is not None and pair.verdict != "error":
            stored[pair.id] = snap
            written.append(pair.id)
    write_json(path, {"version": VERSION, "pairs": dict(sorted(stored.items()))}, indent=2)
    return written


def _allowed(old: float, worse_up: bool, tol: tuple[str, float]) -> float:
    kind, value = tol
    delta = abs(old) * value if kind == "rel" else value
    return old + delta if worse_up else old - delta


def regressions(current: dict[str, Any], old: dict[str, Any], tolerances: dict[str, tuple[str, float]]
                ) -> dict[str, dict[str, Any]]:
    """Per metric: old, new, allowed, worse (bool), detail. NaN now counts as worse."""
    out: dict[str, dict[str, Any]] = {}
    for name, worse_up in METRICS.items():
        tol = tolerances[name]
        if name == "rfn":
            new_curve, old_curve = current.get("rfn") or [], old.get("rfn") or []
            if len(new_curve) != len(old_curve):
                out[name] = {"old": None, "new": None, "allowed": None, "worse": False,
                             "detail": f"layer count changed ({len(old_curve)} -> {len(new_curve)}); not compared"}
                continue
            bad = []
            for i, (n, o) in enumerate(zip(new_curve, old_curve, strict=True)):
                if o is None:
                    continue
                allowed = _allowed(o, True, tol)
                if n is None or not n <= allowed:
                    bad.append((i, o, n, allowed))
            worst = max(bad, key=lambda b: (b[2] if b[2] is not None else math.inf) / max(b[1], 1e-30)) if bad else None
            out[name] = {"old": worst[1] if worst else None, "new": worst[2] if worst else None,
                         "allowed": worst[3] if worst else None, "worse": bool(bad),
                         "detail": ", ".join(f"layer {i}: {o:.4g} -> {n if n is None else format(n, '.4g')}"
                                             for i, o, n, _ in bad[:8])}
            continue
        o, n = old.get(name), current.get(name)
        if o is None:
            out[name] = {"old": None, "new": n, "allowed": None, "worse": False, "detail": "no stored value"}
            continue
        allowed = _allowed(o, worse_up, tol)
        worse = n is None or (isinstance(n, float) and math.isnan(n)) or (n > allowed if worse_up else n < allowed)
        out[name] = {"old": o, "new": n, "allowed": allowed, "worse": bool(worse), "detail": ""}
    return out
