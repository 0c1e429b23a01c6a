"""What the twins cost: a cold compare() of one pair with the runtime twin off and on, in one run.

    python bench/twin_cost.py [--a DIR] [--b FILE] [--corpus default] [--json bench/results/twin-cost.json]

Each case starts from an empty cache, so A and B run too; the ratio on/off is what the runtime twin
adds to a cold run. The weights family's own time (its twin included) is read from its measurement.
Times on a shared machine drift: compare the ratio within one run, not seconds across runs.
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


def run(a: str, b: str, corpus: str, twin: str) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        r = compare(a, b, corpus=corpus, cache_dir=cache, settings=replace(RunSettings(), runtime_twin=twin))
        total = time.perf_counter() - t0
    return {"runtime_twin": twin, "seconds": total, "verdict": r.verdict,
            "runtime": {c.id: c.value for c in r.checks if c.name == "runtime"}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", default=str(ROOT / "fixtures" / "models" / "smollm2" / "smollm2-135m-hf"))
    ap.add_argument("--b", default=str(PIPE / "smollm2.q4_k_m.gguf"))
    ap.add_argument("--corpus", default="default")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    rows = [run(args.a, args.b, args.corpus, twin) for twin in ("off", "quick")]
    out = {"a": args.a, "b": args.b, "corpus": args.corpus, "cases": rows,
           "ratio_quick_over_off": rows[1]["seconds"] / rows[0]["seconds"]}
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
