"""Tensors the converter restructures: one tensor of A written as several tensors of B.

Some converters split a tensor. DeepSeek's latent attention is one case: ``kv_b_proj`` becomes
``attn_k_b``, per head and transposed, and ``attn_v_b``. Then A's tensor has no counterpart in B under
gguf-py's name map, and B's pieces have none in A. Nothing here names such a tensor. The split is
established from the files under test, as ``backends.conventions`` establishes the other transforms:

- **Candidates, from the shapes.** Take A's tensor that B lacks, ``[R, C]`` (leading axes as rows: GraniteMoE
  keeps every expert's gate and up in one ``[experts, 2 I, H]``), and the tensors of B in the
  same layer that A lacks, and look for a subset of them that holds exactly A's elements. Each piece is a
  block of rows of every head: A's rows viewed as ``[h, R/h, C]``, where ``h`` is the pieces' common
  leading dimension (1 for 2-D pieces), sliced along the middle axis. A piece is stored either as it is
  (``[h, s, C]``) or transposed per head (``[h, C, s]``). The candidates are every order of the pieces
  and every way of storing each that fits the shapes.
- **The convention, from the values.** Each candidate is scored in every layer by the relative error
  between B's pieces and A's tensor cut that way. A converter restructures a role uniformly, so the
  role's convention is the candidate with the lowest total error over the layers. It is kept only when it
  brings A within ``conventions.EXPLAINED`` of B, the bound that separates quantisation error from
  unrelated values.
- **Then each piece is an ordinary pair.** Its A side is A's values cut the established way, held in
  memory (``SafetensorsWeights.derived``), so the weights twin quantises it as llama.cpp's quantiser would
  and a failure names the piece and the layer. The runtime twin joins B's pieces back into A's tensor
  (``join``).

No torch and no pytest: numpy and the readers of ``backends.dequant``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..core.weight_errors import layer_and_role

__all__ = ["MAX_PIECES", "Piece", "Split", "candidates", "cut", "establish", "join"]

MAX_PIECES = 4  # a split into more pieces than this is not searched (the orders grow as n!)


@dataclass(frozen=True)
class Piece:
    """One of B's tensors as a block of A's rows: rows ``start .. start + size`` of each of ``heads`` heads,
    stored transposed per head when ``transposed``."""

    role: str  # B's role (``attn_k_b.weight``)
    start: int
    size: int
    transposed: bool


@dataclass(frozen=True)
class Split:
    """How a role of A is written as pieces of B: the same in every layer."""

    heads: int
    pieces: tuple[Piece, ...]

    def describe(self) -> str:
        per = "per head, " if self.heads > 1 else ""
        parts = [f"{p.role.removesuffix('.weight')} (rows {p.start}-{p.start + p.size}"
                 f"{', transposed' if p.transposed else ''})" for p in self.pieces]
        return f"split {per}into " + " + ".join(parts) + (f", {self.heads} heads" if self.heads > 1 else "")


def candidates(shape_a: tuple[int, ...], pieces: Sequence[tuple[str, tuple[int, ...]]]) -> list[Split]:
    """Every split of a ``[R, C]`` tensor into these pieces (B's role, numpy shape) that the shapes allow."""
    if len(shape_a) < 2 or not 2 <= len(pieces) <= MAX_PIECES:
        return []
    rows, cols = math.prod(shape_a[:-1]), shape_a[-1]  # stacked experts' leading axes are rows too
    if sum(math.prod(s) for _, s in pieces) != rows * cols:
        return []
    dims = {len(s) for _, s in pieces}
    if dims == {3}:
        heads = {s[0] for _, s in pieces}
        if len(heads) != 1:
            return []
        h = heads.pop()
        inner = [(role, s[1:]) for role, s in pieces]
    elif dims == {2}:
        h, inner = 1, [(role, s) for role, s in pieces]
    else:
        return []
    if h <= 0 or rows % h:
        return []
    per = rows // h
    ways: list[list[tuple[str, int, bool]]] = []
    for role, (p, q) in inner:
        opts = ([(role, p, False)] if q == cols else []) + ([(role, q, True)] if p == cols and p != q else [])
        if not opts:
            return []
        ways.append(opts)
    out: list[Split] = []
    for choice in itertools.product(*ways):
        if sum(size for _, size, _ in choice) != per:
            continue
        for order in itertools.permutations(choice):
            start, built = 0, []
            for role, size, tr in order:
                built.append(Piece(role, start, size, tr))
                start += size
            out.append(Split(h, tuple(built)))
    return out


def cut(x: np.ndarray, split: Split, piece: Piece) -> np.ndarray:
    """A's ``[R, C]`` values cut as ``piece`` is stored: ``[h, size, C]`` or ``[h, C, size]`` (2-D when h is 1)."""
    v = x.reshape(split.heads, -1, x.shape[-1])[:, piece.start:piece.start + piece.size, :]
    if piece.transposed:
        v = v.transpose(0, 2, 1)
    v = np.ascontiguousarray(v)
    return v[0] if split.heads == 1 else v


def join(split: Split, values: dict[str, np.ndarray], shape_a: tuple[int, ...]) -> np.ndarray:
    """The inverse of ``cut`` over every piece: B's pieces (by role) back into A's layout (``shape_a``)."""
    rows, cols = math.prod(shape_a[:-1]), shape_a[-1]
    out = np.empty((split.heads, rows // split.heads, cols), dtype=np.float32)
    for p in split.pieces:
        v = np.asarray(values[p.role], dtype=np.float32).reshape(split.heads, *(
            (cols, p.size) if p.transposed else (p.size, cols)))
        out[:, p.start:p.start + p.size, :] = v.transpose(0, 2, 1) if p.transposed else v
    return out.reshape(shape_a)


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


@dataclass
class Found:
    """A role of A established as split: its convention, and per layer A's tensor name with B's pieces' names."""

    role_a: str
    split: Split
    error: float  # the median relative error over the layers
    layers: dict[int | None, tuple[str, dict[str, str]]]  # layer -> (A's name, B's role -> B's name)


def establish(missing: Sequence[tuple[str, tuple[int, ...]]], unmatched: Sequence[tuple[str, tuple[int, ...]]],
              read_a: Callable[[str], np.ndarray], read_b: Callable[[str], np.ndarray],
              explained: float) -> list[Found]:
    """The splits the files show: ``missing`` are A's tensors (name, shape) that B lacks, ``unmatched`` B's
    tensors that A lacks; ``read_a``/``read_b`` give a tensor's values (A's as ``[R, C]``, B's in its numpy
    shape). A role is kept when one candidate has the lowest total error over its layers and brings A
    within ``explained`` of B in the median layer."""
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
            x: np.ndarray | None = None
            for k in range(2, min(MAX_PIECES, len(pool)) + 1):
                for subset in itertools.combinations(pool, k):
                    by_role = {layer_and_role(n)[1]: (n, s) for n, s in subset}
                    if len(by_role) != k:
                        continue
                    for split in candidates(shape, [(r, s) for r, (_, s) in by_role.items()]):
                        if x is None:
                            x = read_a(name)
                        got = {r: read_b(n) for r, (n, _) in by_role.items()}
                        scores.setdefault(split, []).append(_error(x, split, got))
                        names.setdefault(split, {})[layer] = (name, {r: n for r, (n, _) in by_role.items()})
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
