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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

TOPK_MAX = 5
CHUNK_ELEMENTS = 1 << 22  # logit elements per streamed chunk (rows = this // vocabulary size)

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


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (stable)."""
    x = np.asarray(logits, dtype=np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    shifted = x - m
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def _exp_lse(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row-wise ``e = exp(x - max)`` (float32), its row sums and ``logsumexp(x)`` (both float64)."""
    m = x.max(axis=-1, keepdims=True)
    e = np.exp(x - m)
    total = np.sum(e, axis=-1, dtype=np.float64)
    return e, total, m[:, 0].astype(np.float64) + np.log(total)


def kl_per_position(ref_logits: np.ndarray, test_logits: np.ndarray) -> np.ndarray:
    """KL(P_ref || P_test) for each row (position), in nats."""
    lp = log_softmax(ref_logits)
    lq = log_softmax(test_logits)
    p = np.exp(lp)
    kl = np.sum(p * (lp - lq), axis=-1)
    # Tiny negative values are rounding; clamp them but keep NaN visible.
    return np.where(kl < 0, 0.0, kl)


def topk_indices(logits: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest logits per row, largest first; ties broken by lower index
    (exactly, also at the k-th place). NaN counts as smallest."""
    x = np.asarray(logits)
    if x.ndim == 2 and x.shape[-1] >= 64 * 8 * k and not np.issubdtype(x.dtype, np.integer):
        return _topk_by_blocks(x, k)
    if x.ndim == 2 and x.shape[-1] > 4 * k:
        # O(V) selection; exact unless ties at the k-th value (or NaN) leave the choice open
        part = np.argpartition(-x, k - 1, axis=-1)[:, :k]
        vals = np.take_along_axis(x, part, axis=-1)
        kth = vals.min(axis=-1)
        order = np.lexsort((part, -vals), axis=-1)
        out = np.take_along_axis(part, order, axis=-1)
        open_ = (np.sum(x >= kth[:, None], axis=-1) != k) | np.isnan(kth)
        if open_.any():
            out[open_] = np.argsort(-x[open_], axis=-1, kind="stable")[:, :k]
        return out
    return np.argsort(-x, axis=-1, kind="stable")[..., :k]


_TOPK_BLOCK = 64


def _topk_by_blocks(x: np.ndarray, k: int) -> np.ndarray:
    """Top-k over a large vocabulary without a full selection pass per row.

    Each row is cut into blocks of 64; the k largest values all lie in the blocks whose maxima are
    among the k largest block maxima (the k-th largest value is at least the k-th largest block
    maximum). Rows where ties at that block maximum make the choice ambiguous, or holding NaN, are
    sorted whole.
    """
    t, v = x.shape
    nb = v // _TOPK_BLOCK
    body = x[:, : nb * _TOPK_BLOCK].reshape(t, nb, _TOPK_BLOCK)
    bmax = body.max(axis=2)
    if nb * _TOPK_BLOCK < v:  # the tail is one more (short) block
        bmax = np.concatenate([bmax, x[:, nb * _TOPK_BLOCK:].max(axis=1, keepdims=True)], axis=1)
    nblk = bmax.shape[1]
    chosen = np.argpartition(bmax, nblk - k, axis=1)[:, nblk - k:]
    kth = np.take_along_axis(bmax, chosen, axis=1).min(axis=1)
    ambiguous = (np.sum(bmax >= kth[:, None], axis=1) != k) | np.isnan(kth)
    cols = chosen[:, :, None] * _TOPK_BLOCK + np.arange(_TOPK_BLOCK)
    cols = np.minimum(cols, v - 1).reshape(t, -1)  # the short tail block repeats its last column
    vals = np.take_along_axis(x, cols, axis=1)
    order = np.lexsort((cols, -vals), axis=-1)
    sorted_cols = np.take_along_axis(cols, order, axis=1)
    out = np.empty((t, k), dtype=np.int64)
    for r in range(t):  # drop the repeated tail column, keep the first k distinct
        row = sorted_cols[r]
        out[r] = row[np.concatenate(([True], row[1:] != row[:-1]))][:k] if not ambiguous[r] else 0
    if ambiguous.any():
        rows = np.nonzero(ambiguous)[0]
        out[rows] = np.argsort(-x[rows], axis=-1, kind="stable")[:, :k]
    return out


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
        self.per_prompt: dict[str, dict[str, float]] = {}

    def update(self, prompt: str, ref: np.ndarray, test: np.ndarray, tokens: Sequence[int] | None = None,
               chunk: int | None = None) -> None:
        """Add one prompt's logits ``[T, V]``, ``chunk`` positions at a time, so the work arrays stay
        at ``chunk x V`` however long the prompt (memory-mapped inputs are read in slices). The
        default chunk holds about 2**22 elements (32 MiB per float64 work array) whatever V is."""
        if ref.shape != test.shape:
            raise ValueError(f"prompt {prompt!r}: logits shape mismatch, A {ref.shape} vs B {test.shape}")
        if len(ref.shape) != 2 or ref.shape[0] == 0:
            return
        t = ref.shape[0]
        local = {"n": 0, "mean": 0.0, "m2": 0.0, "sq": 0.0, "kl": 0.0, "top1": 0.0, "nll_a": 0.0, "nll_b": 0.0,
                 "nll_n": 0, "ordered": dict.fromkeys(range(1, self.topk_max + 1), 0.0)}
        chunk = chunk or max(8, CHUNK_ELEMENTS // max(1, ref.shape[1]))
        for start in range(0, t, chunk):
            stop = min(t, start + chunk)
            targets = None
            if tokens is not None and len(tokens) >= 2:
                targets = np.asarray(tokens[start + 1:min(stop + 1, t)], dtype=np.int64)
            self._update_rows(prompt, np.asarray(ref[start:stop]), np.asarray(test[start:stop]), start, targets, local)
        pp: dict[str, float] = {"positions": float(t), "kl_mean": local["kl"] / t,
                                "nmse": _safe_ratio(local["sq"] / local["n"], local["m2"] / local["n"]),
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
        t = ref.shape[0]
        a32 = np.asarray(ref, dtype=np.float32)
        b32 = np.asarray(test, dtype=np.float32)
        a64 = a32.astype(np.float64)
        flat_a = a64.reshape(-1)

        n_new = a64.size
        sum_a = float(flat_a.sum())
        sum_b = float(np.sum(b32, dtype=np.float64))
        if not (math.isfinite(sum_a) and math.isfinite(sum_b)):
            bad_a = ~np.isfinite(a32)
            bad_b = ~np.isfinite(b32)
            na, nb = int(bad_a.sum()), int(bad_b.sum())
            if (na or nb) and self.nonfinite_where is None:
                rows = np.nonzero(np.any(bad_a | bad_b, axis=1))[0]
                self.nonfinite_where = Where(prompt, offset + int(rows[0]))
            self.nonfinite_a += na
            self.nonfinite_b += nb

        # Chan et al. merge of (count, mean, M2) for var(A): corpus-wide and for this prompt.
        mean_new = sum_a / n_new
        m2_new = max(float(np.dot(flat_a, flat_a)) - n_new * mean_new * mean_new, 0.0)
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
        self.positions += t

        diff = np.subtract(b32, a32, dtype=np.float64)
        flat_d = diff.reshape(-1)
        sq = float(np.dot(flat_d, flat_d))
        self.sq_err += sq
        local["sq"] += sq
        absdiff = np.abs(diff)
        abs_sum = float(absdiff.sum())
        self.abs_err += abs_sum
        if math.isnan(abs_sum):
            if self.max_abs_where is None or not math.isnan(self.max_abs):
                row = int(np.nonzero(np.isnan(absdiff).any(axis=1))[0][0])
                self.max_abs, self.max_abs_where = math.nan, Where(prompt, offset + row)
        elif not math.isnan(self.max_abs):
            flat = int(np.argmax(absdiff))
            m = float(absdiff.flat[flat])
            if m > self.max_abs:
                self.max_abs = m
                self.max_abs_where = Where(prompt, offset + flat // ref.shape[1])
        del absdiff

        top_a = topk_indices(a32, self.topk_max)
        top_b = topk_indices(b32, self.topk_max)
        for k in range(1, self.topk_max + 1):
            ordered = np.all(top_a[:, :k] == top_b[:, :k], axis=-1)
            overlap = [len(set(x[:k].tolist()) & set(y[:k].tolist())) / k for x, y in zip(top_a, top_b, strict=True)]
            self.topk_ordered[k] += float(ordered.sum())
            self.topk_overlap[k] += float(sum(overlap))
            local["ordered"][k] += float(ordered.sum())
        local["top1"] += float(np.sum(top_a[:, 0] == top_b[:, 0]))

        with np.errstate(invalid="ignore", over="ignore"):
            exp_a, total_a, lse_a = _exp_lse(a32)
            lse_b = _exp_lse(b32)[2]
            kl = lse_b - lse_a - np.einsum("ij,ij->i", exp_a.astype(np.float64), diff) / total_a
        del exp_a, diff
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

        if targets is not None and len(targets):
            rows = np.arange(len(targets))
            la = a64[rows, targets] - lse_a[rows]
            lb = b32[rows, targets].astype(np.float64) - lse_b[rows]
            self.nll_a -= float(la.sum())
            self.nll_b -= float(lb.sum())
            self.nll_n += len(targets)
            local["nll_a"] -= float(la.sum())
            local["nll_b"] -= float(lb.sum())
            local["nll_n"] += len(targets)
            dp = np.exp(lb) - np.exp(la)
            self.dp_sum += float(dp.sum())
            self.dp_sq += float((dp * dp).sum())

    def result(self) -> LogitMetrics:
        if self.positions == 0:
            raise ValueError("no positions were compared (empty corpus?)")
        var = self.m2_a / self.n
        mse = self.sq_err / self.n
        value = _safe_ratio(mse, var)
        if self.nonfinite_a or self.nonfinite_b:
            value = math.nan
        kl = np.concatenate(self.kl) if self.kl else np.zeros(0)
        kl_bad = bool(np.isnan(kl).any())
        ppl_a = math.exp(self.nll_a / self.nll_n) if self.nll_n else math.nan
        ppl_b = math.exp(self.nll_b / self.nll_n) if self.nll_n else math.nan
        return LogitMetrics(
            positions=self.positions,
            nmse=value,
            nmse_db=nmse_db(value),
            nmse_label=nmse_label(value),
            mse=mse,
            max_abs=self.max_abs,
            max_abs_where=self.max_abs_where,
            mean_abs=self.abs_err / self.n,
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

    def to_dict(self) -> dict[str, Any]:
        return {
            "rfn": self.rfn,
            "worst_row_rfn": self.worst_row_rfn,
            "worst_where": [w.__dict__ if w else None for w in self.worst_where],
            "nonfinite_a": self.nonfinite_a,
            "nonfinite_b": self.nonfinite_b,
            "sublayers": self.sublayers,
            "sub_contrib": self.sub_contrib,
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

    def update(self, prompt: str, ref: np.ndarray, test: np.ndarray,
               sub_ref: dict[str, np.ndarray] | None = None, sub_test: dict[str, np.ndarray] | None = None) -> None:
        if ref.shape != test.shape:
            raise ValueError(f"prompt {prompt!r}: hidden-state shape mismatch, A {ref.shape} vs B {test.shape}")
        if ref.shape[0] != self.num_layers:
            raise ValueError(f"expected {self.num_layers} layers, got {ref.shape[0]}")
        for layer in range(self.num_layers):
            a = np.asarray(ref[layer], dtype=np.float64)
            b = np.asarray(test[layer])
            self.bad_a[layer] += int((~np.isfinite(a)).sum())
            self.bad_b[layer] += int((~np.isfinite(b)).sum())
            d = np.subtract(b, a, dtype=np.float64)
            d2 = np.einsum("ij,ij->i", d, d)
            r2 = np.einsum("ij,ij->i", a, a)
            self.num[layer] += float(d2.sum())
            self.den[layer] += float(r2.sum())
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
        )


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
        finite = [v for v in values if not math.isnan(v)]
        if len(finite) < 3:
            continue
        typical = float(np.median(finite))
        for i, v in enumerate(values):
            upstream = float(inherited[i]) if inherited is not None and i < len(inherited) else 0.0
            level = max(typical, upstream if not math.isnan(upstream) else math.inf, 1e-12)
            if math.isnan(v):
                found.append((i, name, math.inf))
            elif v > floor and v > jump * level:
                found.append((i, name, v / level))
    return sorted(found)
