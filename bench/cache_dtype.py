"""What ``--convdiff-cache-dtype float16`` does to each metric, measured on real pairs.

    .venv/bin/python bench/cache_dtype.py [--cases tiny,smollm2] [--out bench/results]

Each pair runs twice through ``pytest_convdiff.comparison``, once with float32 and once with float16
storage, each on its own fresh cache (both models really run and store in that dtype), and the
metrics, verdicts and entry sizes are set side by side. Writes ``<out>/cache-dtype.json`` and
``<out>/cache-dtype.md`` (also printed).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pytest_convdiff.comparison import PairResult, compare  # noqa: E402
from pytest_convdiff.runner import RunSettings  # noqa: E402

M = ROOT / "fixtures/models"
METRICS = ("nmse", "kl_mean", "kl_p99", "kl_max", "max_abs", "ppl_ratio", "delta_p_rms")


def _pairs(cases: list[str]) -> list[tuple[str, str, str, str]]:
    """(case, A, B, corpus)."""
    out = []
    if "tiny" in cases:
        for b in ("tiny-llama-bf16", "gguf/tiny-f16.gguf", "gguf/tiny-q8_0.gguf", "tiny-llama-broken-layer3"):
            out.append(("tiny", str(M / "tiny-llama"), str(M / b), "default"))
    if "smollm2" in cases:
        from fixtures.smollm2 import gguf_path

        gguf = gguf_path()
        ref = M / "smollm2/smollm2-135m-hf"
        if gguf is None or not ref.is_dir():
            print("smollm2: fixtures missing (python -m fixtures.smollm2); skipped", file=sys.stderr)
        else:
            out.append(("smollm2", str(ref), str(gguf), "quick"))
            out.append(("smollm2", str(ref), str(M / "smollm2/broken/smollm2-scaled-tensor.gguf"), "quick"))
    return out


def _entry_bytes(cache: Path) -> int:
    return sum(f.stat().st_size for f in cache.rglob("*.npy"))


def _summary(res: PairResult) -> dict[str, Any]:
    m = res.logits or {}
    checks = {c.id: c.outcome for c in res.checks}
    rfn = [layer["rfn"] for layer in res.layers]
    return {
        **{k: m.get(k) for k in METRICS},
        "top1": (m.get("topk_ordered") or {}).get("1"), "top5": (m.get("topk_overlap") or {}).get("5"),
        "rfn": rfn, "rfn_max": max(rfn) if rfn else None,
        "verdict": res.verdict, "failed": sorted(k for k, v in checks.items() if v in ("failed", "error")),
        "first_divergent_layer": res.first_divergent_layer,
        "causality": [c.value for c in res.checks if c.name == "causality"],
    }


def run(cases: list[str]) -> list[dict[str, Any]]:
    rows = []
    for case, a, b, corpus in _pairs(cases):
        row: dict[str, Any] = {"case": case, "a": Path(a).name, "b": Path(b).name, "corpus": corpus}
        for dtype in ("float32", "float16"):
            with tempfile.TemporaryDirectory(prefix="convdiff-dtype-") as tmp:
                t = time.perf_counter()
                res = compare(a, b, corpus=corpus, cache_dir=tmp, settings=RunSettings(cache_dtype=dtype))
                row[dtype] = {**_summary(res), "seconds": time.perf_counter() - t, "bytes": _entry_bytes(Path(tmp))}
        rows.append(row)
        print(f"{case}: {row['b']} done", file=sys.stderr)
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def _rel(a: Any, b: Any) -> str:
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or math.isnan(a) or math.isnan(b):
        return ""
    if a == b:
        return "0"
    return f"{abs(b - a) / abs(a):.1e}" if a else f"abs {abs(b - a):.1e}"


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| pair | metric | float32 | float16 | relative change |", "|---|---|---:|---:|---:|"]
    for r in rows:
        f32, f16 = r["float32"], r["float16"]
        name = f"{r['a']} vs {r['b']} ({r['corpus']})"
        for k in (*METRICS, "top1", "top5", "rfn_max"):
            lines.append(f"| {name} | {k} | {_fmt(f32[k])} | {_fmt(f16[k])} | {_rel(f32[k], f16[k])} |")
            name = ""
        worst = max((_abs_rel(x, y) for x, y in zip(f32["rfn"], f16["rfn"], strict=False)), default=0.0)
        lines.append(f"| | rfn per layer, largest relative change | | | {worst:.1e} |")
        lines.append(f"| | causality (A, B) | {', '.join(_fmt(v) for v in f32['causality'])} | "
                     f"{', '.join(_fmt(v) for v in f16['causality'])} | |")
        lines.append(f"| | verdict, failed checks | {f32['verdict']} {f32['failed'][:4]} | "
                     f"{f16['verdict']} {f16['failed'][:4]} | {'same' if f32['failed'] == f16['failed'] else 'DIFFERENT'} |")
        lines.append(f"| | first divergent layer | {_fmt(f32['first_divergent_layer'])} | "
                     f"{_fmt(f16['first_divergent_layer'])} | |")
        lines.append(f"| | cache bytes (both entries) | {f32['bytes']:,} | {f16['bytes']:,} | "
                     f"{f16['bytes'] / f32['bytes']:.3f}x |")
    return "\n".join(lines) + "\n"


def _abs_rel(a: float | None, b: float | None) -> float:
    if a is None or b is None or math.isnan(a) or math.isnan(b) or a == 0:
        return 0.0
    return abs(b - a) / abs(a)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="tiny,smollm2")
    ap.add_argument("--out", default=str(ROOT / "bench/results"))
    args = ap.parse_args(argv)
    rows = run([c.strip() for c in args.cases.split(",") if c.strip()])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cache-dtype.json").write_text(json.dumps(rows, indent=1))
    md = markdown(rows)
    (out / "cache-dtype.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
