"""Tensor-by-tensor comparison of two models' weights: the numbers, without files or pytest.

A conversion that stores a tensor in some type (F16, Q8_0, Q4_K...) cannot give back the reference's
values exactly, but how far it may be is a property of the type, not of the file's label: a tensor's
relative error ``||B - A||_F / ||A||_F`` is judged against the error its storage type gives on real
weights (``TYPE_ERROR``, measured; docs/bounds.md says how). What is here:

- ``TYPE_ERROR`` / ``expected_error``: the measured error of each ggml / torch storage type;
- ``TensorStats``: the sums a tensor's comparison needs, accumulated chunk by chunk (bounded memory),
  with the least-squares scale ``c`` (B = c * A) and offset (B = A + k) they imply, and where the first
  NaN/Inf is;
- ``rope_permute`` / ``rope_unpermute``: llama.cpp's q/k row order and its inverse;
- ``Sketch`` and ``sample_error``: a fixed sample of a tensor's entries, so that a failing tensor can
  be compared with every other tensor of its shape cheaply ("matches A's layer 4 q_proj").
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "BITS_PER_WEIGHT",
    "SKETCH_SIZE",
    "TYPE_ERROR",
    "Sketch",
    "TensorStats",
    "expected_error",
    "layer_and_role",
    "pair_expected_error",
    "relative_error",
    "rope_permute",
    "rope_unpermute",
    "sample_error",
    "sketch_indices",
    "sum_of_squares",
]

# The relative Frobenius error each storage type gives, measured on real and real-like weights: the
# largest value over every tensor of the tiny Llama's and SmolLM2-135M's correct pipeline conversions
# (llama.cpp's own converter and quantizer, fixtures/pipeline.py) and of llama_model_quantize(pure) on
# Gaussian, Student-t (nu=4, heavy-tailed) and SmolLM2-embedding tensors, plus about 10% for the spread
# between samples of heavy-tailed weights, rounded (docs/bounds.md#weights).
# F32 is exact; 1e-6 allows float32 round-off in a converter's arithmetic (Gemma's norm + 1, undone here).
# F16 and BF16 round to nearest: at most 2 ** -p / sqrt(3) RMS (p = 11 and 8 significand bits; values at the
# bottom of a binade, such as norm weights just above 1.0), above the 2.1e-4 and 1.7e-3 measured on weights.
TYPE_ERROR: dict[str, float] = {
    "F64": 1e-6, "F32": 1e-6, "F16": 2.9e-4, "BF16": 2.3e-3,
    "Q8_0": 8e-3, "Q6_K": 0.025, "Q5_K": 0.048, "Q5_1": 0.058, "Q5_0": 0.064,
    "Q4_K": 0.095, "Q4_1": 0.1, "IQ4_NL": 0.1, "IQ4_XS": 0.105, "Q4_0": 0.125,
    "Q3_K": 0.2, "IQ3_S": 0.22, "Q2_K": 0.38,
}
EXACT_TYPES = frozenset({"F32", "F64"})

# Bits per weight of the ggml types (block bytes * 8 / block size), for types not measured above:
# their expected error is estimated as ESTIMATE_K * 2 ** -bits, the upper envelope of the measured
# types (Q4_0 2.62, Q5_0 2.62, Q8_0 2.66, Q6_K 2.17, Q3_K 1.95, Q2_K 2.13, IQ4_XS 1.78 times 2 ** -bpw).
BITS_PER_WEIGHT: dict[str, float] = {
    "Q4_0": 4.5, "Q4_1": 5.0, "Q5_0": 5.5, "Q5_1": 6.0, "Q8_0": 8.5, "Q8_1": 9.0, "Q2_K": 2.625,
    "Q3_K": 3.4375, "Q4_K": 4.5, "Q5_K": 5.5, "Q6_K": 6.5625, "Q8_K": 9.125, "IQ2_XXS": 2.0625,
    "IQ2_XS": 2.3125, "IQ3_XXS": 3.0625, "IQ1_S": 1.5625, "IQ4_NL": 4.5, "IQ3_S": 3.4375, "IQ2_S": 2.5625,
    "IQ4_XS": 4.25, "IQ1_M": 1.75, "TQ1_0": 1.6875, "TQ2_0": 2.0625, "MXFP4": 4.25,
}
ESTIMATE_K = 2.7
SKETCH_SIZE = 64  # rows and columns of a tensor's sample (4,096 entries)

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|blocks|block|blk|h)\.(\d+)\.")


def expected_error(type_name: str) -> tuple[float, bool]:
    """(the relative error a tensor stored as ``type_name`` is expected to have, whether it was measured).

    A type not in the measured table is estimated from its bits per weight; an unknown one (an integer
    type, a new format) gets the estimate of 4 bits, which a wrong tensor (error ~1) still exceeds.
    """
    name = type_name.upper()
    if name in TYPE_ERROR:
        return TYPE_ERROR[name], True
    bits = BITS_PER_WEIGHT.get(name, 4.0)
    return ESTIMATE_K * 2.0 ** -bits, False


def pair_expected_error(type_a: str, type_b: str) -> float:
    """The error expected between two stored copies of the same weights: each side's storage error added
    in quadrature (independent roundings; a B made from A's own values has only B's). An exact side (F32,
    F64) adds nothing, so an F32 reference against a Q4_K tensor expects the Q4_K error."""
    ea = 0.0 if type_a.upper() in EXACT_TYPES else expected_error(type_a)[0]
    eb = 0.0 if type_b.upper() in EXACT_TYPES else expected_error(type_b)[0]
    return math.hypot(ea, eb) or TYPE_ERROR["F32"]


def layer_and_role(name: str) -> tuple[int | None, str]:
    """(decoder layer index, the name without its layer prefix) of a tensor name, HF or GGUF style:
    ``model.layers.3.mlp.down_proj.weight`` -> (3, ``mlp.down_proj.weight``), ``blk.3.ffn_down.weight``
    -> (3, ``ffn_down.weight``), ``model.norm.weight`` -> (None, ``model.norm.weight``)."""
    m = _LAYER_RE.search(name)
    if m is None:
        return None, name
    return int(m.group(1)), name[m.end():]


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """||b - a||_F / ||a||_F in float64 (0 when both are zero, inf when only A is)."""
    a64 = np.asarray(a, dtype=np.float64).ravel()
    d = np.asarray(b, dtype=np.float64).ravel() - a64
    na = float(np.sqrt(a64 @ a64))
    nd = float(np.sqrt(d @ d))
    if na == 0.0:
        return 0.0 if nd == 0.0 else math.inf
    return nd / na


# --------------------------------------------------------------------------- llama.cpp's q/k row order


def rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter order for q/k rows (``LlamaModel.permute``): per head, the two halves that
    transformers' rotate_half pairs up are interleaved. ``w``'s rows must hold ``n_head`` whole heads."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of ``rope_permute`` (what transformers' GGUF loader applies to q/k)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --------------------------------------------------------------------------- streaming statistics


@dataclass
class TensorStats:
    """Sums over a tensor pair seen chunk by chunk (rows at a time), in float64.

    From them: the relative error, the least-squares scale ``c`` (B ~ c*A) and its residual, the
    least-squares offset ``k`` (B ~ A + k) and its residual, and the non-finite entries on each side
    (counted, with the first one's place). Entries where either side is not finite are left out of the
    sums, so the error of the rest is still known.
    """

    n: int = 0
    a2: float = 0.0
    b2: float = 0.0
    ab: float = 0.0
    d2: float = 0.0
    d1: float = 0.0
    b1: float = 0.0
    nonfinite_a: int = 0
    nonfinite_b: int = 0
    first_nonfinite: dict[str, Any] | None = None
    alt: dict[str, float] = field(default_factory=dict)  # name -> sum of squared differences of a candidate

    def update(self, a: np.ndarray, b: np.ndarray, row0: int = 0) -> float | None:
        """Add a chunk (same shape on both sides; ``row0``: the chunk's first row, for locating NaNs).

        Returns the chunk's ||B - A||^2 when every entry on both sides was finite and so was the sum (None
        otherwise): a caller whose own sum over the chunk is that same difference takes it instead of summing
        it again (``TwinStats.identical``)."""
        a = np.ascontiguousarray(a, dtype=np.float32).reshape(a.shape[0], -1)
        b = np.ascontiguousarray(b, dtype=np.float32).reshape(a.shape)
        sums = _block_sums(a, b)
        if sums is not None:  # every sum finite: so is every entry, and no square overflowed
            sa, sb, ab, d2, d1, b1 = sums
            self.n += a.size
            self.a2 += sa
            self.b2 += sb
            self.ab += ab
            self.d2 += d2
            self.d1 += d1
            self.b1 += b1
            return d2
        # some entry is not finite, or some square overflows float32: the whole chunk, masked
        sa, sb = sum_of_squares(a), sum_of_squares(b)
        clean = math.isfinite(sa) and math.isfinite(sb)
        if not clean:
            fa, fb = np.isfinite(a), np.isfinite(b)
            bad_a, bad_b = int(a.size - fa.sum()), int(b.size - fb.sum())
            self.nonfinite_a += bad_a
            self.nonfinite_b += bad_b
            if (bad_a or bad_b) and self.first_nonfinite is None:
                side, arr, ok = ("B", b, fb) if bad_b else ("A", a, fa)
                r, c = np.argwhere(~ok)[0]
                v = float(arr[r, c])
                self.first_nonfinite = {"side": side, "row": int(r) + row0, "col": int(c),
                                        "value": "NaN" if math.isnan(v) else ("+Inf" if v > 0 else "-Inf")}
            keep = fa & fb
            a = np.where(keep, a, np.float32(0))
            b = np.where(keep, b, np.float32(0))
            sa, sb = sum_of_squares(a), sum_of_squares(b)
            if not (math.isfinite(sa) and math.isfinite(sb)):  # finite values whose squares overflow float32
                a, b = a.astype(np.float64), b.astype(np.float64)
                sa, sb = sum_of_squares(a), sum_of_squares(b)
        d = b - a
        d2 = sum_of_squares(d)
        self.n += a.size
        self.a2 += sa
        self.b2 += sb
        self.ab += float(np.dot(a.ravel(), b.ravel()))
        self.d2 += d2
        self.d1 += _total(d)
        self.b1 += _total(b)
        return d2 if clean and math.isfinite(d2) else None

    def add_alt(self, name: str, a: np.ndarray, candidate: np.ndarray) -> None:
        """Accumulate how far ``candidate`` (B transformed some other way) is from A."""
        d = np.asarray(candidate, dtype=np.float32) - np.asarray(a, dtype=np.float32)
        s = sum_of_squares(d)
        self.alt[name] = self.alt.get(name, 0.0) + (s if math.isfinite(s) else 0.0)

    @property
    def nonfinite(self) -> int:
        return self.nonfinite_a + self.nonfinite_b

    def error(self) -> float:
        """Relative error over the finite entries (0 when both are zero, inf when only A is)."""
        if self.a2 <= 0.0:
            return 0.0 if self.d2 <= 0.0 else math.inf
        return math.sqrt(max(self.d2, 0.0) / self.a2)

    def alt_error(self, name: str) -> float | None:
        if name not in self.alt or self.a2 <= 0.0:
            return None
        return math.sqrt(max(self.alt[name], 0.0) / self.a2)

    def scale(self) -> tuple[float | None, float | None]:
        """(c, relative residual of B - c*A): the least-squares scale of A that best explains B."""
        if self.a2 <= 0.0:
            return None, None
        c = self.ab / self.a2
        resid = max(self.b2 - c * self.ab, 0.0)
        return c, math.sqrt(resid / self.a2)

    def constant(self) -> tuple[float | None, float | None]:
        """(v, relative residual of B - v): the one value that best explains all of B."""
        if self.a2 <= 0.0 or self.n == 0:
            return None, None
        v = self.b1 / self.n
        return v, math.sqrt(max(self.b2 - self.n * v * v, 0.0) / self.a2)

    def offset(self) -> tuple[float | None, float | None]:
        """(k, relative residual of B - A - k): the constant shift that best explains B - A."""
        if self.a2 <= 0.0 or self.n == 0:
            return None, None
        k = self.d1 / self.n
        resid = max(self.d2 - self.n * k * k, 0.0)
        return k, math.sqrt(resid / self.a2)


def sum_of_squares(x: np.ndarray) -> float:
    """The sum of an array's squares by BLAS, in its own precision (float32 stays float32: no float64 copy; a
    sum of positive terms, so its relative error is of order float32's epsilon times log of its length). Shared
    by every streaming sum of the weights family: these statistics, the twin's and the regrouping test."""
    flat = np.ascontiguousarray(x).reshape(-1)
    return float(np.dot(flat, flat))


BLOCK_ELEMENTS = 1 << 16  # entries per side summed at a time by ``_block_sums``: 256 KiB, within a core's cache


def _block_sums(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float, float, float, float] | None:
    """(A.A, B.B, A.B, |B - A|^2, sum(B - A), sum(B)) of two float32 chunks (rows, columns), or None when any of
    them is not finite. Taken a block of rows at a time: each block's six passes read it from the cache, not
    from memory (half the time of whole-chunk passes), and its difference goes into one reused buffer. Each
    block's sums are BLAS's in float32 over at most ``BLOCK_ELEMENTS`` entries, added up in float64."""
    rows, cols = a.shape
    step = max(1, BLOCK_ELEMENTS // max(cols, 1))
    buf = np.empty((min(step, rows), cols), dtype=np.float32)
    ones = np.ones(cols, dtype=np.float32)
    sa = sb = ab = d2 = d1 = b1 = 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        for r in range(0, rows, step):
            x, y = a[r:r + step], b[r:r + step]
            d = np.subtract(y, x, out=buf[:x.shape[0]])
            xf, yf, df = x.reshape(-1), y.reshape(-1), d.reshape(-1)
            sa += float(np.dot(xf, xf))
            sb += float(np.dot(yf, yf))
            ab += float(np.dot(xf, yf))
            d2 += float(np.dot(df, df))
            d1 += _total(d, ones)
            b1 += _total(y, ones)
    out = (sa, sb, ab, d2, d1, b1)
    return out if all(math.isfinite(v) for v in out) else None


def _total(x: np.ndarray, ones: np.ndarray | None = None) -> float:
    """The sum of a 2-D chunk: each row's by BLAS in float32 (a row's rounding is of order its length times
    float32's epsilon, far below what an offset or a constant is told apart by), the rows' in float64. numpy's
    float64 sum of float32 values converts them on the way and took twice as long. ``ones``: a float32 vector of
    ones as long as a row, for a caller that sums many chunks of that width."""
    if x.dtype != np.float32 or x.ndim != 2 or not x.flags.c_contiguous:
        return float(x.sum(dtype=np.float64))
    ones = ones if ones is not None else np.ones(x.shape[1], dtype=np.float32)
    return float(np.dot(x, ones).sum(dtype=np.float64))


# --------------------------------------------------------------------------- sketches


def sketch_indices(rows: int, cols: int, size: int = SKETCH_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Fixed sample rows and columns for a (rows, cols) tensor: the same for every tensor of that shape
    (so sketches of two tensors compare entry for entry), and the same set for rows and columns of a
    square one (so a sketch's transpose is the transpose's sketch)."""
    rng = np.random.default_rng(rows * 1_000_003 + cols)
    r = np.sort(rng.choice(rows, size=min(rows, size), replace=False))
    if rows == cols:
        return r, r
    c = np.sort(rng.choice(cols, size=min(cols, size), replace=False))
    return r, c


@dataclass
class Sketch:
    """The entries of a tensor at its shape's sample rows and columns, filled chunk by chunk."""

    rows: np.ndarray
    cols: np.ndarray
    values: np.ndarray

    @classmethod
    def for_shape(cls, rows: int, cols: int) -> Sketch:
        r, c = sketch_indices(rows, cols)
        return cls(r, c, np.zeros((len(r), len(c)), dtype=np.float32))

    def update(self, chunk: np.ndarray, row0: int) -> None:
        chunk = chunk.reshape(chunk.shape[0], -1)
        lo, hi = np.searchsorted(self.rows, [row0, row0 + chunk.shape[0]])
        if hi > lo:
            self.values[lo:hi] = chunk[self.rows[lo:hi] - row0][:, self.cols]

    @property
    def square(self) -> bool:
        return len(self.rows) == len(self.cols) and bool(np.array_equal(self.rows, self.cols))


def sample_error(a: np.ndarray, b: np.ndarray) -> float:
    """Relative error of ``b`` against ``a`` on two sketches (non-finite entries left out)."""
    keep = np.isfinite(a) & np.isfinite(b)
    return relative_error(np.where(keep, a, 0.0), np.where(keep, b, 0.0))
