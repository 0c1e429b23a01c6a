"""The re-quantisation twin: what a correct conversion of A's tensor to B's storage type gives.

A correct llama.cpp conversion of a tensor is a function of A's values and B's storage type: the
converter brings A's tensor into GGUF's convention (q/k rows permuted for llama.cpp's rope, Gemma's
norms stored as 1 + w), writes it as F32, F16 or BF16, and llama.cpp's quantiser turns that into the
type. Running the same quantiser on A's tensor gives B's **twin**, and a correct B reproduces it
except where the quantiser meets a near-tie (an FMA or a rounding of the F16/BF16 intermediate tips
a block's scale search the other way). So B is judged against its twin, not against a table of errors
measured on other models: a tensor scaled by 1.02 before a Q2_K quantisation, far inside Q2_K's noise
of about 0.35, still moves nearly every block off its twin.

Two numbers per tensor, each with a principle behind its bound (docs/twins.md):

- ``blocks``: the share of the type's blocks whose bytes (float types: whose values) differ from the
  twin. A near-tie is rare; changed input changes most blocks.
- ``excess``: ``||B - T||_F / ||T - A||_F``, how far B is from its twin as a fraction of the type's own
  error on this tensor. A block that a near-tie flipped is another near-optimal quantisation of the same
  values, so it is at most about twice that block's own error away from the twin; over a share ``s`` of
  blocks that gives about ``2 sqrt(s)``.

The intermediate (F32, F16 or BF16) that the converter wrote before the quantiser ran is not recorded
in a GGUF; each is tried, and the one B reproduces best is the twin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..core.weight_errors import sum_of_squares

__all__ = ["INTERMEDIATES", "ROUNDING_TYPES", "SCALE_SEARCH_TYPES", "TwinStats", "round_to", "rounding_ties",
           "scale_search_ties", "twin_bytes", "twin_rows"]

INTERMEDIATES: tuple[str, ...] = ("F16", "F32", "BF16")  # the converter's --outtype, most common first
FLOAT_TYPES = ("F32", "F16", "BF16", "F64")
LOCATIONS = 8  # differing blocks whose place is kept


def round_to(x: np.ndarray, type_name: str) -> np.ndarray:
    """float32 values rounded as a file of ``type_name`` stores them (round to nearest even), as float32."""
    t = type_name.upper()
    x = np.asarray(x, dtype=np.float32)
    if t in ("F32", "F64"):
        return x
    if t == "F16":
        from . import ggml  # numpy's own cast where ggml's vector conversion is not there or not numpy's

        return ggml.f16_round(x)
    if t == "BF16":
        u = x.view(np.uint32).astype(np.uint64)
        nan = (u & 0x7FFFFFFF) > 0x7F800000
        r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint32)
        r = np.where(nan, ((u >> 16) | 64).astype(np.uint32), r)
        return (r << 16).astype(np.uint32).view(np.float32)
    raise ValueError(f"{type_name} is not a float type")


def twin_rows(rows_gguf: np.ndarray, type_name: str, intermediate: str,
              imatrix: np.ndarray | None = None) -> tuple[np.ndarray | None, np.ndarray]:
    """(the twin's stored bytes, or None for a float type; its values as float32) for rows of A's tensor
    already in GGUF's convention, written through ``intermediate`` and stored as ``type_name``."""
    t = type_name.upper()
    src = round_to(rows_gguf, intermediate)
    if t in FLOAT_TYPES:
        return None, round_to(src, t)
    from . import ggml

    raw = ggml.quantize(t, src, imatrix)
    return raw, ggml.dequantize(t, raw, src.shape[1])


def twin_bytes(src: np.ndarray, type_name: str, imatrix: np.ndarray | None = None) -> np.ndarray:
    """The twin's stored bytes for a quantised type, from the quantiser's input ``src`` (rows in GGUF's convention
    already written through the intermediate: ``round_to``). ``twin_rows`` without reading them back: where they
    are B's own bytes, B's values are the twin's."""
    from . import ggml

    return ggml.quantize(type_name.upper(), src, imatrix)


# Types whose quantiser, without an importance matrix, fixes each block's scale from its extremes and rounds every
# value once (ggml-quants.c, quantize_row_*_ref): how the scale is made, its divisor, and what is added to x * id
# before the truncation (None: Q8_0's roundf, which rounds half away from zero).
ROUNDING_TYPES: dict[str, tuple[str, float, float | None]] = {
    "Q4_0": ("signed-max", -8.0, 8.5), "Q5_0": ("signed-max", -16.0, 16.5),
    "Q4_1": ("min-max", 15.0, 0.5), "Q5_1": ("min-max", 31.0, 0.5), "Q8_0": ("abs-max", 127.0, None),
}


def _ulp32(v: np.ndarray) -> np.ndarray:
    """One unit in the last place of float32 at |v| (of the smallest normal below it)."""
    a = np.maximum(np.abs(v), np.finfo(np.float32).tiny)
    return np.ldexp(1.0, np.floor(np.log2(a)).astype(np.int64) - 23)


def rounding_ties(type_name: str, x: np.ndarray, raw_b: np.ndarray, raw_t: np.ndarray, vb: np.ndarray,
                  vt: np.ndarray) -> np.ndarray:
    """For blocks of a rounding type (``ROUNDING_TYPES``; one block per row of each argument: the quantiser's
    float32 input ``x``, B's and the twin's bytes, B's and the twin's values), whether each differs from its twin
    only where the quantiser's one rounding was a near-tie that another build of the same code may tip: an arm64
    build contracts ``x * id + 8.5`` into one fused multiply-add, rounded once, where an x86-64 build rounds the
    product and the sum apart.

    The block's scale (and minimum) bytes must be the twin's, and each value that differs must differ by one
    quantum at an element whose rounded quantity, recomputed exactly in float64 from ``x`` and the float32 ``id``
    as the quantiser computes them, lies within ``ulp(x * id) + ulp(t)`` of its rounding boundary (an integer for
    the truncation, a half-integer for Q8_0's roundf). Rounding the product and the sum apart errs by at most half
    an ulp of each, the fused form by half an ulp of the sum, so two builds can only land on either side of a
    boundary closer than that. A defect moves values by a fraction of a quantum, far more than a few ulps, and
    its scale bytes change with them."""
    kind, div, add = ROUNDING_TYPES[type_name]
    x = np.atleast_2d(np.asarray(x, dtype=np.float32))
    rb, rt = np.atleast_2d(raw_b), np.atleast_2d(raw_t)
    b = np.atleast_2d(vb).astype(np.float64)
    t_ = np.atleast_2d(vt).astype(np.float64)
    scale_bytes = 4 if kind == "min-max" else 2
    same_scale = (rb[:, :scale_bytes] == rt[:, :scale_bytes]).all(axis=1)
    rows = np.arange(x.shape[0])
    if kind == "signed-max":
        d = (x[rows, np.argmax(np.abs(x), axis=1)] / np.float32(div)).astype(np.float32)
        base = x
    elif kind == "min-max":
        lo = x.min(axis=1)
        d = ((x.max(axis=1) - lo) / np.float32(div)).astype(np.float32)
        base = (x - lo[:, None]).astype(np.float32)
    else:
        d = (np.abs(x).max(axis=1) / np.float32(div)).astype(np.float32)
        base = x
    inv = (np.float32(1.0) / np.where(d != 0, d, np.float32(1.0))).astype(np.float32)
    quantum = np.abs(np.ascontiguousarray(rb[:, :2]).view(np.float16)[:, 0].astype(np.float64))
    moved = ~((b == t_) | (np.isnan(b) & np.isnan(t_)))
    with np.errstate(invalid="ignore"):
        one_step = np.isclose(np.abs(b - t_), quantum[:, None], rtol=1e-5, atol=0.0)
    prod = base.astype(np.float64) * inv[:, None].astype(np.float64)  # exact: two float32 factors
    t = prod + (add if add is not None else 0.0)
    edge = np.round(t) if add is not None else np.floor(t) + 0.5
    near = np.abs(t - edge) <= _ulp32(prod) + _ulp32(t)
    return same_scale & (d != 0) & (quantum > 0) & (~moved | (one_step & near)).all(axis=1)


# K-quants whose scales come from a float32 search (ggml-quants.c: make_qkx2_quants' least-squares solve, Q3_K's
# make_q3_quants, Q6_K's make_qx_quants; without an importance matrix) and whose values are then rounded again under
# the stored scales: sub-block size, and the range of a quant (Q3_K's and Q6_K's are signed, with no minimum).
SCALE_SEARCH_TYPES: dict[str, tuple[int, int, int]] = {"Q2_K": (16, 0, 3), "Q3_K": (16, -4, 3), "Q4_K": (32, 0, 15),
                                                       "Q5_K": (32, 0, 31), "Q6_K": (16, -32, 31)}


def _k4_scales(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: the 8 six-bit scales and mins packed in 12 bytes after d and dmin (ggml's get_scale_min_k4)."""
    q = raw[:, 4:16].astype(np.int32)
    sc, m = np.empty((len(raw), 8), np.int32), np.empty((len(raw), 8), np.int32)
    sc[:, :4], m[:, :4] = q[:, 0:4] & 63, q[:, 4:8] & 63
    sc[:, 4:] = (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)
    m[:, 4:] = (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)
    return sc, m


def _q3k_scales(raw: np.ndarray) -> np.ndarray:
    """Q3_K: the 16 six-bit signed scales packed in 12 bytes after hmask[32] and qs[64] (low nibbles in bytes 0-7,
    two high bits each in bytes 8-11), as quantize_row_q3_K_ref writes them."""
    q = raw[:, 96:108].astype(np.int32)
    j = np.arange(16)
    low = np.where(j < 8, q[:, j % 8] & 0xF, q[:, j % 8] >> 4)
    high = (q[:, 8 + j % 4] >> (2 * (j // 4))) & 3
    return (low | (high << 4)) - 32


def _fp16(raw: np.ndarray, at: int) -> np.ndarray:
    return np.ascontiguousarray(raw[:, at:at + 2]).view(np.float16)[:, 0].astype(np.float32)


def scale_search_ties(type_name: str, x: np.ndarray, raw_b: np.ndarray, vb: np.ndarray) -> np.ndarray:
    """For blocks of a ``SCALE_SEARCH_TYPES`` type that differ from their twin (one block per row: the quantiser's
    float32 input ``x``, B's bytes, B's values), whether each is the type's own final rounding of ``x`` under the
    block's stored scales: ``l = nearest_int((x + dmin * m_j) / (d * sc_j))`` (Q3_K, Q6_K: ``x / (d * sc_j)``) for every
    value of every sub-block whose scale is not zero.

    Why this is the tie test for these types: the scales come from a least-squares solve in float32
    (``(sum_w * sum_xl - sum_x * sum_l) / D``) that cancels heavily, so another build's rounding or fused
    multiply-adds move a sub-block's six-bit scale, and through the largest one the block's ``d``, in a share of
    blocks that no near-tie argument bounds (a third of a tensor's blocks, measured: docs/twins.md). Everything
    after the solve is exact or correctly rounded the same way on every build: ``d * sc_j`` is an exact product,
    and an addition then a division have no multiply-add to contract. So a block another build made is exactly
    this rounding under its own scales; a defect is not: a scaled, noisy, swapped or shifted tensor moves ``x``
    relative to the scales B stores and changes the rounding of the values near a boundary (every block of
    a tensor scaled by 1.02 or with 1 % noise, measured at every type), a zeroed block has no scale to round
    by (nor does a zeroed sub-block: its values span far more than a scale of zero allows), and a corrupted scale
    changes every rounding of its sub-block.

    The scales themselves are not judged: a build's solve can move a sub-block's scale or minimum by a code or
    two, and where A's values sit on a grid (a checkpoint made from a quantised file) one code more than
    multiplies that sub-block's error against A (16× measured, SmolLM2 Q4_K), so neither a ratio of errors nor
    a share of blocks bounds it. A quantiser whose search chose systematically worse scales would pass here;
    that is a change of the quantiser, not of the conversion, and ``excess`` still reports the distance."""
    sub, qmin, qmax = SCALE_SEARCH_TYPES[type_name]
    x = np.atleast_2d(np.asarray(x, dtype=np.float32))
    raw = np.atleast_2d(raw_b)
    vb = np.atleast_2d(np.asarray(vb, dtype=np.float32))
    if type_name in ("Q3_K", "Q6_K"):  # l = nearest_int(x / (d * sc_j)), signed, no minimum
        if type_name == "Q6_K":  # ql[128] qh[64] int8 scales[16] d
            sc, d = raw[:, 192:208].view(np.int8).astype(np.int32), _fp16(raw, 208)
        else:  # hmask[32] qs[64] scales[12] d
            sc, d = _q3k_scales(raw), _fp16(raw, 108)
        m, dmin = np.zeros_like(sc), np.zeros_like(d)
    elif type_name == "Q2_K":
        sc, m = (raw[:, :16] & 0xF).astype(np.int32), (raw[:, :16] >> 4).astype(np.int32)
        d, dmin = _fp16(raw, 80), _fp16(raw, 82)
    else:
        sc, m = _k4_scales(raw)
        d, dmin = _fp16(raw, 0), _fp16(raw, 2)
    n = x.shape[0]
    step = (d[:, None] * sc.astype(np.float32)).astype(np.float32)  # exact: an 11-bit half times an 8-bit integer
    low = (dmin[:, None] * m.astype(np.float32)).astype(np.float32)
    xs, vs = x.reshape(n, -1, sub), vb.reshape(n, -1, sub)
    live = (step != 0) & np.isfinite(step) & np.isfinite(low)  # sub-blocks the final rounding redid
    safe = np.where(live, step, np.float32(1))[..., None]
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        want = np.clip(np.rint(((xs + low[..., None]).astype(np.float32) / safe).astype(np.float32)), qmin, qmax)
        have = np.rint((vs + low[..., None]) / safe)
    same = (want == have) | ~live[..., None]
    # A sub-block stored without a scale holds one value: the search gives that only where its fit's scale is under
    # half a step of the block's largest code, so where x spans less than half the quants' range in steps of ``d``
    # (the whole range, as a margin of two).
    span = np.maximum(xs.max(axis=2), 0) - np.minimum(xs.min(axis=2), 0)
    flat = live | (span <= (qmax - qmin) * np.abs(d)[:, None])
    finite = np.isfinite(d) & np.isfinite(dmin) & np.isfinite(vs).all(axis=(1, 2))
    return finite & live.any(axis=1) & flat.all(axis=1) & same.all(axis=(1, 2))


@dataclass
class TwinStats:
    """B against its twin over a tensor, chunk by chunk: blocks that differ, and the sums for ``excess``."""

    intermediate: str
    blocks: int = 0
    differing: int = 0
    type: str = ""  # B's storage type (``ROUNDING_TYPES`` get the rounding-tie test)
    ties: int = 0  # blocks that differed only at a near-tie of the quantiser's one rounding (not in ``differing``)
    scale_ties: int = 0  # blocks rounded as the type does under their own scales (``scale_search_ties``; not in
    # ``differing``)
    d2: float = 0.0  # ||B - T||^2
    e2: float = 0.0  # ||T - A||^2 (the type's own error on this tensor)
    b2: float = 0.0  # ||B - A||^2
    half_ulp: float = 0.0  # half a unit in the last place of the stored type, relative (float types)
    diff_b2: float = 0.0  # ||B - A||^2 over the blocks that differ from the twin
    diff_t2: float = 0.0  # ||T - A||^2 over them (floored at half an ulp of the stored type)
    rows_hit: set[int] = field(default_factory=set)
    where: list[tuple[int, int]] = field(default_factory=list)  # (row, block) of the first differing blocks

    def update(self, raw_b: np.ndarray | None, raw_t: np.ndarray | None, values_b: np.ndarray, values_t: np.ndarray,
               values_a: np.ndarray, block: int, row_index: np.ndarray, quantised: np.ndarray | None = None) -> None:
        """One chunk: B's and the twin's bytes (None for float types: values are compared), both sides'
        values and A's in one convention, and the tensor row (in A's order) of each chunk row. ``quantised``:
        the quantiser's float32 input in the same order, for a rounding type quantised without an importance
        matrix: a block that differs only at a near-tie of its one rounding (``rounding_ties``) is counted in
        ``ties``, not as differing; for a ``SCALE_SEARCH_TYPES`` type: a block that is the type's own rounding of
        it under its stored scales (``scale_search_ties``) is counted in ``scale_ties``, not as differing."""
        vb = values_b.reshape(values_b.shape[0], -1)
        vt = values_t.reshape(vb.shape)
        va = values_a.reshape(vb.shape)
        tie = None
        if raw_b is not None and raw_t is not None:
            n_blocks = vb.shape[1] // block
            per = raw_b.shape[1] // n_blocks
            rb, rt = raw_b.reshape(vb.shape[0], n_blocks, per), raw_t.reshape(vb.shape[0], n_blocks, per)
            diff = (rb != rt).any(-1)
            rounding = self.type in ROUNDING_TYPES
            if quantised is not None and (rounding or self.type in SCALE_SEARCH_TYPES) and diff.any():
                shape = (vb.shape[0], n_blocks, block)
                at = np.nonzero(diff)
                x_at, b_at = quantised.reshape(shape)[at], vb.reshape(shape)[at]
                accepted = np.zeros_like(diff)
                accepted[at] = (rounding_ties(self.type, x_at, rb[at], rt[at], b_at, vt.reshape(shape)[at])
                                if rounding else scale_search_ties(self.type, x_at, rb[at], b_at))
                if rounding:  # a tipped rounding is another build's twin: no distance from it either
                    self.ties += int(accepted.sum())
                    tie = accepted
                else:
                    self.scale_ties += int(accepted.sum())
                diff &= ~accepted
        else:
            diff = ~((vb == vt) | (np.isnan(vb) & np.isnan(vt)))
        self.blocks += diff.size
        hit = np.argwhere(diff)
        self.differing += len(hit)
        if len(hit):
            rows = np.asarray(row_index)[hit[:, 0]]
            self.rows_hit.update(int(r) for r in np.unique(rows))
            room = LOCATIONS - len(self.where)
            if room > 0:
                self.where.extend((int(r), int(c)) for r, c in zip(rows[:room], hit[:room, 1], strict=True))
        # differences in float32 (B, the twin and A are close, so each difference is exact or nearly), their squares
        # summed by BLAS: the chunk is never widened to float64, which cost more than the quantiser's own run
        vb, vt, va = (np.asarray(v, dtype=np.float32) for v in (vb, vt, va))
        if not len(hit) and tie is None:
            # every block is the twin's (bytes or values): B's values are the twin's, so B - T is zero and B - A
            # is T - A; one difference instead of three, and no finiteness masks when its sum is finite
            with np.errstate(invalid="ignore", over="ignore"):
                e = vt - va
            s = sum_of_squares(e)
            if math.isfinite(s) and np.array_equal(vb, vt):
                self.e2 += s
                self.b2 += s
                return
        with np.errstate(invalid="ignore", over="ignore"):
            d, e, f = vb - vt, vt - va, vb - va
        if tie is not None and tie.any():  # a tipped near-tie is another build's twin: no distance from it
            d = np.where(np.repeat(tie, block, axis=1), np.float32(0), d)
        ok = np.isfinite(d) & np.isfinite(e) & np.isfinite(f)
        if not ok.all():
            zero = np.float32(0)
            d, e, f = np.where(ok, d, zero), np.where(ok, e, zero), np.where(ok, f, zero)
        self.d2 += sum_of_squares(d)
        self.e2 += sum_of_squares(e)
        self.b2 += sum_of_squares(f)
        if len(hit):  # B's and the twin's errors against A over the blocks that differ
            nb = diff.shape[1]
            fb = f.reshape(vb.shape[0], nb, -1)[diff].astype(np.float64)
            et = e.reshape(vb.shape[0], nb, -1)[diff].astype(np.float64)
            floor = np.abs(va.reshape(vb.shape[0], nb, -1)[diff].astype(np.float64)) * self.half_ulp
            self.diff_b2 += float((fb * fb).sum())
            self.diff_t2 += float(np.maximum((et * et).sum(-1), (floor * floor).sum(-1)).sum())

    def identical(self, blocks: int, b_a2: float) -> None:
        """A chunk whose bytes are all the twin's (B's values are the twin's), with ``b_a2`` its ||B - A||^2 summed
        already (finite, every entry finite): what ``update`` adds for it, without comparing values again."""
        self.blocks += blocks
        self.e2 += b_a2
        self.b2 += b_a2

    @property
    def share(self) -> float:
        return self.differing / self.blocks if self.blocks else 0.0

    def excess(self) -> float:
        """||B - T|| / ||T - A||: 0 when B is its twin; infinite when the type is exact here and B is not."""
        if self.d2 <= 0.0:
            return 0.0
        return math.sqrt(self.d2 / self.e2) if self.e2 > 0.0 else math.inf

    def error_ratio(self) -> float:
        """||B - A|| / ||T - A||: B's error against the error a correct conversion has (the fallback test
        when the twin cannot be reproduced, e.g. an importance matrix was used and is not given)."""
        if self.b2 <= 0.0:
            return 0.0
        return math.sqrt(self.b2 / self.e2) if self.e2 > 0.0 else math.inf

    def tie_ratio(self) -> float:
        """sqrt(||B - A||^2 / ||T - A||^2) over the blocks that differ from the twin: about 1 where a near-tie
        chose another, equally good, quantisation of A's values; larger where B's values are not A's."""
        if self.differing == 0 or self.diff_b2 <= 0.0:
            return 0.0 if self.differing == 0 else 1.0
        return math.sqrt(self.diff_b2 / self.diff_t2) if self.diff_t2 > 0.0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        return {"intermediate": self.intermediate, "blocks": self.blocks, "differing": self.differing,
                "share": self.share, "excess": self.excess() if math.isfinite(self.excess()) else None,
                "excess_inf": not math.isfinite(self.excess()),
                "error_ratio": self.error_ratio() if math.isfinite(self.error_ratio()) else None,
                "tie_ratio": self.tie_ratio() if math.isfinite(self.tie_ratio()) else None,
                "twin_error2": self.e2, "rows_hit": len(self.rows_hit), "ties": self.ties,
                "scale_ties": self.scale_ties,
                "row_range": [min(self.rows_hit), max(self.rows_hit)] if self.rows_hit else None,
                "where": [list(w) for w in self.where]}

    def better_than(self, other: TwinStats | None) -> bool:
        return other is None or (self.differing, self.d2) < (other.differing, other.d2)
