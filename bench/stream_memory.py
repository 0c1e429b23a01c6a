"""Metric computation in bounded memory: a 32k-token corpus against a 150k vocabulary.

    .venv/bin/python bench/stream_memory.py [--tokens 32768] [--vocab 150000] [--prompts 4]

The logits of such a corpus are 19.7 GB per model in float32, more than this machine should hold
twice. The accumulators read their inputs a slice at a time (as they read memory-mapped cache
files), so here each model's logits are a virtual ``[T, V]`` array that makes the rows it is asked
for on the fly (seeded per row, so A and B agree where they should). The script reports the peak
RSS of the whole computation against the size of the logits it reduced, and the time per element.
Writes ``bench/results/stream-memory.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pytest_convdiff.core import metrics  # noqa: E402


class VirtualLogits:
    """A read-only ``[T, V]`` float32 array whose rows are made when sliced: row r is one of 64
    seeded random rows, rotated by r // 64 (cheap to make, different at every position).

    B's rows are A's plus one of 64 seeded noise rows, so every metric has a non-trivial value.
    """

    BASE = 64

    def __init__(self, rows: int, vocab: int, seed: int, noise: float) -> None:
        self.shape = (rows, vocab)
        rng = np.random.default_rng(seed)
        self.base = 3.0 * rng.standard_normal((self.BASE, vocab), dtype=np.float32)
        self.noise = (noise * np.random.default_rng(seed + 1).standard_normal((self.BASE, vocab), dtype=np.float32)
                      if noise else None)

    def __getitem__(self, index: slice) -> np.ndarray:
        start, stop, _ = index.indices(self.shape[0])
        out = np.empty((stop - start, self.shape[1]), dtype=np.float32)
        for r in range(start, stop):
            out[r - start] = np.roll(self.base[r % self.BASE], r // self.BASE)
            if self.noise is not None:
                out[r - start] += self.noise[(7 * r) % self.BASE]
        return out


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--vocab", type=int, default=150000)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--out", default=str(ROOT / "bench/results/stream-memory.json"))
    args = ap.parse_args(argv)

    per_prompt = args.tokens // args.prompts
    start_rss = peak_rss_mib()
    acc = metrics.LogitAccumulator()
    t0 = time.perf_counter()
    gen = 0.0
    for i in range(args.prompts):
        a = VirtualLogits(per_prompt, args.vocab, seed=10 * i, noise=0.0)
        b = VirtualLogits(per_prompt, args.vocab, seed=10 * i, noise=0.05)
        targets = np.random.default_rng(i).integers(0, args.vocab, per_prompt).tolist()
        t = time.perf_counter()
        a[0:64], b[0:64]  # noqa: B018 - time the row generator alone on a small slice
        gen += (time.perf_counter() - t) / 128 * 2 * per_prompt
        acc.update(f"p{i}", a, b, targets)
        print(f"prompt {i + 1}/{args.prompts}: {per_prompt} positions, peak RSS so far {peak_rss_mib():.0f} MiB",
              file=sys.stderr)
    m = acc.result()
    wall = time.perf_counter() - t0
    elements = args.prompts * per_prompt * args.vocab
    res = {
        "tokens": args.prompts * per_prompt, "vocab": args.vocab, "prompts": args.prompts,
        "chunk_rows": max(8, metrics.CHUNK_ELEMENTS // args.vocab),
        "logits_gb_per_model_float32": elements * 4 / 1e9,
        "peak_rss_mib": peak_rss_mib(), "rss_before_mib": start_rss,
        # the row generators' own tables (A base, B base, B noise), two prompts' worth while one replaces the other
        "generator_tables_mib": 2 * 3 * VirtualLogits.BASE * args.vocab * 4 / 2**20,
        "wall_s": wall, "row_generation_s_estimate": gen,
        "metric_ns_per_element_pair": (wall - gen) / elements * 1e9,
        "nmse": m.nmse, "kl_mean": m.kl_mean, "top1": m.topk_ordered[1],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
