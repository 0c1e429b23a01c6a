"""Read a model's stored tensors a block of rows at a time, as float32, without torch.

A GGUF (or the shards of a split one) is read from its header and a memory map, its rows dequantised by
llama.cpp's own ``to_float`` where its library is installed (else gguf-py's); a transformers checkpoint's
``*.safetensors`` files from their JSON header and a memory map. A 70B model's weights are never all in memory:
only the rows a caller asks for. Which tensor of one side goes with which of the other is ``backends.pairing``'s.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import gguf_header

__all__ = ["CHUNK_ELEMENTS", "DERIVED", "GGUFWeights", "SafetensorsWeights", "Source", "StoredTensor",
           "WeightsUnreadable", "is_derived"]

CHUNK_ELEMENTS = 1 << 22  # entries per side per chunk a caller reads (16 MiB as float32)


class WeightsUnreadable(Exception):
    """This side's weights cannot be compared here; the message says why (the items skip with it)."""


# GGUF tensors that a transformers checkpoint does not store (its config describes them)
_ST_DTYPES = {"F64": ("<f8", "F64"), "F32": ("<f4", "F32"), "F16": ("<f2", "F16"), "BF16": ("<u2", "BF16")}


@dataclass(frozen=True)
class StoredTensor:
    """A tensor as stored: its name in its file, numpy-order shape, storage type, and where its bytes are."""

    name: str
    shape: tuple[int, ...]
    type: str
    file: Path
    offset: int  # absolute byte offset in ``file``
    nbytes: int
    rows: int  # the 2-D view the comparison streams: (rows, cols)
    cols: int


def view_2d(shape: tuple[int, ...], block: int = 1) -> tuple[int, int]:
    """A tensor's 2-D view: leading dims as rows; a 1-D tensor as a column (rows are what chunks split and
    what llama.cpp's q/k permutation moves), unless its type packs blocks along it."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return (shape[0], 1) if block == 1 else (1, shape[0])
    return math.prod(shape[:-1]), shape[-1]


DERIVED = Path("<derived>")  # the "files" of tensors held in memory (``SafetensorsWeights.add_derived``)


def is_derived(t: StoredTensor) -> bool:
    return t.file.parent == DERIVED


class _Maps:
    """One read-only memory map per file, opened on first use."""

    def __init__(self) -> None:
        self._maps: dict[Path, np.memmap] = {}

    def get(self, path: Path) -> np.memmap:
        if path not in self._maps:
            self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
        return self._maps[path]

    def close(self) -> None:
        self._maps.clear()


def _ggml_ready() -> bool:
    from . import ggml

    return ggml.available() is None


class GGUFWeights:
    """A GGUF file (or the shards of a split one): tensor table from the header, data through a memory map,
    rows dequantised by gguf-py."""

    kind = "gguf"

    def __init__(self, path: str | Path) -> None:
        import gguf  # noqa: F401 - fail early with a readable reason when missing

        self.path = Path(path)
        self.tensors: dict[str, StoredTensor] = {}
        self.kv: dict[str, Any] = {}
        for shard in gguf_header.shard_files(self.path):
            hdr = gguf_header.read_header(shard)
            if not self.kv:
                self.kv = hdr.kv
            for name, ne, ttype, offset in hdr.tensors:
                tname, block, nbytes = gguf_header.GGML_TYPES.get(ttype, (f"type {ttype}", 0, 0))
                shape = tuple(int(d) for d in reversed(ne))
                n = math.prod(shape) if shape else 1
                size = n // block * nbytes if block else 0
                r, c = view_2d(shape, block or 1)
                self.tensors[name] = StoredTensor(name, shape, tname, shard, hdr.data_start + offset, size, r, c)
        self.arch = str(self.kv.get("general.architecture") or "")
        self._maps = _Maps()

    def meta(self, key: str, layer: int | None = None) -> Any:
        v = self.kv.get(f"{self.arch}.{key}")
        if isinstance(v, list):
            return v[layer] if layer is not None and layer < len(v) else (v[0] if v else None)
        return v

    def heads(self, layer: int | None) -> tuple[int | None, int | None]:
        n_head = self.meta("attention.head_count", layer)
        n_kv = self.meta("attention.head_count_kv", layer) or n_head
        return (int(n_head) if n_head else None), (int(n_kv) if n_kv else None)

    def raw(self, t: StoredTensor, r0: int, r1: int) -> np.ndarray:
        """Rows r0..r1 of the tensor's 2-D view as stored: (rows, bytes per row)."""
        return np.asarray(self._maps.get(t.file)[t.offset:t.offset + t.nbytes].reshape(t.rows, -1)[r0:r1])

    def read(self, t: StoredTensor, r0: int, r1: int) -> np.ndarray:
        """Rows r0..r1 of the tensor's 2-D view, dequantised to float32 (by llama.cpp's own ``to_float``
        where its library is installed, so that B and its re-quantisation twin are read the same way)."""
        raw = self.raw(t, r0, r1)
        if t.type == "F64":
            return raw.view("<f8").astype(np.float32)
        if t.type == "F32":
            return raw.view("<f4").reshape(r1 - r0, t.cols).copy()
        if t.type == "F16":
            from . import ggml

            return ggml.f16_widen(raw.view("<f2").reshape(r1 - r0, t.cols))
        if _ggml_ready():
            from . import ggml

            try:
                return ggml.dequantize(t.type, raw, t.cols)
            except ggml.GGMLUnavailable:
                pass
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        try:
            qtype = GGMLQuantizationType[t.type]
        except KeyError:
            raise WeightsUnreadable(f"gguf-py does not know the tensor type {t.type}") from None
        out = dequantize(np.asarray(raw), qtype)
        return np.asarray(out, dtype=np.float32).reshape(r1 - r0, t.cols)

    def close(self) -> None:
        self._maps.close()


class SafetensorsWeights:
    """A transformers checkpoint's ``*.safetensors`` files: header JSON, data through a memory map (bf16
    widened to float32 by bit shift, so no torch is needed)."""

    kind = "safetensors"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        files = self._files()
        if not files:
            bins = sorted(self.path.glob("*.bin")) + sorted(self.path.glob("*.pt"))
            if bins:
                raise WeightsUnreadable(f"{self.path} keeps its weights in {bins[0].name} (a pickle), which this check "
                                        "does not read; save the checkpoint with safetensors")
            raise WeightsUnreadable(f"{self.path} has no *.safetensors weights")
        self.tensors: dict[str, StoredTensor] = {}
        self.skipped: dict[str, str] = {}
        self.derived: dict[str, np.ndarray] = {}  # A's values cut as B stores them (``backends.restructure``)
        for f in files:
            self._read_header(f)
        cfg = self.path / "config.json"
        try:
            self.config: dict[str, Any] = json.loads(cfg.read_text(encoding="utf-8")) if cfg.is_file() else {}
        except (OSError, ValueError):
            self.config = {}
        self._maps = _Maps()

    def _files(self) -> list[Path]:
        if self.path.is_file():
            return [self.path]
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
                return [self.path / n for n in names]
            except (OSError, ValueError, KeyError, TypeError):
                pass
        return sorted(self.path.glob("*.safetensors"))

    def _read_header(self, f: Path) -> None:
        try:
            with f.open("rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
        except (OSError, struct.error, ValueError) as exc:
            raise WeightsUnreadable(f"{f}: not a readable safetensors file ({exc})") from None
        base = 8 + n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = str(info.get("dtype"))
            if dtype not in _ST_DTYPES:
                self.skipped[name] = f"dtype {dtype} (not a float type this check reads)"
                continue
            start, end = info["data_offsets"]
            shape = tuple(int(d) for d in info["shape"])
            r, c = view_2d(shape)
            self.tensors[name] = StoredTensor(name, shape, _ST_DTYPES[dtype][1], f, base + start, end - start, r, c)

    def add_derived(self, name: str, values: np.ndarray, like: StoredTensor) -> StoredTensor:
        """A tensor made of this checkpoint's values (a piece of a tensor the converter splits), read from memory
        like a stored one; it keeps the storage type of the tensor it was cut from."""
        self.derived[name] = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
        r, c = view_2d(tuple(values.shape))  # stored like a file's bytes, so that an expert's slice of it reads too
        return StoredTensor(name, tuple(values.shape), like.type, DERIVED / name, 0, values.size * 4, r, c)

    def read(self, t: StoredTensor, r0: int, r1: int) -> np.ndarray:
        if is_derived(t):
            flat = self.derived[t.file.name][t.offset // 4:(t.offset + t.nbytes) // 4]
            return flat.reshape(t.rows, t.cols)[r0:r1]
        np_dtype = _ST_DTYPES[t.type][0]
        raw = self._maps.get(t.file)[t.offset:t.offset + t.nbytes].view(np_dtype).reshape(t.rows, t.cols)[r0:r1]
        if t.type == "BF16":  # the bits, shifted into float32's upper half in one pass (cast and shift fused)
            return np.left_shift(np.asarray(raw), np.uint32(16), dtype=np.uint32).view(np.float32)
        if t.type == "F32":
            return np.asarray(raw)
        if t.type == "F16":
            from . import ggml

            return ggml.f16_widen(np.asarray(raw))
        return np.asarray(raw, dtype=np.float32)

    def close(self) -> None:
        self._maps.close()


Source = GGUFWeights | SafetensorsWeights

