"""llama.cpp backend: a GGUF file run with llama-cpp-python's low-level API.

Options (declared in ``OPTIONS``): ``n_ctx`` (longest sequence it will be given; default 4096),
``n_batch`` (llama.cpp's logical batch: tokens per ``llama_decode`` call; default n_ctx, so a prompt
is one call; a longer prompt is decoded in n_batch pieces on the KV cache), ``n_ubatch`` (the physical
micro-batch: tokens per compute step; default min(n_batch, 512); llama.cpp stitches ubatches together),
``n_threads`` (default: all cores), ``n_gpu_layers`` (default: every layer when llama-cpp-python was built with a GPU backend, else 0), ``main_gpu`` (the GPU that holds the
whole model, with llama.cpp's single-GPU split mode; ignored by a CPU-only build), ``type_k`` /
``type_v`` (KV cache type: f16 (the llama.cpp default), f32, bf16, q8_0...), ``flash_attn``
(true | false | auto; default false, auto with a quantised V cache: ``flash_default``).

Per-layer states come from llama.cpp's eval callback: ``l_out-i`` is the output of
decoder layer i (the last one before the final norm, as in ``base.py``),
``attn_out-i`` / ``ffn_out-i`` the attention and MLP sub-block outputs. A wanted tensor the callback
cannot read (a type it cannot convert) makes ``forward`` fail naming it, never a shorter result.

The GGUF header is read by :mod:`.gguf_header` (no llama_cpp import), so ``probe`` is cheap at
pytest collection time; ``read_header`` and the type tables are re-exported here.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..core import routing
from ..core.threads import default_threads
from ..errors import ContextLengthError, MissingDependencyError, ModelLoadError
from .base import (
    HIDDEN_STATES,
    INCREMENTAL_DECODE,
    SUBBLOCKS,
    TWIN_GUEST,
    WEIGHTS_TWIN,
    ForwardOutput,
    ModelInfo,
    installed_version,
    whole_run_from,
)
from .gguf_header import (
    FILE_TYPES,
    GGML_TYPES,
    GGUF_MAGIC,
    ggml_type_name,
    model_info,
    read_header,
    shard_files,
)
from .options import BackendOption, resolve_options
from .registry import BackendSpec

__all__ = ["CAPABILITIES", "FILE_TYPES", "GGML_TYPES", "GGUF_MAGIC", "NAME", "OPTIONS", "LlamaCppBackend",
           "UnreadableTensor", "fingerprint_files", "load", "probe", "read_header", "tensor_nbytes",
           "tensor_to_float32"]

NAME = "llama.cpp"
DEFAULT_N_CTX = 4096
DEFAULT_MAX_UBATCH = 512
_KV_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "bf16": 30}
OPTIONS: tuple[BackendOption, ...] = (
    BackendOption("n_ctx", "int", DEFAULT_N_CTX, "context length: the longest prompt it takes", minimum=1),
    BackendOption("n_batch", "int", None, "logical batch: tokens per llama_decode call; default n_ctx", minimum=1),
    BackendOption("n_ubatch", "int", None,
                  f"physical micro-batch: tokens per compute step; default min(n_batch, {DEFAULT_MAX_UBATCH})",
                  minimum=1),
    BackendOption("n_threads", "int", None, "CPU threads; default all cores (under xdist, each worker's share)",
                  minimum=1),
    BackendOption("n_gpu_layers", "int", None, "layers offloaded to the GPU (-1: all); default all when "
                  "llama-cpp-python was built with a GPU backend, else 0", minimum=-1),
    BackendOption("main_gpu", "int", None, "GPU index holding the whole model (single-GPU split mode)", minimum=0),
    BackendOption("flash_attn", "str", None,
                  "flash attention; default false (auto with a quantised V cache, which needs it): its F16 "
                  "accumulator is a rounding the runtime twin does not emulate, and it grows with context",
                  choices=("auto", "true", "false")),
    BackendOption("type_k", "str", None, "K cache type; default llama.cpp's (f16)", choices=tuple(_KV_TYPES)),
    BackendOption("type_v", "str", None, "V cache type; default llama.cpp's (f16)", choices=tuple(_KV_TYPES)),
)
CAPABILITIES: frozenset[str] = frozenset({HIDDEN_STATES, SUBBLOCKS, INCREMENTAL_DECODE, WEIGHTS_TWIN, TWIN_GUEST})


# The options under which llama.cpp's own tools (llama-perplexity) run a model: its defaults. A run scored against
# a llama-perplexity base file reproduces that tool's numbers, so it takes them where the user set nothing.
TOOL_DEFAULTS: dict[str, Any] = {"flash_attn": "auto"}


def flash_default(type_v: str | None) -> str:
    """Flash attention off unless asked for: llama.cpp's CPU kernel accumulates each query's weighted sum of V
    in F16, rounding it once per key, so its error grows with the context (a correct F16 file's last-layer rfn
    grows 5x past 1k positions on a tiny model, and the flash-free graph shows none of it). That is a kernel's
    rounding, not the file's; the twin T8 emulates the flash-free graph. A quantised V cache runs only with
    flash attention, so it keeps llama.cpp's own choice."""
    return "auto" if type_v not in (None, "f32", "f16", "bf16") else "false"


def library_version() -> str | None:
    return installed_version("llama-cpp-python")


def fingerprint_files(path: Path) -> list[Path]:
    """The GGUF file, or all shards of a split GGUF."""
    return shard_files(Path(path))


def probe(path: Path, options: dict[str, Any] | None = None) -> ModelInfo:
    """Architecture, layers, vocabulary, quantization from the GGUF header only; the context is the
    llama.cpp context this backend will create (``n_ctx``), which may differ from the training context."""
    info = model_info(Path(path), NAME, library_version())
    try:
        info.context_length = int(resolve_options(NAME, options)["n_ctx"])
    except (ValueError, KeyError):
        info.context_length = DEFAULT_N_CTX
    return info


# --------------------------------------------------------------------------- reading captured tensors

_F32, _F16, _BF16 = 0, 1, 30


class UnreadableTensor(Exception):
    """A tensor the eval callback cannot turn into float32; the message says why."""


def _item_size(ggml_type: int) -> int:
    if ggml_type == _F32:
        return 4
    if ggml_type in (_F16, _BF16):
        return 2
    raise UnreadableTensor(f"its ggml type {ggml_type_name(ggml_type)} ({ggml_type}) is not F32, F16 or BF16, "
                           "the float types the eval callback can read")


def tensor_nbytes(ggml_type: int, ne: Sequence[int], nb: Sequence[int]) -> int:
    """Bytes from a tensor's first element to the end of its last, as ggml_nbytes counts them for a
    (possibly strided) tensor of a float type; UnreadableTensor for any other type."""
    item = _item_size(ggml_type)
    if any(int(n) <= 0 for n in ne):
        return 0
    return item + sum((int(n) - 1) * int(b) for n, b in zip(ne, nb, strict=True))


def tensor_to_float32(raw: np.ndarray, ggml_type: int, ne: Sequence[int], nb: Sequence[int]) -> np.ndarray:
    """A captured tensor's bytes (``tensor_nbytes`` of them) as float32 ``[ne1*ne2*ne3, ne0]``.

    Strides are honoured, so a non-contiguous view (a permuted or sliced tensor) reads right; BF16
    is widened by shifting its 16 bits into the top of a float32. UnreadableTensor on a layout
    that does not fit the bytes given.
    """
    item = _item_size(ggml_type)
    ne4 = [int(n) for n in ne]
    nb4 = [int(b) for b in nb]
    rows = ne4[1] * ne4[2] * ne4[3]
    if min(ne4) <= 0:
        return np.zeros((rows, max(ne4[0], 0)), np.float32)
    if any(b % item for b in nb4):
        raise UnreadableTensor(f"its strides {nb4} are not multiples of the element size {item}")
    need = tensor_nbytes(ggml_type, ne4, nb4)
    buf = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
    if buf.size < need:
        raise UnreadableTensor(f"its layout (ne {ne4}, nb {nb4}) needs {need} bytes, {buf.size} were read")
    storage = np.uint16 if ggml_type in (_F16, _BF16) else np.float32
    view = np.ndarray(shape=tuple(reversed(ne4)), dtype=storage, buffer=buf[:need].data, offset=0,
                      strides=tuple(reversed(nb4)))
    values = np.ascontiguousarray(view).reshape(rows, ne4[0])
    if ggml_type == _F16:
        return values.view(np.float16).astype(np.float32)
    if ggml_type == _BF16:
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float32, copy=False)


# --------------------------------------------------------------------------- running

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


@contextlib.contextmanager
def quiet_console(llama_cpp: Any) -> Iterator[None]:
    """llama.cpp's console output kept out of the test output for one call outside a backend (a vocabulary read)."""
    capture = _ConsoleCapture(llama_cpp)
    try:
        with capture():
            yield
    finally:
        capture.close()


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


def context_sizes(opts: dict[str, Any]) -> tuple[int, int, int]:
    """(n_ctx, n_batch, n_ubatch) asked for, from resolved options: n_batch defaults to n_ctx (one
    llama_decode call per prompt), n_ubatch to min(n_batch, 512); a micro-batch cannot exceed its batch."""
    n_ctx = int(opts["n_ctx"])
    n_batch = int(opts["n_batch"] or n_ctx)
    n_ubatch = int(opts["n_ubatch"] or min(n_batch, DEFAULT_MAX_UBATCH))
    if n_ubatch > n_batch:
        raise ModelLoadError(f"llama.cpp backend: n_ubatch ({n_ubatch}) cannot be larger than n_batch ({n_batch}); "
                             "n_ubatch is the micro-batch each n_batch batch is computed in.")
    return n_ctx, n_batch, n_ubatch


class LlamaCppBackend:
    """A GGUF model in llama.cpp, with logits for every position and per-layer states."""

    def __init__(self, path: Path, options: dict[str, Any]) -> None:
        self.path = Path(path)
        try:
            self.options = opts = resolve_options(NAME, options)
        except ValueError as exc:
            raise ModelLoadError(f"{self.path}: {exc}") from None
        n_ctx, n_batch, n_ubatch = context_sizes(opts)
        try:
            import llama_cpp
        except ImportError as exc:
            raise MissingDependencyError("llama.cpp", "llama-cpp-python", "llama-cpp") from exc
        self._lc = lc = llama_cpp
        self.info = probe(self.path, options)  # readable errors for missing / damaged files first
        self.info.library_version = library_version()
        self._model = None
        self._ctx = None
        self._console = _ConsoleCapture(lc)
        self.n_ctx = n_ctx
        n_threads = int(opts["n_threads"] or default_threads())
        self._ggml = _ggml_lib(lc)
        self._wanted: set[str] = set()
        self._captured: dict[str, list[np.ndarray]] = {}
        # a layer's output read straight into its [T, H] row of the [L, T, H] array ``forward`` hands back (one copy,
        # not one per ubatch, then their join, then the stack of the layers), and the rows read so far
        self._slots: dict[str, np.ndarray] = {}
        self._filled: dict[str, int] = {}
        self._router_biases: dict[int, np.ndarray] | None = None  # a biased router's bias, by layer
        self._unreadable: dict[str, str] = {}
        self._keep: set[tuple[int, ...]] = set()  # prefixes whose KV state a run keeps (``keep_prefixes``)
        self._kept: dict[tuple[int, ...], bytes] = {}
        self._cb = lc.ggml_backend_sched_eval_callback(self._eval_callback)

        with self._console():
            lc.llama_backend_init()
            mparams = lc.llama_model_default_params()
            offload = opts["n_gpu_layers"]
            if offload is None:  # the GPU when this build has one, else the CPU
                offload = -1 if bool(lc.llama_supports_gpu_offload()) else 0
            mparams.n_gpu_layers = int(offload)
            if opts["main_gpu"] is not None:
                # the whole model on one GPU, chosen by index rather than by CUDA_VISIBLE_DEVICES
                mparams.main_gpu = int(opts["main_gpu"])
                mparams.split_mode = lc.LLAMA_SPLIT_MODE_NONE
            self._model = lc.llama_model_load_from_file(str(self.path).encode(), mparams)
        self.info.extra["device"] = "cpu" if not offload else (
            f"gpu {opts['main_gpu'] or 0} ({'all' if offload < 0 else offload} layers offloaded)")
        if not self._model:
            log = self._console.text()
            raise ModelLoadError(f"{self.path}: llama.cpp could not load it"
                                 + (f"; its log ends with:\n{log}" if log else "."))
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_ubatch
        cparams.n_seq_max = 1
        cparams.n_threads = n_threads
        cparams.n_threads_batch = n_threads
        _set_field(cparams, "n_outputs_max", 0)
        _set_field(cparams, "n_outputs_max_per_seq", 0)
        cparams.cb_eval = self._cb
        cparams.cb_eval_user_data = None
        cparams.no_perf = True
        for key in ("type_k", "type_v"):
            if opts[key] is not None:
                setattr(cparams, key, _KV_TYPES[opts[key]])
        flash = opts["flash_attn"] or flash_default(opts["type_v"])
        if flash != "auto":
            on = flash == "true"
            _set_field(cparams, "flash_attn_type", 1 if on else 0)
            _set_field(cparams, "flash_attn", on)
        with self._console():
            self._ctx = lc.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            log = self._console.text()
            self.close()
            raise ModelLoadError(f"{self.path}: llama.cpp could not create a context with n_ctx={n_ctx}, "
                                 f"n_batch={n_batch}, n_ubatch={n_ubatch}"
                                 + (f"; its log ends with:\n{log}" if log else "."))
        self._vocab = lc.llama_model_get_vocab(self._model)
        self.n_vocab = int(lc.llama_vocab_n_tokens(self._vocab))
        self.n_layer = int(lc.llama_model_n_layer(self._model))
        self.n_embd = int(lc.llama_model_n_embd(self._model))
        # llama.cpp may round n_ctx up and clamps n_batch to it; what it settled on is what counts
        self.n_ctx = int(lc.llama_n_ctx(self._ctx))
        self.n_batch = int(lc.llama_n_batch(self._ctx))
        self.n_ubatch = int(lc.llama_n_ubatch(self._ctx))
        self.info.num_layers = self.n_layer
        self.info.vocab_size = self.n_vocab
        self.info.hidden_size = self.n_embd
        self.info.extra.update(n_ctx=self.n_ctx, n_batch=self.n_batch, n_ubatch=self.n_ubatch)
        arch = self._meta("general.architecture")
        used = self._meta(f"{arch}.expert_used_count") if arch else None
        # a mixture of experts: its router logits (``ffn_moe_logits-i``) say which experts each token went to
        self.experts_used = int(used) if used and used.isdigit() and int(used) > 0 else None

    def _meta(self, key: str) -> str | None:
        """A GGUF metadata value as llama.cpp read it (None when the file has no such key)."""
        buf = ctypes.create_string_buffer(256)
        n = self._lc.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace") if n >= 0 else None

    def _router(self, n_tokens: int) -> np.ndarray | None:
        """``[L, T, E]`` router logits of the layers that have experts (NaN rows for those that do not), as the
        experts were chosen by. A router with a bias (gpt-oss) chooses by its biased logits: llama.cpp's MoE
        graph adds ``ffn_gate_inp.bias`` to ``ffn_moe_logits`` and names the sum ``ffn_moe_logits_biased``, unless
        the gating uses the logits themselves as probabilities, which renames that sum ``ffn_moe_probs``. So the
        biased logits are read where the graph names them, else the file's bias is added here; without it every
        comparison with A's router would be a bias off."""
        out = {}
        for i in range(self.n_layer):
            if c := self._captured.get(f"ffn_moe_logits_biased-{i}"):
                out[i] = np.concatenate(c, axis=0)
            elif c := self._captured.get(f"ffn_moe_logits-{i}"):
                bias = self._router_bias(i)
                out[i] = np.concatenate(c, axis=0) + (bias if bias is not None else 0.0)
        return routing.stack_layers(out, self.n_layer, n_tokens)

    def _router_bias(self, layer: int) -> np.ndarray | None:
        """The file's ``blk.N.ffn_gate_inp.bias`` (float32 ``[E]``), read once; None when it has none."""
        if self._router_biases is None:
            from . import tensors

            self._router_biases = {}
            w = tensors.GGUFWeights(self.path)
            try:
                for i in range(self.n_layer):
                    t = w.tensors.get(f"blk.{i}.ffn_gate_inp.bias")
                    if t is not None:
                        self._router_biases[i] = w.read(t, 0, t.rows).reshape(-1).astype(np.float32)
            finally:
                w.close()
        return self._router_biases.get(layer)

    # ------------------------------------------------------------------ eval callback
    def _eval_callback(self, tensor: int, ask: bool, _user: Any) -> bool:
        """Copy each wanted tensor out as float32; what cannot be read is recorded, never dropped silently
        (an exception must not cross into C, so failures are kept for ``forward`` to raise)."""
        name = ""
        try:
            raw_name = self._ggml.ggml_get_name(tensor)
            name = raw_name.decode("utf-8", errors="replace") if raw_name else ""
            if ask:
                return name in self._wanted
            if name not in self._wanted:
                return True
            head = _TensorHead.from_address(tensor)
            ggml_type, ne, nb = int(head.type), list(head.ne), list(head.nb)
            need = tensor_nbytes(ggml_type, ne, nb)
            have = int(self._ggml.ggml_nbytes(tensor))
            if need != have:  # reading more than ggml_nbytes would trip a ggml assert and abort
                raise UnreadableTensor(f"its layout (ne {ne}, nb {nb}) spans {need} bytes but ggml counts {have}")
            if self._read_into_slot(name, tensor, ggml_type, ne, nb, need):
                return True
            raw = np.empty(need, dtype=np.uint8)
            if need:
                self._ggml.ggml_backend_tensor_get(tensor, raw.ctypes.data, 0, need)
            self._captured.setdefault(name, []).append(tensor_to_float32(raw, ggml_type, ne, nb))
        except UnreadableTensor as exc:
            self._unreadable.setdefault(name, str(exc))
        except Exception as exc:  # noqa: BLE001 - never let an exception cross into C
            self._unreadable.setdefault(name or "?", f"{type(exc).__name__}: {exc}")
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
        raise ModelLoadError(f"{self.path}: llama_tokenize failed on a {len(data)}-byte text")

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

    _LAYER_OUTPUTS = ("l_out", "attn_out", "ffn_out")

    def _set_slots(self, n_tokens: int) -> dict[str, np.ndarray]:
        """The ``[L, T, H]`` arrays a forward with hidden states fills, one per layer output it captures (pages
        are only taken as rows are written: an architecture without ``attn_out`` costs nothing)."""
        arrays = {p: np.empty((self.n_layer, n_tokens, self.n_embd), np.float32) for p in self._LAYER_OUTPUTS}
        self._slots = {f"{p}-{i}": arr[i] for p, arr in arrays.items() for i in range(self.n_layer)}
        self._filled = {}
        return arrays

    def _read_into_slot(self, name: str, tensor: int, ggml_type: int, ne: list[int], nb: list[int],
                        need: int) -> bool:
        """A contiguous F32 layer output copied straight into the next rows of its slot; False (the caller keeps
        it as a chunk) for any other layout, or rows beyond the slot, after moving what the slot holds to the
        chunks, so that the layer's rows stay in order."""
        slot = self._slots.get(name)
        if slot is None:
            return False
        done = self._filled.get(name, 0)
        rows = int(ne[1])
        if (ggml_type == _F32 and int(ne[0]) == slot.shape[1] and int(ne[2]) == int(ne[3]) == 1 and int(nb[0]) == 4
                and int(nb[1]) == 4 * int(ne[0]) and need == 4 * rows * int(ne[0]) and done + rows <= slot.shape[0]):
            if need:
                self._ggml.ggml_backend_tensor_get(tensor, slot[done].ctypes.data, 0, need)
            self._filled[name] = done + rows
            return True
        del self._slots[name]
        if done:
            self._captured.setdefault(name, []).append(slot[:done].copy())
        self._filled.pop(name, None)
        return False

    def _stack(self, prefix: str, n_tokens: int, required: bool, arrays: dict[str, np.ndarray]) -> np.ndarray | None:
        """``[L, T, H]`` of one layer output: its array as the slots filled it, each layer that came in chunks
        joined into its row."""
        out = arrays[prefix]
        for i in range(self.n_layer):
            name = f"{prefix}-{i}"
            chunks = self._captured.get(name)
            if chunks:
                arr = np.concatenate(chunks, axis=0) if len(chunks) > 1 else chunks[0]
            elif name in self._filled:
                arr = out[i, : self._filled[name]]
            else:
                if required:
                    raise ModelLoadError(
                        f"{self.path}: llama.cpp's graph has no tensor named '{prefix}-{i}' for this "
                        f"architecture ({self.info.architecture}); per-layer states are not available. "
                        "Run it with --convdiff-no-layers.")
                return None
            if arr.shape != (n_tokens, self.n_embd):
                if required:
                    raise ModelLoadError(
                        f"{self.path}: '{prefix}-{i}' came back with shape {arr.shape}, expected "
                        f"({n_tokens}, {self.n_embd}).")
                return None
            if chunks:
                out[i] = arr
        return out

    def _check_open(self) -> None:
        if self._ctx is None:
            raise ModelLoadError(f"{self.path}: the llama.cpp backend is closed")

    def _check_ids(self, toks: list[int]) -> None:
        bad = [t for t in toks if not 0 <= t < self.n_vocab]
        if bad:
            raise ModelLoadError(f"{self.path}: token id {bad[0]} is outside the vocabulary (0..{self.n_vocab - 1})")

    def _decode(self, toks: list[int], start: int, all_logits: bool, what: str) -> np.ndarray:
        """Append ``toks`` at positions ``start..`` to the KV cache, at most n_batch tokens per
        llama_decode call; logits ``[len(toks), V]`` of every position, or ``[V]`` of the last."""
        lc = self._lc
        rows: list[np.ndarray] = []
        batch = lc.llama_batch_init(min(len(toks), self.n_batch), 0, 1)
        try:
            for first in range(0, len(toks), self.n_batch):
                piece = toks[first:first + self.n_batch]
                last_piece = first + len(piece) == len(toks)
                for i, t in enumerate(piece):
                    batch.token[i] = t
                    batch.pos[i] = start + first + i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = int(all_logits or (last_piece and i == len(piece) - 1))
                batch.n_tokens = len(piece)
                with self._console():
                    rc = lc.llama_decode(self._ctx, batch)
                if rc != 0:
                    raise self._decode_error(rc, what)
                if all_logits:
                    ptr = lc.llama_get_logits(self._ctx)
                    rows.append(np.ctypeslib.as_array(ptr, shape=(len(piece), self.n_vocab)).astype(np.float32))
                elif last_piece:
                    ptr = lc.llama_get_logits_ith(self._ctx, len(piece) - 1)
                    rows.append(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).astype(np.float32))
        finally:
            lc.llama_batch_free(batch)
        if not all_logits:
            return rows[-1]
        return np.concatenate(rows, axis=0) if len(rows) > 1 else rows[0]

    def _decode_error(self, rc: int, what: str) -> Exception:
        """llama_decode's return codes as readable errors (1: no room in the KV cache)."""
        log = self._console.text()
        tail = f"; its log ends with:\n{log}" if log else ""
        if rc == 1:
            return ContextLengthError(f"{self.path}: llama.cpp found no room in its KV cache (n_ctx={self.n_ctx}) "
                                      f"{what}; pass a larger n_ctx backend option{tail}")
        return ModelLoadError(f"{self.path}: llama_decode failed (code {rc}) {what}{tail}")

    def _raise_unreadable(self) -> None:
        if self._unreadable:
            name, why = next(iter(sorted(self._unreadable.items())))
            more = f" (and {len(self._unreadable) - 1} more)" if len(self._unreadable) > 1 else ""
            self._unreadable = {}
            raise ModelLoadError(
                f"{self.path}: cannot capture llama.cpp's tensor '{name}'{more}: {why}. Its per-layer states "
                "would be incomplete; run it with --convdiff-no-layers to compare logits only.")

    def forward(self, tokens: Sequence[int], *, hidden_states: bool = True,
                inject: dict[int, np.ndarray] | None = None) -> ForwardOutput:
        if inject:
            raise NotImplementedError("the llama.cpp backend cannot inject hidden states")
        self._check_open()
        toks = [int(t) for t in tokens]
        n = len(toks)
        if n > self.n_ctx:
            raise ContextLengthError(
                f"{self.path}: a prompt of {n} tokens is longer than the llama.cpp context "
                f"(n_ctx={self.n_ctx}); pass a larger n_ctx backend option or shorten it "
                "(--convdiff-max-tokens).")
        self._check_ids(toks)
        if n == 0:
            hid = np.zeros((self.n_layer, 0, self.n_embd), np.float32) if hidden_states else None
            return ForwardOutput(logits=np.zeros((0, self.n_vocab), np.float32), hidden=hid)

        self._wanted = ({f"{p}-{i}" for p in ("l_out", "attn_out", "ffn_out") for i in range(self.n_layer)}
                        if hidden_states else set())
        if hidden_states and self.experts_used:
            self._wanted |= {f"{p}-{i}" for p in ("ffn_moe_logits", "ffn_moe_logits_biased")
                             for i in range(self.n_layer)}
        self._captured = {}
        self._unreadable = {}
        arrays = self._set_slots(n) if hidden_states else {}
        try:
            with self._console():
                self._clear_memory()
            logits = self._decode(toks, 0, True, f"on a {n}-token prompt")
            self._keep_states(toks)
        finally:
            self._wanted = set()
            self._slots = {}
        hidden = router = None
        sublayers: dict[str, np.ndarray] = {}
        try:
            self._raise_unreadable()
            if hidden_states:
                hidden = self._stack("l_out", n, True, arrays)
                for key, prefix in (("attn", "attn_out"), ("mlp", "ffn_out")):
                    arr = self._stack(prefix, n, False, arrays)
                    if arr is not None:
                        sublayers[key] = arr
                router = self._router(n)
        finally:
            self._captured = {}
            self._filled = {}
        return ForwardOutput(logits=logits, hidden=hidden, sublayers=sublayers, router=router)

    # ------------------------------------------------------------------ kept prefix states
    _STATE_API = ("llama_get_memory", "llama_memory_seq_rm", "llama_memory_seq_pos_min", "llama_memory_seq_pos_max",
                  "llama_state_seq_get_size", "llama_state_seq_get_data", "llama_state_seq_set_data")

    def keep_prefixes(self, prefixes: Sequence[Sequence[int]]) -> None:
        """Runs from now on keep the KV cache after any of these prefixes they pass (``base.PrefixKeeper``). A
        llama-cpp-python without the sequence-state API keeps nothing: ``forward_from`` then runs from scratch."""
        if all(hasattr(self._lc, name) for name in self._STATE_API):
            self._keep = {tuple(int(t) for t in p) for p in prefixes if len(p)}

    def _keep_states(self, toks: list[int]) -> None:
        """Right after a forward over ``toks``: the memory cut to each wanted prefix it starts with (longest
        first, as each cut shortens it), serialised. Nothing is kept where the memory cannot be cut back to a
        prefix (a recurrent state, as in a hybrid like LFM2, holds only its last position) or cannot be read:
        ``forward_from`` then runs from scratch."""
        if not self._keep:
            return
        lc = self._lc
        for prefix in sorted((p for p in self._keep if len(p) <= len(toks) and tuple(toks[:len(p)]) == p),
                             key=len, reverse=True):
            self._keep.discard(prefix)
            try:
                with self._console():
                    mem = lc.llama_get_memory(self._ctx)
                    if not lc.llama_memory_seq_rm(mem, 0, len(prefix), -1):
                        return  # and the memory still holds all of toks: no shorter prefix can be cut either
                    if not self._holds(mem, len(prefix)):
                        return
                    size = int(lc.llama_state_seq_get_size(self._ctx, 0))
                    buf = (ctypes.c_ubyte * size)()
                    got = int(lc.llama_state_seq_get_data(self._ctx, buf, size, 0))
            except Exception:  # noqa: BLE001 - only a saving lost: forward_from runs from scratch
                return
            if 0 < got <= size:
                self._kept[prefix] = bytes(buf)[:got]

    def _holds(self, mem: Any, n: int) -> bool:
        """Whether the memory holds sequence 0 at exactly positions 0..n-1: a sliding-window cache drops the
        positions behind its window as a prompt runs on, and a state without them is not that prefix's."""
        lc = self._lc
        return int(lc.llama_memory_seq_pos_min(mem, 0)) == 0 and int(lc.llama_memory_seq_pos_max(mem, 0)) == n - 1

    def forward_from(self, tokens: Sequence[int], start: int) -> np.ndarray:
        """Logits of positions ``start..`` of a run over ``tokens`` (``base.PrefixKeeper``): on the KV cache kept
        after ``tokens[:start]`` when a run kept it (then dropped), else a whole forward, cut."""
        toks = [int(t) for t in tokens]
        state = self._kept.pop(tuple(toks[:start]), None) if 0 < start < len(toks) else None
        if state is not None and len(toks) <= self.n_ctx and self._restore(state, start):
            self._check_ids(toks)
            return self._decode(toks[start:], start, True, f"after a kept {start}-token prefix")
        return whole_run_from(self, toks, start)  # its errors (context, ids) are forward's

    def _restore(self, state: bytes, n: int) -> bool:
        """A kept state back in the emptied memory, holding exactly the prefix's n positions as it was kept."""
        self._check_open()
        lc = self._lc
        self._wanted = set()
        with self._console():
            self._clear_memory()
            buf = (ctypes.c_ubyte * len(state)).from_buffer_copy(state)
            restored = int(lc.llama_state_seq_set_data(self._ctx, buf, len(state), 0))
            return restored == len(state) and self._holds(lc.llama_get_memory(self._ctx), n)

    def greedy_decode(self, sequences: Sequence[Sequence[int]], steps: int,
                      pick: Callable[[int, np.ndarray], int]) -> None:
        """Greedy decoding on the KV cache, one sequence after another: the prefix (in n_batch pieces,
        logits of its last position only), then one token per step; ``pick(i, logits)`` chooses."""
        self._check_open()
        self._wanted = set()
        for index, seq in enumerate(sequences):
            toks = [int(t) for t in seq]
            if not toks or len(toks) + steps > self.n_ctx:
                raise ContextLengthError(f"{self.path}: greedy decoding of {len(toks)} + {steps} tokens does not "
                                         f"fit the llama.cpp context (n_ctx={self.n_ctx}).")
            self._check_ids(toks)
            with self._console():
                self._clear_memory()
            try:
                row = self._decode(toks, 0, False, "while decoding greedily")
                for step in range(steps):
                    chosen = int(pick(index, row))
                    if step < steps - 1:
                        self._check_ids([chosen])
                        row = self._decode([chosen], len(toks) + step, False, "while decoding greedily")
            finally:
                with self._console():
                    self._clear_memory()

    def close(self) -> None:
        self._kept = {}
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


def _detect(path: Path) -> bool:
    """A file that starts with the GGUF magic (whatever its name)."""
    if not path.is_file():
        return False
    with path.open("rb") as fh:
        return fh.read(4) == GGUF_MAGIC


def open_weights(path: Path, options: dict[str, Any], role: str) -> Any:  # noqa: ARG001 - same for every option
    from . import tensors

    return tensors.GGUFWeights(path)


def eog_ids(path: Path) -> dict[str, Any]:
    """The end-of-generation set of llama.cpp's runtime: the file's EOS, EOT and EOM ids, and the tokens llama.cpp
    adds by their text (``<|im_end|>``, ``<end_of_turn>``, ...), read from llama.cpp itself
    (``llama_vocab_is_eog`` over a vocabulary-only load: no weights). ``{"value": [ids]}``, or
    ``{"value": None, "source": why}`` without llama-cpp-python."""
    try:
        import llama_cpp as lc
    except ImportError:
        return {"value": None, "source": "llama-cpp-python is not installed: llama.cpp's end-of-generation set "
                                         "cannot be read (pip install 'pytest-convdiff[llama-cpp]')"}
    with quiet_console(lc):
        lc.llama_backend_init()
        params = lc.llama_model_default_params()
        params.vocab_only = True
        model = lc.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        return {"value": None, "source": "llama.cpp could not load the file's vocabulary"}
    try:
        vocab = lc.llama_model_get_vocab(model)
        ids = [i for i in range(int(lc.llama_vocab_n_tokens(vocab))) if lc.llama_vocab_is_eog(vocab, i)]
    finally:
        lc.llama_model_free(model)
    return {"value": ids, "source": "llama.cpp's llama_vocab_is_eog (vocabulary-only load)"}


def read_config(path: Path, options: dict[str, Any]) -> dict[str, Any]:  # noqa: ARG001 - same for every option
    """The GGUF's metadata for the config check, and the end-of-generation set llama.cpp gives it."""
    from .gguf_config import read_gguf

    side = read_gguf(Path(path))
    side["eog"] = eog_ids(Path(path))  # the ids that end generation in llama.cpp's runtime (config[eog])
    return side


BACKEND = BackendSpec(NAME, __name__, aliases=("llamacpp", "llama-cpp", "llama_cpp", "gguf"), detect=_detect,
                      priority=10, gpu_option="main_gpu", gpu_value=lambda i: i, open_weights=open_weights,
                      read_config=read_config)
