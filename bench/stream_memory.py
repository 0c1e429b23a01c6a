"""A 32k-token corpus against a 150k vocabulary in bounded memory and disk.

    .venv/bin/python bench/stream_memory.py [--part metrics,pipeline] [--tokens 32768] [--vocab 150000]
                                            [--prompts 4] [--pipeline-prompts 16] [--layers 24] [--hidden 896]

The logits of such a corpus are 19.7 GB per model in float32, more than this machine should hold
twice, let alone store per model.

``metrics``: the accumulators read their inputs a slice at a time (as they read memory-mapped full
cache files), so here each model's logits are a virtual ``[T, V]`` array that makes the rows it is
asked for on the fly (seeded per row, so A and B agree where they should). Reports the peak RSS of
the whole computation against the size of the logits it reduced, and the time per element.

``pipeline``: the plugin's own run path (``runner.run_model``, the cache, compact A, B streamed)
with a synthetic backend of a Qwen2-0.5B-like shape (150k vocabulary, 24 layers of 896, attention
and MLP outputs), one prompt's outputs in memory at a time as a real backend gives them. A runs
and its compact entry is written; B (A plus noise) runs on A's tokens and is reduced against that
entry as it comes. Reports the bytes each entry leaves on disk against what full storage would
take, the process's resident memory after every prompt (flat: it does not grow with the corpus)
and its peak, which one prompt's arrays set.

Writes ``bench/results/stream-memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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


def metrics_part(args: argparse.Namespace) -> dict[str, Any]:
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
    return {
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


# --------------------------------------------------------------------------- the pipeline part


class SyntheticBackend:
    """A model of a given shape whose outputs are made from small seeded tables: logits row ``r`` is one of 64
    rows chosen by the token and the position, rotated by the position; states likewise per layer. ``noise``
    adds seeded noise (model B). Only what ``runner`` calls of a backend."""

    BASE = 64

    def __init__(self, path: Path, spec: dict[str, Any]) -> None:
        from pytest_convdiff.backends.base import ModelInfo

        self.v, self.n_layers, self.h = int(spec["vocab"]), int(spec["layers"]), int(spec["hidden"])
        self.per_prompt = int(spec["tokens_per_prompt"])
        noise = float(spec["noise"])
        rng = np.random.default_rng(1234)  # the same tables for A and B
        self.logit_base = 3.0 * rng.standard_normal((self.BASE, self.v), dtype=np.float32)
        self.state_base = rng.standard_normal((3, self.BASE, self.h), dtype=np.float32)
        nrng = np.random.default_rng(99)
        self.logit_noise = noise * nrng.standard_normal((self.BASE, self.v), dtype=np.float32) if noise else None
        self.state_noise = 0.05 * noise * nrng.standard_normal((3, self.BASE, self.h), dtype=np.float32) if noise else None
        self.info = ModelInfo(path=str(path), backend="synthetic", architecture="synthetic", num_layers=self.n_layers,
                              vocab_size=self.v, hidden_size=self.h, dtype="float32", library_version="bench")

    def tokenize(self, text: str) -> list[int]:
        seed = int.from_bytes(text.encode()[-8:].rjust(8, b"\0"), "little")
        return np.random.default_rng(seed).integers(0, self.v, self.per_prompt).tolist()

    def decode_piece(self, token_id: int) -> str:
        return f"<{token_id}>"

    def special_tokens(self) -> dict[str, Any]:
        return {"bos_id": None, "eos_id": None}

    def forward(self, tokens: list[int], *, hidden_states: bool = True) -> Any:
        from pytest_convdiff.backends.base import ForwardOutput

        t = len(tokens)
        ids = np.asarray(tokens, dtype=np.int64)
        pick = (ids * 7 + np.arange(t)) % self.BASE
        logits = np.empty((t, self.v), dtype=np.float32)
        for r in range(t):
            logits[r] = np.roll(self.logit_base[pick[r]], r // self.BASE)
            if self.logit_noise is not None:
                logits[r] += self.logit_noise[(7 * r) % self.BASE]
        if not hidden_states:
            return ForwardOutput(logits)
        arrays = []
        for kind in range(3):  # hidden, attention output, MLP output
            out = np.empty((self.n_layers, t, self.h), dtype=np.float32)
            for layer in range(self.n_layers):
                rows = (pick + layer) % self.BASE
                out[layer] = self.state_base[kind][rows] * (1.0 + layer / self.n_layers)
                if self.state_noise is not None:
                    out[layer] += self.state_noise[kind][(rows * 3 + 1) % self.BASE]
            arrays.append(out)
        return ForwardOutput(logits, arrays[0], {"attn": arrays[1], "mlp": arrays[2]})

    def close(self) -> None:
        pass


# what ``backends.backend_module("synthetic")`` returns: this script's module-level functions
OPTIONS: tuple[Any, ...] = ()
CAPABILITIES: frozenset[str] = frozenset()


def library_version() -> str:
    return "bench"


def fingerprint_files(path: Path) -> list[Path]:
    return [path]


def probe(path: Path, options: dict[str, Any] | None = None) -> Any:
    return load(path, options).info


def load(path: Path, options: dict[str, Any] | None = None) -> SyntheticBackend:
    return SyntheticBackend(path, json.loads(Path(path).read_text()))


def current_rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def pipeline_part(args: argparse.Namespace) -> dict[str, Any]:
    """A then B through ``runner.run_model`` into a fresh cache directory."""
    from pytest_convdiff.backends import base, registry
    from pytest_convdiff.core.corpus import Corpus, Prompt
    from pytest_convdiff.runner import ModelSpec, RunSettings, run_model
    from pytest_convdiff.store.cache import Cache

    global CAPABILITIES
    CAPABILITIES = frozenset({base.HIDDEN_STATES, base.SUBBLOCKS})
    registry.register(registry.BackendSpec("synthetic", __name__))  # this module's functions below (run as "__main__")
    per_prompt = args.tokens // args.pipeline_prompts
    work = Path(tempfile.mkdtemp(prefix="convdiff-stream-", dir=args.workdir))
    try:
        models = {}
        for name, noise in (("a", 0.0), ("b", 0.05)):
            models[name] = work / f"model-{name}.json"
            models[name].write_text(json.dumps({"vocab": args.vocab, "layers": args.layers, "hidden": args.hidden,
                                                "tokens_per_prompt": per_prompt, "noise": noise}))
        corpus = Corpus(tuple(Prompt(f"s{i:02d}", f"synthetic prompt {i:02d}") for i in range(args.pipeline_prompts)),
                        source="synthetic")
        cache = Cache(work / "cache")
        settings = RunSettings(greedy_tokens=0, causality=False, tokenizer_cases=False)
        trace: list[dict[str, Any]] = []
        t_start = time.perf_counter()

        def progress(msg: str) -> None:
            if "] s" in msg:  # after each prompt
                trace.append({"t": round(time.perf_counter() - t_start, 1), "what": msg.strip(),
                              "rss_mib": round(current_rss_mib()), "peak_rss_mib": round(peak_rss_mib())})
                print(f"  {msg.strip()}: RSS {trace[-1]['rss_mib']} MiB, peak {trace[-1]['peak_rss_mib']} MiB",
                      file=sys.stderr)

        res: dict[str, Any] = {"tokens": per_prompt * args.pipeline_prompts, "vocab": args.vocab,
                               "layers": args.layers, "hidden": args.hidden, "prompts": args.pipeline_prompts,
                               "tokens_per_prompt": per_prompt}
        t = time.perf_counter()
        run_a = run_model(ModelSpec(str(models["a"]), backend="synthetic"), corpus, cache, settings=settings,
                          progress=progress, label="A ")
        res["a_wall_s"] = time.perf_counter() - t
        res["a_entry_bytes"] = dir_bytes(run_a.entry.path)
        res["peak_rss_after_a_mib"] = peak_rss_mib()
        t = time.perf_counter()
        run_b = run_model(ModelSpec(str(models["b"]), backend="synthetic"), corpus, cache, feed=run_a,
                          settings=settings, progress=progress, label="B ")
        res["b_wall_s"] = time.perf_counter() - t
        res["b_entry_bytes"] = dir_bytes(run_b.entry.path)
        res["cache_bytes"] = dir_bytes(work / "cache")
        res["peak_rss_mib"] = peak_rss_mib()
        v, n_layers, h = args.vocab, args.layers, args.hidden
        res["full_entry_bytes_per_model"] = res["tokens"] * (4 * (v + 3 * n_layers * h) + 16)
        res["one_prompt_outputs_mib"] = per_prompt * 4 * (v + 3 * n_layers * h) / 2**20
        res["a_bytes_per_token"] = res["a_entry_bytes"] / res["tokens"]
        res["b_bytes_per_token"] = res["b_entry_bytes"] / res["tokens"]
        from pytest_convdiff.pair import pair_metrics

        m = pair_metrics(run_a, run_b, corpus)
        res["metrics"] = {"nmse": m.logits.nmse, "kl_mean": m.logits.kl_mean, "top1": m.logits.topk_ordered[1],
                          "rfn_last_layer": m.layers.rfn[-1] if m.layers and m.layers.rfn else None}
        res["rss_trace"] = trace
        rss = [x["rss_mib"] for x in trace]
        half = len(rss) // 2
        res["rss_first_half_max_mib"] = max(rss[:half]) if half else None
        res["rss_second_half_max_mib"] = max(rss[half:]) if rss else None
        return res
    finally:
        shutil.rmtree(work, ignore_errors=True)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", default="metrics,pipeline", help="metrics, pipeline or both (comma-separated)")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--vocab", type=int, default=150000)
    ap.add_argument("--prompts", type=int, default=4, help="metrics part: prompts the tokens are split into")
    ap.add_argument("--pipeline-prompts", type=int, default=16, help="pipeline part: prompts (2,048 tokens each)")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=896)
    ap.add_argument("--workdir", default=None, help="where the pipeline part's cache goes (default: the temp dir)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/stream-memory.json"))
    args = ap.parse_args(argv)
    parts = {p.strip() for p in args.part.split(",") if p.strip()}
    if not parts <= {"metrics", "pipeline"}:
        ap.error(f"--part: unknown {sorted(parts - {'metrics', 'pipeline'})}; use metrics, pipeline or both")
    out = Path(args.out)
    res: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {}
    if "tokens" in res:  # the file's earlier layout: the metrics part alone
        res = {"metrics": res}
    # each part in its own process: one part's peak RSS must not count in the other's
    if parts == {"metrics"}:
        res["metrics"] = metrics_part(args)
    elif parts == {"pipeline"}:
        res["pipeline"] = pipeline_part(args)
    else:
        import subprocess

        for part in ("metrics", "pipeline"):
            subprocess.run([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--part", part],
                           check=True)
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
