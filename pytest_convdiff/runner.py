"""Run one model over the corpus into a cache entry, or find the entry already there.

A model is loaded only when its entry is missing, used for everything it has to
produce (tokens, logits, hidden states, tokenizer cases, the causality probe),
and closed before the next model loads: one model in memory at a time. A golden
reference (``store.reference``) is served as model A without any model: it is
recognised by its content before a backend is detected.

Model B is streamed unless ``RunSettings.keep_b``: each prompt's outputs are reduced against A's
stored ones as they come out of the backend (``pair.PairReducer``) and dropped, so B's
entry holds its tokens, its records and the pair's metrics, a few hundred kilobytes instead of
gigabytes. Such an entry is only valid for that A and that metric code, so both are in its key.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .backends import backend_capabilities, backend_module, detect_backend, normalize_backend_name, registry
from .backends.base import LAYER_SWAP, IncrementalDecoder, ModelInfo
from .core import compact, metrics
from .core.corpus import Corpus
from .core.tokenizer_cases import TOKENIZER_CASES
from .errors import ConvdiffError, ModelLoadError
from .pair import PairReducer, reduced_against
from .store.budget import expected_entry_bytes
from .store.cache import Cache, content_fingerprint, make_key
from .store.reference import is_reference, open_reference_run, reference_info
from .store.run import ModelRun

__all__ = ["ModelRun", "ModelSpec", "RunSettings", "cache_dtype_name", "run_key", "run_model", "store_name"]

Progress = Callable[[str], None]
REFERENCE = "reference"  # what a golden reference shows as its backend; no backend module has this name
_REFERENCE_NAMES = (REFERENCE, "golden")
CACHE_DTYPES = ("float32", "float16")
STORES = ("compact", "full")
LAYER_SWAP_NEEDS_FULL = (
    "the layer swap (--convdiff-layer-swap) feeds model A's hidden states into B, and the compact store (the "
    "default) keeps only a sketch of them: add --convdiff-store full (ini convdiff_store = full; "
    "RunSettings(store='full') in the library)")
_CACHE_DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "fp16": "float16", "f16": "float16", "half": "float16"}


def cache_dtype_name(name: str) -> str:
    """``float32`` or ``float16`` (also accepting fp32/f32/fp16/f16/half); ValueError otherwise."""
    key = str(name).strip().lower()
    key = _CACHE_DTYPE_ALIASES.get(key, key)
    if key not in CACHE_DTYPES:
        raise ValueError(f"{name!r} is not one of {', '.join(CACHE_DTYPES)}")
    return key


def store_name(name: str) -> str:
    """``compact`` or ``full``; ValueError naming the valid values otherwise."""
    key = str(name).strip().lower()
    if key not in STORES:
        raise ValueError(f"{name!r} is not one of {', '.join(STORES)}")
    return key


RUNTIME_TWIN = ("quick", "full", "off")


def runtime_twin_name(name: str) -> str:
    """``quick``, ``full`` or ``off``; ValueError naming the valid values otherwise."""
    key = str(name).strip().lower()
    if key not in RUNTIME_TWIN:
        raise ValueError(f"{name!r} is not one of {', '.join(RUNTIME_TWIN)}")
    return key


def quiet(_msg: str) -> None:
    """A progress callback that says nothing."""


@dataclass
class ModelSpec:
    """Which model to run and how: a path, a backend (detected when None) and backend options."""

    path: str
    backend: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def is_saved_reference(self) -> bool:
        """A saved golden reference: named so (``backend="reference"``), or recognised by its content."""
        if self.backend and self.backend.strip().lower() in _REFERENCE_NAMES:
            return True
        return is_reference(self.path)

    def resolved_backend(self) -> str:
        """The backend's name; ``"reference"`` for a golden reference (for display: it has no backend module)."""
        if self.is_saved_reference():
            return REFERENCE
        return normalize_backend_name(self.backend) if self.backend else detect_backend(self.path)

    def probe(self) -> ModelInfo:
        """Cheap facts about the model (layer count for collection); a reference's come from its header."""
        if self.is_saved_reference():
            return reference_info(self.path)
        mod = backend_module(self.resolved_backend())
        return mod.probe(Path(self.path), self.options)

    def fingerprint(self) -> str:
        p = Path(self.path)
        if self.is_saved_reference():
            return content_fingerprint([p], p.parent)
        mod = backend_module(self.resolved_backend())
        files = mod.fingerprint_files(p)
        own = content_fingerprint(files, p if p.is_dir() else p.parent)
        other = (self.options or {}).get("weights_from")
        if other:  # a runtime twin: its outputs depend on the other model's weights as much as on this one
            o = Path(other)
            return own + "+" + content_fingerprint([o], o.parent)
        return own


@dataclass
class RunSettings:
    """Settings that change what a run produces, hence part of its cache key."""

    hidden_states: bool = True
    tokenizer_cases: bool = True
    causality: bool = True
    max_tokens: int | None = None
    layer_swap: int = 0  # B only: also run with A's hidden states fed in for layers < layer_swap
    greedy_tokens: int = 16  # greedy continuation length per greedy prompt (0: no greedy check)
    cache_dtype: str = "float32"  # how logits / hidden states are stored: float32 or float16 (compact)
    keep_b: bool = False  # B only: store B's arrays (custom checks read them) instead of streaming them into the metrics
    # A only: "compact" keeps what the metrics need (core.compact, a few kB per token), "full" every array
    store: str = "compact"
    # the runtime twin (checks/runtime.py): "quick" (a subset of the corpus), "full" (all of it) or "off"
    runtime_twin: str = "quick"
    # llama.cpp's importance matrix B was quantised with (backends/imatrix.py): the weights twin needs it
    imatrix: str | None = None

    def __post_init__(self) -> None:
        self.cache_dtype = cache_dtype_name(self.cache_dtype)  # one spelling, so one cache key
        self.store = store_name(self.store)
        self.runtime_twin = runtime_twin_name(self.runtime_twin)
        if self.layer_swap and self.hidden_states and self.store != "full":
            raise ValueError(LAYER_SWAP_NEEDS_FULL)

    def key(self, fed: bool = True) -> dict[str, Any]:
        out = dict(self.__dict__)
        out.pop("runtime_twin")  # which extra runs a pair makes, not what a run produces
        out.pop("imatrix")  # read by the weights check only, keyed there
        if not fed:  # A's entry is the same whatever is done with B
            out.pop("layer_swap")
            out.pop("keep_b")
        else:  # B is never stored compact; what it is reduced against is in its key (reduced_against)
            out.pop("store")
        return out


def _digest_tokens(feed: ModelRun | None) -> str:
    if feed is None:
        return "own"
    h = hashlib.sha256()
    for pid in feed.prompt_ids:
        h.update(pid.encode())
        h.update(np.asarray(feed.inputs(pid), dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def _streams(feed: ModelRun | None, settings: RunSettings) -> bool:
    """Whether this run is a B whose outputs are reduced as they come instead of stored."""
    return feed is not None and not settings.keep_b


def _key_parts(spec: ModelSpec, corpus: Corpus, feed: ModelRun | None) -> dict[str, Any]:
    """What every run's key holds, whatever the settings."""
    backend = spec.resolved_backend()
    return {
        "model": str(Path(spec.path).resolve()),
        "fingerprint": spec.fingerprint(),
        "backend": backend,
        "library": registry.get(backend).library_version(),
        "options": spec.options,
        "corpus": corpus.digest,
        "inputs": _digest_tokens(feed),
    }


def _key(parts: dict[str, Any], feed: ModelRun | None, settings: RunSettings) -> str:
    extra: dict[str, Any] = {"settings": settings.key(fed=feed is not None)}
    if feed is None and settings.store == "compact":  # what A's compact entry holds depends on this code
        extra["compact"] = [compact.CompactConfig().to_dict(), compact.code_digest()]
    if _streams(feed, settings):

        extra["reduced_against"] = reduced_against(feed)  # a streamed B holds metrics of this A and this code
    elif feed is not None and settings.layer_swap and settings.hidden_states:
        extra["swap_from"] = feed.entry.identity  # a kept B's layer-swap states are run from A's hidden states
    return make_key({**parts, **extra})


def run_key(spec: ModelSpec, corpus: Corpus, feed: ModelRun | None, settings: RunSettings) -> str:
    return _key(_key_parts(spec, corpus, feed), feed, settings)


def _safe_piece(backend, token_id: int) -> str:
    try:
        return backend.decode_piece(int(token_id))
    except Exception:  # noqa: BLE001 - a piece is only for display
        return f"<{token_id}>"


def run_model(spec: ModelSpec, corpus: Corpus, cache: Cache, *, feed: ModelRun | None = None,
              settings: RunSettings | None = None, progress: Progress = quiet, label: str = "") -> ModelRun:
    """The model's outputs for the corpus: from the cache when valid, else computed and cached.

    ``feed``: the run whose token ids this model must be evaluated on (A's), so a
    tokenizer difference fails the token checks without hiding how logits compare.
    """
    settings = settings or RunSettings()
    if spec.is_saved_reference():
        return _reference_run(spec, corpus, feed, settings, progress, label)
    parts = _key_parts(spec, corpus, feed)
    key = _key(parts, feed, settings)
    entry = cache.get(key)
    if entry is None and _streams(feed, settings):  # B's arrays kept by an earlier run serve as well
        entry = cache.get(_key(parts, feed, replace(settings, keep_b=True)))
    if entry is not None:
        progress(f"{label}{spec.path}: outputs served from cache {entry.path.name}")
        return ModelRun(spec, entry, from_cache=True)

    mod = backend_module(spec.resolved_backend())
    t0 = time.perf_counter()
    progress(f"{label}loading {spec.path} ({spec.resolved_backend()})")
    options = dict(spec.options)
    backend = mod.load(Path(spec.path), options)
    writer = cache.writer(key)
    try:
        # Before any forward pass: room for the entry in the cache's budget and on the disk, or a readable
        # CacheError saying how much is needed and where.
        tokens = sum(len(feed.inputs(p.id)) if feed is not None
                     else len(backend.tokenize(p.text)[: settings.max_tokens or None]) for p in corpus)
        cache.reserve(expected_entry_bytes(backend.info, tokens, settings, fed=feed is not None),
                      f"{spec.path} ({spec.resolved_backend()})", writer=writer)
        progress(f"{label}loaded in {time.perf_counter() - t0:.1f}s; running {len(corpus)} prompts"
                 + (", reduced against A's outputs as they come" if _streams(feed, settings) else ""))
        meta = _produce(backend, spec, corpus, feed, settings, writer, progress, label)
        entry = writer.commit(meta)
    except BaseException:
        writer.abort()
        raise
    finally:
        backend.close()
    progress(f"{label}done in {time.perf_counter() - t0:.1f}s")
    return ModelRun(spec, entry, from_cache=False)


def _reference_run(spec: ModelSpec, corpus: Corpus, feed: ModelRun | None, settings: RunSettings,
                   progress: Progress, label: str) -> ModelRun:
    """Model A served from a saved reference. A reference holds outputs, not a model that could be run
    on A's tokens, so as model B it is refused with a message saying what to pass instead."""
    if feed is not None:
        raise ModelLoadError(
            f"{spec.path}: a saved convdiff reference can only be model A (--model-a): it holds outputs, "
            f"not a model that can be run on A's tokens. Pass the converted model itself as --model-b."
        )
    run = open_reference_run(spec.path, corpus, settings, spec=spec)
    ref = run.meta.get("reference", {})
    progress(f"{label}{spec.path}: outputs served from the saved reference of {ref.get('model', '?')} "
             f"({ref.get('backend', '?')}, saved {ref.get('created', '?')})")
    return run


def _produce(backend, spec: ModelSpec, corpus: Corpus, feed: ModelRun | None, settings: RunSettings,
             writer, progress: Progress, label: str) -> dict[str, Any]:
    info: ModelInfo = backend.info
    store = np.dtype(settings.cache_dtype)
    cfg = compact.CompactConfig() if feed is None and settings.store == "compact" else None
    reducer = None
    if _streams(feed, settings):

        reducer = PairReducer(feed)
    prompts: list[str] = []
    pieces: dict[str, list[str]] = {}
    truncated: dict[str, int] = {}
    sub_names: set[str] = set()
    shapes: dict[str, Any] = {}
    longest: tuple[str, list[int]] | None = None
    probe_rows: np.ndarray | None = None  # the longest prompt's first logits as stored, for the causality probe
    swap_error: str | None = None
    for i, prompt in enumerate(corpus):
        own = backend.tokenize(prompt.text)
        if settings.max_tokens and len(own) > settings.max_tokens:
            truncated[prompt.id] = len(own)
            own = own[: settings.max_tokens]
        inputs = feed.inputs(prompt.id) if feed is not None else own
        if not inputs:
            raise ConvdiffError(f"prompt {prompt.id!r} tokenizes to nothing for {spec.path}; remove it from the corpus.")
        if feed is not None and info.vocab_size and max(inputs) >= info.vocab_size:
            raise ModelLoadError(
                f"{spec.path}: model A's token id {max(inputs)} is outside this model's vocabulary "
                f"({info.vocab_size}); the models do not share a vocabulary, so logits cannot be compared."
            )
        out = backend.forward(inputs, hidden_states=settings.hidden_states)
        prompts.append(prompt.id)
        writer.add(f"p{i}.own_tokens", np.asarray(own, dtype=np.int64))
        writer.add(f"p{i}.inputs", np.asarray(inputs, dtype=np.int64))
        # rounded to the cache dtype either way, so a streamed B reduces the values a kept B would store
        logits = np.asarray(out.logits, dtype=store)
        hidden = np.asarray(out.hidden, dtype=store) if out.hidden is not None else None
        subs = {name: np.asarray(arr, dtype=store) for name, arr in out.sublayers.items()}
        sub_names.update(subs)
        swap = None
        if feed is not None and settings.layer_swap and settings.hidden_states and swap_error is None:
            swap, swap_error = _layer_swap(backend, feed, prompt.id, inputs, settings.layer_swap)
        if not shapes:
            shapes = {"vocab": int(logits.shape[-1]),
                      "hidden": [int(hidden.shape[0]), int(hidden.shape[-1])] if hidden is not None else None}
        if reducer is not None:
            reducer.add(prompt.id, logits, hidden, subs, swap)
        elif cfg is not None:
            _write_compact(writer, i, prompt.id, logits, inputs, hidden, subs, cfg)
        else:
            writer.add(f"p{i}.logits", logits)
            if hidden is not None:
                writer.add(f"p{i}.hidden", hidden)
            if swap is not None:
                writer.add(f"p{i}.hidden_swap", swap)
            for name, arr in subs.items():
                writer.add(f"p{i}.sub_{name}", arr)
        pieces[prompt.id] = [_safe_piece(backend, t) for t in own]
        if longest is None or len(inputs) > len(longest[1]):
            longest = (prompt.id, list(inputs))
            probe_rows = np.array(logits[:_probe_length(len(inputs))])
        del out, logits, hidden, subs, swap  # before the next forward: one prompt's outputs in memory at a time
        progress(f"{label}  [{i + 1}/{len(corpus)}] {prompt.id}: {len(inputs)} tokens")

    meta: dict[str, Any] = {
        "info": info.to_dict(),
        "spec": {"path": spec.path, "backend": spec.resolved_backend(), "options": spec.options},
        "prompts": prompts,
        "pieces": pieces,
        "truncated": truncated,
        "max_tokens": settings.max_tokens,
        "sublayers": sorted(sub_names),
        "special": backend.special_tokens(),
        "layer_swap": {"k": settings.layer_swap, "error": swap_error} if feed is not None and settings.layer_swap else None,
        "created": time.time(),
    }
    meta["shapes"] = shapes  # what the checks need of arrays not stored: the vocabulary, (layers, hidden size)
    if feed is None:
        meta["store"] = {"form": "compact", **cfg.to_dict()} if cfg is not None else {"form": "full"}
    if reducer is not None:

        meta["streamed"] = {**reduced_against(feed), "a_path": feed.spec.path}
        meta["pair_metrics"] = reducer.result().to_dict()
    if settings.tokenizer_cases:
        cases: dict[str, list[dict[str, Any]]] = {}
        for category, texts in TOKENIZER_CASES.items():
            rows = []
            for text in texts:
                try:
                    ids = backend.tokenize(text)
                    rows.append({"text": text, "ids": ids, "pieces": [_safe_piece(backend, t) for t in ids]})
                except Exception as exc:  # noqa: BLE001 - a tokenizer that chokes is a finding, not a crash
                    rows.append({"text": text, "ids": None, "error": f"{type(exc).__name__}: {exc}"})
            cases[category] = rows
        meta["tokenizer_cases"] = cases
    if settings.greedy_tokens:
        meta["greedy"] = _greedy(backend, corpus, feed, prompts, settings.greedy_tokens, progress, label)
    if settings.causality and longest is not None and probe_rows is not None and len(longest[1]) >= 8:
        meta["causality"] = _causality_probe(backend, probe_rows, longest)
    return meta


def _write_compact(writer, i: int, pid: str, logits: np.ndarray, inputs: list[int], hidden: np.ndarray | None,
                   subs: dict[str, np.ndarray], cfg: compact.CompactConfig) -> None:
    """A's outputs for one prompt, reduced to the compact arrays (``core.compact``; names in ``store.run``)."""
    chunk = max(8, metrics.CHUNK_ELEMENTS // max(1, logits.shape[-1]))
    for name, arr in compact.summarise_logits(logits, np.asarray(inputs), pid, cfg, chunk).items():
        writer.add(f"p{i}.c_{name}", arr)
    if hidden is not None:
        for name, arr in compact.summarise_states(hidden, pid, cfg).items():
            writer.add(f"p{i}.c_hidden_{name}", arr)
    for sub, states in subs.items():
        for name, arr in compact.summarise_states(states, pid, cfg, rows=False).items():
            writer.add(f"p{i}.c_sub_{sub}_{name}", arr)


def _layer_swap(backend, feed: ModelRun, pid: str, inputs: list[int], k: int) -> tuple[np.ndarray | None, str | None]:
    """B run again with A's hidden state replacing B's for layers < k: (its hidden states, float32; None) when
    it worked, (None, why) when it cannot be done."""
    if feed.compact:
        return None, "model A's outputs are stored compact; " + LAYER_SWAP_NEEDS_FULL
    hidden_a = feed.hidden(pid)
    if hidden_a is None:
        return None, "model A has no hidden states"
    if LAYER_SWAP not in backend_capabilities(backend.info.backend):
        return None, f"the {backend.info.backend} backend cannot take injected hidden states"
    k = min(k, hidden_a.shape[0])
    # A backend that declares the capability and then raises has a bug: it propagates, never swallowed.
    out = backend.forward(inputs, hidden_states=True, inject={j: np.asarray(hidden_a[j]) for j in range(k)})
    return np.asarray(out.hidden, dtype=np.float32), None


GREEDY_PROMPTS = 3
GREEDY_PREFIX = 48
GREEDY_TOPN = 5


def _greedy(backend, corpus: Corpus, feed: ModelRun | None, prompts: list[str], n_new: int,
            progress: Progress, label: str) -> dict[str, Any]:
    """Greedy continuations of the first few non-long prompts, with each step's top-N token ids.

    A generates (incrementally on its KV cache when the backend has ``greedy_decode``, else one
    full forward per new token). B is teacher-forced on A's continuation in a single
    forward: up to the first step where they disagree that *is* B's own greedy path, and the check
    (vLLM's check_logprobs_close) stops comparing a prompt at its first disagreement anyway.
    """
    out: dict[str, Any] = {}
    chosen = [p for p in corpus if p.kind != "long"][:GREEDY_PROMPTS]
    theirs = (feed.meta.get("greedy") or {}) if feed is not None else {}
    if feed is not None:
        for p in chosen:
            if p.id not in theirs:
                continue
            prefix = [int(t) for t in feed.inputs(p.id)][: theirs[p.id]["prefix_len"]]
            forced = theirs[p.id]["generated"]
            logits = np.asarray(backend.forward(prefix + forced[:-1], hidden_states=False).logits)[len(prefix) - 1:]
            tops = [[int(t) for t in row] for row in metrics.topk_indices(logits, GREEDY_TOPN)]
            out[p.id] = {"prefix_len": len(prefix), "generated": [top[0] for top in tops], "top": tops,
                         "index": prompts.index(p.id), "teacher_forced": True}
    else:
        prefixes = [[int(t) for t in backend.tokenize(p.text)][:GREEDY_PREFIX] for p in chosen]
        steps: list[list[list[int]]] = [[] for _ in chosen]

        def pick(i: int, logits: np.ndarray) -> int:
            top = [int(t) for t in metrics.topk_indices(np.asarray(logits)[None, :], GREEDY_TOPN)[0]]
            steps[i].append(top)
            return top[0]

        if isinstance(backend, IncrementalDecoder):
            backend.greedy_decode(prefixes, n_new, pick)  # incremental, on the backend's KV cache
        else:
            for i, prefix in enumerate(prefixes):
                ids = list(prefix)
                for _ in range(n_new):
                    ids.append(pick(i, np.asarray(backend.forward(ids, hidden_states=False).logits[-1])))
        for p, prefix, top in zip(chosen, prefixes, steps, strict=True):
            out[p.id] = {"prefix_len": len(prefix), "generated": [t[0] for t in top], "top": top,
                         "index": prompts.index(p.id)}
    progress(f"{label}  greedy: {len(out)} prompts x {n_new} tokens")
    return out


def _probe_length(tokens: int) -> int:
    """How many first positions of the longest prompt the causality probe runs alone."""
    return min(128, tokens // 2)


def _causality_probe(backend, stored: np.ndarray, longest: tuple[str, list[int]]) -> dict[str, Any]:
    """Logits of the first n tokens must not change when more tokens follow. ``stored``: the full run's
    first n logits as stored (kept in memory: a streamed B stores none)."""
    pid, tokens = longest
    n = len(stored)
    prefix = backend.forward(tokens[:n], hidden_states=False).logits
    full = np.asarray(stored, dtype=np.float64)
    # rounded as the stored logits were (--convdiff-cache-dtype float16), so storage is not mistaken for leakage
    prefix = np.asarray(prefix, dtype=stored.dtype).astype(np.float64)
    diff = np.abs(prefix - full)
    worst = int(np.argmax(diff.max(axis=1))) if diff.size else 0
    value = metrics.nmse(full, prefix)
    return {"prompt": pid, "prefix_len": n, "full_len": len(tokens), "nmse": value if not math.isnan(value) else None,
            "max_abs": float(diff.max()) if diff.size else 0.0, "worst_position": worst}
