"""llama.cpp's importance-matrix files, read as llama-quantize reads them.

A GGUF quantised "with an imatrix" was made by llama-quantize from per-column importance weights: the
mean squared activation entering each column of each matrix, collected by llama-imatrix. The weights
check's re-quantisation twin (backends.twin) reproduces such a file only with the same weights, so
``--convdiff-imatrix FILE`` hands them over. Two layouts exist:

- GGUF (llama-imatrix's default since mid-2025): ``general.type == "imatrix"``, a tensor
  ``<name>.in_sum2`` (F32, ``ne0`` columns x one row per expert) and ``<name>.counts`` (F32, one per
  expert) for each matrix, and ``imatrix.datasets`` / ``imatrix.chunk_count`` / ``imatrix.chunk_size``.
  The weight is ``in_sum2 / counts``; an expert never reached (count 0) gets weight 1.
- legacy ``.dat``: int32 entry count, then per entry an int32-prefixed name, int32 ``ncall``,
  int32 ``nval`` and ``nval`` float32 values; then optionally the chunk count and the dataset name.
  The weight is ``value / ncall`` (the value itself when ``ncall`` is 0).

Both rules are llama-quantize's own (tools/quantize/quantize.cpp, ``load_imatrix``).
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ConvdiffError

__all__ = ["ImatrixError", "ImportanceMatrix", "read"]


class ImatrixError(ConvdiffError):
    """The file given as an importance matrix cannot be read as one."""


@dataclass
class ImportanceMatrix:
    """Per-tensor column weights by GGUF tensor name, as llama-quantize passes them to the quantiser."""

    path: str
    layout: str  # "gguf" or "dat"
    weights: dict[str, np.ndarray] = field(repr=False)
    datasets: list[str]
    chunk_count: int | None
    digest: str  # sha256 of the file's bytes: part of the weights measurement's cache key

    def get(self, tensor: str, cols: int) -> tuple[np.ndarray | None, str | None]:
        """The column weights for a 2-D tensor of ``cols`` columns, or (None, why not).

        No entry is not a problem (llama-quantize quantises such a tensor without weights, as it does
        token_embd); an entry of another length is one (llama-quantize refuses the file)."""
        w = self.weights.get(tensor)
        if w is None:
            return None, None
        if w.size != cols:
            return None, (f"the importance matrix {Path(self.path).name} holds {w.size} weights for {tensor}, "
                          f"whose rows have {cols} values: it was made for another model (llama-quantize "
                          "refuses such a pair)")
        return w, None


def _bad(path: Path, what: str) -> ImatrixError:
    return ImatrixError(f"{path}: not a llama.cpp importance matrix ({what}). Give the file llama-imatrix wrote "
                        "(imatrix.gguf, or a legacy imatrix.dat) with --convdiff-imatrix.")


def read(path: str | os.PathLike[str]) -> ImportanceMatrix:
    """Read either layout; an ImatrixError names the file and what is wrong."""
    p = Path(path)
    if not p.exists():
        raise ImatrixError(f"{p}: no such file (--convdiff-imatrix wants llama-imatrix's output file).")
    if p.is_dir():
        raise ImatrixError(f"{p} is a directory; --convdiff-imatrix wants llama-imatrix's output file.")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ImatrixError(f"{p}: cannot be read ({exc.strerror or exc}).") from None
    digest = hashlib.sha256(data).hexdigest()
    if data[:4] == b"GGUF":
        weights, datasets, chunks = _read_gguf(p)
        layout = "gguf"
    else:
        weights, datasets, chunks = _read_dat(p, data)
        layout = "dat"
    if not weights:
        raise _bad(p, "it holds no entries")
    for name, w in weights.items():
        if not np.all(np.isfinite(w)):
            raise ImatrixError(f"{p}: the weights for {name} are not all finite; llama-quantize refuses such a "
                               "matrix too. Recompute it with llama-imatrix.")
    return ImportanceMatrix(str(p), layout, weights, datasets, chunks, digest)


def _read_dat(p: Path, data: bytes) -> tuple[dict[str, np.ndarray], list[str], int | None]:
    pos = 0

    def take(fmt: str) -> tuple[int, ...]:
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise _bad(p, f"it ends early, at byte {len(data)}")
        out = struct.unpack_from(fmt, data, pos)
        pos += size
        return out

    (n_entries,) = take("<i")
    if n_entries < 0 or n_entries * 12 > len(data):
        raise _bad(p, f"implausible entry count {n_entries}")
    weights: dict[str, np.ndarray] = {}
    for _ in range(n_entries):
        (n,) = take("<i")
        if n <= 0 or pos + n > len(data):
            raise _bad(p, f"an entry name of {n} bytes at byte {pos - 4}")
        name = data[pos:pos + n].decode("utf-8", "replace")
        pos += n
        ncall, nval = take("<ii")
        if nval < 0 or pos + 4 * nval > len(data):
            raise _bad(p, f"{name} claims {nval} values")
        values = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        pos += 4 * nval
        if name in weights:
            raise _bad(p, f"{name} appears twice")
        weights[name] = values / np.float32(ncall) if ncall > 0 else values.copy()
    chunks: int | None = None
    datasets: list[str] = []
    if pos + 4 <= len(data):  # the optional trailer: chunk count and the dataset's name
        (chunks,) = take("<i")
        if pos + 4 <= len(data):
            (n,) = take("<i")
            if 0 < n <= len(data) - pos:
                datasets = [data[pos:pos + n].decode("utf-8", "replace")]
    return weights, datasets, chunks


def _read_gguf(p: Path) -> tuple[dict[str, np.ndarray], list[str], int | None]:
    from . import gguf_header

    try:
        hdr = gguf_header.read_header(p)
    except ConvdiffError as exc:
        raise _bad(p, str(exc)) from None
    kind = hdr.kv.get("general.type")
    if kind not in (None, "imatrix"):
        raise _bad(p, f"its general.type is {kind!r}: a model file, not an importance matrix")
    if "imatrix.chunk_count" not in hdr.kv:
        raise _bad(p, "it has no imatrix.chunk_count key (llama-quantize rejects it: 'missing imatrix metadata')")
    f32 = 0  # GGML_TYPE_F32
    tensors = {name: (ne, ttype, offset) for name, ne, ttype, offset in hdr.tensors}
    mm = np.memmap(p, dtype=np.uint8, mode="r")

    def values(name: str) -> np.ndarray:
        ne, ttype, offset = tensors[name]
        if ttype != f32:
            raise _bad(p, f"{name} is not stored as F32")
        n = math.prod(ne)
        start = hdr.data_start + offset
        return np.frombuffer(mm[start:start + 4 * n].tobytes(), dtype=hdr.endian + "f4").astype(np.float32)

    weights: dict[str, np.ndarray] = {}
    for name in tensors:
        if not name.endswith(".in_sum2"):
            continue
        base = name[: -len(".in_sum2")]
        if base + ".counts" not in tensors:
            raise _bad(p, f"{base} has sums but no counts")
        sums, counts = values(name), values(base + ".counts")
        ne0 = sums.size // max(counts.size, 1)
        out = np.empty_like(sums)
        for j, c in enumerate(counts):
            part = slice(j * ne0, (j + 1) * ne0)
            out[part] = sums[part] / np.float32(c) if c > 0 else np.float32(1.0)
        weights[base] = out
    raw = hdr.kv.get("imatrix.datasets")
    datasets = [str(d) for d in raw] if isinstance(raw, (list, tuple)) else ([str(raw)] if raw else [])
    chunks = hdr.kv.get("imatrix.chunk_count")
    return weights, datasets, int(chunks) if chunks is not None else None
