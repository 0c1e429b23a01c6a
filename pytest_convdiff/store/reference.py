"""Golden references: model A's outputs saved to one file, so A never has to be loaded again.

``save_reference`` writes every array of a run (token ids, logits, hidden states,
sub-block outputs; or, for a run stored compact, the default, what the metrics need of them:
``core.compact``, tens of MB instead of GBs) into one standard safetensors file whose ``__metadata__`` holds
the run's meta (model info, pieces, tokenizer cases, causality probe), the corpus
digest, the model fingerprint, library versions and a SHA-256 of the tensor data.

A reference is a stored entry, not a backend: ``is_reference`` recognises one by its
content (a safetensors header carrying the convdiff key), whatever the file is called,
so ``--model-a PATH`` takes whatever ``--convdiff-save-reference PATH`` wrote.
``open_reference_run`` serves it as a ``ModelRun`` through ``ReferenceEntry``, one
implementation of ``store.entry.Entry``: arrays are memory-mapped, one at a time,
never all loaded. ``reference_info`` reads the header only (collection stays cheap).

The file is written and read by this module's own small safetensors codec rather
than ``safetensors.numpy``: ``save_file`` builds the whole file in memory (hidden
states of a 7B model over the corpus are GBs) and ``get_tensor`` copies a tensor on
every access, while the format itself is a JSON header and raw little-endian bytes.
So a reference needs no optional dependency, and the files are ordinary safetensors
(``safetensors.numpy.load_file`` reads them; the tests check both directions).

Bonus: ``compare_llamacpp_bins`` checks a model against the files llama.cpp's
model-conversion scripts write (``data/pytorch-<name>.bin``: float32 logits of the
last position; ``data/pytorch-<name>-tokens.bin``: int32 token ids).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..core.model_info import ModelInfo
from ..errors import ModelLoadError
from .atomic import atomic_open
from .run import ModelRun, RunSource

if TYPE_CHECKING:
    from ..core.corpus import Corpus

FORMAT = "1"
# The array holding the count sketch of A's weights (backends/replay.py): one row per tensor
SKETCH_ARRAY = "weights.sketch"
HEADER_KEY = "convdiff_reference"
MAX_HEADER = 100_000_000  # the safetensors library's own limit
_CHUNK = 1 << 24

# safetensors dtype names <-> numpy (little-endian)
_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NAMES = {dt.str: name for name, dt in _DTYPES.items()}

SAVE_HINT = "Save one with --convdiff-save-reference PATH (or pytest_convdiff.store.reference.save_reference)."


class ReferenceSettings(Protocol):
    """The run settings a reference must match (``runner.RunSettings`` is one)."""

    hidden_states: bool
    tokenizer_cases: bool
    causality: bool
    max_tokens: int | None


@dataclass(frozen=True)
class ReferenceSource:
    """What made a run served from a reference when the caller has no model spec for it."""

    path: str
    backend: str = "reference"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def plugin_version() -> str:
    from .. import __version__

    return __version__


# --------------------------------------------------------------------------- the file format


@dataclass
class Header:
    """A parsed safetensors header: tensors (name -> dtype, shape, offsets) and string metadata."""

    path: Path
    data_start: int
    tensors: dict[str, tuple[np.dtype, tuple[int, ...], int, int]]
    metadata: dict[str, str]


def _not_reference(path: Path, why: str) -> ModelLoadError:
    return ModelLoadError(
        f"{path}: not a convdiff reference ({why}). --model-a accepts a reference file written by "
        f"--convdiff-save-reference; otherwise pass the model itself (a transformers directory, a .gguf, "
        f"an EXL2 directory) or choose its backend with --backend-a. {SAVE_HINT}"
    )


def read_header(path: str | os.PathLike[str]) -> Header:
    """Parse and validate a safetensors header (reads only the header, never the tensors)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise _not_reference(path, f"only {len(head)} bytes long")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER, size - 8):
                raise _not_reference(path, "no safetensors header: the file does not start with a header length")
            raw = fh.read(n)
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read the reference file ({exc}).") from exc
    try:
        obj = json.loads(raw.decode("utf-8"))
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise _not_reference(path, f"the safetensors header is not valid JSON ({exc})") from exc
    meta = obj.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _not_reference(path, "__metadata__ is not a map of strings")
    data_start = 8 + n
    data_len = size - data_start
    tensors: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
    end = 0
    try:
        for name, t in sorted(obj.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            dtype = _DTYPES[t["dtype"]]
            shape = tuple(int(s) for s in t["shape"])
            start, stop = (int(x) for x in t["data_offsets"])
            if start != end or stop - start != math.prod(shape) * dtype.itemsize:
                raise ValueError(f"tensor {name!r} has inconsistent data offsets")
            end = stop
            tensors[name] = (dtype, shape, start, stop)
    except (KeyError, TypeError, ValueError) as exc:
        raise _not_reference(path, f"damaged safetensors header: {exc!r}") from exc
    if end != data_len:
        raise ModelLoadError(
            f"{path}: the reference file is truncated or damaged (its header describes {end} bytes of tensor "
            f"data, the file holds {data_len}). Save it again. {SAVE_HINT}"
        )
    return Header(path, data_start, tensors, meta)


def _raw_header(path: Path) -> bytes | None:
    """The header bytes of a safetensors-shaped file, or None (a directory, a GGUF, anything else)."""
    try:
        if not path.is_file():
            return None
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return None
            (n,) = struct.unpack("<Q", head)
            if n < 2 or n > min(MAX_HEADER, size - 8):
                return None
            first = fh.read(1)
            if first != b"{":
                return None
            return first + fh.read(n - 1)
    except OSError:
        return None


def is_reference(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a convdiff golden reference, judged by its content, never its name.

    True for any file whose safetensors header carries the convdiff key, even one that is
    truncated or of another format version (opening it then says what is wrong); False, without
    raising, for directories, missing files, GGUFs and plain safetensors weights.
    """
    raw = _raw_header(Path(path))
    if raw is None or HEADER_KEY.encode() not in raw:  # cheap: most candidates never reach the JSON parser
        return False
    try:
        meta = json.loads(raw.decode("utf-8")).get("__metadata__")
    except (UnicodeDecodeError, ValueError, AttributeError):
        return False
    return isinstance(meta, dict) and HEADER_KEY in meta


def reference_info(path: str | os.PathLike[str]) -> ModelInfo:
    """The saved model's info (layers, vocabulary, dtype, its backend), from the header only.

    Collection needs the layer count of model A; this gives it without reading any tensor.
    """
    path = Path(path)
    if path.is_dir():
        raise ModelLoadError(f"{path}: a convdiff reference is one file, not a directory. {SAVE_HINT}")
    hdr = read_header(path)
    if HEADER_KEY not in hdr.metadata:
        raise _not_reference(path, "a safetensors file without a convdiff header, e.g. model weights")
    try:
        info = json.loads(hdr.metadata["meta"])["info"]
        known = {k: v for k, v in info.items() if k in ModelInfo.__dataclass_fields__}
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise _not_reference(path, f"its convdiff header has no model info ({exc!r})") from exc
    known["extra"] = {**(known.get("extra") or {}), "reference": str(path),
                      "reference_created": hdr.metadata.get("created"),
                      "reference_of": hdr.metadata.get("model")}
    known.setdefault("path", str(path))
    known.setdefault("backend", "reference")
    try:
        return ModelInfo(**known)
    except TypeError as exc:
        raise _not_reference(path, f"its convdiff header has incomplete model info ({exc})") from exc


def write_safetensors(path: str | os.PathLike[str], arrays: dict[str, Callable[[], np.ndarray]],
                      metadata_: dict[str, str]) -> str:
    """Write a safetensors file streaming one array at a time, atomically (``store.atomic``, fsynced).

    ``arrays`` maps each name to a function giving the array (a memory map: only its shape and dtype
    are read before it is written, and only one array is held at a time). The SHA-256 of the tensor
    data is stored as ``data_sha256`` in the metadata (a fixed-width slot filled in after the data)
    and returned.
    """
    path = Path(path)
    layout: dict[str, tuple[str, tuple[int, ...]]] = {}
    header: dict[str, Any] = {"__metadata__": {**metadata_, "data_sha256": "0" * 64}}
    off = 0
    for name, get in arrays.items():
        a = get()
        dt_name = _NAMES.get(a.dtype.newbyteorder("<").str)
        if dt_name is None:
            raise TypeError(f"array {name!r}: dtype {a.dtype} cannot be stored in a reference")
        nbytes = a.size * a.dtype.itemsize
        layout[name] = (dt_name, tuple(a.shape))
        header[name] = {"dtype": dt_name, "shape": list(a.shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
        del a

    def encode(h: dict[str, Any]) -> bytes:
        blob = json.dumps(h, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        return blob + b" " * (-len(blob) % 8)  # safetensors pads its header to 8 bytes

    blob = encode(header)
    with atomic_open(path, "wb", fsync=True) as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        h = hashlib.sha256()
        for name, get in arrays.items():
            a = get()
            dt_name, shape = layout[name]
            if tuple(a.shape) != shape:
                raise RuntimeError(f"array {name!r} changed shape while the reference was written")
            for block in _blocks(a, _DTYPES[dt_name]):
                h.update(block)
                fh.write(block)
            del a
        digest = h.hexdigest()
        header["__metadata__"]["data_sha256"] = digest
        final = encode(header)
        if len(final) != len(blob):
            raise RuntimeError("the reference header changed length while it was written")
        fh.seek(8)
        fh.write(final)
    return digest


def _blocks(a: np.ndarray, dt: np.dtype) -> Iterator[bytes]:
    """The array's bytes in C order as dtype ``dt``, in bounded chunks."""
    flat = np.asarray(a).reshape(-1)
    step = max(1, _CHUNK // max(1, dt.itemsize))
    for i in range(0, flat.size, step):
        yield np.ascontiguousarray(flat[i:i + step], dtype=dt).tobytes()


def _data_sha256(header: Header) -> str:
    h = hashlib.sha256()
    with header.path.open("rb") as fh:
        fh.seek(header.data_start)
        while block := fh.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- saving


def reference_tokens(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The special tokens and stop ids a reference was saved with ({} for one saved before they were kept)."""
    hdr = read_header(Path(path))
    try:
        return json.loads(hdr.metadata["meta"]).get("tokens") or {}
    except (KeyError, ValueError, TypeError, AttributeError):
        return {}


def save_reference(run: ModelRun, path: str | os.PathLike[str], corpus: Corpus,
                   settings: ReferenceSettings | None = None,
                   weights: tuple[dict[str, Any], np.ndarray] | str | None = None,
                   tokens: dict[str, Any] | None = None) -> Path:
    """Write A's run (every array of its entry, and its meta) to one safetensors file; returns the path.

    ``settings``: the RunSettings the run was made with, recorded so that a later run with other
    settings (e.g. another --convdiff-max-tokens) is told instead of silently comparing other things.
    ``weights``: ``backends.replay.sketch_model``'s (table, sketches) of A's weights, kept so the weights check
    runs without A's files; or why there are none (a string, reported when a replay asks).
    ``tokens``: A's special tokens and stop ids (``comparison.token_record``), kept for the config check.
    """
    path = Path(path)
    meta = dict(run.meta)
    if list(meta.get("prompts", [])) != [p.id for p in corpus]:
        raise ValueError(f"{path}: the run was not made on this corpus ({corpus.source}); pass the run's corpus.")
    entry = run.entry
    names = list(meta.get("files") or ())  # every Entry lists its arrays in meta["files"]
    if not names:
        raise ValueError(f"{path}: the run's entry lists no arrays (meta['files'] is missing)")
    fingerprint = meta.get("fingerprint")  # set when the run is itself a reference: keep the model's
    if not fingerprint:
        try:
            fingerprint = run.spec.fingerprint()  # type: ignore[attr-defined]  # a ModelSpec has one
        except Exception:  # noqa: BLE001 - informational; the model may be gone, or the spec has none
            fingerprint = None
    info = meta.get("info", {})
    spec = meta.get("spec", {})
    meta.pop("files", None)
    meta["fingerprint"] = fingerprint
    meta.pop("reference", None)
    if settings is not None:
        meta["settings"] = {k: getattr(settings, k, None) for k in (*_SETTING_OPTIONS, "max_tokens")}
    arrays: dict[str, Callable[[], np.ndarray]] = {n: (lambda n=n: entry.array(n)) for n in names}
    tokens = tokens if tokens is not None else run.meta.get("tokens")  # a reference of a reference keeps its own
    if tokens is not None:  # so config[special_tokens] and config[eog] run in a replay as they do live
        meta["tokens"] = tokens
    if isinstance(weights, tuple):

        table, sketches = weights
        meta["weights_sketch"] = table
        arrays[SKETCH_ARRAY] = lambda: sketches
    elif weights:
        meta["weights_sketch_missing"] = weights
    header = {
        HEADER_KEY: FORMAT,
        "meta": json.dumps(meta, ensure_ascii=False, default=str),
        "corpus_digest": corpus.digest,
        "corpus_source": corpus.source,
        "fingerprint": str(fingerprint or ""),
        "key": str(meta.get("key", "")),
        "model": str(spec.get("path", run.spec.path)),
        "backend": str(info.get("backend") or spec.get("backend") or ""),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": json.dumps({
            "pytest_convdiff": plugin_version(),
            "numpy": np.__version__,
            "backend_library": info.get("library_version"),
            "safetensors": _version("safetensors"),
        }),
    }
    write_safetensors(path, arrays, header)
    return path


# --------------------------------------------------------------------------- loading


class ReferenceEntry:
    """A saved reference, read like a cache entry (``store.entry.Entry``).

    Arrays are read-only memory maps into the file, made on demand. ``hide`` names arrays to
    treat as absent (hidden states when the current run asks for none).
    """

    def __init__(self, path: str | os.PathLike[str], header: Header | None = None,
                 hide: Callable[[str], bool] | None = None) -> None:
        self.path = Path(path)
        self.header = header or read_header(self.path)
        md = self.header.metadata
        if md.get(HEADER_KEY) is None:
            raise _not_reference(self.path, "a safetensors file without a convdiff header, e.g. model weights")
        if md[HEADER_KEY] != FORMAT:
            raise ModelLoadError(
                f"{self.path}: a convdiff reference in format {md[HEADER_KEY]!r}; this version of pytest-convdiff "
                f"({plugin_version()}) reads format {FORMAT!r}. Save it again with this version. {SAVE_HINT}"
            )
        try:
            self.meta: dict[str, Any] = json.loads(md["meta"])
        except (KeyError, ValueError) as exc:
            raise _not_reference(self.path, f"its convdiff header has no readable meta ({exc!r})") from exc
        self._hide = hide or (lambda _n: False)
        self.meta["files"] = {n: "" for n in self.names}
        self.meta["reference"] = {k: v for k, v in md.items() if k not in ("meta",)}

    @property
    def names(self) -> list[str]:
        return [n for n in self.header.tensors if not self._hide(n)]

    @property
    def identity(self) -> str:
        """Names the content served: the file's data checksum and which arrays are in use."""
        h = hashlib.sha256(str(self.header.metadata.get("data_sha256") or self.path.resolve()).encode())
        h.update("\n".join(sorted(self.names)).encode())
        h.update(json.dumps({k: self.meta.get(k) is not None for k in ("tokenizer_cases", "causality")}).encode())
        return h.hexdigest()[:24]

    @property
    def metadata(self) -> dict[str, str]:
        return self.header.metadata

    def has(self, name: str) -> bool:
        return name in self.header.tensors and not self._hide(name)

    def array(self, name: str) -> np.ndarray:
        if not self.has(name):
            raise KeyError(f"{self.path}: the reference holds no array {name!r}")
        dtype, shape, start, _stop = self.header.tensors[name]
        if math.prod(shape) == 0:
            return np.zeros(shape, dtype=dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self.header.data_start + start, shape=shape)

    def verify(self) -> None:
        """Check the tensor data against the SHA-256 stored when it was saved."""
        want = self.header.metadata.get("data_sha256")
        if want and _data_sha256(self.header) != want:
            raise ModelLoadError(
                f"{self.path}: the reference's tensor data fails its checksum (the file was modified or damaged "
                f"after it was saved). Save it again from the model. {SAVE_HINT}"
            )


_SETTING_OPTIONS = {"hidden_states": "--convdiff-no-layers", "tokenizer_cases": "--convdiff-no-tokenizer-cases",
                    "causality": "--convdiff-no-causality"}


def open_reference_run(path: str | os.PathLike[str], corpus: Corpus, settings: ReferenceSettings | None = None,
                       *, spec: RunSource | None = None, verify: bool = True) -> ModelRun:
    """A ModelRun served from a saved reference (no model is loaded).

    Raises ModelLoadError when the file is not a convdiff reference, is damaged, was saved on
    another corpus, or lacks what ``settings`` asks for (or was saved with another --convdiff-max-tokens).
    ``spec``: what the run reports as its source (the runner passes its ModelSpec).
    """
    path = Path(path)
    spec = spec or ReferenceSource(str(path))
    header = read_header(path)
    probe_entry = ReferenceEntry(path, header)
    md, meta = header.metadata, probe_entry.meta
    saved = md.get("corpus_digest")
    if saved != corpus.digest:
        raise ModelLoadError(
            f"{path}: this reference was saved with another corpus ({md.get('corpus_source', '?')}, digest {saved}) "
            f"than the current one ({corpus.source}, digest {corpus.digest}); its outputs cannot be compared. "
            f"Pass the same --convdiff-prompts as when it was saved, or save the reference again on this corpus "
            f"with --convdiff-save-reference."
        )
    hide: Callable[[str], bool] | None = None
    drop: list[str] = []
    if settings is not None:
        stored = meta.get("settings")
        if stored is not None and stored.get("max_tokens") != settings.max_tokens:
            raise ModelLoadError(
                f"{path}: this reference was saved with --convdiff-max-tokens {stored.get('max_tokens')}, the current "
                f"run uses {settings.max_tokens}; pass the same value or save the reference again."
            )
        has_hidden = any(n.endswith((".hidden", ".c_hidden_sketch")) for n in header.tensors)
        present = {"hidden_states": has_hidden, "tokenizer_cases": "tokenizer_cases" in meta,
                   "causality": "causality" in meta}
        for key, option in _SETTING_OPTIONS.items():
            wanted = getattr(settings, key)
            if wanted and not present[key] and (stored is None or stored.get(key)):
                # Saved with the feature on but it produced nothing (e.g. a backend without hidden
                # states, or a corpus too short for the causality probe): a live run gives the same.
                continue
            if wanted and not present[key]:
                raise ModelLoadError(
                    f"{path}: this reference was saved without {key.replace('_', ' ')} ({option}); pass {option} "
                    f"or save the reference again without it."
                )
        if not settings.hidden_states:
            def hide(n: str) -> bool:
                return n.endswith(".hidden") or any(part in n for part in (".sub_", ".c_hidden_", ".c_sub_"))
        if not settings.tokenizer_cases:
            drop.append("tokenizer_cases")
        if not settings.causality:
            drop.append("causality")
    entry = ReferenceEntry(path, header, hide) if hide else probe_entry
    for k in drop:
        entry.meta.pop(k, None)
    if hide:
        entry.meta["sublayers"] = []
    if verify:
        entry.verify()
    return ModelRun(spec, entry, from_cache=True)


# --------------------------------------------------------------------------- llama.cpp's conversion-script files


# what the config family reads of a reference (``sources.REFERENCE.read_config``)
_REFERENCE_INFO = {"num_layers": "n_layers", "vocab_size": "vocab_size", "hidden_size": "hidden_size"}
_REFERENCE_EXTRA = {"context_length": "context_length", "rope_freq_base": "rope_theta", "rms_norm_eps": "norm_eps",
                    "bos_token_id": "bos_id", "eos_token_id": "eos_id", "add_bos_token": "add_bos",
                    "add_eos_token": "add_eos"}


def reference_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A saved golden reference keeps the model info it was saved with, not the model's config files."""
    from ..core.config_fields import FIELDS, _reading

    info = reference_info(path)
    tokens = reference_tokens(path)
    of = info.extra.get("reference_of") or "?"
    fields: dict[str, Any] = {}
    for attr, name in _REFERENCE_INFO.items():
        v = getattr(info, attr, None)
        if v is not None:
            fields[name] = _reading(v, f"reference info {attr}")
    for key, name in _REFERENCE_EXTRA.items():
        v = info.extra.get(key)
        if v is not None:
            fields[name] = _reading(v, f"reference info {key}")
    why = (f"{path} is a saved golden reference (of {of}); it records only the model info it was saved with "
           f"({', '.join(sorted(fields)) or 'nothing comparable'})")
    kept = {"special_tokens", "eog"} if tokens.get("special_tokens") is not None else set()
    unknown = {f.name: why for f in FIELDS if f.name not in fields and f.name not in kept}
    return {"kind": "reference", "path": str(path), "fields": fields, "unknown": unknown,
            "stop_ids": tokens.get("stop_ids"), "special_tokens": tokens.get("special_tokens"),
            "special_text": {}, "tokenizer_json": None, "notes": []}
