"""Run one model over the corpus into a cache entry, or find the entry already there.

A model is loaded only when its entry is missing, used for everything it has to
produce (tokens, logits, hidden states, tokenizer cases, the causality probe),
and closed before the next model loads: one model in memory at a time.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import metrics
from .backends import backend_module, detect_backend, normalize_backend_name
from .backends.base import ModelInfo
from .cache import Cache, CacheEntry, content_fingerprint, make_key
from .corpus import Corpus
from .errors import ConvdiffError, ModelLoadError
from .tokenizer_cases import TOKENIZER_CASES

Progress = Callable[[str], None]
CACHE_DTYPES = ("float32", "float16")
_CACHE_DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "fp16": "float16", "f16": "float16", "half": "float16"}


def cache_dtype_name(name: str) -> str:
    """``float32`` or ``float16`` (also accepting fp32/f32/fp16/f16/half); ValueError otherwise."""
    key = str(name).strip().lower()
    key = _CACHE_DTYPE_ALIASES.get(key, key)
    if key not in CACHE_DTYPES:
        raise ValueError(f"{name!r} is not one of {', '.join(CACHE_DTYPES)}")
    return key


def _quiet(_msg: str) -> None:
    pass


@dataclass
class ModelSpec:
    """Which model to run and how: a path, a backend (detected when None) and backend options."""

    path: str
    backend: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def resolved_backend(self) -> str:
        return normalize_backend_name(self.backend) if self.backend else detect_backend(self.path)

    def probe(self) -> ModelInfo:
        name = self.resolved_backend()
        mod = backend_module(name)
        return mod.probe(Path(self.path), self.options)

    def fingerprint(self) -> str:
        mod = backend_module(self.resolved_backend())
        p = Path(self.path)
        files = mod.fingerprint_files(p)
        return content_fingerprint(files, p if p.is_dir() else p.parent)


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

    def __post_init__(self) -> None:
        self.cache_dtype = cache_dtype_name(self.cache_dtype)  # one spelling, so one cache key

    def key(self, fed: bool = True) -> dict[str, Any]:
        out = dict(self.__dict__)
        if not fed:
            out.pop("layer_swap")
        return out


class ModelRun:
    """A model's outputs over the corpus, backed by a verified cache entry."""

    def __init__(self, spec: ModelSpec, entry: CacheEntry, from_cache: bool) -> None:
        self.spec = spec
        self.entry = entry
        self.from_cache = from_cache
        self.meta = entry.meta

    @property
    def info(self) -> dict[str, Any]:
        return self.meta["info"]

    @property
    def prompt_ids(self) -> list[str]:
        return list(self.meta["prompts"])

    def _name(self, pid: str, what: str) -> str:
        return f"p{self.meta['prompts'].index(pid)}.{what}"

    def own_tokens(self, pid: str) -> list[int]:
        return [int(x) for x in self.entry.array(self._name(pid, "own_tokens"))]

    def inputs(self, pid: str) -> list[int]:
        return [int(x) for x in self.entry.array(self._name(pid, "inputs"))]

    def pieces(self, pid: str) -> list[str]:
        return self.meta["pieces"][pid]

    def logits(self, pid: str) -> np.ndarray:
        return self.entry.array(self._name(pid, "logits"))

    def hidden(self, pid: str) -> np.ndarray | None:
        name = self._name(pid, "hidden")
        return self.entry.array(name) if self.entry.has(name) else None

    def hidden_swap(self, pid: str) -> np.ndarray | None:
        """Hidden states from the layer-swap run (A's states fed in for the first k layers), if any."""
        name = self._name(pid, "hidden_swap")
        return self.entry.array(name) if self.entry.has(name) else None

    def sublayers(self, pid: str) -> dict[str, np.ndarray]:
        out = {}
        for sub in self.meta.get("sublayers", []):
            name = self._name(pid, f"sub_{sub}")
            if self.entry.has(name):
                out[sub] = self.entry.array(name)
        return out

    @property
    def special(self) -> dict[str, Any]:
        return self.meta.get("special", {})

    @property
    def tokenizer_cases(self) -> dict[str, list[dict[str, Any]]]:
        return self.meta.get("tokenizer_cases", {})

    @property
    def causality(self) -> dict[str, Any] | None:
        return self.meta.get("causality")


def _digest_tokens(feed: ModelRun | None) -> str:
    if feed is None:
        return "own"
    h = hashlib.sha256()
    for pid in feed.prompt_ids:
        h.update(pid.encode())
        h.update(np.asarray(feed.inputs(pid), dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def run_key(spec: ModelSpec, corpus: Corpus, feed: ModelRun | None, settings: RunSettings) -> str:
    backend = spec.resolved_backend()
    mod = backend_module(backend)
    return make_key({
        "model": str(Path(spec.path).resolve()),
        "fingerprint": spec.fingerprint(),
        "backend": backend,
        "library": mod.library_version(),
        "options": spec.options,
        "corpus": corpus.digest,
        "inputs": _digest_tokens(feed),
        "settings": settings.key(fed=feed is not None),
    })


def _safe_piece(backend, token_id: int) -> str:
    try:
        return backend.decode_piece(int(token_id))
    except Exception:  # noqa: BLE001 - a piece is only for display
        return f"<{token_id}>"


def run_model(spec: ModelSpec, corpus: Corpus, cache: Cache, *, feed: ModelRun | None = None,
              settings: RunSettings | None = None, progress: Progress = _quiet, label: str = "") -> ModelRun:
    """The model's outputs for the corpus: from the cache when valid, else computed and cached.

    ``feed``: the run whose token ids this model must be evaluated on (A's), so a
    tokenizer difference fails the token checks without hiding how logits compare.
    """
    settings = settings or RunSettings()
    if spec.resolved_backend() == "reference":
        from .reference import reference_run_for

        return reference_run_for(spec, corpus, feed=feed, settings=settings, progress=progress, label=label)
    key = run_key(spec, corpus, feed, settings)
    entry = cache.get(key)
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
        progress(f"{label}loaded in {time.perf_counter() - t0:.1f}s; running {len(corpus)} prompts")
        meta = _produce(backend, spec, corpus, feed, settings, writer, progress, label)
        entry = writer.commit(meta)
    except BaseException:
        writer.abort()
        raise
    finally:
        backend.close()
    progress(f"{label}done in {time.perf_counter() - t0:.1f}s")
    return ModelRun(spec, entry, from_cache=False)


def _produce(backend, spec: ModelSpec, corpus: Corpus, feed: ModelRun | None, settings: RunSettings,
             writer, progress: Progress, label: str) -> dict[str, Any]:
    info: ModelInfo = backend.info
    store = np.dtype(settings.cache_dtype)
    prompts: list[str] = []
    pieces: dict[str, list[str]] = {}
    truncated: dict[str, int] = {}
    sub_names: set[str] = set()
    longest: tuple[str, list[int]] | None = None
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
        writer.add(f"p{i}.logits", np.asarray(out.logits, dtype=store))
        if out.hidden is not None:
            writer.add(f"p{i}.hidden", np.asarray(out.hidden, dtype=store))
        if feed is not None and settings.layer_swap and settings.hidden_states and swap_error is None:
            swap_error = _layer_swap(backend, feed, prompt.id, inputs, settings.layer_swap, writer, i)
        for name, arr in out.sublayers.items():
            sub_names.add(name)
            writer.add(f"p{i}.sub_{name}", np.asarray(arr, dtype=store))
        pieces[prompt.id] = [_safe_piece(backend, t) for t in own]
        if longest is None or len(inputs) > len(longest[1]):
            longest = (prompt.id, list(inputs))
        progress(f"{label}  [{i + 1}/{len(corpus)}] {prompt.id}: {len(inputs)} tokens")

    meta: dict[str, Any] = {
        "info": info.to_dict(),
        "spec": {"path": spec.path, "backend": spec.resolved_backend(), "options": spec.options},
        "prompts": prompts,
        "pieces": pieces,
        "truncated": truncated,
        "sublayers": sorted(sub_names),
        "special": backend.special_tokens(),
        "layer_swap": {"k": settings.layer_swap, "error": swap_error} if feed is not None and settings.layer_swap else None,
        "created": time.time(),
    }
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
    if settings.causality and longest is not None and len(longest[1]) >= 8:
        meta["causality"] = _causality_probe(backend, writer, prompts.index(longest[0]), longest)
    return meta


def _layer_swap(backend, feed: ModelRun, pid: str, inputs: list[int], k: int, writer, index: int) -> str | None:
    """Run B again with A's hidden state replacing B's for layers < k; None when it worked."""
    hidden_a = feed.hidden(pid)
    if hidden_a is None:
        return "model A has no hidden states"
    k = min(k, hidden_a.shape[0])
    try:
        out = backend.forward(inputs, hidden_states=True, inject={j: np.asarray(hidden_a[j]) for j in range(k)})
    except (NotImplementedError, TypeError):
        return f"the {backend.info.backend} backend cannot take injected hidden states"
    writer.add(f"p{index}.hidden_swap", np.asarray(out.hidden, dtype=np.float32))
    return None


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

        decode = getattr(backend, "greedy_decode", None)
        if decode is not None:
            decode(prefixes, n_new, pick)  # incremental, on the backend's KV cache
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


def _causality_probe(backend, writer, index: int, longest: tuple[str, list[int]]) -> dict[str, Any]:
    """Logits of the first n tokens must not change when more tokens follow."""
    pid, tokens = longest
    n = min(128, len(tokens) // 2)
    prefix = backend.forward(tokens[:n], hidden_states=False).logits
    stored = writer.array(f"p{index}.logits")[:n]
    full = np.asarray(stored, dtype=np.float64)
    # rounded as the stored logits were (--convdiff-cache-dtype float16), so storage is not mistaken for leakage
    prefix = np.asarray(prefix, dtype=stored.dtype).astype(np.float64)
    diff = np.abs(prefix - full)
    worst = int(np.argmax(diff.max(axis=1))) if diff.size else 0
    value = metrics.nmse(full, prefix)
    return {"prompt": pid, "prefix_len": n, "full_len": len(tokens), "nmse": value if not math.isnan(value) else None,
            "max_abs": float(diff.max()) if diff.size else 0.0, "worst_position": worst}
