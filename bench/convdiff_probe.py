"""pytest plugin used by bench/bench.py: records what a pytest-convdiff run imported and did.

Loaded with ``-p convdiff_probe`` and ``PYTHONPATH=bench``. At session finish it writes a JSON
file (path from ``CONVDIFF_BENCH_PROBE``) saying whether torch / transformers / llama_cpp were
imported, how many modules were loaded, the test outcomes and when configure / session finish
happened (wall clock, so the parent can split start-up from the session itself).
"""

from __future__ import annotations

import json
import os
import sys
import time

_T = {"import": time.time()}
_OUTCOMES: dict[str, int] = {}
HEAVY = ("torch", "transformers", "llama_cpp", "safetensors", "tokenizers", "exllamav2")


def pytest_configure(config) -> None:  # noqa: ARG001
    _T["configure"] = time.time()


def pytest_collection_finish(session) -> None:  # noqa: ARG001
    _T["collected"] = time.time()


def pytest_runtest_logreport(report) -> None:
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _OUTCOMES[report.outcome] = _OUTCOMES.get(report.outcome, 0) + 1


def pytest_sessionfinish(session, exitstatus) -> None:  # noqa: ARG001
    path = os.environ.get("CONVDIFF_BENCH_PROBE")
    if not path:
        return
    now = time.time()
    data = {
        "imported": {name: name in sys.modules for name in HEAVY},
        "n_modules": len(sys.modules),
        "outcomes": _OUTCOMES,
        "exitstatus": int(exitstatus),
        "t_probe_import": _T.get("import"),
        "t_configure": _T.get("configure"),
        "t_collected": _T.get("collected"),
        "t_finish": now,
    }
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh)
