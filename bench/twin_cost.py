"""What the twins cost: cold compare() runs of one pair with each twin off and on, in one run.

    python bench/twin_cost.py [--a DIR] [--b FILE] [--corpus default] [--json bench/results/twin-cost.json]

Each case starts from an empty cache, so A and B run too. Four cases:

- ``cold, runtime twin off`` and ``cold, runtime twin quick`` (the default): the whole pair;
- ``weights only, twin`` and ``weights only, no twin``: the file-reading families alone
  (``static_only``), with the weights twin made and with it withheld (as where llama.cpp's library is
  missing), so their difference is what the weights twin costs.

"Today's cold run" (before the twins) is the first case less the weights twin's cost. Times on a shared
machine drift: compare ratios within one run, not seconds across runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pytest_convdiff import compare  # noqa: E402
from pytest_convdiff.runner import RunSettings  # noqa: E402

PIPE = ROOT / "fixtures" / "models" / "pipeline" / "smollm2"


def run(a: str, b: str, corpus: str, twin: str, static_only: bool = False, weights_twin: bool = True) -> dict:
    from pytest_convdiff.backends import dequant

    saved = dequant.twin_unavailable
    if not weights_twin:
        dequant.twin_unavailable = lambda *_a, **_k: "withheld by bench/twin_cost.py"  # type: ignore[assignment]
    try:
        with tempfile.TemporaryDirectory() as cache:
            t0 = time.perf_counter()
            r = compare(a, b, corpus=corpus, cache_dir=cache, static_only=static_only,
                        settings=replace(RunSettings(), runtime_twin=twin))
            total = time.perf_counter() - t0
    finally:
        dequant.twin_unavailable = saved
    return {"case": ("weights only, " + ("twin" if weights_twin else "no twin")) if static_only
            else f"cold, runtime twin {twin}", "seconds": total, "verdict": r.verdict,
            "runtime": {c.id: c.value for c in r.checks if c.name == "runtime"}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", default=str(ROOT / "fixtures" / "models" / "smollm2" / "smollm2-135m-hf"))
    ap.add_argument("--b", default=str(PIPE / "smollm2.q4_k_m.gguf"))
    ap.add_argument("--corpus", default="default")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    off, quick = (run(args.a, args.b, args.corpus, twin) for twin in ("off", "quick"))
    w_twin = run(args.a, args.b, args.corpus, "off", static_only=True)
    w_none = run(args.a, args.b, args.corpus, "off", static_only=True, weights_twin=False)
    weights_twin = w_twin["seconds"] - w_none["seconds"]
    runtime_twin = quick["seconds"] - off["seconds"]
    before = off["seconds"] - weights_twin  # the cold run without either twin
    out = {"a": args.a, "b": args.b, "corpus": args.corpus, "cases": [off, quick, w_twin, w_none],
           "weights_twin_seconds": weights_twin, "runtime_twin_seconds": runtime_twin,
           "cold_without_twins_seconds": before,
           "ratio_default_over_without_twins": quick["seconds"] / before,
           "ratio_weights_twin_only": off["seconds"] / before}
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
