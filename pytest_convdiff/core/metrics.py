"""Comparison metrics between a reference model (A) and a converted one (B).

Plain numpy, no pytest and no torch, so they can be unit-tested against hand
computed values and used from a notebook. Each whole-corpus metric has a small
accumulator that takes one prompt at a time, so a long corpus never has to be
held in memory at once; the per-prompt functions are the definitions.

Definitions follow the tools users already know:
- NMSE = mean((B - A)^2) / var(A), as llama.cpp's check-nmse.py, with its labels.
- top-K agreement = the *ordered* top-K index lists are identical (exllamav2's
  model_diff.py); the set overlap |topK(A) & topK(B)| / K is reported beside it.
- KL = KL(P_A || P_B) per position, in nats (llama-perplexity's direction).
- rfn = ||h_B - h_A||_F / ||h_A||_F over all positions of one layer.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import compact, llama_stats
from .kernels import exp_lse, exp_lse_max, log_softmax, topk_indices
from .threads import map_ordered

TOPK_MAX = 5
# Position buckets of the position profile: conversion bugs in position handling (rope base, rope
# scaling, sliding windows) grow with position; quantisation noise does not.
POSITION_BUCKETS: tuple[tuple[int, int | None, str], ...] = (
    (0, 64, "0-64"), (64, 256, "64-256"), (256, 1024, "256-1k"), (1024, 4096, "1k-4k"), (4096, None, "4k+"))
# llama-perplexity's KL and delta-p percentiles
KL_PERCENTILES: tuple[float, ...] = (99.9, 99.0, 95.0, 90.0, 50.0, 10.0, 5.0, 1.0)
# Logit elements per streamed chunk (rows = this // vocabulary size, at least 8). Small enough that a chunk's
# float64 temporaries (8 MiB) are reused from the heap: at 1 << 22 they were 32 MiB, above glibc's mmap
# threshold, and every temporary cost its page faults (summarising A and reducing B ran 1.4-1.9x slower).
CHUNK_ELEMENTS = 1 << 20

# llama.cpp check-nmse.py's interpretation scale: (upper bound, label).
NMSE_LABELS: tuple[tuple[float, str], ...] = (
    (0.0, "perfect match"),
    (1e-6, "essentially identical"),
    (1e-4, "excellent match"),
    (1e-3, "very good match"),
    (1e-2, "good match"),
    (1e-1, "acceptable match"),
    (1.0, "poor match"),
)


# --------------------------------------------------------------------------- definitions


def nmse(ref: np.ndarray, test: np.ndarray) -> float:
    """mean((test - ref)^2) / var(ref); inf when ref is constant and test differs."""
    ref = np.asarray(ref, dtype=np.float64)
    test = np.asarray(test, dtype=np.float64)
    if ref.shape != test.shape:
        raise ValueError(f"shape mismatch: reference {ref.shape} vs test {test.shape}")
    mse = float(np.mean((test - ref) ** 2))
    var = float(np.var(ref))
    return _safe_ratio(mse, var)


def _safe_ratio(num: float, den: float) -> float:
    if math.isnan(num) or math.isnan(den):
        return math.nan
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def nmse_db(value: float) -> float:
    """NMSE in decibels: 10 * log10(NMSE); -inf for a perfect match."""
    if math.isnan(value):
        return math.nan
    if value <= 0.0:
        return -math.inf
    return 10.0 * math.log10(value)


def nmse_label(value: float) -> str:
    """llama.cpp's words for an NMSE value."""
    if math.isnan(value):
        return "not a number"
    if value == 0.0:
        return NMSE_LABELS[0][1]
    for bound, label in NMSE_LABELS[1:]:
        if value < bound:
            return label
    return "very poor match"


def kl_per_position(ref_logits: np.ndarray, test_logits: np.ndarray) -> np.ndarray:
    """KL(P_ref || P_test) for each row (position), in nats."""
    lp = log_softmax(ref_logits)
    lq = log_softmax(test_logits)
    p = np.exp(lp)
    kl = np.sum(p * (lp - lq), axis=-1)
    # Tiny negative values are rounding; clamp them but keep NaN visible.
    return np.where(kl < 0, 0.0, kl)



def topk_agreement(ref_logits: np.ndarray, test_logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per position: (ordered top-k lists identical as 0/1, set overlap fraction)."""
    a = topk_indices(ref_logits, k)
    b = topk_indices(test_logits, k)
    ordered = np.all(a == b, axis=-1).astype(np.float64)
    overlap = np.array([len(set(ra.tolist()) & set(rb.tolist())) / k for ra, rb in zip(a, b, strict=True)])
    return ordered, overlap


def rfn(ref: np.ndarray, test: np.ndarray) -> float:
    """Relative Frobenius-norm error ||test - ref||_F / ||ref||_F."""
    ref = np.asarray(ref, dtype=np.float64)
    test = np.asarray(test, dtype=np.float64)
    num = float(np.sqrt(np.sum((test - ref) ** 2)))
    den = float(np.sqrt(np.sum(ref**2)))
    return _safe_ratio(num, den)


def first_divergent_layer(rfns: Sequence[float], bound: float, jump: float = 4.0) -> int | None:
    """The layer where B starts to diverge from A, or None when every layer is within ``bound``.

    Quantisation noise grows smoothly through the layers and may cross the bound
    late; a real defect shows as a jump. So, once some layer fails, the answer is
    the first layer at or before it whose rfn is more than ``jump`` times the
    largest rfn before it (and above a tenth of the bound), else the first failing layer.
    A layer after exact zeros (identical so far) counts as a jump only when it fails itself.
    """
    values = [math.inf if (v is None or math.isnan(v)) else float(v) for v in rfns]
    failing = [i for i, v in enumerate(values) if not v <= bound]
    if not failing:
        return None
    first_fail = failing[0]
    floor = bound / 10.0
    running_max = 0.0
    for i in range(first_fail + 1):
        v = values[i]
        jumped = v > jump * running_max if running_max > 0.0 else v > bound
        if v > floor and jumped:
            return i
        running_max = max(running_max, v)
    return first_fail


@dataclass
class TokenDiff:
    """How two token-id sequences differ."""

    equal: bool
    len_a: int
    len_b: int
    first_mismatch: int | None = None
    id_a: int | None = None
    id_b: int | None = None
    mismatches: int = 0


def compare_tokens(a: Sequence[int], b: Sequence[int]) -> TokenDiff:
    """First differing position and how many positions differ (length difference counts)."""
    a = list(a)
    b = list(b)
    n = min(len(a), len(b))
    diffs = [i for i in range(n) if a[i] != b[i]]
    mismatches = len(diffs) + abs(len(a) - len(b))
    if not mismatches:
        return TokenDiff(True, len(a), len(b))
    first = diffs[0] if diffs else n
    return TokenDiff(
        False, len(a), len(b), first,
        a[first] if first < len(a) else None,
        b[first] if first < len(b) else None,
        mismatches,
    )


# --------------------------------------------------------------------------- accumulators


@dataclass
class Where:
    """A location in the corpus, for 'worst value and where'."""

    prompt: str
    position: int
    layer: int | None = None

    def __str__(self) -> str:
        s = f"prompt {self.prompt!r}, position {self.position}"
        return s if self.layer is None else f"layer {self.layer}, {s}"


@dataclass
class LogitMetrics:
    """Whole-corpus logit comparison of A and B on A's tokens."""

    positions: int
    nmse: float
    nmse_db: float
    nmse_label: str
    mse: float
    max_abs: float
    max_abs_where: Where | None
    mean_abs: float
    nonfinite_a: int
    nonfinite_b: int
    nonfinite_where: Where | None
    topk_ordered: dict[int, float]
    topk_overlap: dict[int, float]
    topk_worst_prompt: dict[int, tuple[str, float]]
    kl_mean: float
    kl_p99: float
    kl_max: float
    kl_max_where: Where | None
    ppl_a: float
    ppl_b: float
    ppl_ratio: float
    delta_p_mean: float
    delta_p_rms: float
    per_prompt: dict[str, dict[str, float]] = field(default_factory=dict)
    # llama-perplexity's view: KL percentiles, delta-p percentiles, same top-1 with its uncertainty
    kl_percentiles: dict[str, float] = field(default_factory=dict)
    delta_p_percentiles: dict[str, float] = field(default_factory=dict)
    top1_stderr: float = math.nan
    # by position bucket, over every prompt (``all``) and over the prompts long enough to reach past
    # 1k tokens (``long``: the same texts early and late, so the text does not confound position)
    position_profile: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    # against A's compact form: NMSE and KL estimated, max/mean |B - A| over A's top K and sampled positions
    compact: bool = False
    # llama-perplexity's final statistics (``core.llama_stats.PerplexityStats.to_dict``), Q = B and base = A,
    # over the positions that predict a next token; KL here is exact over the whole vocabulary
    llama: dict[str, Any] = field(default_factory=dict)
    # against a llama-perplexity base file (A's log-probabilities at each chunk's second half, 16-bit, within
    # 16 nats of the top): KL over the entries it keeps, top-K from its rows; no NMSE or |B - A| (no logits)
    base_file: bool = False
    # a mixture of experts whose routers chose other experts than the reference's (``core.routing``): KL mean
    # and 99th percentile over the positions no flip can reach (``reach``); None when no flip reaches any
    kl_mean_kept: float | None = None
    kl_p99_kept: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in self.__dict__.items():
            if isinstance(v, Where):
                out[k] = v.__dict__
            elif isinstance(v, dict):
                out[k] = {str(kk): (list(vv) if isinstance(vv, tuple) else vv) for kk, vv in v.items()}
            else:
                out[k] = v
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LogitMetrics:
        """The inverse of ``to_dict`` (NaN survives: JSON from Python keeps it)."""
        kw = dict(d)
        for k in ("max_abs_where", "nonfinite_where", "kl_max_where"):
            kw[k] = Where(**kw[k]) if kw.get(k) else None
        for k in ("topk_ordered", "topk_overlap"):
            kw[k] = {int(kk): vv for kk, vv in kw[k].items()}
        kw["topk_worst_prompt"] = {int(kk): (vv[0], vv[1]) for kk, vv in kw["topk_worst_prompt"].items()}
        return cls(**kw)


class SharedRows:
    """B's own figures of one prompt's logit rows (their sums, sketches, top k, maxima and normalisers), made by the
    first reduction of those rows and read by the others: B's run over the corpus is reduced against A and, at the
    runtime twin's prompts' first positions, against T (``runner.Companion``): the same rows of B, so the same
    figures, computed once. Row by row they do not depend on which other rows were taken with them, so a reduction
    that reads them gives what one that computes them gives. Rows of other values (another dtype), another sketch
    or another k are not shared."""

    def __init__(self) -> None:
        self._sig: tuple[Any, ...] | None = None
        self._rows: dict[str, np.ndarray] = {}
        self._done: np.ndarray = np.zeros(0, dtype=bool)
        self._lock = threading.Lock()  # chunks are put from the cores' threads (``threads.map_ordered``)

    def get(self, sig: tuple[Any, ...], start: int, stop: int) -> dict[str, np.ndarray] | None:
        """The figures of rows ``start:stop``, when every one of them was put with this signature."""
        if sig != self._sig or stop > self._done.size or not self._done[start:stop].all():
            return None
        return {name: arr[start:stop] for name, arr in self._rows.items()}

    def put(self, sig: tuple[Any, ...], rows: int, start: int, rows_of: dict[str, np.ndarray]) -> None:
        """Rows ``start..`` of a prompt of ``rows`` rows; the first signature put is the one kept."""
        with self._lock:
            if self._sig is None:
                self._sig = sig
                self._done = np.zeros(rows, dtype=bool)
                self._rows = {name: np.empty((rows, *arr.shape[1:]), dtype=arr.dtype) for name, arr in rows_of.items()}
            if sig != self._sig:
                return
            n = min(next(iter(rows_of.values())).shape[0], self._done.size - start)
            if n <= 0:
                return
            for name, arr in rows_of.items():
                self._rows[name][start:start + n] = arr[:n]
            self._done[start:start + n] = True


def _b_rows(ref: compact.LogitSummary, test: np.ndarray, keys: np.ndarray, span: tuple[int, int], k: int,
            cfg: compact.CompactConfig, shared: SharedRows | None = None) -> dict[str, Any]:
    """What ``update_compact`` needs of B's rows ``span`` alone (no running sum): their float64 sum, sketch, top
    ``k``, log-normaliser, mass outside A's top K and which rows are finite. B's own figures come from ``shared``
    when another reduction of these rows made them; the mass outside A's top K is this reference's own."""
    start, stop = span
    b32 = np.asarray(test[start:stop], dtype=np.float32)
    top_idx = np.asarray(ref.top_idx[start:stop], dtype=np.int64)
    sig = (b32.dtype.str, test.dtype.str, b32.shape[1], k, cfg.seed, cfg.logit_sketch)
    own = shared.get(sig, start, stop) if shared is not None else None
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        if own is None:
            exp_b, total_b, lse_b, max_b = exp_lse_max(b32)
            rowsum = np.sum(b32, axis=1, dtype=np.float64)
            # a row is finite exactly where its float64 sum is (compact.nonfinite_rows): no pass of its own
            own = {"rowsum": rowsum, "sketch": compact.sketch(b32, keys[start:stop], cfg.logit_sketch),
                   "top": topk_indices(b32, k), "lse": lse_b, "total": total_b, "max": max_b,
                   "finite": np.isfinite(rowsum)}
            if shared is not None:
                shared.put(sig, test.shape[0], start, own)
        else:
            exp_b = np.exp(b32 - own["max"][:, None])  # exp_lse's e, from its maxima
        rest_b = compact.rest_mass(exp_b, own["total"], top_idx)
    del exp_b
    return {"sum": float(np.sum(own["rowsum"])), "sketch": own["sketch"], "top": own["top"], "lse": own["lse"],
            "rest": rest_b, "finite": own["finite"]}


class LogitAccumulator:
    """Streams per-prompt logits into corpus-wide metrics (float64 sums, Chan's variance merge)."""

    def __init__(self, topk_max: int = TOPK_MAX) -> None:
        self.topk_max = topk_max
        self.n = 0  # elements
        self.positions = 0
        self.mean_a = 0.0
        self.m2_a = 0.0
        self.sq_err = 0.0
        self.abs_err = 0.0
        self.max_abs = -1.0
        self.max_abs_where: Where | None = None
        self.nonfinite_a = 0
        self.nonfinite_b = 0
        self.nonfinite_where: Where | None = None
        self.topk_ordered = {k: 0.0 for k in range(1, topk_max + 1)}
        self.topk_overlap = {k: 0.0 for k in range(1, topk_max + 1)}
        self.topk_by_prompt: dict[int, list[tuple[str, float]]] = {k: [] for k in range(1, topk_max + 1)}
        self.kl: list[np.ndarray] = []
        self.kl_max = -1.0
        self.kl_max_where: Where | None = None
        self.nll_a = 0.0
        self.nll_b = 0.0
        self.nll_n = 0
        self.dp_sum = 0.0
        self.dp_sq = 0.0
        self.dp: list[np.ndarray] = []
        self.kl_pos: list[np.ndarray] = []  # the position of each KL value
        self.kl_prompt_len: list[np.ndarray] = []  # the length of its prompt
        # whether a router sent the token to other experts in B than in A (core.routing): left out of the
        # position profile, which judges growth with position, not near-tied routing decisions
        self.kl_rerouted: list[np.ndarray] = []
        self.kl_reached: list[np.ndarray] = []
        self.same_top1: list[np.ndarray] = []
        self.per_prompt: dict[str, dict[str, float]] = {}
        self.compact = False  # A compact (core.compact): NMSE from a sketch, mean |B - A| over sampled positions
        self.llama = llama_stats.Sums()
        self.abs_n = 0  # elements behind abs_err when compact
        self.base_file = False  # A a llama-perplexity base file (update_base)

    def update(self, prompt: str, ref: np.ndarray, test: np.ndarray, tokens: Sequence[int] | None = None,
               chunk: int | None = None, rerouted: np.ndarray | None = None, reach: np.ndarray | None = None) -> None:
        """Add one prompt's logits ``[T, V]``, ``chunk`` positions at a time, so the work arrays stay
        at ``chunk x V`` however long the prompt (memory-mapped inputs are read in slices). The
        default chunk holds about 2**22 elements (32 MiB per float64 work array) whatever V is.
        ``rerouted`` [T] leaves positions out of the position profile, ``reach`` [T] out of the kept KL."""
        if ref.shape != test.shape:
            raise ValueError(f"prompt {prompt!r}: logits shape mismatch, A {ref.shape} vs B {test.shape}")
        if len(ref.shape) != 2 or ref.shape[0] == 0:
            return
        self._prompt(prompt, ref.shape[0], ref.shape[1], tokens, chunk,
                     lambda start, stop, targets, local: self._update_rows(
                         prompt, np.asarray(ref[start:stop]), np.asarray(test[start:stop]), start, targets, local),
                     rerouted, reach)

    def update_compact(self, prompt: str, ref: compact.LogitSummary, test: np.ndarray, cfg: compact.CompactConfig,
                       tokens: Sequence[int] | None = None, chunk: int | None = None,
                       rerouted: np.ndarray | None = None, reach: np.ndarray | None = None,
                       shared: SharedRows | None = None) -> None:
        """``update`` against A's compact logits (``core.compact``): top-K/PPL exact, KL over A's top K plus
        a rest bucket, NMSE from the sketch, max |B - A| over A's top K and the sampled positions. ``shared``: B's
        own figures of these rows, when another reduction of them made them (``SharedRows``)."""
        t = ref.stats.shape[0]
        if test.shape != (t, ref.vocab):
            raise ValueError(f"prompt {prompt!r}: logits shape mismatch, A {(t, ref.vocab)} vs B {test.shape}")
        if t == 0:
            return
        self.compact = True
        chunk = chunk or max(8, CHUNK_ELEMENTS // max(1, ref.vocab))
        keys = compact.row_keys(cfg.seed, prompt, np.arange(t))
        k = min(self.topk_max, ref.top_idx.shape[1])
        spans = [(start, min(t, start + chunk)) for start in range(0, t, chunk)]
        # B's own arrays chunk by chunk on the cores (each chunk's alone), then added up in order as before
        b_side = dict(zip((s for s, _ in spans), map_ordered(lambda sp: _b_rows(ref, test, keys, sp, k, cfg, shared), spans),
                          strict=True))
        self._prompt(prompt, t, ref.vocab, tokens, chunk,
                     lambda start, stop, targets, local: self._update_rows_compact(
                         prompt, ref, cfg, start, np.asarray(test[start:stop]), targets, local, b_side[start]),
                     rerouted, reach)

    def update_base(self, prompt: str, rows: np.ndarray, test: np.ndarray, targets: np.ndarray, first: int,
                    chunk: int | None = None) -> None:
        """B's logits at a chunk's scored positions ``[T, V]`` against a llama-perplexity base file's rows
        ``[T, W]`` (row t at position ``first + t`` predicts ``targets[t]``). The file decides what can be
        measured: KL, same top and delta p as llama-perplexity scores them (``llama_stats.score_rows``),
        top-K from the decoded rows, PPL; not NMSE or |B - A|, as it holds rounded log-probabilities, not logits."""
        t, v = test.shape
        if rows.shape[0] != t or len(targets) != t:
            raise ValueError(f"prompt {prompt!r}: {rows.shape[0]} base rows and {len(targets)} targets for {t} rows "
                             "of logits")
        self.base_file = True
        local = {"kl": 0.0, "top1": 0.0, "nll_a": 0.0, "nll_b": 0.0, "nll_n": 0,
                 "ordered": dict.fromkeys(range(1, self.topk_max + 1), 0.0)}
        chunk = chunk or max(8, CHUNK_ELEMENTS // max(1, v))
        for start in range(0, t, chunk):
            stop = min(t, start + chunk)
            b32 = np.asarray(test[start:stop], dtype=np.float32)
            r = np.asarray(rows[start:stop])
            base = llama_stats.decode_rows(r, v)  # once: scored, then A's top K
            with np.errstate(invalid="ignore", over="ignore"):
                s = llama_stats.score_log_probs(base, b32, targets[start:stop])
            bad_a = (~np.isfinite(base)).sum(axis=1)  # a damaged row of the file is A's non-finite output
            if bad_a.any() or not np.isfinite(b32).all():
                self._nonfinite(prompt, first + start, bad_a, b32)
            self.positions += stop - start
            self._topk(topk_indices(base, self.topk_max), topk_indices(b32, self.topk_max), local)
            del base
            self._kl(prompt, first + start, s.kld, local, clamp=False)
            self._nll(-s.nll_base, -s.nll, local, s.kld, s.same_top, clamp=False)
            self.kl_pos.append(np.arange(first + start, first + stop, dtype=np.int32))
            self.kl_prompt_len.append(np.full(stop - start, first + t + 1, dtype=np.int32))
            self.kl_rerouted.append(np.zeros(stop - start, dtype=bool))
            self.kl_reached.append(np.zeros(stop - start, dtype=bool))
        self._finish_prompt(prompt, t, local, math.nan)

    def _prompt(self, prompt: str, t: int, v: int, tokens: Sequence[int] | None, chunk: int | None,
                rows: Callable[[int, int, np.ndarray | None, dict[str, Any]], None],
                rerouted: np.ndarray | None = None, reach: np.ndarray | None = None) -> None:
        local = {"n": 0, "mean": 0.0, "m2": 0.0, "sq": 0.0, "kl": 0.0, "top1": 0.0, "nll_a": 0.0, "nll_b": 0.0,
                 "nll_n": 0, "ordered": dict.fromkeys(range(1, self.topk_max + 1), 0.0)}
        chunk = chunk or max(8, CHUNK_ELEMENTS // max(1, v))
        for start in range(0, t, chunk):
            stop = min(t, start + chunk)
            targets = None
            if tokens is not None and len(tokens) >= 2:
                targets = np.asarray(tokens[start + 1:min(stop + 1, t)], dtype=np.int64)
            rows(start, stop, targets, local)
            self.kl_pos.append(np.arange(start, stop, dtype=np.int32))
            self.kl_prompt_len.append(np.full(stop - start, t, dtype=np.int32))
            self.kl_reached.append(np.asarray(reach[start:stop], dtype=bool) if reach is not None
                                   else np.zeros(stop - start, dtype=bool))
            self.kl_rerouted.append(np.asarray(rerouted[start:stop], dtype=bool) if rerouted is not None
                                    else np.zeros(stop - start, dtype=bool))
        self._finish_prompt(prompt, t, local, _safe_ratio(local["sq"] / local["n"], local["m2"] / local["n"]))

    def _finish_prompt(self, prompt: str, t: int, local: dict[str, Any], nmse: float) -> None:
        """A prompt's own figures (``per_prompt``, top-K by prompt) from its ``local`` sums over ``t`` positions."""
        pp: dict[str, float] = {"positions": float(t), "kl_mean": local["kl"] / t, "nmse": nmse,
                                "top1": local["top1"] / t}
        if local["nll_n"]:
            pp["ppl_a"] = math.exp(local["nll_a"] / local["nll_n"])
            pp["ppl_b"] = math.exp(local["nll_b"] / local["nll_n"])
        for k, count in local["ordered"].items():
            self.topk_by_prompt[k].append((prompt, count / t))
        self.per_prompt[prompt] = pp

    def _update_rows(self, prompt: str, ref: np.ndarray, test: np.ndarray, offset: int,
                     targets: np.ndarray | None, local: dict[str, Any]) -> None:
        """One chunk of rows. Sums and differences are taken in float64; ``exp`` runs in float32
        (4x faster, relative error ~1e-7 per term, far below any bound) and KL comes from the
        log-normalisers: KL_t = lse(B_t) - lse(A_t) - E_{P_A}[B_t - A_t], exactly 0 when A == B."""
        a32 = np.asarray(ref, dtype=np.float32)
        b32 = np.asarray(test, dtype=np.float32)
        a64 = a32.astype(np.float64)
        flat_a = a64.reshape(-1)
        sum_a = float(flat_a.sum())
        sum_b = float(np.sum(b32, dtype=np.float64))
        if not (math.isfinite(sum_a) and math.isfinite(sum_b)):
            self._nonfinite(prompt, offset, (~np.isfinite(a32)).sum(axis=1), b32)
        self._merge_var(local, a64.size, sum_a, float(np.dot(flat_a, flat_a)))
        self.positions += ref.shape[0]

        diff = np.subtract(b32, a32, dtype=np.float64)
        flat_d = diff.reshape(-1)
        sq = float(np.dot(flat_d, flat_d))
        self.sq_err += sq
        local["sq"] += sq
        absdiff = np.abs(diff)
        abs_sum = float(absdiff.sum())
        self.abs_err += abs_sum
        self._max_abs(prompt, offset, absdiff, np.arange(ref.shape[0]), math.isnan(abs_sum))
        del absdiff

        same = self._topk(topk_indices(a32, self.topk_max), topk_indices(b32, self.topk_max), local)
        with np.errstate(invalid="ignore", over="ignore"):
            exp_a, total_a, lse_a = exp_lse(a32)
            lse_b = exp_lse(b32)[2]
            kl = lse_b - lse_a - np.einsum("ij,ij->i", exp_a.astype(np.float64), diff) / total_a
        del exp_a, diff
        self._kl(prompt, offset, kl, local)
        if targets is not None and len(targets):
            rows = np.arange(len(targets))
            self._nll(a64[rows, targets] - lse_a[rows], b32[rows, targets].astype(np.float64) - lse_b[rows], local,
                      kl[rows], same[rows])

    def _update_rows_compact(self, prompt: str, ref: compact.LogitSummary, cfg: compact.CompactConfig, offset: int,
                             test: np.ndarray, targets: np.ndarray | None, local: dict[str, Any],
                             b_side: dict[str, Any]) -> None:
        """One chunk of B's rows against A's compact summary of the same rows (``b_side``: ``_b_rows`` of them)."""
        t = test.shape[0]
        sl = slice(offset, offset + t)
        stats = np.asarray(ref.stats[sl], dtype=np.float64)
        top_idx = np.asarray(ref.top_idx[sl], dtype=np.int64)
        top_a = np.asarray(ref.top_logit[sl], dtype=np.float64)
        b32 = np.asarray(test, dtype=np.float32)
        sum_a = float(stats[:, compact.SUM].sum())
        sum_b = b_side["sum"]
        if not (math.isfinite(sum_a) and math.isfinite(sum_b)):
            self._nonfinite(prompt, offset, stats[:, compact.NONFINITE], b32)
        self._merge_var(local, t * b32.shape[1], sum_a, float(stats[:, compact.SUMSQ].sum()))
        self.positions += t

        if "sampled" not in local:  # once per prompt: the sampled positions (chunks only slice them)
            local["sampled"] = compact.sampled_rows(compact.row_keys(cfg.seed, prompt, np.arange(ref.stats.shape[0])),
                                                    cfg.sample_every)
        d = b_side["sketch"].astype(np.float64) - np.asarray(ref.sketch[sl], np.float64)
        sq = float(np.einsum("ij,ij->", d, d))
        self.sq_err += sq
        local["sq"] += sq

        top_b = np.take_along_axis(b32, top_idx, axis=1).astype(np.float64)
        absdiff = np.abs(top_b - top_a)
        rows = np.arange(t)
        mask = local["sampled"]
        sampled = np.nonzero(mask[offset:offset + t])[0]
        full = np.zeros((0, 1))
        if sampled.size:  # every logit of the sampled positions: the mean |B - A| there, and their max
            first = int(np.count_nonzero(mask[:offset]))
            a_rows = np.asarray(ref.sample[first:first + sampled.size], dtype=np.float32)
            full = np.abs(np.subtract(b32[sampled], a_rows, dtype=np.float64))
            self.abs_err += float(full.sum())
            self.abs_n += full.size
        bad = (stats[:, compact.NONFINITE] > 0) | ~b_side["finite"] | np.isnan(absdiff).any(axis=1)
        if bad.any():  # where A is not finite is known by row only: the first such row, as NaN
            self._max_abs(prompt, offset, np.full((1, 1), np.nan), np.nonzero(bad)[0][:1], True)
        else:
            self._max_abs(prompt, offset, absdiff, rows, False)
            self._max_abs(prompt, offset, full, sampled, False)

        k = min(self.topk_max, top_idx.shape[1])
        same = self._topk(top_idx[:, :k], b_side["top"], local)
        lse_b, rest_b = b_side["lse"], b_side["rest"]
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            lse_a, rest_a = stats[:, compact.LSE], stats[:, compact.REST]
            lp_a = top_a - lse_a[:, None]
            lp_b = top_b - lse_b[:, None]
            kl = np.einsum("ij,ij->i", np.exp(lp_a), lp_a - lp_b)
            kl += np.where(rest_a > 0, rest_a * (np.log(rest_a) - np.log(rest_b)), 0.0)
            # inside the rest: E_q[r - 1 - log r] over the tokens drawn from A's rest, r = q_B / q_A
            ridx = np.asarray(ref.rest_idx[sl], dtype=np.int64)
            drawn = ridx >= 0
            log_r = ((np.take_along_axis(b32, np.maximum(ridx, 0), axis=1) - lse_b[:, None] - np.log(rest_b)[:, None])
                     - (np.asarray(ref.rest_logit[sl], dtype=np.float64) - lse_a[:, None] - np.log(rest_a)[:, None]))
            inside = np.where(drawn, np.expm1(log_r) - log_r, 0.0).sum(axis=1) / np.maximum(drawn.sum(axis=1), 1)
            kl += np.where(rest_a > 0, rest_a * inside, 0.0)
        self._kl(prompt, offset, kl, local)
        if targets is not None and len(targets):
            rows = np.arange(len(targets))
            self._nll(stats[rows, compact.TARGET_LP], b32[rows, targets].astype(np.float64) - lse_b[rows], local,
                      kl[rows], same[rows])

    def _nonfinite(self, prompt: str, offset: int, bad_a_rows: np.ndarray, b32: np.ndarray) -> None:
        bad_b = ~np.isfinite(b32)
        na, nb = int(np.nansum(bad_a_rows)), int(bad_b.sum())
        if (na or nb) and self.nonfinite_where is None:
            rows = np.nonzero((np.asarray(bad_a_rows) > 0) | np.any(bad_b, axis=1))[0]
            self.nonfinite_where = Where(prompt, offset + int(rows[0]))
        self.nonfinite_a += na
        self.nonfinite_b += nb

    def _merge_var(self, local: dict[str, Any], n_new: int, sum_a: float, sumsq_a: float) -> None:
        """Chan et al. merge of (count, mean, M2) for var(A): corpus-wide and for this prompt."""
        mean_new = sum_a / n_new
        m2_new = max(sumsq_a - n_new * mean_new * mean_new, 0.0)
        if not math.isfinite(sum_a):
            m2_new = math.nan
        for acc, keys in ((self, ("n", "mean_a", "m2_a")), (None, ("n", "mean", "m2"))):
            n_old = getattr(acc, keys[0]) if acc is not None else local[keys[0]]
            mean_old = getattr(acc, keys[1]) if acc is not None else local[keys[1]]
            m2_old = getattr(acc, keys[2]) if acc is not None else local[keys[2]]
            total = n_old + n_new
            delta = mean_new - mean_old
            merged = (total, mean_old + delta * n_new / total, m2_old + m2_new + delta * delta * n_old * n_new / total)
            for key, value in zip(keys, merged, strict=True):
                if acc is not None:
                    setattr(acc, key, value)
                else:
                    local[key] = value

    def _max_abs(self, prompt: str, offset: int, absdiff: np.ndarray, rows: np.ndarray, has_nan: bool) -> None:
        """The largest |B - A| so far and where; ``absdiff`` [len(rows), *] holds the rows ``rows`` of the chunk."""
        if has_nan:
            if self.max_abs_where is None or not math.isnan(self.max_abs):
                nan_rows = np.nonzero(np.isnan(absdiff).any(axis=1))[0]
                row = int(rows[nan_rows[0]]) if nan_rows.size else int(rows[0])
                self.max_abs, self.max_abs_where = math.nan, Where(prompt, offset + row)
        elif not math.isnan(self.max_abs) and absdiff.size:
            flat = int(np.argmax(absdiff))
            m = float(absdiff.flat[flat])
            if m > self.max_abs:
                self.max_abs = m
                self.max_abs_where = Where(prompt, offset + int(rows[flat // absdiff.shape[1]]))

    def _topk(self, top_a: np.ndarray, top_b: np.ndarray, local: dict[str, Any]) -> np.ndarray:
        for k in range(1, self.topk_max + 1):
            ordered = np.all(top_a[:, :k] == top_b[:, :k], axis=-1)
            overlap = [len(set(x[:k].tolist()) & set(y[:k].tolist())) / k for x, y in zip(top_a, top_b, strict=True)]
            self.topk_ordered[k] += float(ordered.sum())
            self.topk_overlap[k] += float(sum(overlap))
            local["ordered"][k] += float(ordered.sum())
        same = top_a[:, 0] == top_b[:, 0]
        self.same_top1.append(same)
        local["top1"] += float(np.sum(same))
        return same

    def _kl(self, prompt: str, offset: int, kl: np.ndarray, local: dict[str, Any], clamp: bool = True) -> None:
        """``clamp``: a KL below 0 is rounding (KL over the whole vocabulary is never negative), so 0; against a
        base file's rounded, truncated rows it is llama-perplexity's own value, kept as the tool keeps it."""
        if clamp:
            kl = np.where(kl < 0, 0.0, kl)
        self.kl.append(kl)
        local["kl"] += float(np.sum(kl))
        if np.isnan(kl).any():
            if not math.isnan(self.kl_max):
                self.kl_max, self.kl_max_where = math.nan, Where(prompt, offset + int(np.nonzero(np.isnan(kl))[0][0]))
        elif not math.isnan(self.kl_max):
            i = int(np.argmax(kl))
            if kl[i] > self.kl_max:
                self.kl_max, self.kl_max_where = float(kl[i]), Where(prompt, offset + i)

    def _nll(self, la: np.ndarray, lb: np.ndarray, local: dict[str, Any], kl: np.ndarray, same: np.ndarray,
             clamp: bool = True) -> None:
        """Log-probabilities of the next token under A (``la``) and B (``lb``), with those rows' KL and top-1
        (``clamp`` as for ``_kl``)."""
        self.nll_a -= float(la.sum())
        self.nll_b -= float(lb.sum())
        self.nll_n += len(la)
        local["nll_a"] -= float(la.sum())
        local["nll_b"] -= float(lb.sum())
        local["nll_n"] += len(la)
        dp = np.exp(lb) - np.exp(la)
        self.llama.add(llama_stats.TokenScores(-lb, -la, np.where(kl < 0, 0.0, kl) if clamp else kl, dp, same))
        self.dp.append(dp)
        self.dp_sum += float(dp.sum())
        self.dp_sq += float((dp * dp).sum())

    def result(self) -> LogitMetrics:
        if self.positions == 0:
            raise ValueError("no positions were compared (empty corpus?)")
        var = self.m2_a / self.n if self.n else math.nan
        mse = self.sq_err / self.n if self.n else math.nan  # no elements: A was a base file (no logits)
        value = _safe_ratio(mse, var)
        if self.nonfinite_a or self.nonfinite_b or self.base_file:
            value = math.nan
        kl = np.concatenate(self.kl) if self.kl else np.zeros(0)
        kl_bad = bool(np.isnan(kl).any())
        ppl_a = math.exp(self.nll_a / self.nll_n) if self.nll_n else math.nan
        ppl_b = math.exp(self.nll_b / self.nll_n) if self.nll_n else math.nan
        pos = np.concatenate(self.kl_pos) if self.kl_pos else np.zeros(0, dtype=np.int32)
        plen = np.concatenate(self.kl_prompt_len) if self.kl_prompt_len else np.zeros(0, dtype=np.int32)
        same = np.concatenate(self.same_top1) if self.same_top1 else np.zeros(0, dtype=bool)
        top1 = self.topk_ordered[1] / self.positions
        rerouted = np.concatenate(self.kl_rerouted) if self.kl_rerouted else np.zeros(0, dtype=bool)
        long = (plen > POSITION_BUCKETS[3][0]) & ~rerouted
        reached = np.concatenate(self.kl_reached) if self.kl_reached else np.zeros(0, dtype=bool)
        kept = kl[~reached] if reached.shape == kl.shape and reached.any() else None
        return LogitMetrics(
            positions=self.positions,
            nmse=value,
            nmse_db=nmse_db(value),
            nmse_label=nmse_label(value),
            mse=mse,
            max_abs=math.nan if self.base_file else self.max_abs,
            max_abs_where=self.max_abs_where,
            mean_abs=self.abs_err / (self.abs_n if self.compact else self.n) if (self.abs_n if self.compact else self.n)
            else math.nan,
            nonfinite_a=self.nonfinite_a,
            nonfinite_b=self.nonfinite_b,
            nonfinite_where=self.nonfinite_where,
            topk_ordered={k: v / self.positions for k, v in self.topk_ordered.items()},
            topk_overlap={k: v / self.positions for k, v in self.topk_overlap.items()},
            topk_worst_prompt={k: min(v, key=lambda pv: pv[1]) for k, v in self.topk_by_prompt.items() if v},
            kl_mean=math.nan if kl_bad else float(np.mean(kl)),
            kl_p99=math.nan if kl_bad else float(np.percentile(kl, 99)),
            kl_max=self.kl_max,
            kl_max_where=self.kl_max_where,
            ppl_a=ppl_a,
            ppl_b=ppl_b,
            ppl_ratio=_safe_ratio(ppl_b, ppl_a),
            delta_p_mean=self.dp_sum / self.nll_n if self.nll_n else math.nan,
            delta_p_rms=math.sqrt(self.dp_sq / self.nll_n) if self.nll_n else math.nan,
            per_prompt=self.per_prompt,
            kl_percentiles=percentiles(kl),
            delta_p_percentiles=percentiles(np.concatenate(self.dp) if self.dp else np.zeros(0)),
            top1_stderr=math.sqrt(max(top1 * (1 - top1), 0.0) / self.positions),
            position_profile={"all": profile_by_bucket(pos, kl, same),
                              "long": profile_by_bucket(pos[long], kl[long], same[long])},
            compact=self.compact,
            llama=self.llama.stats().to_dict() if self.llama.count >= 2 else {},
            base_file=self.base_file,
            kl_mean_kept=None if kept is None or kl_bad or not kept.size else float(np.mean(kept)),
            kl_p99_kept=None if kept is None or kl_bad or not kept.size else float(np.percentile(kept, 99)),
        )


@dataclass
class LayerMetrics:
    """Per-layer rfn over the whole corpus, with the worst position in each layer."""

    rfn: list[float]
    worst_row_rfn: list[float]
    worst_where: list[Where | None]
    nonfinite_a: list[int]
    nonfinite_b: list[int]
    sublayers: dict[str, list[float]] = field(default_factory=dict)
    # Each sub-block's error as a share of the residual stream: ||dOut_s[i]||_F / ||h_A[i]||_F.
    sub_contrib: dict[str, list[float]] = field(default_factory=dict)
    # rfn of the last layer by position bucket over the prompts that reach past 1k tokens:
    # [{"bucket", "positions", "rfn"}] (see POSITION_BUCKETS)
    position_profile: list[dict[str, Any]] = field(default_factory=list)
    compact: bool = False  # against A's compact form: rfn from sketches, the worst row's value a rough estimate
    # a mixture of experts whose routers flipped (``core.routing``): per-layer rfn over the states no flip can
    # reach (``reach``; from the row sketches against a compact A); None when no flip reaches any
    rfn_kept: list[float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "rfn": self.rfn,
            "rfn_kept": self.rfn_kept,
            "worst_row_rfn": self.worst_row_rfn,
            "worst_where": [w.__dict__ if w else None for w in self.worst_where],
            "nonfinite_a": self.nonfinite_a,
            "nonfinite_b": self.nonfinite_b,
            "sublayers": self.sublayers,
            "sub_contrib": self.sub_contrib,
            "compact": self.compact,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerMetrics:
        return cls(**{**d, "worst_where": [Where(**w) if w else None for w in d["worst_where"]]})


class LayerAccumulator:
    """Streams per-prompt hidden states ``[L, T, H]`` into per-layer rfn."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.num = np.zeros(num_layers)
        self.den = np.zeros(num_layers)
        self.worst = np.full(num_layers, -1.0)
        self.worst_where: list[Where | None] = [None] * num_layers
        self.bad_a = np.zeros(num_layers, dtype=np.int64)
        self.bad_b = np.zeros(num_layers, dtype=np.int64)
        self.sub_num: dict[str, np.ndarray] = {}
        self.sub_den: dict[str, np.ndarray] = {}
        nb = len(POSITION_BUCKETS)
        self.pos_num, self.pos_den, self.pos_n = np.zeros(nb), np.zeros(nb), np.zeros(nb, dtype=np.int64)
        self.compact = False
        # sums over the states that no router flip reaches; ``any_reached`` once a prompt had one
        self.kept_num, self.kept_den = np.zeros(num_layers), np.zeros(num_layers)
        self.any_reached = False
        self.kept_exact = True  # False once a compact prompt without row sketches had reached states

    def update(self, prompt: str, ref: np.ndarray, test: np.ndarray,
               sub_ref: dict[str, np.ndarray] | None = None, sub_test: dict[str, np.ndarray] | None = None,
               rerouted: np.ndarray | None = None, reach: np.ndarray | None = None) -> None:
        """``rerouted``: positions whose tokens B's routers sent to other experts than A's (``core.routing``);
        they stay in every layer's rfn and are left out of the position profile. ``reach`` ``[L, T]``: the
        states those flips can reach, left out of ``rfn_kept``."""
        if ref.shape != test.shape:
            raise ValueError(f"prompt {prompt!r}: hidden-state shape mismatch, A {ref.shape} vs B {test.shape}")
        if ref.shape[0] != self.num_layers:
            raise ValueError(f"expected {self.num_layers} layers, got {ref.shape[0]}")
        for layer in range(self.num_layers):
            a = np.asarray(ref[layer], dtype=np.float64)
            b = np.asarray(test[layer])
            d = np.subtract(b, a, dtype=np.float64)
            self._rows(prompt, layer, np.einsum("ij,ij->i", d, d), np.einsum("ij,ij->i", a, a),
                       int((~np.isfinite(a)).sum()), int((~np.isfinite(b)).sum()), rerouted,
                       reach[layer] if reach is not None else None)
        for name in (sub_ref or {}):
            if sub_test is None or name not in sub_test:
                continue
            sa, sb = sub_ref[name], sub_test[name]
            if sa.shape != sb.shape:
                continue
            num = self.sub_num.setdefault(name, np.zeros(sa.shape[0]))
            den = self.sub_den.setdefault(name, np.zeros(sa.shape[0]))
            for layer in range(sa.shape[0]):  # one [T, H] layer at a time: float64 work stays small
                a = np.asarray(sa[layer], dtype=np.float64).reshape(-1)
                d = np.subtract(sb[layer], sa[layer], dtype=np.float64).reshape(-1)
                num[layer] += float(np.dot(d, d))
                den[layer] += float(np.dot(a, a))

    def update_compact(self, prompt: str, ref: compact.StateSummary, test: np.ndarray, cfg: compact.CompactConfig,
                       sub_ref: dict[str, compact.StateSummary] | None = None,
                       sub_test: dict[str, np.ndarray] | None = None, rerouted: np.ndarray | None = None,
                       reach: np.ndarray | None = None) -> None:
        """``update`` against A's compact states: ||h_B - h_A||² from the flat sketch of each position segment
        (the worst position from the row sketches), ||h_A||² exact. A long prompt with ``rerouted`` positions
        takes its position profile from the row sketches of the other positions (a flat sketch cannot leave
        one position out)."""
        n_layers, t = ref.norm2.shape
        if test.shape[:2] != (n_layers, t):
            raise ValueError(f"prompt {prompt!r}: hidden-state shape mismatch, A {(n_layers, t)} vs B {test.shape[:2]}")
        if n_layers != self.num_layers:
            raise ValueError(f"expected {self.num_layers} layers, got {n_layers}")
        self.compact = True
        layout = compact.flat_layout(cfg.seed, prompt, t, test.shape[-1], cfg.state_sketch)
        last = compact.flat_layout(cfg.seed, prompt, t, test.shape[-1], cfg.last_sketch) if ref.last is not None else None
        keys = compact.state_keys(compact.row_keys(cfg.seed, prompt, np.arange(t)))
        row_mask = compact.sign_mask(keys, test.shape[-1]) if ref.rows is not None else None  # every layer's

        def seg_sq(sk_a: np.ndarray, sk_b: np.ndarray, lay: compact.FlatLayout = layout) -> np.ndarray:
            return compact.segment_sq(sk_b.astype(np.float64) - np.asarray(sk_a, np.float64), lay)

        def b_layer(layer: int) -> tuple[np.ndarray, int, np.ndarray | None]:
            """B's side of one layer alone (its segments' distances, non-finite count, rows' distances)."""
            b = np.asarray(test[layer])
            lay, sk_a = (last, ref.last) if layer == n_layers - 1 and last is not None else (layout, ref.sketch[layer])
            sk_b = compact.flat_sketch(b, lay)  # the last layer: the finer sketch its position profile needs
            segs = seg_sq(sk_a, sk_b, lay)
            # every entry lands in a bucket, so a finite sketch means finite states: counted only otherwise
            bad_b = 0 if np.isfinite(sk_b).all() else int((~np.isfinite(b)).sum())
            rows_d2 = None
            if row_mask is not None:
                d = compact.sketch_masked(b, row_mask, cfg.row_sketch).astype(np.float64) - np.asarray(ref.rows[layer],
                                                                                                      np.float64)
                rows_d2 = np.einsum("ij,ij->i", d, d)
            return segs, bad_b, rows_d2

        # the layers' own work on the cores, then added up in layer order as before
        for layer, (segs, bad_b, rows_d2) in enumerate(map_ordered(b_layer, range(n_layers))):
            r2 = np.asarray(ref.norm2[layer], dtype=np.float64)
            self.bad_a[layer] += int(ref.nonfinite[layer])
            self.bad_b[layer] += bad_b
            self.num[layer] += float(segs.sum())
            self.den[layer] += float(r2.sum())
            if (layer == self.num_layers - 1 and t > POSITION_BUCKETS[3][0] and rerouted is not None
                    and np.any(rerouted) and rows_d2 is not None):
                self._profile(rows_d2, r2, rerouted)
            elif layer == self.num_layers - 1 and t > POSITION_BUCKETS[3][0]:  # a long prompt: segments are buckets
                for i, v in enumerate(segs):
                    lo, hi = POSITION_BUCKETS[i][0], POSITION_BUCKETS[i][1] or t
                    self.pos_num[i] += v
                    self.pos_den[i] += float(r2[lo:hi].sum())
                    self.pos_n[i] += min(hi, t) - lo
            if rows_d2 is not None:
                self._worst(prompt, layer, rows_d2, r2)
            self._kept(layer, rows_d2, r2, reach[layer] if reach is not None else None, float(segs.sum()),
                       float(r2.sum()))
        for name, sa in (sub_ref or {}).items():
            sb = (sub_test or {}).get(name)
            if sb is None or sb.shape[:2] != sa.norm2.shape:
                continue
            num = self.sub_num.setdefault(name, np.zeros(sa.norm2.shape[0]))
            den = self.sub_den.setdefault(name, np.zeros(sa.norm2.shape[0]))
            sums = map_ordered(lambda layer, sa=sa, sb=sb: float(seg_sq(sa.sketch[layer],
                                                                          compact.flat_sketch(sb[layer], layout)).sum()),
                               range(sa.norm2.shape[0]))
            for layer, value in enumerate(sums):
                num[layer] += value
                den[layer] += float(np.sum(sa.norm2[layer], dtype=np.float64))

    def _rows(self, prompt: str, layer: int, d2: np.ndarray, r2: np.ndarray, bad_a: int, bad_b: int,
              rerouted: np.ndarray | None = None, reach: np.ndarray | None = None) -> None:
        """One layer of one prompt: ||h_B - h_A||² and ||h_A||² per position."""
        self.bad_a[layer] += bad_a
        self.bad_b[layer] += bad_b
        self.num[layer] += float(d2.sum())
        self.den[layer] += float(r2.sum())
        if layer == self.num_layers - 1 and d2.shape[0] > POSITION_BUCKETS[3][0]:  # a long prompt
            self._profile(d2, r2, rerouted)
        self._worst(prompt, layer, d2, r2)
        self._kept(layer, d2, r2, reach, float(d2.sum()), float(r2.sum()))

    def _kept(self, layer: int, d2: np.ndarray | None, r2: np.ndarray, reach: np.ndarray | None,
              num: float, den: float) -> None:
        """One layer of one prompt into ``rfn_kept``: the states a flip reaches left out (they need
        per-position distances: exact ones, or a compact A's row sketches); a prompt without one counts whole."""
        if reach is None or not np.any(reach):
            self.kept_num[layer] += num
            self.kept_den[layer] += den
            return
        self.any_reached = True
        if d2 is None:  # a compact A without row sketches cannot leave one position out
            self.kept_exact = False
            self.kept_num[layer] += num
            self.kept_den[layer] += den
            return
        keep = ~np.asarray(reach, dtype=bool)
        self.kept_num[layer] += float(d2[keep].sum())
        self.kept_den[layer] += float(r2[keep].sum())

    def _profile(self, d2: np.ndarray, r2: np.ndarray, rerouted: np.ndarray | None) -> None:
        """A long prompt's last layer into the position profile, by bucket, its rerouted positions left out."""
        keep = np.ones(d2.shape[0], dtype=bool) if rerouted is None else ~np.asarray(rerouted, dtype=bool)
        idx = bucket_index(np.arange(d2.shape[0]))[keep]
        self.pos_num += np.bincount(idx, weights=d2[keep], minlength=len(POSITION_BUCKETS))
        self.pos_den += np.bincount(idx, weights=r2[keep], minlength=len(POSITION_BUCKETS))
        self.pos_n += np.bincount(idx, minlength=len(POSITION_BUCKETS))

    def _worst(self, prompt: str, layer: int, d2: np.ndarray, r2: np.ndarray) -> None:
        with np.errstate(divide="ignore", invalid="ignore"):
            row = np.sqrt(d2) / np.sqrt(r2)
        if np.isnan(row).any():
            i = int(np.nonzero(np.isnan(row))[0][0])
            if not math.isnan(self.worst[layer]):
                self.worst[layer] = math.nan
                self.worst_where[layer] = Where(prompt, i, layer)
        elif not math.isnan(self.worst[layer]) and row.size:
            i = int(np.argmax(row))
            if row[i] > self.worst[layer]:
                self.worst[layer] = float(row[i])
                self.worst_where[layer] = Where(prompt, i, layer)

    def result(self) -> LayerMetrics:
        values = []
        for layer in range(self.num_layers):
            v = _safe_ratio(math.sqrt(self.num[layer]), math.sqrt(self.den[layer]))
            if self.bad_a[layer] or self.bad_b[layer]:
                v = math.nan
            values.append(v)
        subs = {
            name: [_safe_ratio(math.sqrt(n), math.sqrt(d)) for n, d in zip(self.sub_num[name], self.sub_den[name], strict=True)]
            for name in self.sub_num
        }
        contrib = {
            name: [_safe_ratio(math.sqrt(n), math.sqrt(d)) for n, d in zip(self.sub_num[name], self.den, strict=True)]
            for name in self.sub_num
        }
        return LayerMetrics(
            rfn=values,
            worst_row_rfn=[float(w) for w in self.worst],
            worst_where=list(self.worst_where),
            nonfinite_a=[int(x) for x in self.bad_a],
            nonfinite_b=[int(x) for x in self.bad_b],
            sublayers=subs,
            sub_contrib=contrib,
            position_profile=[
                {"bucket": label, "start": lo, "stop": hi, "positions": int(self.pos_n[b]),
                 "rfn": _safe_ratio(math.sqrt(self.pos_num[b]), math.sqrt(self.pos_den[b]))}
                for b, (lo, hi, label) in enumerate(POSITION_BUCKETS) if self.pos_n[b]],
            compact=self.compact,
            # a layer every state of which a flip reaches keeps its whole rfn: nothing is left to judge it by
            rfn_kept=[v if math.isnan(v) or d == 0.0 else _safe_ratio(math.sqrt(n), math.sqrt(d))
                      for v, n, d in zip(values, self.kept_num, self.kept_den, strict=True)]
            if self.any_reached and self.kept_exact else None,
        )


def bucket_index(positions: np.ndarray) -> np.ndarray:
    """The POSITION_BUCKETS index of each position."""
    edges = np.array([lo for lo, _, _ in POSITION_BUCKETS[1:]])
    return np.searchsorted(edges, positions, side="right")


def percentiles(values: np.ndarray, qs: Sequence[float] = KL_PERCENTILES) -> dict[str, float]:
    """``{"99.9": ..., "50": ...}`` (NaN when ``values`` is empty or holds a NaN)."""
    if values.size == 0 or np.isnan(values).any():
        return {f"{q:g}": math.nan for q in qs}
    return {f"{q:g}": float(v) for q, v in zip(qs, np.percentile(values, qs), strict=True)}


def profile_by_bucket(positions: np.ndarray, kl: np.ndarray, same_top1: np.ndarray) -> list[dict[str, Any]]:
    """KL mean/p99 and same-top-1 per position bucket (buckets without positions are left out)."""
    out = []
    idx = bucket_index(positions)
    for b, (lo, hi, label) in enumerate(POSITION_BUCKETS):
        sel = idx == b
        n = int(sel.sum())
        if not n:
            continue
        k = kl[sel]
        bad = bool(np.isnan(k).any())
        out.append({"bucket": label, "start": lo, "stop": hi, "positions": n,
                    "kl_mean": math.nan if bad else float(k.mean()),
                    "kl_p99": math.nan if bad else float(np.percentile(k, 99)),
                    "top1": float(same_top1[sel].mean())})
    return out


def typical_level(values: Sequence[float]) -> float | None:
    """The median of a sub-block's finite per-layer errors: its typical level, against which one layer's
    value is judged; None when fewer than three layers have a finite value (too few to call typical)."""
    finite = [float(v) for v in values if v is not None and not math.isnan(v)]
    return float(np.median(finite)) if len(finite) >= 3 else None


def subblock_anomalies(contrib: dict[str, list[float]], jump: float, floor: float,
                       inherited: Sequence[float] | None = None) -> list[tuple[int, str, float]]:
    """Layers whose attention or MLP output error stands out from that sub-block's typical error.

    ``contrib`` holds each sub-block's relative error per layer (||dOut||/||Out||).
    Quantisation noise keeps these in a narrow band across layers (within 1.5x of
    the median on SmolLM2 Q4_1, 1.2x on the tiny Q8_0); a layer-local defect (a
    scaled or mis-permuted tensor) lifts one layer's value far above the median
    even when the residual stream dilutes it below the rfn bound.
    ``inherited[i]``: the error already in layer i's input (rfn of layer i-1); a sub-block fed a
    wrong input has a large error of its own making no defect, so the reference level is the
    larger of the median and that input error.
    Returns (layer, sub-block, ratio to the reference level), by layer.
    """
    found: list[tuple[int, str, float]] = []
    for name, values in contrib.items():
        typical = typical_level(values)
        if typical is None:
            continue
        for i, v in enumerate(values):
            upstream = float(inherited[i]) if inherited is not None and i < len(inherited) else 0.0
            level = max(typical, upstream if not math.isnan(upstream) else math.inf, 1e-12)
            if math.isnan(v):
                found.append((i, name, math.inf))
            elif v > floor and v > jump * level:
                found.append((i, name, v / level))
    return sorted(found)
