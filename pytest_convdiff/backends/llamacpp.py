"""llama.cpp backend: a GGUF file run with llama-cpp-python's low-level API.

Options: ``n_ctx`` (longest sequence it will be given; default 4096), ``n_threads``
(default: all cores), ``n_gpu_layers`` (default 0), ``n_ubatch`` (tokens per
compute step, default min(n_ctx, 512); a sequence is still decoded as one batch,
ubatches are stitched together), ``type_k`` / ``type_v`` (KV cache type: f16 (the
llama.cpp default), f32, bf16, q8_0), ``flash_attn`` (true | false | auto, default auto).

Per-layer states come from llama.cpp's eval callback: ``l_out-i`` is the output of
decoder layer i (the last one before the final norm, as in ``base.py``),
``attn_out-i`` / ``ffn_out-i`` the attention and MLP sub-block outputs.

``probe`` reads the GGUF header with a small parser of its own (no llama_cpp and
no gguf import), so it is cheap at pytest collection time.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import re
import struct
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ContextLengthError, MissingDependencyError, ModelLoadError
from .base import ForwardOutput, ModelInfo, installed_version

NAME = "llama.cpp"
DEFAULT_N_CTX = 4096
GGUF_MAGIC = b"GGUF"

# --------------------------------------------------------------------------- header parsing

# GGUF value types -> (struct format, size) for scalars
_SCALARS: dict[int, tuple[str, int]] = {
    0: ("B", 1), 1: ("b", 1), 2: ("H", 2), 3: ("h", 2), 4: ("I", 4), 5: ("i", 4),
    6: ("f", 4), 7: ("?", 1), 10: ("Q", 8), 11: ("q", 8), 12: ("d", 8),
}
_STRING, _ARRAY = 8, 9

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

    def string(self) -> str:
        n = self.take("Q", 8)
        if n > self.size - self.pos:
            raise _Truncated
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def skip_string(self) -> None:
        n = self.take("Q", 8)
        if n > self.size - self.pos:
            raise _Truncated
        self.pos += n

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


def _bad(path: Path, what: str) -> ModelLoadError:
    return ModelLoadError(f"{path}: {what}; the file is damaged or incomplete. "
                          "Re-download or re-convert it.")


def read_header(path: str | os.PathLike[str]) -> _Header:
    """Parse a GGUF header (metadata and tensor table) without reading tensor data."""
    path = Path(path)
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot open ({exc.strerror or exc}).") from exc
    with fh:
        size = os.fstat(fh.fileno()).st_size
        if size < 24:
            raise _bad(path, f"only {size} bytes, too short for a GGUF header")
        buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            return _parse(path, buf, size)
        finally:
            buf.close()


def _parse(path: Path, buf: Any, size: int) -> _Header:
    if bytes(buf[:4]) != GGUF_MAGIC:
        raise _bad(path, f"does not start with the GGUF magic bytes (found {bytes(buf[:4])!r})")
    endian = "<"
    version = struct.unpack_from("<I", buf, 4)[0]
    if version & 0xFFFF == 0:  # written big-endian
        endian, version = ">", struct.unpack_from(">I", buf, 4)[0]
    if version < 2:
        raise ModelLoadError(f"{path}: GGUF version {version} is too old for llama.cpp; re-convert it.")
    hdr = _Header()
    hdr.version, hdr.file_size = version, size
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
    need = hdr.data_start
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


def _quantization(hdr: _Header) -> str | None:
    ft = hdr.kv.get("general.file_type")
    if isinstance(ft, int) and ft in FILE_TYPES:
        return FILE_TYPES[ft]
    counts: dict[str, int] = {}
    for _, ne, ttype, _ in hdr.tensors:
        if len(ne) >= 2 and ttype in GGML_TYPES:
            counts[GGML_TYPES[ttype][0]] = counts.get(GGML_TYPES[ttype][0], 0) + 1
    return max(counts, key=counts.__getitem__) if counts else None


def library_version() -> str | None:
    return installed_version("llama-cpp-python")


_SHARD_RE = re.compile(r"^(?P<stem>.*)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$")


def fingerprint_files(path: Path) -> list[Path]:
    """The GGUF file, or all shards of a split GGUF."""
    path = Path(path)
    m = _SHARD_RE.match(path.name)
    if m:
        n = int(m["n"])
        shards = [path.with_name(f"{m['stem']}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]
        return [p for p in shards if p.is_file()]
    return [path]


def probe(path: Path, options: dict[str, Any] | None = None) -> ModelInfo:
    """Architecture, layers, vocabulary, quantization from the GGUF header only."""
    path = Path(path)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        hint = f" It holds {ggufs[0].name}: pass that file." if ggufs else ""
        raise ModelLoadError(f"{path}: the llama.cpp backend needs a .gguf file, not a directory.{hint}")
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
    }
    return ModelInfo(
        path=str(path), backend=NAME, architecture=arch,
        num_layers=int(n_layers) if n_layers is not None else None,
        vocab_size=int(vocab) if vocab else None,
        hidden_size=int(hidden) if hidden is not None else None,
        dtype=quant.lower() if quant else None,
        library_version=library_version(),
        quantization=quant,
        extra=extra,
    )


# --------------------------------------------------------------------------- running

_KV_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "bf16": 30}


_QUIET: list[Any] = []


def _quiet_log_callback(llama_cpp: Any) -> Any:
    if not _QUIET:
        _QUIET.append(llama_cpp.llama_log_callback(lambda _level, _text, _user: None))
    return _QUIET[0]


class _ConsoleCapture:
    """Keeps llama.cpp's console output (log callback and raw stderr) out of the test output."""

    def __init__(self, llama_cpp: Any) -> None:
        self._llama_cpp = llama_cpp
        self.lines: list[str] = []
        self._file = tempfile.TemporaryFile(mode="w+b")

        @llama_cpp.llama_log_callback
        def _log(level: int, text: bytes, _user: Any) -> None:
            with contextlib.suppress(Exception):
                self.lines.append(text.decode("utf-8", errors="replace"))
                if len(self.lines) > 2000:
                    del self.lines[:1000]

        self._callback = _log

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        lc = self._llama_cpp
        self.lines.clear()
        self._file.seek(0)
        self._file.truncate()
        lc.llama_log_set(self._callback, ctypes.c_void_p(0))
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        saved = None
        with contextlib.suppress(OSError):
            saved = os.dup(2)
            os.dup2(self._file.fileno(), 2)
        try:
            yield
        finally:
            if saved is not None:
                os.dup2(saved, 2)
                os.close(saved)
            # hand logging back to llama-cpp-python's own callback (or a module-lifetime quiet one),
            # never leaving C with a pointer to this object's callback after it is freed
            restore = getattr(getattr(lc, "_logger", None), "llama_log_callback", None)
            lc.llama_log_set(restore if restore is not None else _quiet_log_callback(lc), ctypes.c_void_p(0))

    def text(self, limit: int = 2000) -> str:
        self._file.seek(0)
        raw = self._file.read().decode("utf-8", errors="replace")
        out = ("".join(self.lines) + raw).strip()
        return out[-limit:]

    def close(self) -> None:
        self._file.close()


def _ggml_lib(llama_cpp: Any) -> ctypes.CDLL:
    libdir = Path(llama_cpp.__file__).resolve().parent / "lib"
    names = ["libggml-base.so", "libggml-base.dylib", "ggml-base.dll"]
    cands = [libdir / n for n in names] + sorted(libdir.glob("*ggml-base*"))
    for cand in cands:
        if cand.exists():
            lib = ctypes.CDLL(str(cand))
            break
    else:
        raise ModelLoadError(f"llama.cpp backend: cannot find libggml-base in {libdir}; "
                             "reinstall llama-cpp-python.")
    lib.ggml_get_name.argtypes = [ctypes.c_void_p]
    lib.ggml_get_name.restype = ctypes.c_char_p
    lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
    lib.ggml_nbytes.restype = ctypes.c_size_t
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    lib.ggml_backend_tensor_get.restype = None
    return lib


class _TensorHead(ctypes.Structure):
    """The start of ``struct ggml_tensor``: type, buffer, ne[4], nb[4]."""

    _fields_ = [("type", ctypes.c_int32), ("buffer", ctypes.c_void_p),
                ("ne", ctypes.c_int64 * 4), ("nb", ctypes.c_size_t * 4)]


def _set_field(params: Any, name: str, value: Any) -> None:
    if any(f == name for f, _ in type(params)._fields_):
        setattr(params, name, value)


class LlamaCppBackend:
    """A GGUF model in llama.cpp, with logits for every position and per-layer states."""

    def __init__(self, path: Path, options: dict[str, Any]) -> None:
        try:
            import llama_cpp
        except ImportError as exc:
            raise MissingDependencyError("llama.cpp", "llama-cpp-python", "llama-cpp") from exc
        self._lc = lc = llama_cpp
        self.path = Path(path)
        self.options = dict(options)
        self.info = probe(self.path)  # readable errors for missing / damaged files first
        self.info.library_version = library_version()
        self._model = None
        self._ctx = None
        self._console = _ConsoleCapture(lc)
        self.n_ctx = int(options.get("n_ctx") or DEFAULT_N_CTX)
        n_ubatch = int(options.get("n_ubatch") or min(self.n_ctx, 512))
        n_threads = int(options.get("n_threads") or os.cpu_count() or 1)
        self._ggml = _ggml_lib(lc)
        self._wanted: set[str] = set()
        self._captured: dict[str, list[np.ndarray]] = {}
        self._cb = lc.ggml_backend_sched_eval_callback(self._eval_callback)

        with self._console():
            lc.llama_backend_init()
            mparams = lc.llama_model_default_params()
            mparams.n_gpu_layers = int(options.get("n_gpu_layers") or 0)
            self._model = lc.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not self._model:
            log = self._console.text()
            raise ModelLoadError(f"{self.path}: llama.cpp could not load it"
                                 + (f"; its log ends with:\n{log}" if log else "."))
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = self.n_ctx
        cparams.n_batch = self.n_ctx
        cparams.n_ubatch = n_ubatch
        cparams.n_seq_max = 1
        cparams.n_threads = n_threads
        cparams.n_threads_batch = n_threads
        _set_field(cparams, "n_outputs_max", 0)
        _set_field(cparams, "n_outputs_max_per_seq", 0)
        cparams.cb_eval = self._cb
        cparams.cb_eval_user_data = None
        cparams.no_perf = True
        for opt in ("type_k", "type_v"):
            if options.get(opt):
                key = str(options[opt]).lower()
                if key not in _KV_TYPES:
                    self.close()
                    raise ModelLoadError(f"llama.cpp backend: {opt} must be one of {', '.join(_KV_TYPES)}, "
                                         f"not {options[opt]!r}.")
                setattr(cparams, opt, _KV_TYPES[key])
        fa = options.get("flash_attn")
        if fa is not None and str(fa).lower() != "auto":
            on = str(fa).lower() in ("1", "true", "yes", "on")
            _set_field(cparams, "flash_attn_type", 1 if on else 0)
            _set_field(cparams, "flash_attn", on)
        with self._console():
            self._ctx = lc.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            log = self._console.text()
            self.close()
            raise ModelLoadError(f"{self.path}: llama.cpp could not create a context with n_ctx={self.n_ctx}"
                                 + (f"; its log ends with:\n{log}" if log else "."))
        self._vocab = lc.llama_model_get_vocab(self._model)
        self.n_vocab = int(lc.llama_vocab_n_tokens(self._vocab))
        self.n_layer = int(lc.llama_model_n_layer(self._model))
        self.n_embd = int(lc.llama_model_n_embd(self._model))
        # llama.cpp may round n_ctx up; one sequence is one batch, so the limit is the smaller of the two
        n_batch = int(lc.llama_n_batch(self._ctx)) if hasattr(lc, "llama_n_batch") else self.n_ctx
        self.n_ctx = min(int(lc.llama_n_ctx(self._ctx)), n_batch)
        self.info.num_layers = self.n_layer
        self.info.vocab_size = self.n_vocab
        self.info.hidden_size = self.n_embd
        self.info.extra["n_ctx"] = self.n_ctx

    # ------------------------------------------------------------------ eval callback
    def _eval_callback(self, tensor: int, ask: bool, _user: Any) -> bool:
        try:
            name = self._ggml.ggml_get_name(tensor)
            name = name.decode("utf-8", errors="replace") if name else ""
            if ask:
                return name in self._wanted
            if name in self._wanted:
                head = _TensorHead.from_address(tensor)
                ne0, ne1 = int(head.ne[0]), int(head.ne[1])
                rows = ne1 * int(head.ne[2]) * int(head.ne[3])
                if head.type == 0:
                    dtype = np.float32
                elif head.type == 1:
                    dtype = np.float16
                else:
                    return True
                item = np.dtype(dtype).itemsize
                contiguous = head.nb[0] == item and (rows <= 1 or head.nb[1] == item * ne0)
                if not contiguous:
                    return True
                out = np.empty((rows, ne0), dtype=dtype)
                self._ggml.ggml_backend_tensor_get(tensor, out.ctypes.data, 0, out.nbytes)
                self._captured.setdefault(name, []).append(out.astype(np.float32, copy=False))
            return True
        except Exception:  # never let an exception cross into C
            return True

    # ------------------------------------------------------------------ tokenizer
    def tokenize(self, text: str) -> list[int]:
        lc = self._lc
        data = text.encode("utf-8")
        n_max = len(data) + 16
        for _ in range(2):
            buf = (lc.llama_token * n_max)()
            with self._console():
                n = lc.llama_tokenize(self._vocab, data, len(data), buf, n_max, True, True)
            if n >= 0:
                return [int(buf[i]) for i in range(n)]
            n_max = -n + 16
        raise RuntimeError(f"{self.path}: llama_tokenize failed on a {len(data)}-byte text")

    def _piece_bytes(self, token_id: int) -> bytes:
        lc = self._lc
        size = 64
        for _ in range(3):
            buf = ctypes.create_string_buffer(size)
            n = lc.llama_token_to_piece(self._vocab, int(token_id), buf, size, 0, True)
            if n >= 0:
                return buf.raw[:n]
            size = -n + 8
        return b""

    def decode_piece(self, token_id: int) -> str:
        return self._piece_bytes(token_id).decode("utf-8", errors="replace")

    def special_tokens(self) -> dict[str, Any]:
        lc = self._lc
        bos = int(lc.llama_vocab_bos(self._vocab))
        eos = int(lc.llama_vocab_eos(self._vocab))
        return {
            "bos_id": bos if bos >= 0 else None,
            "eos_id": eos if eos >= 0 else None,
            "adds_bos": bool(bos >= 0 and lc.llama_vocab_get_add_bos(self._vocab)),
            "adds_eos": bool(eos >= 0 and lc.llama_vocab_get_add_eos(self._vocab)),
        }

    # ------------------------------------------------------------------ forward
    def _clear_memory(self) -> None:
        lc = self._lc
        if hasattr(lc, "llama_get_memory"):
            lc.llama_memory_clear(lc.llama_get_memory(self._ctx), True)
        elif hasattr(lc, "llama_kv_self_clear"):
            lc.llama_kv_self_clear(self._ctx)
        else:
            lc.llama_kv_cache_clear(self._ctx)

    def _stack(self, prefix: str, n_tokens: int, required: bool) -> np.ndarray | None:
        layers = []
        for i in range(self.n_layer):
            chunks = self._captured.get(f"{prefix}-{i}")
            if not chunks:
                if required:
                    raise RuntimeError(
                        f"{self.path}: llama.cpp's graph has no tensor named '{prefix}-{i}' for this "
                        f"architecture ({self.info.architecture}); per-layer states are not available.")
                return None
            arr = np.concatenate(chunks, axis=0) if len(chunks) > 1 else chunks[0]
            if arr.shape != (n_tokens, self.n_embd):
                if required:
                    raise RuntimeError(
                        f"{self.path}: '{prefix}-{i}' came back with shape {arr.shape}, expected "
                        f"({n_tokens}, {self.n_embd}).")
                return None
            layers.append(arr)
        return np.stack(layers)

    def forward(self, tokens: Sequence[int], *, hidden_states: bool = True,
                inject: dict[int, np.ndarray] | None = None) -> ForwardOutput:
        if inject:
            raise NotImplementedError("the llama.cpp backend cannot inject hidden states")
        if self._ctx is None:
            raise RuntimeError(f"{self.path}: the llama.cpp backend is closed")
        lc = self._lc
        toks = [int(t) for t in tokens]
        n = len(toks)
        if n > self.n_ctx:
            raise ContextLengthError(
                f"{self.path}: a prompt of {n} tokens is longer than the llama.cpp context "
                f"(n_ctx={self.n_ctx}); pass a larger n_ctx backend option or shorten it "
                "(--convdiff-max-tokens).")
        bad = [t for t in toks if not 0 <= t < self.n_vocab]
        if bad:
            raise ValueError(f"{self.path}: token id {bad[0]} is outside the vocabulary (0..{self.n_vocab - 1})")
        if n == 0:
            hid = np.zeros((self.n_layer, 0, self.n_embd), np.float32) if hidden_states else None
            return ForwardOutput(logits=np.zeros((0, self.n_vocab), np.float32), hidden=hid)

        self._wanted = ({f"{p}-{i}" for p in ("l_out", "attn_out", "ffn_out") for i in range(self.n_layer)}
                        if hidden_states else set())
        self._captured = {}
        batch = lc.llama_batch_init(n, 0, 1)
        try:
            for i, t in enumerate(toks):
                batch.token[i] = t
                batch.pos[i] = i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1
            batch.n_tokens = n
            with self._console():
                self._clear_memory()
                rc = lc.llama_decode(self._ctx, batch)
            if rc != 0:
                log = self._console.text()
                raise RuntimeError(f"{self.path}: llama_decode failed (code {rc}) on a {n}-token prompt"
                                   + (f"; its log ends with:\n{log}" if log else ""))
            ptr = lc.llama_get_logits(self._ctx)
            logits = np.ctypeslib.as_array(ptr, shape=(n, self.n_vocab)).astype(np.float32, copy=True)
        finally:
            lc.llama_batch_free(batch)
            self._wanted = set()
        hidden = None
        sublayers: dict[str, np.ndarray] = {}
        if hidden_states:
            hidden = self._stack("l_out", n, required=True)
            for key, prefix in (("attn", "attn_out"), ("mlp", "ffn_out")):
                arr = self._stack(prefix, n, required=False)
                if arr is not None:
                    sublayers[key] = arr
        self._captured = {}
        return ForwardOutput(logits=logits, hidden=hidden, sublayers=sublayers)

    def greedy_decode(self, sequences: Sequence[Sequence[int]], steps: int,
                      pick: Callable[[int, np.ndarray], int]) -> None:
        """Greedy decoding on the KV cache, one sequence after another: the prefix in one batch
        (logits of its last position only), then one token per step; ``pick(i, logits)`` chooses."""
        if self._ctx is None:
            raise RuntimeError(f"{self.path}: the llama.cpp backend is closed")
        self._wanted = set()
        for index, seq in enumerate(sequences):
            toks = [int(t) for t in seq]
            if not toks or len(toks) + steps > self.n_ctx:
                raise ContextLengthError(f"{self.path}: greedy decoding of {len(toks)} + {steps} tokens does not "
                                         f"fit the llama.cpp context (n_ctx={self.n_ctx}).")
            with self._console():
                self._clear_memory()
            try:
                row = self._decode_last(toks, 0)
                for step in range(steps):
                    chosen = int(pick(index, row))
                    if step < steps - 1:
                        row = self._decode_last([chosen], len(toks) + step)
            finally:
                with self._console():
                    self._clear_memory()

    def _decode_last(self, toks: list[int], start: int) -> np.ndarray:
        """Append ``toks`` at positions ``start..`` to the KV cache; the last position's logits."""
        lc = self._lc
        batch = lc.llama_batch_init(len(toks), 0, 1)
        try:
            for i, t in enumerate(toks):
                batch.token[i] = t
                batch.pos[i] = start + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = int(i == len(toks) - 1)
            batch.n_tokens = len(toks)
            with self._console():
                rc = lc.llama_decode(self._ctx, batch)
            if rc != 0:
                log = self._console.text()
                raise RuntimeError(f"{self.path}: llama_decode failed (code {rc}) while decoding greedily"
                                   + (f"; its log ends with:\n{log}" if log else ""))
            ptr = lc.llama_get_logits_ith(self._ctx, len(toks) - 1)
            return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).astype(np.float32, copy=True)
        finally:
            lc.llama_batch_free(batch)

    def close(self) -> None:
        lc = getattr(self, "_lc", None)
        if lc is None:
            return
        console = getattr(self, "_console", None)
        with console() if console is not None else contextlib.nullcontext():
            if getattr(self, "_ctx", None):
                lc.llama_free(self._ctx)
            self._ctx = None
            if getattr(self, "_model", None):
                lc.llama_model_free(self._model)
            self._model = None
        if console is not None:
            console.close()
            self._console = None

    def __enter__(self) -> LlamaCppBackend:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def load(path: Path, options: dict[str, Any] | None = None) -> LlamaCppBackend:
    return LlamaCppBackend(Path(path), dict(options or {}))
