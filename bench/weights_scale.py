"""The weights twin at scale: a ~1B-parameter model through the real converter and quantiser, its weights family
in full and sampled mode against llama-quantize's own time, and what the sampled mode detects.

    python bench/weights_scale.py [--work /tmp/convdiff-1b] [--json bench/results/weights_scale.json]
    python bench/weights_scale.py --render docs/performance.md    # the tables from the JSON, into the docs

- **The model**: a random Llama checkpoint of 1.0 B parameters (TinyLlama's shape: hidden 2048, 22 layers,
  32 query and 4 key/value heads, MLP 5632) saved as BF16, converted to F16 by llama.cpp's
  ``convert_hf_to_gguf.py`` and quantised to Q4_K_M by ``llama_model_quantize`` (timed again at 1 and 2 threads
  in each run, beside the twin).
- **Throughput**: ``dequant.measure_weights`` (every tensor of B against A's and against its twin; what the weights
  family measures) in full mode and in sampled mode (``SAMPLE_SHARE`` of each tensor's rows), at 1 and 2 threads
  of llama.cpp's quantiser, in M parameters of B per second, and full mode's time over llama-quantize's.
- **Detection**: defects written into the Q4_K_M file's bytes (so that no other tensor changes), each judged by the
  sampled mode with the default bounds: whole tensors scaled, permuted or swapped, and one row or one block scaled,
  zeroed or swapped. Caught when the tensor fails, and by what: the twin's sampled blocks or the row check.

The files (about 3.5 GB) are kept in ``--work`` for a re-run; delete it afterwards. Times on a shared machine drift:
read the ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_JSON = ROOT / "bench" / "results" / "weights_scale.json"
SHAPE = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
         "num_key_value_heads": 4}
Q4_K_M = 15  # llama_ftype
LAYER = 11  # the middle layer the defects go into


def build(work: Path) -> dict[str, Any]:
    """The checkpoint and its F16 and Q4_K_M files (built once; llama-quantize is timed in ``main``)."""
    from fixtures import anyarch, pipeline

    hf, f16, q4 = work / "hf", work / "model.f16.gguf", work / "model.q4_k_m.gguf"
    stamp = work / "build.json"
    if stamp.is_file() and q4.is_file():
        return json.loads(stamp.read_text())
    work.mkdir(parents=True, exist_ok=True)
    import torch
    import transformers

    tok = pipeline.MODELS_DIR / anyarch.TOKENIZER_FROM
    vocab = len(json.loads((tok / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"])
    config = transformers.LlamaConfig(**SHAPE, vocab_size=vocab, max_position_embeddings=2048,
                                      tie_word_embeddings=False)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(hf)
    del model
    for f in anyarch._TOKENIZER_FILES:
        if (tok / f).is_file():
            shutil.copy2(tok / f, hf / f)
    made = time.perf_counter() - t0
    root = pipeline.converter_root(pipeline.DEFAULT_OUT / "_converter", pipeline.default_converter_version())
    t0 = time.perf_counter()
    pipeline.convert(root, hf, "f16", f16, "bench-1b", "gpt-2")
    converted = time.perf_counter() - t0
    _quantize(f16, q4, 2)
    out = {"checkpoint_seconds": made, "convert_seconds": converted, "parameters": _parameters(q4)}
    stamp.write_text(json.dumps(out, indent=2))
    return out


def _quantize(src: Path, dst: Path, threads: int) -> None:
    import subprocess

    from fixtures import pipeline

    rc = subprocess.run([sys.executable, "-c", pipeline._QUANTIZE, str(src), str(dst), str(Q4_K_M), str(threads)],
                        capture_output=True, text=True)
    if rc.returncode:
        raise SystemExit(f"llama_model_quantize failed: {rc.stderr[-2000:]}")


def _parameters(path: Path) -> int:
    from pytest_convdiff.backends.tensors import GGUFWeights

    g = GGUFWeights(path)
    n = sum(math.prod(t.shape) for t in g.tensors.values())
    g.close()
    return n


def measure(hf: Path, b: Path, share: float | None, threads: int) -> tuple[float, dict[str, Any]]:
    """(seconds, the weights family's measurement) with llama.cpp's quantiser on ``threads`` threads."""
    from pytest_convdiff.backends import dequant
    from pytest_convdiff.backends.tensors import GGUFWeights, SafetensorsWeights
    from pytest_convdiff.core import threads as threads_mod

    saved = threads_mod.default_threads
    threads_mod.default_threads = lambda: threads  # type: ignore[assignment]
    try:
        t0 = time.perf_counter()
        m = dequant.measure_weights(SafetensorsWeights(hf), GGUFWeights(b), sample=share)
        return time.perf_counter() - t0, m
    finally:
        threads_mod.default_threads = saved  # type: ignore[assignment]


def failing(m: dict[str, Any]) -> dict[str, list[str]]:
    """Each failing tensor's reasons, judged with the default bounds of B's class (q4)."""
    from pytest_convdiff.checks import bound_table
    from pytest_convdiff.checks.weights import judge_tensor

    bounds = bound_table().row("q4")
    out = {}
    for e in m["tensors"]:
        why = judge_tensor(e, bounds)
        if why:
            out[e["b_name"] or e["name"]] = [w for _, w in why]
    return out


# --------------------------------------------------------------------------- defects in B's bytes


def _rows(path: Path, name: str) -> tuple[Any, int]:
    from pytest_convdiff.backends.tensors import GGUFWeights

    g = GGUFWeights(path)
    t = g.tensors[name]
    g.close()
    return t, t.nbytes // t.rows


def _edit(path: Path, name: str, fn: Any) -> None:
    """``fn(rows)`` edits the tensor's stored rows (uint8, one row per tensor row) in place."""
    t, per = _rows(path, name)
    mm = np.memmap(path, dtype=np.uint8, mode="r+", offset=t.offset, shape=(t.rows, per))
    fn(mm)
    mm.flush()
    del mm


def _scale_q4k(rows: np.ndarray, factor: float) -> None:
    """Q4_K blocks of 144 bytes lead with d and dmin (f16): scaling both scales every value of the block."""
    blocks = rows.reshape(rows.shape[0], -1, 144)
    head = np.ascontiguousarray(blocks[:, :, :4]).view(np.float16) * np.float16(factor)
    blocks[:, :, :4] = head.astype(np.float16).view(np.uint8).reshape(blocks[:, :, :4].shape)


def defects(q4: Path, sampled_rows: Any) -> list[tuple[str, str, str, Any]]:
    """(what, scope, tensor, edit(path)) for each defect kind; rows are picked outside the twin's sample, so that
    a row-confined defect is seen by the row check or not at all."""
    from pytest_convdiff.core.weight_errors import rope_unpermute

    up, q, up2 = f"blk.{LAYER}.ffn_up.weight", f"blk.{LAYER}.attn_q.weight", f"blk.{LAYER + 1}.ffn_up.weight"
    free = [r for r in range(5632) if not sampled_rows(f"model.layers.{LAYER}.mlp.up_proj.weight", 5632)[r]]
    r1, r2 = free[7], free[8]

    def swap_tensors(path: Path) -> None:
        t1, per = _rows(path, up)
        t2, _ = _rows(path, up2)
        a = np.memmap(path, dtype=np.uint8, mode="r+", offset=t1.offset, shape=(t1.nbytes,))
        b = np.memmap(path, dtype=np.uint8, mode="r+", offset=t2.offset, shape=(t2.nbytes,))
        tmp = np.array(a)
        a[:] = b
        b[:] = tmp
        a.flush()
        b.flush()

    def scale_rows(rows_: list[int] | None, factor: float, block: int | None = None) -> Any:
        def fn(rows: np.ndarray) -> None:
            sel = rows if rows_ is None else rows[rows_]
            if block is not None:
                blocks = sel.reshape(sel.shape[0], -1, 144)
                one = np.ascontiguousarray(blocks[:, block:block + 1]).reshape(sel.shape[0], 144)
                _scale_q4k(one, factor)
                blocks[:, block] = one
            else:
                _scale_q4k(sel, factor)
            if rows_ is not None:
                rows[rows_] = sel
        return fn

    def zero_row(rows: np.ndarray) -> None:
        rows[r1] = 0

    def swap_rows(rows: np.ndarray) -> None:
        rows[[r1, r2]] = rows[[r2, r1]]

    def unpermute(rows: np.ndarray) -> None:
        rows[:] = rope_unpermute(np.array(rows), 32)

    return [
        ("tensor scaled ×1.25", "every block", up, lambda p: _edit(p, up, scale_rows(None, 1.25))),
        ("tensor scaled ×1.02", "every block", up, lambda p: _edit(p, up, scale_rows(None, 1.02))),
        ("q rows without the rope permutation", "every block", q, lambda p: _edit(p, q, unpermute)),
        ("two layers' tensors swapped", "every block", up, swap_tensors),
        ("one row scaled ×1.25", f"row {r1}", up, lambda p: _edit(p, up, scale_rows([r1], 1.25))),
        ("one row zeroed", f"row {r1}", up, lambda p: _edit(p, up, zero_row)),
        ("two rows swapped", f"rows {r1}, {r2}", up, lambda p: _edit(p, up, swap_rows)),
        ("one block scaled ×1.25", f"row {r1}, block 3", up, lambda p: _edit(p, up, scale_rows([r1], 1.25, 3))),
        ("one block scaled ×1.02", f"row {r1}, block 3", up, lambda p: _edit(p, up, scale_rows([r1], 1.02, 3))),
    ]


BEGIN, END = "<!-- weights-scale:begin -->", "<!-- weights-scale:end -->"


def render(doc: dict[str, Any]) -> str:
    """The JSON's tables, as docs/performance.md shows them."""
    m, q = doc["model"], doc["llama_quantize_seconds"]
    lines = [f"{m['parameters'] / 1e9:.2f} B parameters ({m['num_hidden_layers']} layers, hidden {m['hidden_size']}, "
             f"MLP {m['intermediate_size']}), {m['type']}, {doc['cpus']} CPUs; llama-quantize in the same run: "
             + ", ".join(f"{float(v):.1f} s at {k} thread(s)" for k, v in q.items()) + ".", "",
             "| mode | threads | seconds | M parameters/s | over llama-quantize | failing tensors (correct file) |",
             "|---|---|---|---|---|---|"]
    for r in doc["runs"]:
        lines.append(f"| {r['mode']} | {r['threads']} | {r['seconds']:.1f} | {r['mparams_per_s']:.1f} | "
                     f"{r['over_llama_quantize']:.2f} | {r['failing_tensors']} |")
    lines += ["", f"Detection of the sampled mode (1/{round(1 / doc['sample_share'])} of each tensor's rows, at least "
                  f"{doc['sample_min_rows']}; row limit {doc['row_factor']:g}× the twin rows' scale deviation), one "
                  "defect at a time in the Q4_K_M file's bytes, rows picked outside the sample:", "",
              "| defect | where | caught | by | other tensors failing |", "|---|---|---|---|---|"]
    for d in doc["detection"]:
        lines.append(f"| {d['defect']} | {d['scope']} of `{d['tensor']}` | {'yes' if d['caught'] else '**no**'} | "
                     f"{', '.join(d['by']) or '-'} | {len(d['false_failures'])} |")
    return "\n".join(lines)


def main() -> None:
    from _docs import write_between  # bench/_docs.py, beside this script

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/convdiff-1b"))
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    ap.add_argument("--skip-full", action="store_true", help="sampled mode only (the full twin takes minutes)")
    ap.add_argument("--render", type=Path, help="write the JSON's tables between the markers of this Markdown file")
    args = ap.parse_args()
    if args.render:
        write_between(args.render, BEGIN, END, render(json.loads(args.json.read_text(encoding="utf-8"))))
        return
    from pytest_convdiff.backends import dequant
    from pytest_convdiff.backends.pairing import Pair
    from pytest_convdiff.backends.tensors import StoredTensor

    built = build(args.work)
    hf, q4 = args.work / "hf", args.work / "model.q4_k_m.gguf"
    params = built["parameters"]
    print(f"model: {params / 1e9:.3f} B parameters", flush=True)
    runs = []
    quantize: dict[int, float] = {}
    for threads in (1, 2):  # llama-quantize beside the twin, in this run: a shared machine's speed drifts
        t0 = time.perf_counter()
        _quantize(args.work / "model.f16.gguf", args.work / "again.gguf", threads)
        quantize[threads] = time.perf_counter() - t0
        (args.work / "again.gguf").unlink(missing_ok=True)
    print("llama-quantize now: " + ", ".join(f"{s:.1f} s at {t} thread(s)" for t, s in quantize.items()), flush=True)
    for mode, share in (("sampled", dequant.SAMPLE_SHARE), ("full", None)):
        if mode == "full" and args.skip_full:
            continue
        for threads in (1, 2):
            secs, m = measure(hf, q4, share, threads)
            bad = failing(m)
            q = quantize[threads]
            runs.append({"mode": mode, "threads": threads, "seconds": secs, "mparams_per_s": params / secs / 1e6,
                         "over_llama_quantize": secs / q, "failing_tensors": len(bad)})
            print(f"{mode:8s} {threads} thread(s): {secs:7.1f} s, {params / secs / 1e6:7.1f} M parameters/s, "
                  f"{secs / q:.2f}× llama-quantize, {len(bad)} failing tensor(s)", flush=True)

    def sampled_rows(name: str, rows: int) -> np.ndarray:
        pair = Pair(name, None, StoredTensor(name, (rows, 2048), "Q4_K", Path("x"), 0, 0, rows, 2048))
        s = dequant.SampledRows.of(pair, dequant.SAMPLE_SHARE)
        return s.mask if s is not None else np.ones(rows, dtype=bool)

    found = []
    broken = args.work / "broken.gguf"
    for what, scope, tensor, edit in defects(q4, sampled_rows):
        shutil.copyfile(q4, broken)
        edit(broken)
        secs, m = measure(hf, broken, dequant.SAMPLE_SHARE, 2)
        bad = failing(m)
        hit = {n: w for n, w in bad.items() if n.startswith(f"blk.{LAYER}.") or n.startswith(f"blk.{LAYER + 1}.")}
        text = " ".join(" ".join(w) for w in hit.values())
        by = [name for name, said in (("sampled twin", "llama.cpp's quantiser makes"), ("row check", "stray from A's scale"))
              if said in text]
        other = sorted(set(bad) - set(hit))
        found.append({"defect": what, "scope": scope, "tensor": tensor, "caught": tensor in bad, "by": by,
                      "failing": sorted(hit), "false_failures": other, "seconds": secs})
        print(f"{what:38s} {scope:22s} {'caught' if tensor in bad else 'MISSED':7s} by {', '.join(by) or '-'}"
              f"{'; other tensors failing: ' + ', '.join(other) if other else ''}", flush=True)
    broken.unlink(missing_ok=True)
    doc = {"model": {**SHAPE, "parameters": params, "type": "Q4_K_M"}, "build": built,
           "llama_quantize_seconds": quantize, "runs": runs,
           "sample_share": dequant.SAMPLE_SHARE, "sample_min_rows": dequant.SAMPLE_MIN_ROWS,
           "row_factor": dequant.ROW_FACTOR, "detection": found, "cpus": os.cpu_count()}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"written to {args.json}")


if __name__ == "__main__":
    main()
