"""The weights family's measurement: every tensor of B against A's, and against B's re-quantisation twin.

``backends.pairing`` says which tensor of B goes with which of A and in which convention, and
``backends.tensors`` reads them a chunk of rows at a time. Each pair is streamed once: its error, scale,
offset and non-finite counts, a small sketch of each side, and B's twin (``backends.twin``: A's rows
quantised the way llama.cpp quantised B, block by block). Tensors whose error is above what their types
explain are then compared cheaply, on their sketches, with what B might hold instead (another tensor of A,
A transposed or scaled, another q/k row order) so that a failure says what B matches.

No pytest here and no torch: numpy, the ``gguf`` package and llama.cpp's library (for its quantiser).
"""

from __future__ import annotations

import functools
import math
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.threads import numpy_blas_alone
from ..core.weight_errors import (
    Sketch,
    TensorStats,
    expected_error,
    layer_and_role,
    pair_expected_error,
    rope_permute,
    rope_unpermute,
    sample_error,
)
from . import ggml, gguf_header, twin
from .imatrix import ImportanceMatrix
from .pairing import (
    Pair,
    Plan,
    Reader,
    check_groups,
    chunks,
    per_expert,
    perm_groups,
    plan_pairs,
    shape_problem,
)
from .tensors import GGUFWeights, Source, WeightsUnreadable
from .twin import TwinStats

__all__ = ["measure_weights", "start_entry", "tensor_meaning", "twin_unavailable"]

CANDIDATE_RATIO = 0.5  # an alternative explains B when its error is at most half of B's own error
# The sampled twin (``SampledRows``): on by default (``--convdiff-weights-twin auto``) for a B of more than
# SAMPLED_ABOVE parameters, where the full twin costs minutes of quantising on a laptop's cores; each tensor then
# has SAMPLE_SHARE of its rows (at least SAMPLE_MIN_ROWS) quantised exactly, from a seed and the tensor's name.
SAMPLED_ABOVE = 1_000_000_000
SAMPLE_SHARE = 1 / 32
SAMPLE_MIN_ROWS = 64
SAMPLE_SEED = 0x5EED
ROW_FACTOR = 4.0  # a row of B may stray from A's scale this many times as far as the twin's rows do
ROW_FLOOR = 1e-6  # float32's resolution of a scale: a row of an exact type strays no less


_HALF_ULP = {"F32": 2.0 ** -24, "F64": 2.0 ** -53, "F16": 2.0 ** -11, "BF16": 2.0 ** -8}


@dataclass
class _Chunk:
    """One chunk's twin, between ``_Twin.start`` and ``_Twin.finish``: A's rows (``a``), the rows of them the twin
    holds (``rows_a``, their values ``x``), and the twin's bytes and values beside B's bytes."""

    r0: int
    a: np.ndarray
    rows_a: np.ndarray
    x: np.ndarray
    raw_b: np.ndarray | None = None
    raw_t: np.ndarray | None = None
    vt: np.ndarray | None = None
    quantised: np.ndarray | None = None


class _Twin:
    """B's re-quantisation twin over one tensor (``backends.twin``): A's rows brought into B's stored convention
    (the converter's forward transforms), written through an intermediate, stored as B's type, and read
    back into the common convention, chunk by chunk beside B's own rows.

    ``sample``: quantise only a seeded random share of the tensor's rows (``SampledRows``), and check every row
    of B cheaply against A instead (its least-squares scale, zero rows)."""

    def __init__(self, pair: Pair, n_groups: int, intermediate: str, imatrix: np.ndarray | None = None,
                 sample: float | None = None, rows_from: _Twin | None = None) -> None:
        assert pair.b is not None
        self.pair, self.type, self.imatrix = pair, pair.b.type, imatrix
        self.groups = n_groups if pair.unpermute[1] else 0
        self.offset = pair.norm_offset[1]
        self.stats = TwinStats(intermediate, half_ulp=_HALF_ULP.get(self.type, 0.0), type=self.type)
        self.block = gguf_header.GGML_TYPES[ggml.type_id(self.type)][1] if self.type not in twin.FLOAT_TYPES else 1
        # another intermediate's twin of the same tensor samples the same rows, and B's rows are checked once
        self.sampled = (rows_from.sampled.again() if rows_from is not None and rows_from.sampled is not None
                        else SampledRows.of(pair, sample) if sample else None)

    def update(self, src_b: Source, a: np.ndarray, b: np.ndarray, r0: int, r1: int) -> None:
        self.finish(self.start(src_b, a, r0, r1), b)

    def start(self, src_b: Source, a: np.ndarray, r0: int, r1: int) -> _Chunk:
        """What needs only A's rows and B's bytes: the quantiser's run over the chunk (or its sampled rows), made
        while ``_stream`` reads and sums the chunk on another thread."""
        n = r1 - r0
        k = n // (self.pair.b.rows // self.groups) if self.groups else 0
        a2 = a.reshape(n, -1)
        if self.sampled is not None:  # a stored row of B is one row of A (the rope permutation moves whole rows)
            stored = np.nonzero(self.sampled.mask[r0:r1])[0]
            rows_a = (rope_permute(np.arange(n), k) if k else np.arange(n))[stored]  # A's row of each stored row
            x = a2[rows_a]
        else:
            stored, rows_a, x = None, np.arange(n), a2
        if not len(rows_a):
            return _Chunk(r0, a2, rows_a, x)
        fwd = rope_permute(x, k) if k and stored is None else x  # all rows: quantised in B's stored order
        if self.offset:
            fwd = fwd + np.float32(self.offset)
        quantised_type = self.type not in twin.FLOAT_TYPES
        raw_b = src_b.raw(self.pair.b, r0, r1) if quantised_type and isinstance(src_b, GGUFWeights) else None
        src = None  # the quantiser's input: A's rows written through the intermediate, in B's stored order
        if raw_b is not None:  # bytes against bytes: the twin's values are read back in ``finish``, where they differ
            src = twin.round_to(fwd, self.stats.intermediate)
            raw_t, vt = twin.twin_bytes(src, self.type, self.imatrix), None
            raw_b = raw_b[stored] if stored is not None else raw_b
        else:  # B's bytes unknown (or a float type): compare values
            raw_t, vt = None, twin.twin_rows(fwd, self.type, self.stats.intermediate, self.imatrix)[1].reshape(x.shape)
        if k and stored is None:  # rows in B's stored (rope) order: into A's
            if vt is not None:
                vt = rope_unpermute(vt, k)
            if raw_t is not None:
                raw_t, raw_b = rope_unpermute(raw_t, k), rope_unpermute(raw_b, k)
        if vt is not None and self.offset:
            vt = vt - np.float32(self.offset)
        # the quantiser's own input, in A's order, for the tie tests of the rounding types and the scale-search
        # K-quants, without an importance matrix only: with one, the rounding types search their scale too, and a
        # K-quant's codes carry the matrix's choice, which a given matrix is there to hold B to
        quantised = None
        if src is not None and self.imatrix is None and (self.type in twin.ROUNDING_TYPES
                                                         or self.type in twin.SCALE_SEARCH_TYPES):
            quantised = rope_unpermute(src, k) if k and stored is None else src  # in A's order
        return _Chunk(r0, a2, rows_a, x, raw_b, raw_t, vt, quantised)

    def finish(self, c: _Chunk, b: np.ndarray, b_a2: float | None = None) -> None:
        """B's rows against the twin ``start`` made (and, sampled, every row of B against A's). ``b_a2``: the
        chunk's ||B - A||^2 where ``TensorStats.update`` summed it over finite entries only; when B's bytes are
        all the twin's, that is the twin's sum too, and nothing is compared or summed again."""
        b2 = b.reshape(b.shape[0], -1)
        if (b_a2 is not None and self.sampled is None and c.vt is None and c.raw_t is not None
                and c.raw_b is not None and _same_bytes(c.raw_b, c.raw_t)):
            self.stats.identical(b2.shape[0] * (b2.shape[1] // self.block), b_a2)
            return
        if self.sampled is not None:
            self.sampled.check_rows(c.a, b2, c.r0)
        if not len(c.rows_a):
            return
        vb = b2[c.rows_a] if self.sampled is not None else b2
        vt = c.vt if c.vt is not None else self._read_back(c, vb)
        self.stats.update(c.raw_b, c.raw_t, vb, vt, c.x, self.block, c.r0 + c.rows_a, c.quantised)
        if self.sampled is not None:
            self.sampled.twin_rows(c.x, vt)

    def _read_back(self, c: _Chunk, vb: np.ndarray) -> np.ndarray:
        """The twin's values in A's order and convention: B's own where the bytes are B's, the rest dequantised."""
        assert c.raw_t is not None and c.raw_b is not None
        vt = np.array(vb, dtype=np.float32, copy=True)
        other = np.nonzero((c.raw_t != c.raw_b).any(axis=1))[0]
        if len(other):
            back = ggml.dequantize(self.type, np.ascontiguousarray(c.raw_t[other]), vt.shape[1])
            vt[other] = back - np.float32(self.offset) if self.offset else back
        return vt

    def to_dict(self) -> dict[str, Any]:
        out = self.stats.to_dict()
        if self.sampled is not None:
            out["sampled"] = self.sampled.to_dict(self.stats.e2)
        return out


@dataclass
class SampledRows:
    """The sampled twin of one tensor: which rows are quantised, and every row of B checked cheaply.

    A seeded random ``share`` of the rows (at least ``SAMPLE_MIN_ROWS``) gets its exact twin: blocks are
    quantised independently, so a sample of rows is as exact as all of them, and a defect that touches every
    block (a scaled, swapped, permuted or offset tensor) moves the sampled blocks as it moves the rest.

    Every row of B is checked against A's row without the quantiser: its least-squares scale ``<a, b> / <a, a>``
    and whether it is zeros where A's is not. A correct conversion's error is nearly uncorrelated with A's values,
    so a row's scale strays from 1 by about the type's relative error over the square root of the row's length;
    the twin's sampled rows show how far it strays on this tensor at this type, and a row of B more than
    ``ROW_FACTOR`` times that far (or a row of zeros) holds other values than A's: a row or a block scaled,
    zeroed or swapped, which a sample of rows could miss."""

    mask: np.ndarray  # per stored row of B: quantised (sampled) or not
    dev_b: np.ndarray  # per row of A: |scale of B's row against A's - 1| (inf: B's row zeros, or A's)
    twin_dev: float = 0.0  # the largest |scale - 1| of the twin's sampled rows
    twin_a2: float = 0.0  # ||A||^2 over them (the twin's ||T - A||^2 there is its ``TwinStats.e2``)
    cols: int = 1
    checks_rows: bool = True  # False for another intermediate's twin: ``dev_b`` is the first twin's, filled

    @classmethod
    def of(cls, pair: Pair, share: float) -> SampledRows | None:
        """The sample for this tensor; None where it would hold every row anyway, or where B's type is a float
        type (its twin is a rounding, as cheap as reading the tensor)."""
        assert pair.b is not None
        if pair.b.type in twin.FLOAT_TYPES:
            return None
        rows = pair.b.rows
        n = max(SAMPLE_MIN_ROWS, math.ceil(share * rows))
        if n >= rows:
            return None
        rng = np.random.default_rng([SAMPLE_SEED, zlib.crc32(pair.name.encode())])
        mask = np.zeros(rows, dtype=bool)
        mask[rng.choice(rows, n, replace=False)] = True
        return cls(mask, np.zeros(rows, dtype=np.float64), cols=pair.b.cols)

    def again(self) -> SampledRows:
        """The same sample for the twin of another intermediate, with B's rows as already checked."""
        return SampledRows(self.mask, self.dev_b, cols=self.cols, checks_rows=False)

    @staticmethod
    def _dev(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """|<a, b> / <a, a> - 1| per row, as <a, b - a> / <a, a>: in float32, since B - A is small and exact
        where the two are close; inf for a row of zeros on one side only, or one that is not finite."""
        a = np.asarray(a, dtype=np.float32)
        b = np.asarray(b, dtype=np.float32)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            aa = np.einsum("ij,ij->i", a, a)
            dev = np.abs(np.einsum("ij,ij->i", a, b - a) / aa).astype(np.float64)
        a_any, b_any = a.any(axis=1), b.any(axis=1)
        dev = np.where(a_any, dev, np.where(b_any, np.inf, 0.0))
        dev = np.where(a_any & ~b_any, np.inf, dev)  # B's row zeros where A's is not
        return np.where(np.isnan(dev), np.inf, dev)

    def check_rows(self, a: np.ndarray, b: np.ndarray, r0: int) -> None:
        if self.checks_rows:
            self.dev_b[r0:r0 + a.shape[0]] = self._dev(a, b)

    def twin_rows(self, a: np.ndarray, t: np.ndarray) -> None:
        dev = self._dev(a, t)
        finite = dev[np.isfinite(dev)]
        if len(finite):
            self.twin_dev = max(self.twin_dev, float(finite.max()))
        self.twin_a2 += float(np.nansum(a.astype(np.float64) ** 2))

    def limit(self, twin_e2: float) -> float:
        """How far a row's scale may stray from 1: ``ROW_FACTOR`` times the most the twin's rows stray, or times
        the type's relative error (``twin_e2``: ||T - A||^2 over the sampled rows) over the root of the row length
        where the twin's rows happen to stray less."""
        rel = math.sqrt(twin_e2 / self.twin_a2) if self.twin_a2 > 0 else 0.0
        return ROW_FACTOR * max(self.twin_dev, rel / math.sqrt(max(self.cols, 1)), ROW_FLOOR)

    def to_dict(self, twin_e2: float) -> dict[str, Any]:
        limit = self.limit(twin_e2)
        bad = np.nonzero(~(self.dev_b <= limit))[0]
        worst = int(bad[np.argmax(np.where(np.isfinite(self.dev_b[bad]), self.dev_b[bad], np.inf))]) if len(bad) else None
        finite = self.dev_b[np.isfinite(self.dev_b)]
        top = float(finite.max()) if len(finite) else 0.0
        return {"rows": int(self.mask.size), "twin_rows": int(self.mask.sum()), "row_limit": limit,
                "max_row_dev": top if len(finite) == self.dev_b.size else None,
                "twin_row_dev": self.twin_dev, "rows_off": int(len(bad)), "first_rows_off": [int(r) for r in bad[:8]],
                "worst_row": worst,
                "worst_row_dev": (float(self.dev_b[worst]) if worst is not None and math.isfinite(self.dev_b[worst])
                                  else None)}


def twin_unavailable(pair: Pair, src_b: Source, cols: int, has_imatrix: bool = False) -> str | None:
    """Why B's twin cannot be made for this tensor, or None."""
    assert pair.b is not None
    t = pair.b.type
    if t in twin.FLOAT_TYPES:
        return None
    why = ggml.available()
    if why:
        return why
    try:
        block = gguf_header.GGML_TYPES[ggml.type_id(t)][1]
        if ggml.requires_imatrix(t) and not has_imatrix:
            return (f"llama.cpp makes {t} only with an importance matrix: give the one B was made with "
                    "(--convdiff-imatrix FILE)")
    except ggml.GGMLUnavailable as exc:
        return str(exc)
    if cols % block:
        return f"its rows of {cols} values do not split into {t}'s blocks of {block}"
    if not isinstance(src_b, GGUFWeights):
        return f"B's {t} tensor is not stored as llama.cpp stores it"
    return None


def _type_group(type_name: str) -> str:
    return "float" if type_name in twin.FLOAT_TYPES else "quantised"


FORCE_INTERMEDIATE: str | None = None  # bench/twin_margins.py: a twin from one intermediate only


def _first_intermediate(type_name: str, preferred: dict[str, str]) -> str:
    """The intermediate to try first: the one this file's other tensors were made from; else F32 for a
    float type (the converter writes it directly) and F16 for a quantised one (llama-quantize's usual input)."""
    group = _type_group(type_name)
    if FORCE_INTERMEDIATE and group != "float":
        return FORCE_INTERMEDIATE
    return preferred.get(group) or ("F32" if group == "float" else "F16")


def _same_bytes(x: np.ndarray, y: np.ndarray) -> bool:
    """Whether two byte arrays hold the same bytes (compared eight at a time where they split so)."""
    if x.shape != y.shape:
        return False
    x, y = np.ascontiguousarray(x).reshape(-1), np.ascontiguousarray(y).reshape(-1)
    if x.size % 8 == 0 and x.dtype == y.dtype == np.uint8:
        x, y = x.view(np.uint64), y.view(np.uint64)
    return bool(np.array_equal(x, y))


@functools.lru_cache(maxsize=1)
def _overlap() -> ThreadPoolExecutor:
    """The thread that runs the quantiser's twin of a chunk (itself spread over llama.cpp's threads) while
    ``_stream`` reads and sums the same chunk: numpy and the quantiser let go of the GIL."""
    return ThreadPoolExecutor(1, thread_name_prefix="convdiff-twin")


def _stream(srcs: tuple[Source, Source], pair: Pair, rows: int, cols: int,
            alternatives: bool = False, twins: list[_Twin] | None = None) -> tuple[TensorStats, Sketch, Sketch]:
    """One pass over a tensor pair: its stats and both sketches (and, with ``alternatives``, how B compares
    with A under the other q/k row orders; with ``twins``, B against each of them)."""
    n = perm_groups(pair)
    ra = Reader(srcs[0], pair.a, n if pair.unpermute[0] else 0, pair.norm_offset[0])
    rb = Reader(srcs[1], pair.b, n if pair.unpermute[1] else 0, pair.norm_offset[1])
    align = rows // n if n else 1
    n_head = pair.groups.get("q", 0)
    stats = TensorStats()
    sa, sb = Sketch.for_shape(rows, cols), Sketch.for_shape(rows, cols)
    pending: list[tuple[_Twin, Any, np.ndarray, float | None]] = []  # the previous chunk's twins, made, not yet compared
    for r0, r1 in chunks(rows, cols, align):
        a, b = ra.rows(r0, r1), rb.rows(r0, r1)
        if a.shape != b.shape:
            a, b = a.reshape(r1 - r0, cols), b.reshape(r1 - r0, cols)
        started = [(tw, _overlap().submit(tw.start, srcs[1], a, r0, r1), b) for tw in twins or ()]
        # while the quantiser makes this chunk's twin: this chunk's sums, and B against the previous chunk's twin
        # (in chunk order, as in line: the same numbers, with the comparison off the quantiser's path)
        b_a2 = stats.update(a, b, r0)
        sa.update(a, r0)
        sb.update(b, r0)
        for tw, future, pb, done in pending:
            tw.finish(future.result(), pb, done)
        pending = [(tw, future, pb, b_a2) for tw, future, pb in started]
        if alternatives and n:
            k = (r1 - r0) // align
            stats.add_alt("unpermuted", a, rope_permute(b, k))
            stats.add_alt("twice", a, rope_unpermute(b, k))
            if pair.qk == "k" and n_head and n_head != n and check_groups(rows, n_head) and n_head % n == 0:
                per_h = rows // n_head
                stats.add_alt("heads", a, rope_unpermute(rope_permute(b, k), (r1 - r0) // per_h))
    for tw, future, pb, done in pending:
        tw.finish(future.result(), pb, done)
    return stats, sa, sb



# --------------------------------------------------------------------------- the measurement


def _describe_alt(name: str, mode: str, pair: Pair) -> tuple[str, str]:
    """(what B matches, what that means) when another q/k row order explains it, in this comparison's
    terms (B a GGUF: what its converter did; B a transformers checkpoint: what a GGUF-to-transformers
    conversion did)."""
    which = "q_proj" if pair.qk == "q" else "k_proj"
    if name == "heads":
        return (f"A's {which} permuted for llama.cpp's rope with n_head={pair.groups.get('q')} heads instead of "
                f"n_head_kv={pair.groups.get('k')}", "the grouped-query attention permutation bug")
    if mode in ("hf-gguf", "gguf-gguf"):
        if name == "unpermuted":
            return (f"A's {which} without llama.cpp's rope permutation",
                    "the converter did not permute this tensor's rows for llama.cpp's rope")
        return f"A's {which} with llama.cpp's rope permutation applied twice", "the rows were permuted twice"
    if name == "unpermuted":
        return (f"A's {which} with llama.cpp's rope permutation undone twice",
                "the conversion back from GGUF undid a permutation that was not there")
    return (f"A's {which} in llama.cpp's rope row order",
            "the conversion back from GGUF did not undo llama.cpp's q/k permutation")


def _entry(pair: Pair, layer: int | None, role: str) -> dict[str, Any]:
    a, b = pair.a, pair.b
    return {
        "name": pair.name, "a_name": a.name if a else None, "b_name": b.name if b else None,
        "type_a": a.type if a else None, "type_b": b.type if b else None,
        "shape_a": list(a.shape) if a else None, "shape_b": list(b.shape) if b else None,
        "layer": layer, "role": role, "error": None, "expected": None, "measured_types": None,
        "scale": None, "scale_residual": None, "offset": None, "offset_residual": None,
        "nonfinite_a": 0, "nonfinite_b": 0, "first_nonfinite": None, "problem": None,
        "note": pair.note, "matches": [], "sample_error": None,
    }


def start_entry(pair: Pair, entries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Append the pair's entry; it, when both sides exist in the same shape, else None (its problem set)."""
    layer, role = layer_and_role(pair.name)
    e = _entry(pair, layer, role)
    entries.append(e)
    if pair.b is None:
        e["problem"] = f"B has no tensor for A's {pair.name}" + (f" ({pair.a.name})" if pair.a and
                                                                 pair.a.name != pair.name else "")
        return None
    if pair.a is None:
        return None
    shape = shape_problem(pair)
    if shape:
        e["problem"] = shape
        return None
    return e


def measure_weights(a: Source, b: Source, n_layers: int | None = None,
                    matrix: ImportanceMatrix | None = None, sample: float | None = None) -> dict[str, Any]:
    """Compare every tensor of B with A's; a JSON-serialisable dict (see checks/weights.py for the reading).

    Tensors are read and compared one at a time in row chunks; afterwards, the tensors whose error is
    above what their types give (or whose scale is off) are compared cheaply, on their sketches, with every
    other tensor of A of the same shape, with A's transpose, and (q/k) with A under llama.cpp's other row
    orders, to say what B matches better.

    ``matrix``: the importance matrix B was quantised with (``--convdiff-imatrix``). Without it, a file
    whose header says it was made with one has its quantised tensors judged against a twin made without
    (``weights_imatrix``).

    ``sample``: the share of each tensor's rows its twin quantises (``SampledRows``); None: every row.

    numpy's BLAS runs on one thread meanwhile (``threads.numpy_blas_alone``): the quantiser has the cores.
    """
    with numpy_blas_alone():
        return _measure_weights(a, b, n_layers, matrix, sample)


def _measure_weights(a: Source, b: Source, n_layers: int | None, matrix: ImportanceMatrix | None,
                     sample: float | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    plan = plan_pairs(a, b)
    plan.pairs = [q for pair in plan.pairs for q in per_expert(pair)]
    preferred: dict[str, str] = {}  # the intermediate B's file was made from, once a tensor shows it
    imatrix_used = isinstance(b, GGUFWeights) and any(k.startswith("quantize.imatrix") for k in b.kv)
    entries: list[dict[str, Any]] = []
    sketches_a: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = {}
    sketches_b: dict[int, Sketch] = {}
    for pair in plan.pairs:
        e = start_entry(pair, entries)
        if e is None:
            continue
        assert pair.a is not None and pair.b is not None
        rows, cols = pair.a.rows, pair.a.cols
        n = perm_groups(pair)
        if pair.qk and (pair.unpermute[0] or pair.unpermute[1]) and not check_groups(rows, n):
            e["problem"] = (f"its {rows} rows are not {n} heads of an even size, so llama.cpp's rope permutation "
                            "cannot be undone")
            continue
        if pair.qk and not check_groups(rows, n):
            pair.qk = None
        imatrix, imatrix_problem = matrix.get(pair.b.name, cols) if matrix is not None else (None, None)
        if imatrix_problem:
            e["imatrix_problem"] = imatrix_problem
        if pair.b.type not in twin.FLOAT_TYPES:
            if imatrix is not None:
                e["imatrix_given"] = Path(matrix.path).name if matrix is not None else True
            elif imatrix_used and matrix is None:
                e["imatrix"] = True  # B was made with a matrix we do not have: judged by error ratio
        why_no_twin = twin_unavailable(pair, b, cols, imatrix is not None)
        first = (_Twin(pair, n, _first_intermediate(pair.b.type, preferred), imatrix, sample)
                 if why_no_twin is None else None)
        try:
            stats, sa, sb = _stream((a, b), pair, rows, cols, twins=[first] if first else None)
            best = first
            if first is not None and first.stats.differing and not FORCE_INTERMEDIATE:  # another intermediate may be the one B was made from
                others = [_Twin(pair, n, i, imatrix, sample, rows_from=first) for i in twin.INTERMEDIATES
                          if i != first.stats.intermediate]
                _stream((a, b), pair, rows, cols, twins=others)
                for tw in others:
                    if tw.stats.better_than(best.stats if best else None):
                        best = tw
        except WeightsUnreadable as exc:
            e["problem"] = None
            e["unreadable"] = str(exc)
            continue
        except ggml.GGMLUnavailable as exc:
            best, why_no_twin = None, str(exc)
            stats, sa, sb = _stream((a, b), pair, rows, cols)
        if best is not None:
            e["twin"] = best.to_dict()
            if not best.stats.differing and pair.b.type not in twin.FLOAT_TYPES:
                preferred[_type_group(pair.b.type)] = best.stats.intermediate
        else:
            e["twin_unavailable"] = why_no_twin
        exp = pair_expected_error(pair.a.type, pair.b.type)
        c, c_res = stats.scale()
        k, k_res = stats.offset()
        v, v_res = stats.constant()
        err = stats.error()
        e.update({"error": err if math.isfinite(err) else None, "expected": exp,
                  "measured_types": expected_error(pair.a.type)[1] and expected_error(pair.b.type)[1],
                  "scale": c, "scale_residual": c_res, "offset": k, "offset_residual": k_res,
                  "constant": v, "constant_residual": v_res, "nonfinite_a": stats.nonfinite_a, "nonfinite_b": stats.nonfinite_b,
                  "first_nonfinite": stats.first_nonfinite, "a_zero": stats.a2 == 0.0, "b_zero": stats.b2 == 0.0})
        idx = len(entries) - 1
        sketches_a.setdefault((rows, cols), []).append((idx, sa.values))
        sketches_b[idx] = sb
    for idx, sb in sketches_b.items():
        e = entries[idx]
        if _suspect(e):
            e["matches"] = _matches((a, b), plan, idx, e, sb, sketches_a)
    a.close()
    b.close()
    return {"status": "ok", "mode": plan.mode, "arch": plan.arch, "tensors": entries,
            "imatrix": ({k: v for k, v in b.kv.items() if k.startswith("quantize.imatrix")} if imatrix_used
                        and isinstance(b, GGUFWeights) else None),
            "imatrix_file": None if matrix is None else {"path": matrix.path, "layout": matrix.layout,
                                                         "entries": len(matrix.weights), "datasets": matrix.datasets},
            "unmatched_b": plan.unmatched_b, "not_compared": plan.not_compared,
            "conventions": [c.to_dict() for c in plan.conventions.values()],
            "n_layers": n_layers, "sampled": sample, "seconds": time.perf_counter() - t0}


def _suspect(e: dict[str, Any]) -> bool:
    """Worth asking what B matches instead: off its twin by more than near-ties explain (or, with no twin,
    above its type's tabled error or off in scale). Cheap: the candidates are compared on sketches."""
    t = e.get("twin")
    if t is not None:
        return t["differing"] > 0 and (t["share"] > 0.05 or (t.get("tie_ratio") or math.inf) > 1.2)
    err, exp = e["error"], e["expected"]
    if err is None or exp is None:
        return False
    return err > exp or (e["scale"] is not None and abs(e["scale"] - 1.0) > 0.05)


def _matches(srcs: tuple[Source, Source], plan: Plan, idx: int, e: dict[str, Any], sb: Sketch,
             sketches_a: dict[tuple[int, int], list[tuple[int, np.ndarray]]]) -> list[dict[str, Any]]:
    """What B's tensor is closer to than A's own, best first: another tensor of A (a swap, a tied embedding),
    A transposed, A with another q/k row order, a multiple of A, A plus a constant, zeros."""
    pair = plan.pairs[idx]
    assert pair.a is not None
    err = float(e["error"])
    found: list[dict[str, Any]] = []
    cands = sketches_a.get((pair.a.rows, pair.a.cols), [])
    own = next(v for i, v in cands if i == idx)
    own_sample = sample_error(own, sb.values)
    e["sample_error"] = own_sample
    limit = CANDIDATE_RATIO * own_sample
    best = sorted((s, i) for s, i in ((sample_error(v, sb.values), i) for i, v in cands if i != idx) if s <= limit)
    for s, i in best[:3]:
        other = plan.pairs[i]
        layer, role = layer_and_role(other.name)
        found.append({"kind": "tensor", "tensor": other.name, "a_name": other.a.name if other.a else None,
                      "layer": layer, "role": role, "error": s, "sampled": True, "what": f"A's {other.name}",
                      "meaning": tensor_meaning(pair, other)})
    if sb.square:
        s = sample_error(own.T, sb.values)
        if s <= limit:
            found.append({"kind": "transpose", "error": s, "sampled": True, "what": "A's tensor transposed",
                          "meaning": "the tensor was written transposed"})
    if pair.qk and plan.permute_arch:
        stats, _, _ = _stream(srcs, pair, pair.a.rows, pair.a.cols, alternatives=True)
        for name in ("unpermuted", "twice", "heads"):
            alt = stats.alt_error(name)
            if alt is not None and alt <= CANDIDATE_RATIO * err:
                what, meaning = _describe_alt(name, plan.mode, pair)
                found.append({"kind": f"rope-{name}", "error": alt, "sampled": False, "what": what,
                              "meaning": meaning})
    c, c_res = e["scale"], e["scale_residual"]
    if e.get("b_zero") and not e.get("a_zero"):
        found.append({"kind": "zero", "error": 1.0, "sampled": False, "what": "zeros",
                      "meaning": "B's tensor is all zeros"})
    elif (c is not None and c_res is not None and abs(c - 1.0) > 0.02 and c != 0.0
          and c_res / abs(c) <= CANDIDATE_RATIO * err):
        found.append({"kind": "scale", "factor": c, "error": c_res / abs(c) if c else c_res, "sampled": False,
                      "what": f"{c:.3g} × A's tensor", "meaning": "the tensor was scaled"})
    v, v_res = e.get("constant"), e.get("constant_residual")
    if not e.get("b_zero") and v is not None and v_res is not None and v_res <= 1e-3 * CANDIDATE_RATIO * err:
        found.append({"kind": "constant", "value": v, "error": v_res, "sampled": False,
                      "what": f"the constant {v:.4g}",
                      "meaning": "every value of B's tensor is the same" + (
                          ": a norm weight left at its initial value" if abs(v - 1.0) < 1e-6 else "")})
    k, k_res = e["offset"], e["offset_residual"]
    if k is not None and k_res is not None and abs(k) > 0 and k_res <= CANDIDATE_RATIO * err:
        meaning = "a constant was added to the tensor"
        if abs(abs(k) - 1.0) < 0.02 and pair.name.endswith("norm.weight"):
            meaning = ("a norm weight stored in the (1 + w) convention of Gemma's RMSNorm (or with it undone) "
                       "where the architecture does not use it")
        found.append({"kind": "offset", "offset": k, "error": k_res, "sampled": False,
                      "what": f"A's tensor {'+' if k > 0 else '−'} {abs(k):.3g}", "meaning": meaning})
    found.sort(key=lambda m: m["error"])
    if found:  # the best explanation, and the others only when nearly as good
        keep = 2.0 * found[0]["error"] + 2.0 * float(e["expected"] or 0.0)
        found = [m for m in found if m["error"] <= keep]
    return found


def tensor_meaning(pair: Pair, other: Pair) -> str:
    """What it means that B's tensor is A's ``other`` tensor."""
    layer, role = layer_and_role(pair.name)
    o_layer, o_role = layer_and_role(other.name)
    if role == o_role and layer is not None and o_layer is not None:
        return f"layer {o_layer}'s tensor is in layer {layer}'s place (layers swapped or written twice)"
    if pair.note and layer is None and o_layer is None:
        return f"{pair.note[0].lower()}{pair.note[1:]}, where A's own tensor is different"
    if layer is None and o_layer is None:
        return "B's tensor is another of A's tensors (an output layer tied or untied, or a mix-up)"
    return "B's tensor is another of A's tensors of the same shape (a mix-up)"


