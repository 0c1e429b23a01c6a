"""Reports a person reads: the terminal summary and the JSON file.

Both are built from per-item payloads (one JSON blob in each test report's
``user_properties``), so a run under pytest-xdist reports every worker's results
through the controller exactly as a plain run does.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

JSON_VERSION = 1


def item_payload(pair_id: str, check: tuple[str, str], result, pair_result, model_a: str, model_b: str,
                 outcome: str, longrepr: str | None) -> dict[str, Any]:
    """What one item contributes to its pair's report."""
    name, param = check
    if result is not None:
        c = result.to_dict()
        c["outcome"] = outcome if outcome != "passed" or c["outcome"] != "skipped" else "skipped"
    else:
        c = {"name": name, "param": param, "value": None, "threshold": None,
             "outcome": "error" if outcome == "failed" else outcome,
             "message": (pair_result.error if pair_result is not None and pair_result.error else longrepr) or ""}
    c["outcome"] = {"failed": "failed", "passed": "passed", "skipped": "skipped"}.get(c["outcome"], c["outcome"])
    if result is None and outcome == "failed":
        c["outcome"] = "error"
    pr = pair_result.to_dict() if pair_result is not None else {}
    return {
        "pair": pair_id,
        "header": {
            "id": pair_id, "model_a": model_a, "model_b": model_b,
            "backend_a": pr.get("backend_a"), "backend_b": pr.get("backend_b"),
            "error": pr.get("error"), "first_divergent_layer": pr.get("first_divergent_layer"),
            "divergent_sublayer": pr.get("divergent_sublayer"), "precision_class": pr.get("precision_class"),
            "layers": pr.get("layers", []), "from_cache": pr.get("from_cache", {}),
            "metrics": _summary_metrics(pr.get("metrics")),
            "notes": pr.get("notes", []),
        },
        "check": c,
    }


def _summary_metrics(m: dict[str, Any] | None) -> dict[str, Any]:
    if not m:
        return {}
    keep = ("positions", "nmse", "nmse_db", "nmse_label", "max_abs", "mean_abs", "kl_mean", "kl_p99", "kl_max",
            "ppl_a", "ppl_b", "ppl_ratio", "delta_p_mean", "topk_ordered", "topk_overlap")
    return {k: m.get(k) for k in keep}


def merge_payload(store: dict[str, dict[str, Any]], payload: dict[str, Any]) -> None:
    pair = store.setdefault(payload["pair"], {"header": payload["header"], "checks": {}})
    if payload["header"].get("layers") and not pair["header"].get("layers"):
        pair["header"] = payload["header"]
    check = payload["check"]
    key = f"{check['name']}[{check['param']}]" if check["param"] else check["name"]
    pair["checks"][key] = check


def build_pairs(store: dict[str, dict[str, Any]], order: list[str]) -> list[dict[str, Any]]:
    """Pairs in the JSON schema (version 1), in command-line order."""
    out = []
    for pid in order + [p for p in store if p not in order]:
        if pid not in store:
            continue
        h = store[pid]["header"]
        checks = sorted(store[pid]["checks"].values(), key=lambda c: c.get("order", 0))
        checks = [{k: v for k, v in c.items() if k != "order"} for c in checks]
        outcomes = {c["outcome"] for c in checks}
        verdict = "error" if (h.get("error") or "error" in outcomes) else "fail" if "failed" in outcomes else "pass"
        out.append({
            "id": pid, "model_a": h["model_a"], "model_b": h["model_b"],
            "backend_a": h.get("backend_a"), "backend_b": h.get("backend_b"),
            "verdict": verdict, "error": h.get("error"),
            "first_divergent_layer": h.get("first_divergent_layer"),
            "divergent_sublayer": h.get("divergent_sublayer"),
            "precision_class": h.get("precision_class"),
            "layers": [{"index": layer["index"], "rfn": layer.get("rfn"),
                        **{k: v for k, v in layer.items() if k.startswith(("rfn_", "share_"))}} for layer in h.get("layers", [])],
            "checks": checks,
            "metrics": h.get("metrics", {}),
            "from_cache": h.get("from_cache", {}),
            "notes": h.get("notes", []),
        })
    return out


def write_json(path: Path, pairs: list[dict[str, Any]]) -> None:
    """Atomic write: a reader never sees half a report."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump({"version": JSON_VERSION, "pairs": pairs}, fh, indent=2)
    os.replace(tmp, path)


def _f(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.3g}"
    return str(v)


def summary_lines(pairs: list[dict[str, Any]]) -> list[str]:
    """A compact table per pair: check group, worst value, bound, outcome counts."""
    lines: list[str] = []
    for p in pairs:
        cache = p.get("from_cache") or {}
        src = ", ".join(f"{r} from cache" for r, v in cache.items() if v)
        lines.append(f"{p['verdict'].upper():5} {p['id']}  [{p.get('backend_a')} -> {p.get('backend_b')}"
                     f"{', bounds: ' + p['precision_class'] if p.get('precision_class') else ''}"
                     f"{', ' + src if src else ''}]")
        if p.get("error"):
            lines.append(f"      error: {p['error'].splitlines()[0]}")
            continue
        groups: dict[str, list[dict[str, Any]]] = {}
        for c in p["checks"]:
            groups.setdefault(c["name"], []).append(c)
        lines.append(f"      {'check':<12}{'items':>7}{'failed':>8}  {'worst value':<22}{'bound':<10}")
        for name, checks in groups.items():
            failed = sum(c["outcome"] in ("failed", "error") for c in checks)
            worst = _worst(name, checks)
            bound = next((c["threshold"] for c in checks if c.get("threshold") is not None), None)
            lines.append(f"      {name:<12}{len(checks):>7}{failed:>8}  {worst:<22}{_f(bound):<10}")
        if p.get("layers"):
            curve = " ".join(f"{layer['index']}:{_f(layer['rfn'])}" for layer in p["layers"])
            lines.append(f"      rfn by layer  {curve}")
        if p.get("layers") and "rfn_swap" in p["layers"][0]:
            curve = " ".join(f"{layer['index']}:{_f(layer['rfn_swap'])}" for layer in p["layers"])
            lines.append(f"      rfn, layer swap {curve}")
        fdl = p.get("first_divergent_layer")
        if fdl is not None:
            sub = f" ({p['divergent_sublayer']} first)" if p.get("divergent_sublayer") else ""
            lines.append(f"      first divergent layer: {fdl}{sub}")
        for note in p.get("notes") or []:
            lines.append(f"      note: {note}")
        m = p.get("metrics") or {}
        if m.get("nmse") is not None:
            lines.append(f"      NMSE {_f(m['nmse'])} ({_f(m.get('nmse_db'))} dB, {m.get('nmse_label')}), "
                         f"KL mean {_f(m.get('kl_mean'))}, PPL A {_f(m.get('ppl_a'))} B {_f(m.get('ppl_b'))}")
    return lines


def _worst(name: str, checks: list[dict[str, Any]]) -> str:
    vals = [(c["value"], c["param"]) for c in checks if c.get("value") is not None]
    if not vals:
        return "-"
    lower_is_better = name not in ("topk",)
    v, param = max(vals) if lower_is_better else min(vals)
    all_same = len({value for value, _ in vals}) == 1
    return f"{_f(v)}" + (f" ({param})" if param and len(checks) > 1 and not all_same else "")
