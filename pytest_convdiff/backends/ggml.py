"""llama.cpp's own quantiser, called from Python: ``ggml_quantize_chunk`` and each type's ``to_float``.

What a correct llama.cpp conversion of a tensor gives is not a number to look up in a table: it is
what llama.cpp's quantiser makes of the reference's values. The llama-cpp-python wheel ships that
quantiser in ``llama_cpp/lib/libggml-base`` (the same code ``llama-quantize`` runs); this module opens
that library with ctypes and exposes three calls on numpy arrays, one tensor chunk at a time:

- ``quantize(type, rows, imatrix=None)``: float32 rows -> the type's bytes, as llama.cpp stores them;
- ``dequantize(type, raw, cols)``: those bytes -> float32 (the type's own ``to_float``);
- ``requires_imatrix(type)``: whether llama.cpp refuses to make the type without an importance matrix.

No pytest, no torch. ``available()`` says why the library cannot be used (llama-cpp-python missing, or
an older wheel without these exports), so callers can fall back and say so.
"""

from __future__ import annotations

import ctypes
import importlib.util
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .gguf_header import GGML_TYPES

__all__ = ["GGMLUnavailable", "available", "block_bytes", "dequantize", "f16_round", "f16_widen", "library_path",
           "quantize", "requires_imatrix", "type_id"]

_TYPE_IDS: dict[str, int] = {name: tid for tid, (name, _, _) in GGML_TYPES.items()}
_LIB_NAMES = ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll")
_CPU_NAMES = ("libggml-cpu.so", "libggml-cpu.dylib", "ggml-cpu.dll")


class GGMLUnavailable(Exception):
    """llama.cpp's quantiser cannot be called here; the message says why and what to install."""


class _Traits(ctypes.Structure):
    # struct ggml_type_traits (ggml.h): the leading fields, in order; only to_float is used
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None
_initialised: set[int] = set()


def library_path() -> Path | None:
    """Where llama-cpp-python keeps libggml-base, or None when it is not installed."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        for name in _LIB_NAMES:
            p = Path(root) / "lib" / name
            if p.is_file():
                return p
    return None


def _load() -> ctypes.CDLL:
    global _lib, _error
    with _lock:
        if _lib is not None:
            return _lib
        if _error is not None:
            raise GGMLUnavailable(_error)
        path = library_path()
        if path is None:
            _error = ("llama.cpp's quantiser is not installed: it comes with llama-cpp-python "
                      "(pip install 'pytest-convdiff[gguf]' or pip install llama-cpp-python)")
            raise GGMLUnavailable(_error)
        try:
            lib = ctypes.CDLL(str(path), mode=getattr(ctypes, "RTLD_GLOBAL", 0))
            lib.ggml_quantize_chunk.restype = ctypes.c_size_t
            lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_void_p,
                                                ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                                ctypes.POINTER(ctypes.c_float)]
            lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
            lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
            lib.ggml_quantize_init.restype = None
            lib.ggml_quantize_init.argtypes = [ctypes.c_int]
            lib.ggml_row_size.restype = ctypes.c_size_t
            lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
            lib.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
            lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
        except (OSError, AttributeError) as exc:
            _error = (f"{path} does not export llama.cpp's quantiser ({exc}); a llama-cpp-python wheel of 0.3 or "
                      "newer does")
            raise GGMLUnavailable(_error) from None
        _lib = lib
        return lib


def available() -> str | None:
    """None when the quantiser can be called, else why not."""
    try:
        _load()
    except GGMLUnavailable as exc:
        return str(exc)
    return None


def type_id(name: str) -> int:
    """ggml's id of a type name (``"Q4_K"`` -> 12); GGMLUnavailable for a type this module does not know."""
    try:
        return _TYPE_IDS[name.upper()]
    except KeyError:
        raise GGMLUnavailable(f"llama.cpp tensor type {name!r} is not known here") from None


def block_bytes(name: str) -> tuple[int, int]:
    """(values per block, bytes per block) of a type."""
    _, block, nbytes = GGML_TYPES[type_id(name)]
    return block, nbytes


def requires_imatrix(name: str) -> bool:
    """Whether llama.cpp refuses to quantise to this type without an importance matrix."""
    return bool(_load().ggml_quantize_requires_imatrix(type_id(name)))


def _init(lib: ctypes.CDLL, tid: int) -> None:
    if tid not in _initialised:  # the IQ types build their grids once; ggml_quantize_init is idempotent
        with _lock:
            lib.ggml_quantize_init(tid)
            _initialised.add(tid)


def quantize(name: str, rows: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Rows of float32 values -> the bytes llama.cpp stores for them as type ``name``, shape (rows, row bytes).

    ``imatrix``: one importance weight per column (llama-quantize passes an importance matrix's mean
    squared activations); None quantises as llama-quantize does without one."""
    lib = _load()
    tid = type_id(name)
    src = np.ascontiguousarray(rows, dtype=np.float32)
    if src.ndim != 2:
        raise ValueError(f"quantize wants 2-D rows, got shape {src.shape}")
    nrows, cols = src.shape
    block, _ = block_bytes(name)
    if cols % block:
        raise GGMLUnavailable(f"rows of {cols} values do not split into {name}'s blocks of {block}")
    row_bytes = int(lib.ggml_row_size(tid, cols))
    dst = np.empty((nrows, row_bytes), dtype=np.uint8)
    imx = None
    if imatrix is not None:
        imx_arr = np.ascontiguousarray(imatrix, dtype=np.float32)
        if imx_arr.shape != (cols,):
            raise ValueError(f"an importance matrix for rows of {cols} values needs {cols} weights, got {imx_arr.shape}")
        imx = imx_arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    elif lib.ggml_quantize_requires_imatrix(tid):
        raise GGMLUnavailable(f"llama.cpp makes {name} only with an importance matrix")
    _init(lib, tid)

    def part(r0: int, r1: int) -> int:  # ctypes lets go of the GIL: parts run on all cores
        return int(lib.ggml_quantize_chunk(tid, src[r0:r1].ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                           dst[r0:r1].ctypes.data_as(ctypes.c_void_p), 0, r1 - r0, cols, imx))

    workers = min(_threads(), max(1, nrows * cols // _MIN_PER_THREAD))
    if workers <= 1:
        written = part(0, nrows)
    else:
        step = -(-nrows // workers)
        bounds = [(r, min(nrows, r + step)) for r in range(0, nrows, step)]
        written = sum(_pool(workers).map(lambda rr: part(*rr), bounds))
    if written != dst.nbytes:
        raise GGMLUnavailable(f"ggml_quantize_chunk wrote {written} bytes for {name}, {dst.nbytes} expected")
    return dst


_MIN_PER_THREAD = 1 << 16  # values: below this a thread costs more than it saves
_pools: dict[int, ThreadPoolExecutor] = {}


def _threads() -> int:
    from ..core.threads import default_threads

    return default_threads()


def _pool(n: int) -> ThreadPoolExecutor:
    with _lock:
        if n not in _pools:
            _pools[n] = ThreadPoolExecutor(n, thread_name_prefix="convdiff-quantize")
        return _pools[n]


def dequantize(name: str, raw: np.ndarray, cols: int) -> np.ndarray:
    """A type's bytes (rows of them) -> float32 values, shape (rows, cols), with the type's own ``to_float``."""
    lib = _load()
    tid = type_id(name)
    data = np.ascontiguousarray(raw, dtype=np.uint8)
    nrows = data.shape[0] if data.ndim == 2 else 1
    out = np.empty((nrows, cols), dtype=np.float32)
    traits = lib.ggml_get_type_traits(tid).contents
    if not traits.to_float:
        raise GGMLUnavailable(f"llama.cpp has no to_float for {name}")
    fn = _TO_FLOAT(traits.to_float)
    fn(data.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), nrows * cols)
    return out


# --------------------------------------------------------------------------- float16 conversions
# numpy converts float32 <-> float16 one value at a time (about 200 M values/s here); the twin writes every value of A
# through the converter's F16 intermediate, which then cost a tenth of the quantiser's own time. ggml's CPU library
# converts eight or sixteen at a time with the processor's instructions. It is used only after it gave numpy's
# result bit for bit on a probe of every kind of value (normal, subnormal, overflowing, signed zeros, infinities,
# NaN, odd lengths): a build whose conversion differs, or no such library, leaves numpy's.

_cpu_state: list[ctypes.CDLL | None] = []  # [] not tried yet; [None] not usable; [lib] usable


def _probe_values() -> np.ndarray:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(4099) * np.exp(rng.uniform(-26.0, 13.0, 4099))).astype(np.float32)
    x[:9] = [0.0, -0.0, np.inf, -np.inf, np.nan, 65504.0, 65519.0, 65520.0, 2.0 ** -25]
    return x


def _cpu() -> ctypes.CDLL | None:
    if _cpu_state:
        return _cpu_state[0]
    lib: ctypes.CDLL | None = None
    try:
        base = library_path()
        path = next((base.parent / n for n in _CPU_NAMES if (base.parent / n).is_file()), None) if base else None
        if path is not None:
            lib = ctypes.CDLL(str(path))
            for fn in (lib.ggml_cpu_fp32_to_fp16, lib.ggml_cpu_fp16_to_fp32):
                fn.restype = None
                fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
            lib.ggml_cpu_init.restype = None
            lib.ggml_cpu_init()  # the scalar tails read a table this fills
    except (OSError, AttributeError):
        lib = None
    if lib is not None and not _agrees(lib):
        lib = None
    with _lock:
        if not _cpu_state:
            _cpu_state.append(lib)
    return _cpu_state[0]


def _agrees(lib: Any) -> bool:
    """Whether ``lib``'s two conversions give numpy's results on the probe, bit for bit (NaN as some NaN)."""
    x = _probe_values()
    with np.errstate(over="ignore"):
        want16 = x.astype(np.float16)
    got16, got32 = _to_f16(lib, x), np.empty(x.shape, np.float32)
    lib.ggml_cpu_fp16_to_fp32(got16.ctypes.data, got32.ctypes.data, got16.size)
    num = ~np.isnan(want16)
    return (np.array_equal(want16.view(np.uint16)[num], got16.view(np.uint16)[num])
            and bool(np.isnan(got16[~num]).all())
            and np.array_equal(want16.astype(np.float32).view(np.uint32)[num], got32.view(np.uint32)[num])
            and bool(np.isnan(got32[~num]).all()))


def _to_f16(lib: Any, x: np.ndarray) -> np.ndarray:
    out = np.empty(x.shape, np.float16)
    lib.ggml_cpu_fp32_to_fp16(x.ctypes.data, out.ctypes.data, x.size)
    return out


def f16_round(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to float16 (to nearest, ties to even; beyond 65504 infinite) and back, as float32:
    ``x.astype(np.float16).astype(np.float32)``, by ggml's vector conversion where it reproduces numpy's."""
    src = np.ascontiguousarray(x, dtype=np.float32)
    lib = _cpu()
    if lib is None or src.size < 64:
        with np.errstate(over="ignore"):
            return src.astype(np.float16).astype(np.float32)
    out = np.empty(src.shape, np.float32)
    flat_in, flat_out = src.reshape(-1), out.reshape(-1)
    half = np.empty(min(src.size, _F16_PIECE), np.float16)  # a piece at a time: the halves stay in the cache
    for i in range(0, src.size, _F16_PIECE):
        n = min(_F16_PIECE, src.size - i)
        lib.ggml_cpu_fp32_to_fp16(flat_in[i:].ctypes.data, half.ctypes.data, n)
        lib.ggml_cpu_fp16_to_fp32(half.ctypes.data, flat_out[i:].ctypes.data, n)
    return out


_F16_PIECE = 1 << 16


def f16_widen(x: np.ndarray) -> np.ndarray:
    """float16 values as float32 (``x.astype(np.float32)``), by ggml's vector conversion where it reproduces
    numpy's."""
    src = np.ascontiguousarray(x, dtype=np.float16)
    lib = _cpu()
    if lib is None or src.size < 64:
        return src.astype(np.float32)
    out = np.empty(src.shape, np.float32)
    lib.ggml_cpu_fp16_to_fp32(src.ctypes.data, out.ctypes.data, src.size)
    return out


if __name__ == "__main__":  # pragma: no cover - a quick check by hand: python -m pytest_convdiff.backends.ggml
    why = available()
    print(why or f"llama.cpp's quantiser: {library_path()}", file=sys.stderr if why else sys.stdout)
