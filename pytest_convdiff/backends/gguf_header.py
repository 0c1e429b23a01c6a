"""GGUF header reader: metadata and tensor table of a ``.gguf`` file, in pure Python.

Split from the llama.cpp runtime so that probing a model at pytest collection time costs a header
read (mmap, no tensor data) and imports neither llama_cpp nor the gguf package; both the llama.cpp
backend and the transformers backend (``gguf_file=``) describe GGUFs through ``model_info``.
Damaged files raise ModelLoadError saying what is wrong (truncated, bad magic, implausible counts).
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError
from .base import ModelInfo

__all__ = ["FILE_TYPES", "GGML_TYPES", "GGUF_MAGIC", "ggml_type_name", "model_info", "read_header", "shard_files",
           "token_texts", "ARRAY_TYPE"]

GGUF_MAGIC = b"GGUF"

# GGUF value types -> (struct format, size) for scalars
_SCALARS: dict[int, tuple[str, int]] = {
    0: ("B", 1), 1: ("b", 1), 2: ("H", 2), 3: ("h", 2), 4: ("I", 4), 5: ("i", 4),
    6: ("f", 4), 7: ("?", 1), 10: ("Q", 8), 11: ("q", 8), 12: ("d", 8),
}
_STRING, _ARRAY = 8, 9
ARRAY_TYPE = _ARRAY  # the GGUF value type of an array (``_Header.types``: (ARRAY_TYPE, element type))

# ggml tensor types: id -> (name, block size, bytes per block)
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
}

# general.file_type (llama_ftype) -> name
FILE_TYPES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S",
    29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4_MOE",
}

# Keys whose (possibly huge) array values are not kept, only their length.
_KEEP_ARRAY_LEN_ONLY = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.scores",
                        "tokenizer.ggml.token_type")


class _Truncated(Exception):
    pass


class _Header:
    """The parsed header: key/values, tensor infos, where the data starts."""

    def __init__(self) -> None:
        self.version = 0
        self.kv: dict[str, Any] = {}
        self.array_len: dict[str, int] = {}
        self.types: dict[str, tuple[int, ...]] = {}  # key -> (value type,) or (ARRAY, element type)
        self.token_strings_at = 0  # where tokenizer.ggml.tokens' elements start (0: no such array)
        self.array_at: dict[str, int] = {}  # where each array's elements start
        self.endian = "<"
        self.tensors: list[tuple[str, tuple[int, ...], int, int]] = []  # name, ne, type, offset
        self.data_start = 0
        self.file_size = 0


class _Reader:
    def __init__(self, buf: Any, size: int, endian: str) -> None:
        self.buf, self.size, self.e, self.pos = buf, size, endian, 0

    def take(self, fmt: str, n: int) -> Any:
        if self.pos + n > self.size:
            raise _Truncated
        v = struct.unpack_from(self.e + fmt, self.buf, self.pos)[0]
        self.pos += n
        return v

    def skip_string(self) -> int:
        """Step over a length-prefixed string; where its bytes start."""
        n = self.take("Q", 8)
        if n > self.size - self.pos:
            raise _Truncated
        start, self.pos = self.pos, self.pos + n
        return start

    def string(self) -> str:
        start = self.skip_string()
        return bytes(self.buf[start:self.pos]).decode("utf-8", errors="replace")

    def value(self, vtype: int, key: str, hdr: _Header) -> Any:
        if vtype in _SCALARS:
            fmt, n = _SCALARS[vtype]
            return self.take(fmt, n)
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype = self.take("I", 4)
            count = self.take("Q", 8)
            hdr.array_len[key] = count
            hdr.types[key] = (_ARRAY, etype)
            hdr.array_at[key] = self.pos
            if key == "tokenizer.ggml.tokens" and etype == _STRING:
                hdr.token_strings_at = self.pos
            if etype in _SCALARS:
                fmt, n = _SCALARS[etype]
                if count * n > self.size - self.pos:
                    raise _Truncated
                if key in _KEEP_ARRAY_LEN_ONLY or count > 4096:
                    self.pos += count * n
                    return None
                out = list(struct.unpack_from(f"{self.e}{count}{fmt}", self.buf, self.pos))
                self.pos += count * n
                return out
            if etype == _STRING:
                if key in _KEEP_ARRAY_LEN_ONLY or count > 4096:
                    for _ in range(count):
                        self.skip_string()
                    return None
                return [self.string() for _ in range(count)]
            if etype == _ARRAY:  # nested arrays: keep nothing
                for _ in range(count):
                    self.value(_ARRAY, key + "[]", hdr)
                return None
            raise ValueError(f"unknown array element type {etype} in key {key!r}")
        raise ValueError(f"unknown value type {vtype} for key {key!r}")


#: The GGUF format versions whose layout this reader (and llama.cpp) knows; version 1 predates 64-bit counts.
READABLE_VERSIONS = (2, 3)


def version_problem(path: str | os.PathLike[str], version: int) -> str | None:
    """Why a GGUF of this header version cannot be read (None when it can): nothing after a header of an
    unknown version can be trusted, since its layout may differ from there on."""
    if version in READABLE_VERSIONS:
        return None
    known = " and ".join(str(v) for v in READABLE_VERSIONS)
    hint = ("re-convert it with a current llama.cpp" if version < min(READABLE_VERSIONS) else
            "it was written by a newer GGUF writer, or the file is damaged; update llama.cpp and this plugin, "
            "or re-convert it")
    return f"{path}: GGUF version {version}, but this build reads GGUF versions {known} only; {hint}."


def header_version(head: bytes) -> int:
    """The version field of a GGUF's first 8 bytes, in either byte order."""
    version = struct.unpack_from("<I", head, 4)[0]
    return struct.unpack_from(">I", head, 4)[0] if version & 0xFFFF == 0 else version


def _bad(path: Path, what: str) -> ModelLoadError:
    return ModelLoadError(f"{path}: {what}; the file is damaged or incomplete. "
                          "Re-download or re-convert it.")


# The last few headers parsed, by file identity: a run asks for the same file's header several times (config,
# weights, tokens, routing), and parsing one walks every token string of the vocabulary in Python.
_HEADERS: dict[tuple[Any, ...], _Header] = {}
_HEADERS_KEPT = 8


def read_header(path: str | os.PathLike[str]) -> _Header:
    """Parse a GGUF header (metadata and tensor table) without reading tensor data.

    A file read before and unchanged since (same device, inode, size and modification time) is not parsed
    again; each caller gets its own copy of the containers, so none can change what another reads."""
    path = Path(path)
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot open ({exc.strerror or exc}).") from exc
    with fh:
        st = os.fstat(fh.fileno())
        size = st.st_size
        key = (str(path.resolve()), st.st_dev, st.st_ino, size, st.st_mtime_ns)
        if (kept := _HEADERS.get(key)) is not None:
            return _copy(kept)
        if size < 24:
            raise _bad(path, f"only {size} bytes, too short for a GGUF header")
        buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            hdr = _parse(path, buf, size)
        finally:
            buf.close()
    while len(_HEADERS) >= _HEADERS_KEPT:
        _HEADERS.pop(next(iter(_HEADERS)))
    _HEADERS[key] = hdr
    return _copy(hdr)


def _copy(hdr: _Header) -> _Header:
    out = _Header()
    out.__dict__.update({k: (v.copy() if isinstance(v, (dict, list)) else v) for k, v in hdr.__dict__.items()})
    return out


def token_texts(path: str | os.PathLike[str], ids: list[int], hdr: _Header | None = None) -> dict[int, str]:
    """The texts of a few token ids (``tokenizer.ggml.tokens``), which ``read_header`` steps over: one walk over
    the array's length prefixes, no other parsing (0.1 s for 150k tokens). ``hdr``: this file's header, if read."""
    path = Path(path)
    hdr = hdr if hdr is not None else read_header(path)
    count = hdr.array_len.get("tokenizer.ggml.tokens", 0)
    wanted = {i for i in ids if 0 <= i < count}
    if not hdr.token_strings_at or not wanted:
        return {}
    out: dict[int, str] = {}
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        r = _Reader(buf, hdr.file_size, hdr.endian)
        r.pos = hdr.token_strings_at
        last = max(wanted)
        for i in range(last + 1):
            if i in wanted:
                out[i] = r.string()
            else:
                r.skip_string()
    return out


# llama.cpp's token types (tokenizer.ggml.token_type): CONTROL and USER_DEFINED are the special ones
TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4
TOKEN_UNKNOWN = 2  # a SentencePiece vocabulary's <unk>


TOKEN_TYPE_NAMES = {0: "UNDEFINED", 1: "NORMAL", 2: "UNKNOWN", 3: "CONTROL", 4: "USER_DEFINED", 5: "UNUSED", 6: "BYTE"}


def token_types(path: str | os.PathLike[str], ids: list[int], hdr: _Header | None = None) -> dict[int, int]:
    """``tokenizer.ggml.token_type`` of a few ids (a direct read of the int32 array: no walk)."""
    path = Path(path)
    hdr = hdr if hdr is not None else read_header(path)
    at, count = hdr.array_at.get("tokenizer.ggml.token_type"), hdr.array_len.get("tokenizer.ggml.token_type", 0)
    wanted = sorted({i for i in ids if 0 <= i < count})
    if at is None or not wanted:
        return {}
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        return {i: struct.unpack_from(f"{hdr.endian}i", buf, at + 4 * i)[0] for i in wanted}


def special_tokens(path: str | os.PathLike[str], hdr: _Header | None = None) -> dict[str, int]:
    """``{text: id}`` of the tokens the file marks as control or user-defined (the ones llama.cpp parses as
    special in a prompt): one walk over the token texts and a read of the type array."""
    path = Path(path)
    hdr = hdr if hdr is not None else read_header(path)
    count = hdr.array_len.get("tokenizer.ggml.tokens", 0)
    types_at = hdr.array_at.get("tokenizer.ggml.token_type")
    if not hdr.token_strings_at or types_at is None or hdr.array_len.get("tokenizer.ggml.token_type") != count:
        return {}
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        types = struct.unpack_from(f"{hdr.endian}{count}i", buf, types_at)
        r = _Reader(buf, hdr.file_size, hdr.endian)
        r.pos = hdr.token_strings_at
        out: dict[str, int] = {}
        for i in range(count):
            if types[i] in (TOKEN_CONTROL, TOKEN_USER_DEFINED):
                out.setdefault(r.string(), i)
            else:
                r.skip_string()
    return out


def _parse(path: Path, buf: Any, size: int) -> _Header:
    if bytes(buf[:4]) != GGUF_MAGIC:
        raise _bad(path, f"does not start with the GGUF magic bytes (found {bytes(buf[:4])!r})")
    endian = "<"
    version = struct.unpack_from("<I", buf, 4)[0]
    if version & 0xFFFF == 0:  # written big-endian
        endian, version = ">", struct.unpack_from(">I", buf, 4)[0]
    problem = version_problem(path, version)
    if problem:
        raise ModelLoadError(problem)
    hdr = _Header()
    hdr.version, hdr.file_size, hdr.endian = version, size, endian
    r = _Reader(buf, size, endian)
    r.pos = 8
    try:
        n_tensors = r.take("Q", 8)
        n_kv = r.take("Q", 8)
        if n_tensors > size or n_kv > size:
            raise _bad(path, f"implausible header counts ({n_tensors} tensors, {n_kv} keys)")
        for _ in range(n_kv):
            key = r.string()
            vtype = r.take("I", 4)
            hdr.types[key] = (vtype,)
            hdr.kv[key] = r.value(vtype, key, hdr)
        for _ in range(n_tensors):
            name = r.string()
            n_dims = r.take("I", 4)
            if n_dims > 8:
                raise _bad(path, f"tensor {name!r} claims {n_dims} dimensions")
            ne = tuple(r.take("Q", 8) for _ in range(n_dims))
            ttype = r.take("I", 4)
            offset = r.take("Q", 8)
            hdr.tensors.append((name, ne, ttype, offset))
    except _Truncated:
        raise _bad(path, f"the header ends early (file is {size} bytes)") from None
    except (ValueError, struct.error) as exc:
        raise _bad(path, f"malformed header ({exc})") from None
    align = int(hdr.kv.get("general.alignment") or 32)
    hdr.data_start = (r.pos + align - 1) // align * align
    # every tensor's data must lie inside the file
    need, last = hdr.data_start, "the header"
    for name, ne, ttype, offset in hdr.tensors:
        if ttype not in GGML_TYPES:
            continue
        _, block, nbytes = GGML_TYPES[ttype]
        n = 1
        for d in ne:
            n *= d
        end = hdr.data_start + offset + n // block * nbytes
        if end > need:
            need, last = end, name
    if need > size:
        raise _bad(path, f"truncated: tensor data needs {need} bytes (up to {last!r}) "
                   f"but the file has {size}")
    return hdr


def storage(hdr: _Header) -> dict[str, Any]:
    """What the weights are really stored as: bits per weight over every weight matrix (tensors of two
    or more dimensions: the token embedding and output head included, norms and biases not), and each
    tensor type's share of the weight elements. A file's type label is a poor guide to this: a
    K-quant needs rows divisible by 256 and falls back to other types where they are not."""
    elements: dict[str, int] = {}
    bits = 0.0
    for _, ne, ttype, _ in hdr.tensors:
        if len(ne) < 2 or ttype not in GGML_TYPES:
            continue
        name, block, nbytes = GGML_TYPES[ttype]
        n = 1
        for d in ne:
            n *= d
        elements[name] = elements.get(name, 0) + n
        bits += n * nbytes * 8 / block
    total = sum(elements.values())
    if not total:
        return {}
    return {"bits_per_weight": bits / total,
            "tensor_types": {k: v / total for k, v in sorted(elements.items(), key=lambda kv: -kv[1])}}


def _quantization(hdr: _Header) -> str | None:
    ft = hdr.kv.get("general.file_type")
    if isinstance(ft, int) and ft in FILE_TYPES:
        return FILE_TYPES[ft]
    counts: dict[str, int] = {}
    for _, ne, ttype, _ in hdr.tensors:
        if len(ne) >= 2 and ttype in GGML_TYPES:
            counts[GGML_TYPES[ttype][0]] = counts.get(GGML_TYPES[ttype][0], 0) + 1
    return max(counts, key=counts.__getitem__) if counts else None



def ggml_type_name(ttype: int) -> str:
    """``GGML_TYPES`` name of a tensor type id, or ``type <id>`` for one this table does not know."""
    entry = GGML_TYPES.get(int(ttype))
    return entry[0] if entry else f"type {int(ttype)}"


_SHARD_RE = re.compile(r"^(?P<stem>.*)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$")


def shard_files(path: Path) -> list[Path]:
    """The GGUF file, or all shards of a split GGUF (``name-00001-of-00003.gguf``)."""
    path = Path(path)
    m = _SHARD_RE.match(path.name)
    if m:
        n = int(m["n"])
        shards = [path.with_name(f"{m['stem']}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]
        return [p for p in shards if p.is_file()]
    return [path]


def model_info(path: str | os.PathLike[str], backend: str, library_version: str | None = None) -> ModelInfo:
    """Architecture, layers, vocabulary, quantization from the GGUF header only, as ``backend`` reports it."""
    path = Path(path)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        hint = f" It holds {ggufs[0].name}: pass that file." if ggufs else ""
        raise ModelLoadError(f"{path}: the {backend} backend needs a .gguf file, not a directory.{hint}")
    hdr = read_header(path)
    kv = hdr.kv
    arch = kv.get("general.architecture")
    if not isinstance(arch, str):
        raise _bad(path, "no general.architecture key in the GGUF metadata")

    def akey(name: str) -> Any:
        return kv.get(f"{arch}.{name}")

    vocab = hdr.array_len.get("tokenizer.ggml.tokens") or akey("vocab_size")
    if not vocab:
        shapes = {name: ne for name, ne, _, _ in hdr.tensors}
        ne = shapes.get("output.weight") or shapes.get("token_embd.weight")
        vocab = ne[1] if ne and len(ne) > 1 else None
    n_layers = akey("block_count")
    hidden = akey("embedding_length")
    quant = _quantization(hdr)
    extra = {
        "gguf_version": hdr.version,
        "file_type": kv.get("general.file_type"),
        "name": kv.get("general.name"),
        "context_length": akey("context_length"),
        "tokenizer_model": kv.get("tokenizer.ggml.model"),
        "tokenizer_pre": kv.get("tokenizer.ggml.pre"),
        "bos_token_id": kv.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": kv.get("tokenizer.ggml.eos_token_id"),
        "add_bos_token": kv.get("tokenizer.ggml.add_bos_token"),
        "add_eos_token": kv.get("tokenizer.ggml.add_eos_token"),
        "n_merges": hdr.array_len.get("tokenizer.ggml.merges"),
        "rope_freq_base": akey("rope.freq_base"),
        "rms_norm_eps": akey("attention.layer_norm_rms_epsilon"),
        "n_tensors": len(hdr.tensors),
        **storage(hdr),
    }
    return ModelInfo(
        path=str(path), backend=backend, architecture=arch,
        num_layers=int(n_layers) if n_layers is not None else None,
        vocab_size=int(vocab) if vocab else None,
        hidden_size=int(hidden) if hidden is not None else None,
        dtype=quant.lower() if quant else None,
        library_version=library_version,
        quantization=quant,
        extra=extra,
    )
