"""Tensors the converter restructures: one tensor of A written as several tensors of B.

Some converters split a tensor. DeepSeek's latent attention is one case: ``kv_b_proj`` becomes
``attn_k_b``, per head and transposed, and ``attn_v_b``. Then A's tensor has no counterpart in B under
gguf-py's name map, and B's pieces have none in A. Nothing here names such a tensor. The split is
established from the files under test, as ``backends.conventions`` establishes the other transforms:

- **Candidates, from the shapes.** Take A's tensor that B lacks, ``[R, C]`` (leading axes as rows: GraniteMoE
  keeps every expert's gate and up in one ``[experts, 2 I, H]``), and the tensors of B in the
  same layer that A lacks, and look for a subset of them that holds exactly A's elements. Each piece is a
  block of rows of every head: A's rows viewed as ``[h, R/h, C]``, where ``h`` is the pieces' common
  leading dimension (1 for 2-D pieces), sliced along the middle axis, in contiguous blocks or every n-th
  row (gpt-oss interleaves gate and up), after A's per-head matrix is transposed or not. A piece is stored
  either as it is (``[h, s, C]``) or transposed per head (``[h, C, s]``). The candidates are every order of
  the pieces and every way of storing each that fits the shapes; one piece is a relayout of a whole matrix
  (gpt-oss's down projection, transposed per expert). Candidates are scored on one head's values.
- **The convention, from the values.** Each candidate is scored in every layer by the relative error
  between B's pieces and A's tensor cut that way. A converter restructures a role uniformly, so the
  role's convention is the candidate with the lowest total error over the layers. It is kept only when it
  brings A within ``conventions.EXPLAINED`` of B, the bound that separates quantisation error from
  unrelated values.
- **Then each piece is an ordinary pair.** Its A side is A's values cut the established way, held in
  memory (``SafetensorsWeights.derived``), so the weights twin quantises it as llama.cpp's quantiser would
  and a failure names the piece and the layer. The runtime twin joins B's pieces back into A's tensor
  (``join``).

No torch and no pytest: numpy and the readers of ``backends.tensors``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from ..core.weight_errors import layer_and_role, sum_of_squares

__all__ = ["MAX_PIECES", "Piece", "Regroup", "Split", "candidates", "cut", "establish", "join", "regroup_error",
           "regroup_sample", "regroups"]

MAX_PIECES = 4  # a split into more pieces than this is not searched (the orders grow as n!)


@dataclass(frozen=True)
class Piece:
    """One of B's tensors as a block of A's rows: rows ``start .. start + size`` of each head (every
    ``stride``-th row from ``start`` when interleaved), stored transposed per head when ``transposed``."""

    role: str  # B's role (``attn_k_b.weight``)
    start: int
    size: int
    transposed: bool
    shape: tuple[int, ...] = ()  # B's numpy shape


@dataclass(frozen=True)
class Split:
    """How a role of A is written as pieces of B: the same in every layer. A's values are viewed per head as
    ``[M, N]`` (its last axis as columns), transposed first when ``a_transposed``; the pieces take contiguous
    blocks of those rows, or every n-th row when ``interleaved`` (gpt-oss keeps gate and up interleaved)."""

    heads: int
    pieces: tuple[Piece, ...]
    a_transposed: bool = False
    interleaved: bool = False
    cols: int = 0  # A's last axis (0: the array's own)

    def describe(self) -> str:
        per = "per head, " if self.heads > 1 else ""
        how = ("transposed, " if self.a_transposed else "") + ("interleaved, " if self.interleaved else "")
        if len(self.pieces) == 1:
            p = self.pieces[0]
            return (f"written as {p.role.removesuffix('.weight')}" + (f" {per}transposed" if self.a_transposed
                                                                       != p.transposed else "")
                    + (f", {self.heads} heads" if self.heads > 1 else ""))
        rows = (lambda p: f"rows {p.start}::{len(self.pieces)}") if self.interleaved else (
            lambda p: f"rows {p.start}-{p.start + p.size}")
        parts = [f"{p.role.removesuffix('.weight')} ({rows(p)}{', transposed' if p.transposed else ''})"
                 for p in self.pieces]
        return f"split {per}{how}into " + " + ".join(parts) + (f", {self.heads} heads" if self.heads > 1 else "")


def _inner(shape: tuple[int, ...], h: int) -> tuple[int, int] | None:
    """A piece's per-head matrix (rows, columns): a 3-D piece's last two axes, a 2-D piece itself, a vector as
    one row."""
    if h > 1:
        return (shape[1], shape[2]) if len(shape) == 3 and shape[0] == h else None
    if len(shape) == 2:
        return shape[0], shape[1]
    return (1, shape[0]) if len(shape) == 1 else None


def candidates(shape_a: tuple[int, ...], pieces: Sequence[tuple[str, tuple[int, ...]]]) -> list[Split]:
    """Every way of writing a tensor of A (``shape_a``) as these pieces (B's role, numpy shape) that the shapes
    allow. One piece is a rename that changed the layout (a per-head transpose); a plain rename with the same
    layout is the name map's, not found here."""
    if len(shape_a) < 1 or not 1 <= len(pieces) <= MAX_PIECES:
        return []
    total = math.prod(shape_a)
    if sum(math.prod(s) for _, s in pieces) != total:
        return []
    if len(pieces) == 1 and min(sum(d > 1 for d in shape_a), sum(d > 1 for d in pieces[0][1])) < 2:
        return []  # a vector has no layout to change: one piece of it is a rename, which is the name map's
    lead = {s[0] for _, s in pieces if len(s) == 3}
    h = lead.pop() if len(lead) == 1 and all(len(s) == 3 for _, s in pieces) else 1
    if h > 1 and (total % h or (len(shape_a) == 3 and shape_a[0] != h)):
        return []
    inner = [(role, _inner(s, h), s) for role, s in pieces]
    if any(i is None for _, i, _ in inner):
        return []
    n_cols = shape_a[-1]
    per_head = total // h
    if per_head % n_cols:
        return []
    out: list[Split] = []
    for a_tr in (False, True):
        rows, cols = (n_cols, per_head // n_cols) if a_tr else (per_head // n_cols, n_cols)
        ways: list[list[tuple[str, int, bool, tuple[int, ...]]]] = []
        for role, (p, q), shape in inner:  # type: ignore[misc]
            opts = ([(role, p, False, shape)] if q == cols else []) + ([(role, q, True, shape)] if p == cols else [])
            ways.append(opts)
        if any(not w for w in ways):
            continue
        for choice in itertools.product(*ways):
            if sum(size for _, size, _, _ in choice) != rows:
                continue
            equal = len({size for _, size, _, _ in choice}) == 1
            for interleaved in ((False, True) if equal and len(choice) > 1 else (False,)):
                for order in itertools.permutations(choice):
                    start, built = 0, []
                    for k, (role, size, tr, shape) in enumerate(order):
                        built.append(Piece(role, k if interleaved else start, size, tr, shape))
                        start += size
                    split = Split(h, tuple(built), a_tr, interleaved, n_cols)
                    if len(built) == 1 and not a_tr and not built[0].transposed:
                        continue  # the same layout under another name: the name map's business
                    out.append(split)
    return out


def _per_head(x: np.ndarray, split: Split) -> np.ndarray:
    """A's values as ``[h, rows, cols]`` in the split's row space."""
    n = split.cols or (x.shape[-1] if x.ndim else 1)
    v = np.asarray(x).reshape(split.heads, -1, n)
    return v.transpose(0, 2, 1) if split.a_transposed else v


def _rows(split: Split, piece: Piece) -> slice:
    if split.interleaved:
        return slice(piece.start, None, len(split.pieces))
    return slice(piece.start, piece.start + piece.size)


def cut(x: np.ndarray, split: Split, piece: Piece) -> np.ndarray:
    """A's values cut as ``piece`` is stored, in B's numpy shape."""
    v = _per_head(x, split)[:, _rows(split, piece), :]
    if piece.transposed:
        v = v.transpose(0, 2, 1)
    return np.ascontiguousarray(v).reshape(piece.shape)


def join(split: Split, values: dict[str, np.ndarray], shape_a: tuple[int, ...]) -> np.ndarray:
    """The inverse of ``cut`` over every piece: B's pieces (by role) back into A's layout (``shape_a``)."""
    n = shape_a[-1]
    m = math.prod(shape_a) // split.heads // n
    rows, cols = (n, m) if split.a_transposed else (m, n)
    out = np.empty((split.heads, rows, cols), dtype=np.float32)
    for p in split.pieces:
        v = np.asarray(values[p.role], dtype=np.float32).reshape(
            split.heads, *((cols, p.size) if p.transposed else (p.size, cols)))
        out[:, _rows(split, p), :] = v.transpose(0, 2, 1) if p.transposed else v
    if split.a_transposed:
        out = out.transpose(0, 2, 1)
    return np.ascontiguousarray(out).reshape(shape_a)


def _error(x: np.ndarray, split: Split, got: dict[str, np.ndarray]) -> float:
    num = den = 0.0
    for p in split.pieces:
        want = cut(x, split, p).astype(np.float64).ravel()
        have = np.asarray(got[p.role], dtype=np.float64).ravel()
        if want.size != have.size:
            return math.inf
        d = have - want
        num += float(d @ d)
        den += float(want @ want)
    return math.sqrt(num / den) if den else (0.0 if num == 0.0 else math.inf)


def _first_head(split: Split) -> Split:
    """The split over one head's values: what a candidate is scored on (a layer of 128 experts is not read
    whole to choose between candidates; each head is cut the same way)."""
    if split.heads == 1:
        return split
    return replace(split, heads=1, pieces=tuple(replace(p, shape=p.shape[1:]) for p in split.pieces))


@dataclass
class Found:
    """A role of A established as split: its convention, and per layer A's tensor name with B's pieces' names."""

    role_a: str
    split: Split
    error: float  # the median relative error over the layers
    layers: dict[int | None, tuple[str, dict[str, str]]]  # layer -> (A's name, B's role -> B's name)


def establish(missing: Sequence[tuple[str, tuple[int, ...]]], unmatched: Sequence[tuple[str, tuple[int, ...]]],
              read_a: Callable[[str, int], np.ndarray], read_b: Callable[[str, int], np.ndarray],
              explained: float) -> list[Found]:
    """The splits the files show: ``missing`` are A's tensors (name, shape) that B lacks, ``unmatched`` B's
    tensors that A lacks; ``read_a(name, parts)``/``read_b(name, parts)`` give the first 1/parts of a tensor's
    values in storage order (its first head when its leading axis has ``parts`` heads). A role is kept when
    one candidate has the lowest total error over its layers and brings A within ``explained`` of B in the
    median layer."""
    cache: dict[tuple[str, str, int], np.ndarray] = {}

    def get(side: str, name: str, parts: int) -> np.ndarray:
        key = (side, name, parts)
        if key not in cache:
            cache[key] = (read_a if side == "a" else read_b)(name, parts)
        return cache[key]

    by_layer_b: dict[int | None, list[tuple[str, tuple[int, ...]]]] = {}
    for name, shape in unmatched:
        by_layer_b.setdefault(layer_and_role(name)[0], []).append((name, shape))
    roles: dict[str, list[tuple[int | None, str, tuple[int, ...]]]] = {}
    for name, shape in missing:
        layer, role = layer_and_role(name)
        if layer is not None and by_layer_b.get(layer):
            roles.setdefault(role, []).append((layer, name, shape))
    found: list[Found] = []
    taken: set[str] = set()
    for role_a, items in sorted(roles.items()):
        scores: dict[Split, list[float]] = {}
        names: dict[Split, dict[int | None, tuple[str, dict[str, str]]]] = {}
        for layer, name, shape in items:
            pool = [(n, s) for n, s in by_layer_b.get(layer, []) if n not in taken]
            for k in range(1, min(MAX_PIECES, len(pool)) + 1):
                for subset in itertools.combinations(pool, k):
                    by_role = {layer_and_role(n)[1]: (n, s) for n, s in subset}
                    if len(by_role) != k:
                        continue
                    for split in candidates(shape, [(r, s) for r, (_, s) in by_role.items()]):
                        h = split.heads
                        got = {r: get("b", n, h) for r, (n, _) in by_role.items()}
                        scores.setdefault(split, []).append(_error(get("a", name, h), _first_head(split), got))
                        names.setdefault(split, {})[layer] = (name, {r: n for r, (n, _) in by_role.items()})
            cache.clear()  # one layer's values at a time
        if not scores:
            continue
        # the converter's convention: the candidate seen in the most layers, then the lowest total error
        best = min(scores, key=lambda s: (-len(scores[s]), sum(e if math.isfinite(e) else 1e9 for e in scores[s])))
        med = float(np.median(scores[best]))
        if not med <= explained:
            continue
        found.append(Found(role_a, best, med, names[best]))
        for _, pieces in names[best].values():
            taken.update(pieces.values())
    return found


@dataclass(frozen=True)
class Regroup:
    """A fused projection whose rows the converter reorders without splitting it: A keeps each head's parts
    together (rows as ``[heads, parts, D]``: Bloom's and GPT-NeoX's ``query_key_value``, q, k and v of head 0,
    then of head 1, ...), B groups them by part (``[parts, heads, D]``: every head's q, then k, then v). A vector
    (the bias) is a matrix of one column."""

    heads: int
    parts: int

    def _view(self, x: np.ndarray, lead: tuple[int, int]) -> np.ndarray:
        rows = x.shape[0]
        return np.asarray(x).reshape(*lead, rows // (self.heads * self.parts), -1)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """A's rows as the converter writes them."""
        v = self._view(x, (self.heads, self.parts)).transpose(1, 0, 2, 3)
        return np.ascontiguousarray(v).reshape(x.shape)

    def invert(self, y: np.ndarray) -> np.ndarray:
        """B's rows back in A's order."""
        v = self._view(y, (self.parts, self.heads)).transpose(1, 0, 2, 3)
        return np.ascontiguousarray(v).reshape(y.shape)

    def describe(self) -> str:
        return (f"rows regrouped from {self.heads} heads x {self.parts} parts (A) to {self.parts} parts x "
                f"{self.heads} heads (B)")


def regroups(rows: int, heads: Sequence[int]) -> list[Regroup]:
    """The regroupings a tensor of ``rows`` rows allows, for the head counts the file declares."""
    out = []
    for h in sorted({h for h in heads if h and h > 1}):
        for k in range(2, MAX_PIECES + 1):
            if rows % (h * k) == 0:
                out.append(Regroup(h, k))
    return out


def regroup_sample(rows: int, heads: Sequence[int]) -> int:
    """How many leading rows of A and of B score every regrouping (``regroup_error``): B's first two blocks of
    D rows are A's part 0 of heads 0 and 1, which lie within A's first 2 rows/heads rows."""
    return min(rows, max((2 * rows // h for h in heads if h and h > 1), default=rows))


def regroup_error(a_rows: np.ndarray, b_rows: np.ndarray, rows: int, g: Regroup | None) -> float:
    """B's first two blocks against A's rows that ``g`` (None: no regrouping) puts there, from A's and B's
    first ``regroup_sample`` rows (2-D: rows, columns)."""
    d = rows // (g.heads * g.parts) if g is not None else max(1, b_rows.shape[0] // 2)
    have = np.ascontiguousarray(b_rows[:2 * d], dtype=np.float32)
    want = np.ascontiguousarray(a_rows[:2 * d] if g is None
                                else np.concatenate([a_rows[:d], a_rows[g.parts * d:(g.parts + 1) * d]]),
                                dtype=np.float32)
    if have.shape != want.shape:
        return math.inf
    # float32 differences, squares summed by BLAS (sums of positive terms: relative error of order 1e-5), far finer
    # than the threshold it is held to (conventions.EXPLAINED) or than two regroupings differ by; no float64 copies
    # of the rows, which cost more than the rest of the pass. Identical rows still give exactly 0.
    num, den = sum_of_squares(have - want), sum_of_squares(want)
    if not (math.isfinite(num) and math.isfinite(den)):  # non-finite rows, or squares beyond float32: as before
        h64, w64 = have.astype(np.float64), want.astype(np.float64)
        num, den = float(((h64 - w64) ** 2).sum()), float((w64 ** 2).sum())
    return math.sqrt(num / den) if den else (0.0 if num == 0.0 else math.inf)
