"""Disk left by a model-zoo suite: one reference against N of its conversions, in one pytest session.

    .venv/bin/python bench/zoo_disk.py [--pairs 20] [--corpus default] [--out bench/results]

Model A is SmolLM2-135M-Instruct as a transformers checkpoint (``fixtures/smollm2.py``); the B models
are the real llama.cpp pipeline's files of it (``fixtures/pipeline.py``: F16 ... Q2_K and the
converter bugs), the first ``--pairs`` of them by name. The script writes a ``*.convdiff.toml``
manifest listing the pairs, runs ``pytest <manifest>`` in an empty directory with a fresh cache
directory, samples the cache's size every second while it runs, and records what the suite leaves:
A's entry, each B's entry, the pair documents, the largest size seen during the run and the total
at the end. Writes ``<out>/zoo-disk.json`` and ``<out>/zoo-disk.md``.

Default corpus and default settings (A compact, B streamed): what a zoo suite gets without options.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "fixtures" / "models" / "pipeline" / "smollm2"
REF = ROOT / "fixtures" / "models" / "smollm2" / "smollm2-135m-hf"
GOAL_BYTES = 2 * 10**9


def dir_bytes(path: Path) -> int:
    total = 0
    for f in path.rglob("*"):
        try:
            if f.is_file():
                total += f.stat().st_size
        except OSError:  # removed while walking (a pending write renamed into place)
            pass
    return total


def models_b(n: int) -> list[Path]:
    files = sorted(PIPELINE.glob("*.gguf"))
    if len(files) < n:
        raise SystemExit(f"{PIPELINE}: {len(files)} GGUF files, {n} wanted; build them with "
                         "`.venv/bin/python -m fixtures.pipeline` (scripts/setup.sh does).")
    # correct files first (the conversions a zoo holds), then bug files to make up the number
    correct = [f for f in files if "-bug-" not in f.name]
    bugs = [f for f in files if "-bug-" in f.name]
    return (correct + bugs)[:n]


def write_manifest(path: Path, a: Path, bs: list[Path], corpus: str) -> None:
    lines = ["[defaults]", f'corpus = "{corpus}"', "", "[[pair]]", 'id = "smollm2"', f'model_a = "{a}"',
             "model_b = [" + ", ".join(f'"{b}"' for b in bs) + "]", ""]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=20)
    ap.add_argument("--corpus", default="default")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    if not REF.is_dir():
        raise SystemExit(f"{REF}: missing; build it with `.venv/bin/python -m fixtures.smollm2`.")
    bs = models_b(args.pairs)
    work = Path(tempfile.mkdtemp(prefix="convdiff-zoo-"))
    try:
        cwd, cache = work / "suite", work / "cache"
        cwd.mkdir()
        manifest = cwd / "zoo.convdiff.toml"
        write_manifest(manifest, REF, bs, args.corpus)
        samples: list[tuple[float, int]] = []
        done = threading.Event()
        t0 = time.perf_counter()

        def sample() -> None:
            while not done.wait(1.0):
                if cache.is_dir():
                    samples.append((time.perf_counter() - t0, dir_bytes(cache)))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        log = work / "pytest.log"
        with log.open("wb") as fh:
            proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", str(manifest.name),
                                   "--convdiff-cache-dir", str(cache), "--convdiff-json", str(work / "report.json")],
                                  cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": ""})
        wall = time.perf_counter() - t0
        done.set()
        sampler.join()
        tail = log.read_text(errors="replace").strip().splitlines()[-1:]
        report = json.loads((work / "report.json").read_text()) if (work / "report.json").is_file() else {"pairs": []}
        entries = []
        documents = 0
        for p in sorted(cache.iterdir()):
            if p.is_dir() and (p / "meta.json").is_file():
                meta = json.loads((p / "meta.json").read_text())
                entries.append({"entry": p.name, "model": Path(meta["spec"]["path"]).name,
                                "backend": meta["spec"]["backend"], "bytes": dir_bytes(p),
                                "streamed": meta.get("streamed") is not None,
                                "store": (meta.get("store") or {}).get("form")})
            elif p.is_dir() or p.is_file():
                documents += dir_bytes(p) if p.is_dir() else p.stat().st_size
        total = dir_bytes(cache)
        a_entries = [e for e in entries if not e["streamed"]]
        b_entries = [e for e in entries if e["streamed"]]
        res: dict[str, Any] = {
            "pairs": len(bs), "corpus": args.corpus, "model_a": str(REF), "models_b": [b.name for b in bs],
            "wall_s": wall, "pytest_rc": proc.returncode, "pytest_tail": tail,
            "verdicts": {p["model_b"].rsplit("/", 1)[-1]: p["verdict"] for p in report.get("pairs", [])},
            "total_bytes": total, "peak_bytes_during_run": max([s for _, s in samples] + [total]),
            "a_bytes": sum(e["bytes"] for e in a_entries), "b_bytes": [e["bytes"] for e in b_entries],
            "b_max_bytes": max((e["bytes"] for e in b_entries), default=0), "documents_bytes": documents,
            "entries": entries, "goal_bytes": GOAL_BYTES, "meets_goal": total < GOAL_BYTES,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "zoo-disk.json").write_text(json.dumps(res, indent=1))
    md = render(res)
    (out / "zoo-disk.md").write_text(md)
    print(md)
    return 0 if res["meets_goal"] and res["pytest_rc"] in (0, 1) else 1


def render(res: dict[str, Any]) -> str:
    mb = 1e6
    lines = [
        "# Disk left by a model-zoo suite (`bench/zoo_disk.py`)", "",
        f"One pytest session over a manifest of {res['pairs']} pairs: SmolLM2-135M-Instruct (transformers, "
        f"float32) against {res['pairs']} GGUF files from llama.cpp's converter and quantizer, corpus "
        f"`{res['corpus']}`, default settings (A compact, B streamed). {res['wall_s'] / 60:.1f} min; "
        f"pytest: {' '.join(res['pytest_tail'])}.", "",
        "| what | bytes |", "|---|---:|",
        f"| A's entry (compact) | {res['a_bytes'] / mb:.1f} MB |",
        f"| B entries ({len(res['b_bytes'])}) | {sum(res['b_bytes']) / mb:.2f} MB in all, largest "
        f"{res['b_max_bytes'] / 1e3:.0f} kB |",
        f"| pair documents, reports | {res['documents_bytes'] / mb:.2f} MB |",
        f"| **cache at the end** | **{res['total_bytes'] / mb:.1f} MB** (goal: under {res['goal_bytes'] / 1e9:.0f} GB) |",
        f"| largest size seen during the run (sampled each second) | {res['peak_bytes_during_run'] / mb:.1f} MB |",
        "", "Verdicts: " + ", ".join(f"{k} {v}" for k, v in sorted(res["verdicts"].items())) + ".", "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
