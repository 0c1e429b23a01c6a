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
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import sources
from .backends import backend_capabilities, backend_module, detect_backend, normalize_backend_name, registry
from .backends.base import LAYER_SWAP, ModelInfo, PrefixKeeper
from .core import compact, metrics, routing
from .core.code_version import code_digest
from .core.corpus import Corpus
from .core.settings import (
    LAYER_SWAP_NEEDS_FULL,
    RunSettings,
    cache_dtype_name,
    store_name,
)
from .errors import ConvdiffError, ModelLoadError
from .pair import PairReducer, reduced_against
from .sources import SourceKind
from .store.budget import expected_entry_bytes
from .store.cache import Cache, content_fingerprint, make_key
from .store.kld_file import evaluated_chunk
from .store.run import ModelRun

__all__ = ["ModelRun", "ModelSpec", "RunSettings", "cache_dtype_name", "run_key", "run_model", "store_name"]

Progress = Callable[[str], None]


def quiet(_msg: str) -> None:
    """A progress callback that says nothing."""


# The leading logits of the longest prompt kept in memory for producers (the causality probe): a streamed B
# stores none, and the probe needs them as stored.
LEADING_ROWS = 128


@dataclass
class ProduceContext:
    """What a producer gets after the corpus ran: the loaded model, the corpus, A's run (for B), the
    settings, the prompt ids run, the longest prompt's (id, inputs) and its first ``LEADING_ROWS``
    logits as stored (None when the corpus is empty)."""

    backend: Any
    spec: ModelSpec
    corpus: Corpus
    feed: ModelRun | None
    settings: RunSettings
    prompts: list[str]
    longest: tuple[str, list[int]] | None
    leading_logits: np.ndarray | None
    progress: Progress
    label: str

    def piece(self, token_id: int) -> str:
        """A token's text for messages, never raising (a backend that cannot decode it gives ``<id>``)."""
        return _safe_piece(self.backend, token_id)


@dataclass(frozen=True)
class Producer:
    """Something a check family records from a loaded model beside its outputs over the corpus: ``run``'s
    JSON-serialisable value is kept in the run's ``meta[key]`` when ``enabled(settings)``. ``code`` (a
    digest of the family's source) is part of the run's cache key."""

    key: str
    enabled: Callable[[RunSettings], bool]
    run: Callable[[ProduceContext], Any]
    code: str = ""
    # the token prefixes ``run`` continues from, given (feed, corpus): kept by a backend that can keep them
    prefixes: Callable[[ModelRun | None, Corpus], list[list[int]]] | None = None


@dataclass
class ModelSpec:
    """Which model to run and how: a path, a backend (detected when None) and backend options."""

    path: str
    backend: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # a pathlib.Path is what a notebook passes; the spec is keyed and stored as JSON, so it holds a str
        self.path = os.fspath(self.path)

    def kind(self) -> SourceKind:
        """What this path is: a model a backend runs, a saved reference, a llama-perplexity base file."""
        return sources.kind_of(self)

    def capabilities(self) -> frozenset[str]:
        """What it gives (``sources``' vocabulary, and a model's backend's ``CAPABILITIES``)."""
        kind = self.kind()
        if kind is not sources.MODEL:
            return kind.gives
        try:
            backend = registry.get(self.resolved_backend())
        except (ConvdiffError, ValueError):  # not recognised: it errors the pair where it is run, saying why
            return kind.gives
        gives = set(kind.gives) | backend.capabilities
        if backend.open_weights is None:
            gives.discard(sources.TENSORS)
        if backend.read_config is None:
            gives.discard(sources.CONFIG)
        return frozenset(gives)

    def can(self, *what: str) -> bool:
        """Whether it gives every one of ``what``."""
        return set(what) <= self.capabilities()

    def resolved_backend(self) -> str:
        """The backend's name; a stored source's display name (``"reference"``, ``"llama-perplexity base"``:
        neither has a backend module)."""
        kind = self.kind()
        if kind.display is not None:
            return kind.display
        return normalize_backend_name(self.backend) if self.backend else detect_backend(self.path)

    def probe(self) -> ModelInfo:
        """Cheap facts about the model (layer count for collection); a stored source's come from its header."""
        kind = self.kind()
        if kind.probe is not None:
            return kind.probe(self)
        mod = backend_module(self.resolved_backend())
        return mod.probe(Path(self.path), self.options)

    def fingerprint(self) -> str:
        p = Path(self.path)
        if not self.can(sources.RUNS):  # a stored source: its file is all it is
            return content_fingerprint([p], p.parent)
        mod = backend_module(self.resolved_backend())
        files = mod.fingerprint_files(p)
        own = content_fingerprint(files, p if p.is_dir() else p.parent)
        other = (self.options or {}).get("weights_from")
        if other:  # a runtime twin: its outputs depend on the other model's weights as much as on this one
            o = Path(other)
            return own + "+" + content_fingerprint([o], o.parent)
        return own


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
        "outputs": OUTPUTS_VERSION,
    }


# What a run records besides logits and states; raised when a run gains arrays (2: MoE routers) or reads them
# otherwise (3: a biased router's logits as llama.cpp chooses by them), so that an entry cached by an older
# version is recomputed rather than read without them.
OUTPUTS_VERSION = 3

# The modules that bring B's tensors into A's architecture for a runtime twin (names, conventions, placement).
TWIN_LOADING = ("pytest_convdiff.backends.hf", "pytest_convdiff.backends.pairing", "pytest_convdiff.backends.tensors",
                "pytest_convdiff.backends.conventions", "pytest_convdiff.backends.restructure")


def _key(parts: dict[str, Any], feed: ModelRun | None, settings: RunSettings) -> str:
    extra: dict[str, Any] = {"settings": settings.key(fed=feed is not None)}
    if (parts.get("options") or {}).get("weights_from"):  # a runtime twin: which of B's values it runs is this code's
        extra["twin_loading"] = code_digest(TWIN_LOADING)
    if feed is None and settings.store == "compact":  # what A's compact entry holds depends on this code
        extra["compact"] = [compact.CompactConfig().to_dict(), compact.code_digest()]
    if _streams(feed, settings):

        extra["reduced_against"] = reduced_against(feed)  # a streamed B holds metrics of this A and this code
    elif feed is not None and settings.layer_swap and settings.hidden_states:
        extra["swap_from"] = feed.entry.identity  # a kept B's layer-swap states are run from A's hidden states
    return make_key({**parts, **extra})


def run_key(spec: ModelSpec, corpus: Corpus, feed: ModelRun | None, settings: RunSettings) -> str:
    return _key(_key_parts(spec, corpus, feed), feed, settings)


@dataclass(frozen=True)
class Companion:
    """Another run of the same model whose outputs the main run's forwards already compute: the prompts of
    ``corpus``, each on ``feed``'s tokens, reduced against ``feed`` (the runtime twin's B against T, over the
    twin's prompts' first tokens). A causal model's outputs at a prompt's first n positions are those of a run
    over those n tokens, so the main run writes this run's entry too, as ``run_model(spec, corpus, feed=feed,
    settings=settings)`` would, and that later call finds it in the cache instead of loading the model again.
    A prompt whose tokens are not a prefix of the main run's leaves the companion out (it then runs itself)."""

    corpus: Corpus
    feed: ModelRun
    settings: RunSettings

    def usable_with(self, corpus: Corpus, feed: ModelRun | None, settings: RunSettings) -> bool:
        """Whether a main run of ``corpus`` on ``feed``'s tokens computes every output this one needs."""
        if (feed is None or feed.base_file or self.feed.base_file or not _streams(self.feed, self.settings)
                or self.settings.keep_b):
            return False
        if self.settings.hidden_states and not settings.hidden_states:
            return False
        if settings.max_tokens and not (self.settings.max_tokens and self.settings.max_tokens <= settings.max_tokens):
            return False  # its own tokens (and their pieces) would be cut shorter than a run of its own cuts them
        main = {p.id: p.text for p in corpus}
        for p in self.corpus:
            if main.get(p.id) != p.text or p.id not in feed.prompt_ids or p.id not in self.feed.prompt_ids:
                return False
            mine, theirs = list(self.feed.inputs(p.id)), list(feed.inputs(p.id))
            if not mine or mine != theirs[: len(mine)]:
                return False
        return True


def _lookup(spec: ModelSpec, corpus: Corpus, cache: Cache, feed: ModelRun | None, settings: RunSettings,
            producers: Sequence[Producer]) -> tuple[str, Any]:
    """(the run's cache key, its stored entry or None): the entry under that key, or, for a streamed B, the
    entry of a run that kept B's arrays, which serves as well."""
    parts = _key_parts(spec, corpus, feed)
    parts["producers"] = sorted([p.key, p.code] for p in producers if p.enabled(settings))
    key = _key(parts, feed, settings)
    entry = cache.get(key)
    if entry is None and _streams(feed, settings):
        entry = cache.get(_key(parts, feed, replace(settings, keep_b=True)))
    return key, entry


def run_cached(spec: ModelSpec, corpus: Corpus, cache: Cache, *, feed: ModelRun | None = None,
               settings: RunSettings | None = None, producers: Sequence[Producer] = ()) -> bool:
    """Whether ``run_model`` with these arguments would be served from the cache (nothing loaded)."""
    settings = settings or RunSettings()
    return spec.kind().open_run is not None or _lookup(spec, corpus, cache, feed, settings, producers)[1] is not None


class _CompanionWriter:
    """One companion's entry, written from the main run's outputs prompt by prompt (``Companion``)."""

    def __init__(self, c: Companion, writer: Any) -> None:
        self.c, self.writer = c, writer
        self.reducer = PairReducer(c.feed)
        self.wanted = {p.id for p in c.corpus}
        self.prompts: list[str] = []
        self.pieces: dict[str, list[str]] = {}
        self.truncated: dict[str, int] = {}
        self.sub_names: set[str] = set()
        self.shapes: dict[str, Any] = {}
        self.routed = False
        self.failed = False  # its reduction raised: aborted, and run by itself when asked for

    def add(self, pid: str, own: list[int], full_length: int, out: Any, pieces: list[str],
            shared: metrics.SharedRows | None = None) -> None:
        """The main run's outputs of prompt ``pid`` (``own``: its tokens by the model's tokenizer, cut to the
        main run's limit; ``full_length``: their number uncut; ``shared``: B's own figures of the rows, made by
        whichever reduction of them comes first)."""
        c, store = self.c, np.dtype(self.c.settings.cache_dtype)
        inputs = list(c.feed.inputs(pid))
        n = len(inputs)
        limit = c.settings.max_tokens
        mine = own[:limit] if limit else own
        if limit and full_length > limit:
            self.truncated[pid] = full_length
        i = len(self.prompts)
        self.prompts.append(pid)
        self.writer.add(f"p{i}.own_tokens", np.asarray(mine, dtype=np.int64))
        self.writer.add(f"p{i}.inputs", np.asarray(inputs, dtype=np.int64))
        logits = np.asarray(out.logits[:n], dtype=store)
        hidden = (np.asarray(out.hidden[:, :n], dtype=store) if out.hidden is not None and c.settings.hidden_states
                  else None)
        subs = ({k: np.asarray(v[:, :n], dtype=store) for k, v in out.sublayers.items()}
                if c.settings.hidden_states else {})
        self.sub_names.update(subs)
        router = (routing.summarise(out.router[:, :n]) if out.router is not None and c.settings.hidden_states
                  else None)  # a run without hidden states captures no router either
        self.routed = self.routed or router is not None
        if not self.shapes:
            self.shapes = {"vocab": int(logits.shape[-1]),
                           "hidden": [int(hidden.shape[0]), int(hidden.shape[-1])] if hidden is not None else None}
        self.reducer.add(pid, logits, hidden, subs, None, router, shared=shared)
        self.pieces[pid] = pieces[: len(mine)]

    def commit(self, base: dict[str, Any], experts_used: int | None) -> None:
        """The entry, with the main run's description of the model (``base``) and this run's own records."""
        if self.failed:
            return
        if self.prompts != [p.id for p in self.c.corpus]:  # the corpus's order, as run_model writes them
            self.writer.abort()
            return
        meta = {**base, "prompts": self.prompts, "pieces": self.pieces, "truncated": self.truncated,
                "max_tokens": self.c.settings.max_tokens, "sublayers": sorted(self.sub_names),
                "router": {"k": int(experts_used)} if self.routed and experts_used else None,
                "layer_swap": None, "created": time.time(), "shapes": self.shapes,
                "streamed": {**reduced_against(self.c.feed), "a_path": self.c.feed.spec.path},
                "pair_metrics": self.reducer.result().to_dict(), "companion_of": base["spec"]["path"]}
        self.writer.commit(meta)


def _safe_piece(backend, token_id: int) -> str:
    try:
        return backend.decode_piece(int(token_id))
    except Exception:  # noqa: BLE001 - a piece is only for display
        return f"<{token_id}>"


def run_model(spec: ModelSpec, corpus: Corpus, cache: Cache, *, feed: ModelRun | None = None,
              settings: RunSettings | None = None, progress: Progress = quiet, label: str = "",
              producers: Sequence[Producer] = (), companions: Sequence[Companion] = ()) -> ModelRun:
    """The model's outputs for the corpus: from the cache when valid, else computed and cached.

    ``feed``: the run whose token ids this model must be evaluated on (A's), so a
    tokenizer difference fails the token checks without hiding how logits compare.
    ``producers``: what check families record from the loaded model besides its outputs (greedy
    continuations, the causality probe, tokenizer cases: ``checks.producers()``); each enabled one's
    value is kept in the run's ``meta`` under its key.
    ``companions``: other runs of this model that this run's forwards compute as well (``Companion``); their
    entries are written beside this one when it runs, and are not when it is served from the cache.
    """
    settings = settings or RunSettings()
    kind = spec.kind()
    if kind.open_run is not None:  # a stored source: its outputs are read, nothing runs
        if feed is not None and kind.only_as_a:
            raise ModelLoadError(f"{spec.path}: {kind.only_as_a}, so it can only be model A (--model-a). Pass "
                                 "the converted model itself as --model-b.")
        run = kind.open_run(spec, corpus, settings)
        progress(f"{label}{spec.path}: {_served(run, kind)}")
        return run
    key, entry = _lookup(spec, corpus, cache, feed, settings, producers)
    if entry is not None:
        progress(f"{label}{spec.path}: outputs served from cache {entry.path.name}")
        return ModelRun(spec, entry, from_cache=True)

    mod = backend_module(spec.resolved_backend())
    t0 = time.perf_counter()
    progress(f"{label}loading {spec.path} ({spec.resolved_backend()})")
    options = dict(spec.options)
    if feed is not None and feed.base_file:  # scored as llama-perplexity scores it: that tool's defaults
        options = {**getattr(mod, "TOOL_DEFAULTS", {}), **options}
    backend = mod.load(Path(spec.path), options)
    writer = cache.writer(key)
    extra: list[_CompanionWriter] = []
    try:
        for c in companions:
            try:  # a companion is an optimisation: one that cannot be set up runs by itself when asked for
                ckey, stored = _lookup(spec, c.corpus, cache, c.feed, c.settings, ())  # as its own run keys it
                if c.usable_with(corpus, feed, settings) and stored is None:
                    extra.append(_CompanionWriter(c, cache.writer(ckey)))
            except Exception:  # noqa: BLE001
                continue
        # Before any forward pass: room for the entry in the cache's budget and on the disk, or a readable
        # CacheError saying how much is needed and where.
        tokens = sum(len(feed.inputs(p.id)) if feed is not None
                     else len(backend.tokenize(p.text)[: settings.max_tokens or None]) for p in corpus)
        cache.reserve(expected_entry_bytes(backend.info, tokens, settings, fed=feed is not None),
                      f"{spec.path} ({spec.resolved_backend()})", writer=writer)
        progress(f"{label}loaded in {time.perf_counter() - t0:.1f}s; running {len(corpus)} prompts"
                 + (", reduced against A's outputs as they come" if _streams(feed, settings) else ""))
        meta = _produce(backend, spec, corpus, feed, settings, writer, progress, label, producers, extra)
        entry = writer.commit(meta)
    except BaseException:
        writer.abort()
        for w in extra:
            w.writer.abort()
        raise
    else:
        base = {k: meta[k] for k in ("info", "spec", "special")}
        for w in extra:  # a companion that cannot be written is run by itself when asked for: never an error here
            try:
                w.commit(base, getattr(backend, "experts_used", None))
            except Exception:  # noqa: BLE001
                w.writer.abort()
    finally:
        backend.close()
    progress(f"{label}done in {time.perf_counter() - t0:.1f}s")
    return ModelRun(spec, entry, from_cache=False)


def _served(run: ModelRun, kind: SourceKind) -> str:
    """The progress line of a stored source: what serves A's outputs."""
    ref = run.meta.get("reference")
    if ref:
        return (f"outputs served from the saved reference of {ref.get('model', '?')} ({ref.get('backend', '?')}, "
                f"saved {ref.get('created', '?')})")
    return f"A served from a {kind.name} (no model loaded)"


def _produce(backend, spec: ModelSpec, corpus: Corpus, feed: ModelRun | None, settings: RunSettings,
             writer, progress: Progress, label: str, producers: Sequence[Producer],
             companions: Sequence[_CompanionWriter] = ()) -> dict[str, Any]:
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
    routed = False
    shapes: dict[str, Any] = {}
    longest: tuple[str, list[int]] | None = None
    probe_rows: np.ndarray | None = None  # the longest prompt's first logits as stored (ProduceContext)
    swap_error: str | None = None
    special = backend.special_tokens()
    if isinstance(backend, PrefixKeeper):
        backend.keep_prefixes([p for producer in producers if producer.enabled(settings) and producer.prefixes
                               for p in producer.prefixes(feed, corpus)])
    for i, prompt in enumerate(corpus):
        own = backend.tokenize(prompt.text)
        full_length = len(own)
        if settings.max_tokens and len(own) > settings.max_tokens:
            truncated[prompt.id] = len(own)
            own = own[: settings.max_tokens]
        inputs = feed.inputs(prompt.id) if feed is not None else own
        if feed is not None and feed.base_file:  # a base file's chunk, run as llama-perplexity runs it
            inputs = evaluated_chunk(inputs, special)
        if not inputs:
            raise ConvdiffError(f"prompt {prompt.id!r} tokenizes to nothing for {spec.path}; remove it from the corpus.")
        if feed is not None and info.vocab_size and max(inputs) >= info.vocab_size:
            raise ModelLoadError(
                f"{spec.path}: model A's token id {max(inputs)} is outside this model's vocabulary "
                f"({info.vocab_size}); the models do not share a vocabulary, so logits cannot be compared."
            )
        out = backend.forward(inputs, hidden_states=settings.hidden_states)
        pieces[prompt.id] = [_safe_piece(backend, t) for t in own]
        shared = metrics.SharedRows() if companions else None  # B's rows, reduced against A and the companions'
        for c in companions:
            if prompt.id in c.wanted and not c.failed:
                try:
                    c.add(prompt.id, own, full_length, out, pieces[prompt.id], shared)
                except Exception:  # noqa: BLE001 - dropped, never the main run's error: it runs by itself later
                    c.failed = True
                    c.writer.abort()
        prompts.append(prompt.id)
        writer.add(f"p{i}.own_tokens", np.asarray(own, dtype=np.int64))
        writer.add(f"p{i}.inputs", np.asarray(inputs, dtype=np.int64))
        # rounded to the cache dtype either way, so a streamed B reduces the values a kept B would store
        logits = np.asarray(out.logits, dtype=store)
        hidden = np.asarray(out.hidden, dtype=store) if out.hidden is not None else None
        subs = {name: np.asarray(arr, dtype=store) for name, arr in out.sublayers.items()}
        sub_names.update(subs)
        router = routing.summarise(out.router) if out.router is not None else None
        if router is not None:  # small (KEPT per position and layer), so stored in every form
            routed = True
            if reducer is None:
                writer.add(f"p{i}.router_ids", router[0])
                writer.add(f"p{i}.router_logits", router[1])
        swap = None
        if feed is not None and settings.layer_swap and settings.hidden_states and swap_error is None:
            swap, swap_error = _layer_swap(backend, feed, prompt.id, inputs, settings.layer_swap)
        if not shapes:
            shapes = {"vocab": int(logits.shape[-1]),
                      "hidden": [int(hidden.shape[0]), int(hidden.shape[-1])] if hidden is not None else None}
        if reducer is not None:
            reducer.add(prompt.id, logits, hidden, subs, swap, router, shared=shared)
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
        if longest is None or len(inputs) > len(longest[1]):
            longest = (prompt.id, list(inputs))
            probe_rows = np.array(logits[:LEADING_ROWS])
        del out, logits, hidden, subs, swap, router, shared  # before the next forward: one prompt's outputs in memory at a time
        progress(f"{label}  [{i + 1}/{len(corpus)}] {prompt.id}: {len(inputs)} tokens")

    meta: dict[str, Any] = {
        "info": info.to_dict(),
        "spec": {"path": spec.path, "backend": spec.resolved_backend(), "options": spec.options},
        "prompts": prompts,
        "pieces": pieces,
        "truncated": truncated,
        "max_tokens": settings.max_tokens,
        "sublayers": sorted(sub_names),
        # a mixture of experts: how many experts each token is sent to (its routers' top k)
        "router": {"k": int(backend.experts_used)} if routed and getattr(backend, "experts_used", None) else None,
        "special": special,
        "layer_swap": {"k": settings.layer_swap, "error": swap_error} if feed is not None and settings.layer_swap else None,
        "created": time.time(),
    }
    meta["shapes"] = shapes  # what the checks need of arrays not stored: the vocabulary, (layers, hidden size)
    if feed is None:
        meta["store"] = {"form": "compact", **cfg.to_dict()} if cfg is not None else {"form": "full"}
    if reducer is not None:

        meta["streamed"] = {**reduced_against(feed), "a_path": feed.spec.path}
        meta["pair_metrics"] = reducer.result().to_dict()
    ctx = ProduceContext(backend, spec, corpus, feed, settings, prompts, longest, probe_rows, progress, label)
    for producer in producers:
        if producer.enabled(settings):
            value = producer.run(ctx)
            if value is not None:
                meta[producer.key] = value
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
