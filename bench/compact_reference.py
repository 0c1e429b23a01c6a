"""Each metric under a compact reference against full fp32 storage, on real pairs, and bytes per token.

    PYTHONPATH=. .venv/bin/python bench/compact_reference.py [--corpus quick|default] [--b FILE ...]
                                                      [--cache DIR] [--out bench/results]

Model A (SmolLM2-135M, transformers, float32) is run twice into one cache: stored full and stored
compact (the default). Each B (llama.cpp GGUFs of the pipeline fixtures: F16, Q8_0, Q4_K_M and broken
ones) is run once with its arrays kept, then reduced against both A entries, so the two columns differ
only by A's storage. For each pair: every verdict and check outcome (must be identical), and each
metric's relative error. Also: A's entry size in both forms and a golden reference saved from the
compact entry, in bytes per token. Results: ``<out>/compact-reference.json`` and ``.md`` (also printed).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pytest_convdiff import ModelSpec, RunSettings, load_corpus, run_model  # noqa: E402
from pytest_convdiff.checks import default_bounds  # noqa: E402
from pytest_convdiff.comparison import evaluate  # noqa: E402
from pytest_convdiff.pair import PairReducer  # noqa: E402
from pytest_convdiff.store.cache import Cache  # noqa: E402
from pytest_convdiff.store.reference import save_reference  # noqa: E402

PIPE = ROOT / "fixtures" / "models" / "pipeline" / "smollm2"
A_MODEL = ROOT / "fixtures" / "models" / "smollm2" / "smollm2-135m-hf"
DEFAULT_BS = ("smollm2.f16.gguf", "smollm2.q8_0.gguf", "smollm2.q4_k_m.gguf",
              "smollm2-bug-qk-permute-layer-7.q4_k_m.gguf", "smollm2-bug-scale-1.25-blk-15-ffn-down.q4_k_m.gguf",
              "smollm2-bug-rope-base-10000.q4_k_m.gguf", "smollm2-bug-output-random.q4_k_m.gguf")
MB = 10**6


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def scalars(pm: Any) -> dict[str, float]:
    """The metrics the checks judge and report, as one flat mapping."""
    out: dict[str, float] = {}
    m = pm.logits
    if m is not None:
        out.update({"nmse": m.nmse, "kl_mean": m.kl_mean, "kl_p99": m.kl_p99, "kl_max": m.kl_max,
                    "top1": m.topk_ordered[1], "top5_overlap": m.topk_overlap[5], "ppl_ratio": m.ppl_ratio,
                    "delta_p_rms": m.delta_p_rms, "max_abs": m.max_abs, "mean_abs": m.mean_abs})
        for row in m.position_profile.get("long", []):
            out[f"kl_mean@{row['bucket']}"] = row["kl_mean"]
    lm = pm.layers
    if lm is not None:
        for i, v in enumerate(lm.rfn):
            out[f"rfn[{i}]"] = v
        for name, values in lm.sublayers.items():
            for i, v in enumerate(values):
                out[f"rfn_{name}[{i}]"] = v
        for i, v in enumerate(lm.worst_row_rfn):
            out[f"worst_row_rfn[{i}]"] = v
        for row in lm.position_profile:
            out[f"rfn_last@{row['bucket']}"] = row["rfn"]
    return out


def rel(full: float, comp: float) -> float:
    if math.isnan(full) and math.isnan(comp):
        return 0.0
    if full == comp:
        return 0.0
    return abs(comp - full) / abs(full) if full else math.inf


def reduce(a: Any, b: Any, corpus: Any) -> Any:
    reducer = PairReducer(a)
    for p in corpus:
        reducer.add(p.id, b.logits(p.id), b.hidden(p.id), b.sublayers(p.id), b.hidden_swap(p.id))
    return reducer.result()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default="default")
    ap.add_argument("--b", nargs="*", default=list(DEFAULT_BS))
    ap.add_argument("--all", action="store_true", help="every pipeline file of SmolLM2 (correct and broken)")
    ap.add_argument("--cache", default="/tmp/convdiff-bench-compact")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    if args.all:
        args.b = [f.name for f in sorted(PIPE.glob("*.gguf"), key=lambda f: ("-bug-" in f.name, f.name))]
    corpus = load_corpus(args.corpus)
    cache = Cache(Path(args.cache) / args.corpus)
    spec_a = ModelSpec(str(A_MODEL))
    t0 = time.perf_counter()
    a_full = run_model(spec_a, corpus, cache, settings=RunSettings(store="full"))
    a_comp = run_model(spec_a, corpus, cache, settings=RunSettings(store="compact"))
    tokens = sum(len(a_full.inputs(p.id)) for p in corpus)
    ref_path = Path(args.cache) / f"golden-{args.corpus}"  # no extension: recognised by its content
    save_reference(a_comp, ref_path, corpus, RunSettings())
    sizes = {"tokens": tokens, "a_full_bytes": _bytes(a_full.entry.path), "a_compact_bytes": _bytes(a_comp.entry.path),
             "reference_bytes": _bytes(ref_path)}
    sizes.update({k.replace("_bytes", "_per_token"): v / tokens for k, v in sizes.items() if k.endswith("_bytes")})
    print(f"A ({tokens} tokens of {args.corpus}): full {sizes['a_full_bytes'] / MB:.1f} MB, compact "
          f"{sizes['a_compact_bytes'] / MB:.2f} MB, golden reference {sizes['reference_bytes'] / MB:.2f} MB "
          f"({time.perf_counter() - t0:.0f}s)", flush=True)

    pairs = []
    for name in args.b:
        t1 = time.perf_counter()
        spec_b = ModelSpec(str(PIPE / name))
        b = run_model(spec_b, corpus, cache, feed=a_full, settings=RunSettings(keep_b=True))
        pm_full, pm_comp = reduce(a_full, b, corpus), reduce(a_comp, b, corpus)
        cls, bounds = default_bounds(a_full.info, b.info)
        res_full = evaluate(a_full, b, corpus, bounds, pair_id=name, precision=cls, pm=pm_full, cache=cache)
        res_comp = evaluate(a_comp, b, corpus, bounds, pair_id=name, precision=cls, pm=pm_comp, cache=cache)
        out_full = {c.id: c.outcome for c in res_full.checks}
        out_comp = {c.id: c.outcome for c in res_comp.checks}
        sf, sc = scalars(pm_full), scalars(pm_comp)
        pairs.append({
            "b": name, "class": cls, "verdict_full": res_full.verdict, "verdict_compact": res_comp.verdict,
            "fdl_full": res_full.first_divergent_layer, "fdl_compact": res_comp.first_divergent_layer,
            "outcomes_differ": sorted(k for k in out_full if out_full[k] != out_comp.get(k)),
            "failing": sorted(k for k, v in out_full.items() if v == "failed"),
            "metrics": {k: {"full": sf[k], "compact": sc.get(k, math.nan), "rel": rel(sf[k], sc.get(k, math.nan))}
                        for k in sf}})
        p = pairs[-1]
        print(f"{name}: verdict {p['verdict_full']} / {p['verdict_compact']}, first divergent layer "
              f"{p['fdl_full']} / {p['fdl_compact']}, outcomes that differ: {p['outcomes_differ'] or 'none'} "
              f"({time.perf_counter() - t1:.0f}s)", flush=True)
        shutil.rmtree(b.entry.path, ignore_errors=True)  # a kept B is as large as a full A
    report = {"corpus": args.corpus, "sizes": sizes, "pairs": pairs}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"compact-reference-{args.corpus}.json").write_text(json.dumps(report, indent=1, default=str))
    md = table(report)
    (out / f"compact-reference-{args.corpus}.md").write_text(md)
    print(md)
    return 0


GROUPS = (("nmse", ("nmse",)), ("kl_mean", ("kl_mean",)), ("kl_p99", ("kl_p99",)),
          ("top1", ("top1",)), ("top5_overlap", ("top5_overlap",)), ("ppl_ratio", ("ppl_ratio",)),
          ("delta_p_rms", ("delta_p_rms",)), ("kl_mean by position", ("kl_mean@",)),
          ("rfn (every layer)", ("rfn[",)), ("rfn attn/mlp (every layer)", ("rfn_attn[", "rfn_mlp[")),
          ("rfn last layer by position", ("rfn_last@",)), ("kl_max", ("kl_max",)),
          ("worst_row_rfn", ("worst_row_rfn[",)), ("max_abs", ("max_abs",)), ("mean_abs", ("mean_abs",)))
GROUPS_JUDGED = 10  # the groups before: judged by a bound (the last layer's rfn by position has its own, 2 %)


def table(report: dict[str, Any]) -> str:
    s = report["sizes"]
    lines = [f"Corpus `{report['corpus']}`, {s['tokens']} tokens. Model A: SmolLM2-135M (transformers, float32).", "",
             "| A stored as | bytes | bytes per token |", "|---|---:|---:|",
             f"| full (fp32 logits, hidden, attn, mlp) | {s['a_full_bytes'] / MB:.1f} MB | {s['a_full_per_token']:,.0f} |",
             f"| compact cache entry | {s['a_compact_bytes'] / MB:.2f} MB | {s['a_compact_per_token']:,.0f} |",
             f"| compact golden reference | {s['reference_bytes'] / MB:.2f} MB | {s['reference_per_token']:,.0f} |",
             "", "| B | class | verdict full / compact | first divergent layer | checks that differ | failing (full) |",
             "|---|---|---|---|---|---|"]
    for p in report["pairs"]:
        lines.append(f"| {p['b']} | {p['class']} | {p['verdict_full']} / {p['verdict_compact']} | "
                     f"{p['fdl_full']} / {p['fdl_compact']} | {', '.join(p['outcomes_differ']) or 'none'} | "
                     f"{', '.join(p['failing'][:6])}{' ...' if len(p['failing']) > 6 else ''} |")
    lines += ["", "Largest relative error of each metric (compact vs full) per pair, in %; for a group of values "
              "(every layer, every position bucket) the worst one. kl_max, worst_row_rfn, max_abs and mean_abs are "
              "message-only estimates.", "",
              "| B | " + " | ".join(label for label, _ in GROUPS) + " |",
              "|---|" + "---:|" * len(GROUPS)]
    for p in report["pairs"]:
        cells = []
        for _, prefixes in GROUPS:
            items = [v for k, v in p["metrics"].items() if any(k == q or (q.endswith(("[", "@")) and k.startswith(q))
                                                               for q in prefixes)]
            if not items:
                cells.append("n/a")
                continue
            worst = max((v["rel"] for v in items), key=lambda r: r if not math.isnan(r) else math.inf)
            cells.append(f"{100 * worst:.2f}")
        lines.append(f"| {p['b'].replace('smollm2', '').strip('-.')} | " + " | ".join(cells) + " |")
    judged = [label for label, _ in GROUPS[:GROUPS_JUDGED]]
    worst_judged = max((max((v["rel"] for k, v in p["metrics"].items()
                             if not k.startswith(("kl_max", "worst_row_rfn", "max_abs", "mean_abs", "rfn_last@"))),
                            default=0.0) for p in report["pairs"]), default=0.0)
    lines += ["", f"Worst relative error of any judged metric ({', '.join(judged)}) over all pairs, the last layer's "
              f"rfn by position aside: {100 * worst_judged:.2f} %."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
