"""GGUFs quantised by another build of llama.cpp, judged by the weights twin (issue 30, docs/twins.md).

    python bench/other_build.py                              # measure, write bench/results/other_build.json
    python bench/other_build.py --render docs/twins.md       # the table from the JSON, into the docs

For each file fixtures/otherbuild.py makes with ``llama-quantize-fma`` (llama.cpp's quantiser built with
``-mfma -ffp-contract=fast``, as an arm64 build is), against the file the installed llama-cpp-python (an
x86-64 build without FMA) makes from the same F16: the share of blocks of each quantised type whose bytes
differ between the two builds, and what ``compare(static_only=True)`` says of the FMA file (the worst
``weights`` value, 1 = the bound, and the items that fail). The defect, a tensor scaled by 1.02 in the F16
before the FMA build quantised it, must fail at its layer. ``--held-out`` adds architectures none of this was
built on (default: Granite, whose config multiplies embeddings, residuals, attention and logits), made by
fixtures/anyarch.py and quantised by both builds here; no file of theirs is kept.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fixtures import otherbuild, pipeline  # noqa: E402
from pytest_convdiff.backends.gguf_header import GGML_TYPES, read_header  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "other_build.json"
BEGIN, END = "<!-- other-build:begin -->", "<!-- other-build:end -->"
FLOATS = {"F32", "F16", "BF16"}


def _blocks(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """Each quantised tensor's type and bytes, one row per block."""
    hdr = read_header(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, ne, ttype, off in hdr.tensors:
        tname, block, size = GGML_TYPES[ttype][:3]
        if tname in FLOATS:
            continue
        n = int(np.prod(ne)) // block
        out[name] = (tname, np.frombuffer(data, np.uint8, n * size, hdr.data_start + off).reshape(n, size))
    return out


def build_diff(ours: Path, theirs: Path) -> dict[str, dict[str, float]]:
    """Per quantised type: blocks, blocks whose bytes differ, and the share of differing bytes."""
    a, b = _blocks(ours), _blocks(theirs)
    per: dict[str, dict[str, float]] = {}
    for name, (tname, ra) in a.items():
        tb, rb = b[name]
        if tb != tname:  # another type mix: not a near-tie question
            continue
        d = per.setdefault(tname, {"blocks": 0, "differ": 0, "bytes": 0, "bytes_differ": 0})
        ne = ra != rb
        d["blocks"] += ra.shape[0]
        d["differ"] += int(ne.any(axis=1).sum())
        d["bytes"] += ra.size
        d["bytes_differ"] += int(ne.sum())
    return per


def _row(model: str, type_: str, kind: str, source: Path, theirs: Path, ours: Path, cache: Path) -> dict[str, Any]:
    """One file of the other build: how its blocks differ from ours (correct files) and what the weights family
    says of it against A (``compare(static_only=True)``)."""
    from pytest_convdiff import compare

    r = compare(str(source), str(theirs), corpus="quick", cache_dir=cache, static_only=True)
    weights = [c for c in r.checks if c.name == "weights"]
    worst = max(weights, key=lambda c: c.value if c.value is not None else float("inf"))
    row = {"model": model, "type": type_, "kind": kind, "file": theirs.name,
           "types": build_diff(ours, theirs) if kind == "correct" else None,
           "defect_type": _blocks(theirs).get(otherbuild.DEFECT["tensor"], (None,))[0] if kind == "bug" else None,
           "worst": worst.value, "worst_item": f"weights[{worst.param}]",
           "failed": [f"weights[{c.param}]" for c in weights if c.outcome == "failed"],
           "worst_message": worst.message.splitlines()[0]}
    print(f"{model} {type_} {kind}: worst {worst.value:.3f} at {row['worst_item']}; failed {row['failed']}",
          file=sys.stderr)
    return row


def measure(models: tuple[str, ...]) -> dict[str, Any]:
    rows = []
    for f in otherbuild.build(models, log=lambda line: print(line, file=sys.stderr)):
        ours = pipeline.DEFAULT_OUT / f.model / f"{f.model}.{f.type.lower()}.gguf"
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(_row(f.model, f.type, f.kind, f.source_path, f.path, ours, Path(tmp)))
    return {"machine": platform.machine(), "builds": {
        "ours": "llama-cpp-python's libggml-base (installed wheel, x86-64, GGML_NATIVE=OFF: no FMA)",
        "theirs": "llama-quantize-fma (fixtures/llama_tools.py: the same sources, -mfma -ffp-contract=fast)"},
        "defect": otherbuild.DEFECT, "rows": rows}


def held_out(model_type: str, types: tuple[str, ...] = ("Q2_K", "Q4_K_M", "Q5_K_M", "Q6_K")) -> list[dict[str, Any]]:
    """An architecture none of this was built on (fixtures/anyarch.py's tiny checkpoint, converted by llama.cpp's
    converter), quantised by both builds at ``types``, plus the ×1.02 defect at Q4_K_M by the FMA build: the rows
    ``measure`` gives, without a fixture kept for them."""
    from fixtures import anyarch, llama_tools

    tool = llama_tools.build_tool(llama_tools.QUANTIZE_FMA, log=lambda line: print(line, file=sys.stderr))
    paths = anyarch.build(model_type, correct_only=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        scaled = d / "scaled.f16.gguf"
        otherbuild._scaled(paths["f16"], scaled)
        for t, kind, src in [(t, "correct", paths["f16"]) for t in types] + [("Q4_K_M", "bug", scaled)]:
            theirs, ours = d / f"{kind}.{t}.fma.gguf", d / f"{kind}.{t}.gguf"
            otherbuild._quantize(tool, src, theirs, t)
            pipeline.quantize(src, ours, pipeline.FTYPES[t.lower()])
            rows.append(_row(f"{model_type} (held out)", t, kind, paths["hf"], theirs, ours, d / "cache"))
    return rows


def render(doc: dict[str, Any]) -> str:
    out = ["| model | ftype | type: blocks that differ between the builds (bytes) | worst `weights` value | "
           "`weights` items failed |", "|---|---|---|---|---|"]
    for r in doc["rows"]:
        if r["kind"] == "correct":
            per = "; ".join(f"{t}: {v['differ'] / v['blocks']:.2%} ({v['bytes_differ'] / v['bytes']:.3%})"
                            for t, v in sorted(r["types"].items()))
        else:
            d = doc["defect"]
            per = f"defect: {d['tensor']} ×{d['factor']} in the F16, then this build's {r['type']}"
            if r.get("defect_type"):
                per += f" ({d['tensor']}: {r['defect_type']})"
        failed = ", ".join(r["failed"]) if r["failed"] else "none"
        out.append(f"| {r['model']} | {r['type']} | {per} | {r['worst']:.2f} | {failed} |")
    out.append("")
    out.append(f"Measured by `bench/other_build.py` ({doc['machine']}): ours = {doc['builds']['ours']}; "
               f"theirs = {doc['builds']['theirs']}.")
    return "\n".join(out)


def main() -> None:
    from _docs import write_between  # bench/_docs.py, beside this script

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=list(otherbuild.TYPES))
    ap.add_argument("--json", type=Path, default=RESULTS)
    ap.add_argument("--render", type=Path, help="write the JSON's table between the markers of this Markdown file")
    ap.add_argument("--held-out", nargs="*", default=["granite"],
                    help="model types (fixtures/anyarch.py) built, quantised by both builds and judged; none kept")
    args = ap.parse_args()
    if args.render:
        write_between(args.render, BEGIN, END, render(json.loads(args.json.read_text(encoding="utf-8"))))
        return
    doc = measure(tuple(args.models))
    for mt in args.held_out:
        doc["rows"].extend(held_out(mt))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_name(args.json.name + ".part")
    tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    tmp.replace(args.json)
    print(render(doc))


if __name__ == "__main__":
    main()
