"""Margins of the weights twin on the real pipeline fixtures: every file's worst tensor against its twin.

    python bench/twin_margins.py [--models tiny,smollm2] [--json bench/results/twin-margins.json] [--md docs/...]

For each file in fixtures/models/pipeline/MANIFEST.json, B's tensors are compared with their twins
(``backends.twin``: llama.cpp's quantiser on A's tensors) and judged with the default bounds. A correct file's
worst score (1.0 = at the bound) should be at most 0.5; a defect's failing tensor at least 2.
Also measured, as the stand-in for a B quantised by another build of llama.cpp: the same comparison with
the twin forced to the wrong intermediate (F32 instead of F16), a far larger perturbation of the
quantiser's input than an FMA contraction on another machine.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fixtures import pipeline  # noqa: E402
from pytest_convdiff.backends import dequant, tensors  # noqa: E402
from pytest_convdiff.checks import default_bounds  # noqa: E402
from pytest_convdiff.checks.weights import judge_tensor, score  # noqa: E402


def measure(entry: dict, force: str | None = None) -> dict:
    a = tensors.SafetensorsWeights(entry["source_path"])
    b = tensors.GGUFWeights(entry["path"])
    if force:
        dequant.FORCE_INTERMEDIATE = force
    try:
        t0 = time.perf_counter()
        m = dequant.measure_weights(a, b)
        secs = time.perf_counter() - t0
    finally:
        dequant.FORCE_INTERMEDIATE = None
    _, bounds = default_bounds({}, {})
    rows = []
    for e in m["tensors"]:
        s = score(e, bounds)
        rows.append({"name": e["name"], "type": e["type_b"], "score": s, "twin": e.get("twin"),
                     "fails": [w for w, _ in judge_tensor(e, bounds)] or None})
    scored = [r for r in rows if r["score"] is not None]
    worst = max(scored, key=lambda r: r["score"]) if scored else None
    failing = [r for r in rows if r["fails"]]
    return {"file": entry["file"], "kind": entry["kind"], "quant": entry["quant"], "seconds": secs,
            "worst": worst, "failing": [{"name": r["name"], "score": r["score"], "fails": r["fails"]} for r in failing],
            "min_failing_score": min((r["score"] for r in failing if r["score"] is not None), default=None),
            "no_twin": sorted({e.get("twin_unavailable") for e in m["tensors"] if e.get("twin_unavailable")})}


def _score(v: float | None) -> str:
    if v is None:
        return "n/a"
    return "inf" if not math.isfinite(v) else f"{v:.3g}"


def markdown(rows: list[dict]) -> str:
    """Per model and file: the worst correct tensor's score (must be <= 0.5), a defect's weakest failing
    tensor's score (must be >= 2, or a NaN), and the wrong-intermediate stand-in."""
    out = ["| file | kind | worst tensor (type) | score | blocks differing | tie ratio | defect: weakest failing "
           "score | wrong intermediate (stand-in) | seconds |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        w = r.get("worst") or {}
        t = w.get("twin") or {}
        fails = r.get("failing") or []
        weakest = "-"
        if r["kind"] == "bug":
            nan = [f for f in fails if "" in (f.get("fails") or [])]
            if r.get("metadata"):
                weakest = "metadata only: tensors untouched" + (" (**fails**)" if fails else ", pass")
            else:
                weakest = _score(r.get("min_failing_score")) + (" (+ NaN)" if nan else "") if fails else "**passes**"
        cross = r.get("cross_build")
        out.append(f"| {r['file']} | {r['kind']} | {w.get('name', '-')} ({w.get('type', '-')}) | {_score(w.get('score'))} "
                   f"| {t.get('differing', 0)}/{t.get('blocks', 0)} | {_score(t.get('tie_ratio'))} | {weakest} | "
                   f"{_score(cross.get('score')) if cross else '-'} | {r['seconds']:.1f} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny,smollm2")
    ap.add_argument("--only", default="", help="comma-separated substrings of file names")
    ap.add_argument("--cross-build", action="store_true", help="also the wrong-intermediate stand-in")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--md", type=Path, default=None, help="write the margins table as Markdown")
    ap.add_argument("--from-json", type=Path, default=None, help="only render --md from an earlier --json")
    args = ap.parse_args(argv)
    if args.from_json:
        (args.md or Path("/dev/stdout")).write_text(markdown(json.loads(args.from_json.read_text())))
        return
    models = set(args.models.split(","))
    only = [s for s in args.only.split(",") if s]
    out = []
    for entry in pipeline.load_manifest():
        if entry["model"] not in models or (only and not any(s in entry["file"] for s in only)):
            continue
        r = measure(entry)
        # a metadata-only defect keeps the correct file's tensors: its weights must pass (config catches it)
        r["metadata"] = bool((entry.get("expect") or {}).get("fields"))
        if args.cross_build and entry["kind"] == "correct":
            r["cross_build"] = measure(entry, force="F32")["worst"]
        w = r["worst"] or {}
        print(f"{r['file']:55s} {r['kind']:7s} worst {w.get('name', '-')[:40]:40s} "
              f"score {w.get('score') if w.get('score') is None else round(w['score'], 4)!s:8s} "
              f"failing {len(r['failing'])} min-fail {r['min_failing_score']} ({r['seconds']:.1f}s)"
              + (f" cross {r['cross_build'] and round(r['cross_build']['score'], 3)}" if "cross_build" in r else ""),
              flush=True)
        out.append(r)
    if args.md:
        args.md.write_text(markdown(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=lambda x: None if isinstance(x, float) and
                                        not math.isfinite(x) else x))


if __name__ == "__main__":
    main()
