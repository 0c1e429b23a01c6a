"""The pair's metrics: B's outputs reduced against A's stored run, before any bound is applied.

The layer between the runner (which produces one model's outputs) and the checks (which judge them):
``PairReducer`` takes B's outputs one prompt at a time, either as the runner produces them (B streamed)
or from B's stored arrays (``pair_metrics``), so both give the same ``PairMetrics``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from .core import compact, kernels, llama_stats, metrics, routing
from .core.code_version import code_digest
from .core.corpus import Corpus
from .errors import ConvdiffError
from .store.cache import Cache, make_key
from .store.run import ModelRun

__all__ = ["PairMetrics", "PairReducer", "pair_metrics", "pair_metrics_key",
           "reduced_against"]



@dataclass
class PairMetrics:
    """What the arrays of a pair reduce to, before any bound is applied: the costly part of
    evaluation, stored in the cache so a warm run (or another set of bounds) reuses it."""

    logits: metrics.LogitMetrics | None = None  # None: the vocabularies differ
    layers: metrics.LayerMetrics | None = None  # None: no hidden states, or shapes that do not pair
    swap_rfn: list[float] | None = None  # per-layer rfn of the layer-swap run, when there is one
    routing: routing.RoutingMetrics | None = None  # a mixture of experts: where B's routers chose otherwise

    def to_dict(self) -> dict[str, Any]:
        layers = None
        if self.layers is not None:  # LayerMetrics.to_dict leaves the position profile out; a stored copy needs it
            layers = {**self.layers.to_dict(), "position_profile": self.layers.position_profile}
        return {"logits": self.logits.to_dict() if self.logits else None, "layers": layers,
                "swap_rfn": self.swap_rfn, "routing": self.routing.to_dict() if self.routing else None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PairMetrics:
        return cls(metrics.LogitMetrics.from_dict(d["logits"]) if d.get("logits") else None,
                   metrics.LayerMetrics.from_dict(d["layers"]) if d.get("layers") else None, d.get("swap_rfn"),
                   routing.RoutingMetrics.from_dict(d["routing"]) if d.get("routing") else None)


def _metrics_code_digest() -> str:
    """Stored pair metrics are reused only by the code that computed them: this module's reduction and the
    metric, summary and kernel modules it calls."""
    return code_digest((__name__, metrics.__name__, routing.__name__, compact.__name__, kernels.__name__, llama_stats.__name__,
                        "pytest_convdiff.store.run", "pytest_convdiff.store.kld_file", "pytest_convdiff.store.kld_run"))


def reduced_against(a: ModelRun) -> dict[str, Any]:
    """What a B streamed against ``a`` depends on besides its own model: A's stored outputs and the metric
    code (part of the streamed B's cache key, and recorded in its entry)."""
    return {"a": a.entry.identity, "code": _metrics_code_digest()}


def pair_metrics_key(a: ModelRun, b: ModelRun, corpus: Corpus) -> str:
    return make_key({"pair_metrics": _metrics_code_digest(), "corpus": corpus.digest,
                     "a": a.entry.identity, "b": b.entry.identity})


def _pairable_logits(a: ModelRun, vocab_b: int | None) -> bool:
    """A's logits and B's compare position by position: the same vocabulary width."""
    va = a.vocab_width()
    return va is not None and va == vocab_b


def _pairable_layers(a: ModelRun, dims_b: tuple[int, int] | None) -> bool:
    """A's hidden states and B's pair layer by layer: the same (layers, hidden size)."""
    da = a.hidden_dims()
    return da is not None and da == dims_b


class PairReducer:
    """B's outputs reduced against A's stored run, one prompt at a time, into the pair's metrics.

    One reduction for both ways B is served: the runner feeds it B's outputs as they are produced (B
    streamed: none of them is written), ``pair_metrics`` feeds it B's stored arrays (B kept), so both
    give the same metrics. Whether logits and layers pair is decided on the first prompt (the corpus's
    first); the shapes are the same for every prompt.
    """

    def __init__(self, a: ModelRun) -> None:
        self.a = a
        self._logits: metrics.LogitAccumulator | None = None
        self._layers: metrics.LayerAccumulator | None = None
        self._swap: metrics.LayerAccumulator | None = None
        self._router: routing.RouterAccumulator | None = None
        self._started = False

    def add(self, pid: str, logits: np.ndarray | None, hidden: np.ndarray | None = None,
            sublayers: dict[str, np.ndarray] | None = None, hidden_swap: np.ndarray | None = None,
            router: tuple[np.ndarray, np.ndarray] | None = None, shared: metrics.SharedRows | None = None) -> None:
        """One prompt of B, each array as stored: logits ``[T, V]``, hidden ``[L, T, H]``, sub-block outputs
        (the cache dtype), the layer-swap run's hidden states (float32), and a mixture of experts' kept router
        logits (``core.routing.summarise``); None for what B lacks. ``shared``: B's own figures of these logit
        rows, for the other reductions of the same rows (``metrics.SharedRows``)."""
        a = self.a
        mine = a.router(pid) if router is not None else None  # A's kept router logits, read once
        if not self._started:
            self._started = True
            vocab_b = logits.shape[-1] if logits is not None else None
            if a.base_file and not _pairable_logits(a, vocab_b):  # nothing else would be compared: an error
                raise ConvdiffError(f"{a.spec.path}: a llama-perplexity base file written for a vocabulary of "
                                    f"{a.vocab_width()} entries, but model B's logits have {vocab_b}; score it "
                                    "against a base file of a model with B's vocabulary.")
            if _pairable_logits(a, vocab_b):
                self._logits = metrics.LogitAccumulator()
            dims = (hidden.shape[0], hidden.shape[-1]) if hidden is not None else None
            if _pairable_layers(a, dims):
                self._layers = metrics.LayerAccumulator(dims[0])
                if hidden_swap is not None:
                    self._swap = metrics.LayerAccumulator(dims[0])
            k = (a.meta.get("router") or {}).get("k")
            if k and mine is not None:
                self._router = routing.RouterAccumulator(int(k))
        rerouted = reach = reach_logits = None
        if self._router is not None and mine is not None and mine[0].shape[:2] == router[0].shape[:2]:
            flipped = self._router.update(pid, mine[0], mine[1], router[0], router[1])
            rerouted, reach_logits = flipped.rerouted, flipped.logit_cone()
            if self._layers is not None and mine[0].shape[0] == self._layers.num_layers:
                reach = flipped.cone(self._layers.num_layers)
        if a.base_file:  # B's logits at each chunk's second half against a llama-perplexity base file's rows
            if self._logits is not None and logits is not None:
                rows, targets, first = a.base_rows(pid)
                self._logits.update_base(pid, rows, logits[first:first + rows.shape[0]], targets, first)
            return
        if a.compact:  # B against A's compact form (core.compact); A has no states to swap in
            cfg = a.compact_config()
            if self._logits is not None:
                self._logits.update_compact(pid, a.logit_summary(pid), logits, cfg, a.inputs(pid), rerouted=rerouted,
                                            reach=reach_logits, shared=shared)
            if self._layers is not None:
                self._layers.update_compact(pid, a.state_summary(pid), hidden, cfg, a.sub_summaries(pid),
                                            sublayers or {}, rerouted, reach)
            return
        if self._logits is not None:
            self._logits.update(pid, a.logits(pid), logits, a.inputs(pid), rerouted=rerouted, reach=reach_logits)
        if self._layers is not None:
            hidden_a = a.hidden(pid)
            self._layers.update(pid, hidden_a, hidden, a.sublayers(pid), sublayers or {}, rerouted, reach)
            if self._swap is not None:
                self._swap.update(pid, hidden_a, hidden_swap)

    def result(self) -> PairMetrics:
        return PairMetrics(self._logits.result() if self._logits is not None else None,
                           self._layers.result() if self._layers is not None else None,
                           self._swap.result().rfn if self._swap is not None else None,
                           self._router.result() if self._router is not None else None)


def _streamed_metrics(a: ModelRun, b: ModelRun) -> PairMetrics:
    """The metrics a streamed B's entry holds, provided they were reduced against this A by this code."""
    streamed = b.meta["streamed"]
    here = reduced_against(a)
    if streamed.get("a") != here["a"]:
        raise ConvdiffError(
            f"model B ({b.spec.path}) was streamed against other outputs of model A than those of {a.spec.path} "
            "given here: its entry holds that pair's metrics, not B's arrays. Run B again with this A as its feed "
            "(run_model(..., feed=run_a)), or keep B's arrays with --convdiff-keep-b / RunSettings(keep_b=True).")
    if streamed.get("code") != here["code"]:
        raise ConvdiffError(
            f"model B ({b.spec.path}) was streamed by another version of the metric code; its metrics cannot be "
            "reused and its arrays were not stored. Run B again (its cache key changes with the code, so a new "
            "run recomputes it).")
    return PairMetrics.from_dict(b.meta["pair_metrics"])


def pair_metrics(a: ModelRun, b: ModelRun, corpus: Corpus, cache: Cache | None = None) -> PairMetrics:
    """The pair's metrics: those a streamed B's entry holds (reduced while B ran, no read-back of A),
    else both runs' arrays reduced prompt by prompt, or read from ``cache`` when reduced before."""
    if b.meta.get("streamed") is not None:
        return _streamed_metrics(a, b)
    key = pair_metrics_key(a, b, corpus) if cache is not None else ""
    doc = cache.get_json(key) if cache is not None else None
    if doc is not None:
        with contextlib.suppress(KeyError, TypeError, ValueError):  # unreadable: recompute
            return PairMetrics.from_dict(doc["metrics"])
    reducer = PairReducer(a)
    for p in corpus:  # memory maps: only what pairs with A is read
        reducer.add(p.id, b.logits(p.id), b.hidden(p.id), b.sublayers(p.id), b.hidden_swap(p.id), b.router(p.id))
    out = reducer.result()
    if cache is not None:
        cache.put_json(key, {"metrics": out.to_dict(), "a": a.spec.path, "b": b.spec.path})
    return out
