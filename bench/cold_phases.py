"""Where a cold run's time goes: wall time of the plugin's phases in one real pytest run, no profiler.

    .venv/bin/python bench/cold_phases.py [--case smollm2|tiny] [--corpus quick] [--out bench/results]

cProfile slows the Python-heavy parts of a run (metadata parsing, the compact summaries) several
times more than the C parts (the forwards), so its shares mislead. Here the named functions are
wrapped with a timer and pytest runs in this process against a fresh cache directory, exactly as
``bench/bench.py``'s cold run does. Times are inclusive (a phase contains the phases it calls: the
forwards of the greedy check are inside both ``greedy`` and ``forward``). Compare with
``bench/bench.py``'s raw run of the same case: the difference is the plugin's cost.
Writes ``<out>/cold-phases-<case>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import collections
import functools
import importlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# (module, qualified name, what it is)
PHASES: tuple[tuple[str, str, str], ...] = (
    ("pytest_convdiff.comparison", "Comparison._static", "checks before any model runs (config, weights)"),
    ("pytest_convdiff.checks._config_fields", "read_side", "  config: reading both sides' configuration"),
    ("pytest_convdiff.backends.dequant", "measure_weights", "  weights: every tensor of B against A's (in this process)"),
    ("pytest_convdiff.measure_worker", "Worker.value", "  weights: waiting for the worker process measuring them"),
    ("pytest_convdiff.backends.hf", "load", "load a transformers model (imports included)"),
    ("pytest_convdiff.backends.llamacpp", "load", "load a GGUF in llama.cpp"),
    ("pytest_convdiff.backends.hf", "TransformersBackend.forward", "transformers forwards (all of them)"),
    ("pytest_convdiff.backends.llamacpp", "LlamaCppBackend.forward", "llama.cpp forwards (all of them)"),
    ("pytest_convdiff.runner", "_write_compact", "A: summarising its outputs to the compact entry"),
    ("pytest_convdiff.core.compact", "summarise_logits", "  of which logits"),
    ("pytest_convdiff.core.compact", "summarise_states", "  of which hidden states and sub-blocks"),
    ("pytest_convdiff.pair", "PairReducer.add", "B: reducing its outputs against A's entry"),
    ("pytest_convdiff.checks.greedy", "produce", "greedy check (A decodes, B teacher-forced)"),
    ("pytest_convdiff.checks.causality", "produce", "causality probe"),
    ("pytest_convdiff.checks.runtime", "companions", "runtime twin: T, before B (B's run then serves the twin's)"),
    ("pytest_convdiff.checks.runtime", "measure", "runtime twin: T8 (and B when its run was stored before)"),
    ("pytest_convdiff.checks.position", "measure", "position: T over the long prompts, when B's growth asks"),
    ("pytest_convdiff.store.cache", "EntryWriter.commit", "committing cache entries"),
)


def _wrap(times: collections.Counter, calls: collections.Counter, module: str, qual: str) -> None:
    owner: Any = importlib.import_module(module)
    *path, name = qual.split(".")
    for part in path:
        owner = getattr(owner, part)
    fn = getattr(owner, name)
    key = f"{module.rsplit('.', 1)[-1]}.{qual}"

    @functools.wraps(fn)
    def timed(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            times[key] += time.perf_counter() - t
            calls[key] += 1

    setattr(owner, name, timed)
    # a check family holds its functions (produce, measure, companions) in a frozen record: time those too
    from pytest_convdiff import checks

    for family in checks.families():
        for fld in ("produce", "measure", "companions"):
            if getattr(family, fld, None) is fn:
                object.__setattr__(family, fld, timed)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="smollm2", choices=("smollm2", "tiny"))
    ap.add_argument("--corpus", default=None, help="default: quick for smollm2, default for tiny (as bench.py)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--twin-off", action="store_true", help="with --convdiff-runtime-twin off (bench.py's cold_no_twin)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.case == "smollm2":
        from fixtures.smollm2 import gguf_path

        a, b, corpus = ROOT / "fixtures/models/smollm2/smollm2-135m-hf", gguf_path(), args.corpus or "quick"
    else:
        a, b, corpus = ROOT / "fixtures/models/tiny-llama", ROOT / "fixtures/models/gguf/tiny-f16.gguf", (
            args.corpus or "default")
    times: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    for module, qual, _ in PHASES:
        _wrap(times, calls, module, qual)
    import pytest

    work = Path(tempfile.mkdtemp(prefix="convdiff-phases-"))
    cwd = work / "cwd"
    cwd.mkdir()
    os.chdir(cwd)
    t0 = time.perf_counter()
    rc = pytest.main(["-p", "no:cacheprovider", "-q", f"--model-a={a}", f"--model-b={b}",
                      f"--convdiff-cache-dir={work / 'cache'}", f"--convdiff-prompts={corpus}",
                      *(["--convdiff-runtime-twin", "off"] if args.twin_off else [])])
    session = time.perf_counter() - t0
    rows = []
    for module, qual, what in PHASES:
        key = f"{module.rsplit('.', 1)[-1]}.{qual}"
        rows.append({"phase": key, "what": what.strip(), "indent": what.startswith("  "),
                     "seconds": round(times[key], 3), "calls": calls[key]})
    res = {"case": args.case, "corpus": corpus, "runtime_twin": not args.twin_off, "pytest_rc": int(rc), "session_s": session, "phases": rows,
           "loadavg": os.getloadavg()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"cold-phases-{args.case}{'-no-twin' if args.twin_off else ''}.json").write_text(json.dumps(res, indent=1))
    print(f"\n{args.case}, corpus {corpus}: pytest.main {session:.2f} s (rc {int(rc)})")
    for r in rows:
        print(f"{r['seconds']:8.2f} s  x{r['calls']:<4} {'  ' if r['indent'] else ''}{r['what']}  [{r['phase']}]")
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
