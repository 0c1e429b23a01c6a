"""The read view of one model's outputs over a corpus, whichever store serves them.

``ModelRun`` lives in ``store`` (not in the runner that produces runs) so that a golden reference
can be served as a run without the store importing the runner: the store depends on nothing above it.

A model B that was *streamed* (the default) has no arrays: its outputs were reduced against A's
while it ran, and its entry holds its tokens, its records and the pair's metrics
(``meta["streamed"]``, ``meta["pair_metrics"]``) plus the shapes its arrays had (``meta["shapes"]``),
which is what the checks need of them.

A model A stored *compact* (the default, ``meta["store"]["form"] == "compact"``) has no logits or
states either, only what the metrics need of them (``core.compact``): ``logit_summary``,
``state_summary`` and ``sub_summaries`` serve those, and the full-array readers say how to keep them.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from ..core import compact
from ..errors import ConvdiffError
from .entry import Entry

STORE_FULL_HINT = ("Run with --convdiff-store full (ini convdiff_store = full; RunSettings(store='full') in the library) "
                   "to store them; the plugin turns it on by itself when a test uses the convdiff_pair fixture.")
BASE_FILE_FORM = "kld"  # ``meta["store"]["form"]`` of model A served from a llama-perplexity base file (store.kld_run)
KEEP_B_HINT = ("Run with --convdiff-keep-b (ini convdiff_keep_b; RunSettings(keep_b=True) in the library) to store "
               "them; the plugin turns it on by itself when a test uses the convdiff_pair fixture.")


class RunSource(Protocol):
    """What made a run, as far as readers need it: the model's path (``runner.ModelSpec`` is one)."""

    @property
    def path(self) -> str: ...


class ModelRun:
    """A model's outputs over the corpus, backed by a verified entry (cache entry or golden reference)."""

    def __init__(self, spec: RunSource, entry: Entry, from_cache: bool) -> None:
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

    @property
    def streamed(self) -> bool:
        """B reduced into the pair's metrics while it ran: its logits and hidden states were never stored."""
        return self.meta.get("streamed") is not None

    @property
    def compact(self) -> bool:
        """A's outputs stored compact: what the metrics need of them, not the arrays (``core.compact``)."""
        return (self.meta.get("store") or {}).get("form") == "compact"

    @property
    def base_file(self) -> bool:
        """A served from a llama-perplexity base file: per chunk, log-probabilities of its second half only."""
        return (self.meta.get("store") or {}).get("form") == BASE_FILE_FORM

    def base_rows(self, pid: str) -> tuple[np.ndarray, np.ndarray, int]:
        """A base file's encoded rows of a chunk, the token each row predicts, and the first scored position."""
        store = self.meta["store"]
        first = int(store["first"])
        return (self.entry.array(self._name(pid, "base_rows")),
                np.asarray(self.inputs(pid)[first + 1:], dtype=np.int64), first)

    def compact_config(self) -> compact.CompactConfig:
        return compact.CompactConfig.from_dict(self.meta["store"])

    def logit_summary(self, pid: str) -> compact.LogitSummary:
        def get(what: str) -> np.ndarray:
            return self.entry.array(self._name(pid, f"c_{what}"))

        return compact.LogitSummary(get("top_idx"), get("top_logit"), get("stats"), get("sketch"), get("sample"),
                                    get("rest_idx"), get("rest_logit"), int(self.meta["shapes"]["vocab"]))

    def _state(self, pid: str, prefix: str) -> compact.StateSummary | None:
        names = [self._name(pid, f"{prefix}_{what}") for what in ("sketch", "norm2", "nonfinite")]
        if not all(self.entry.has(n) for n in names):
            return None
        extra = {what: self._name(pid, f"{prefix}_{what}") for what in ("rows", "last")}
        return compact.StateSummary(*(self.entry.array(n) for n in names),
                                    **{k: self.entry.array(n) if self.entry.has(n) else None for k, n in extra.items()})

    def state_summary(self, pid: str) -> compact.StateSummary | None:
        """The compact hidden states of a prompt; None when the run has none."""
        return self._state(pid, "c_hidden")

    def sub_summaries(self, pid: str) -> dict[str, compact.StateSummary]:
        out = {}
        for sub in self.meta.get("sublayers", []):
            found = self._state(pid, f"c_sub_{sub}")
            if found is not None:
                out[sub] = found
        return out

    def _name(self, pid: str, what: str) -> str:
        return f"p{self.meta['prompts'].index(pid)}.{what}"

    def _arrays(self, what: str) -> None:
        """Refuse to serve arrays a streamed run never stored, saying how to keep them."""
        if self.streamed:
            raise ConvdiffError(
                f"model B ({self.spec.path}) was streamed: its outputs were reduced into the pair's metrics while "
                f"it ran and its {what} were not stored. {KEEP_B_HINT}")
        if self.base_file:
            raise ConvdiffError(
                f"model A ({self.spec.path}) is a llama-perplexity base file: it holds the log-probabilities of "
                f"each chunk's second half, not {what}. Pass the reference model itself as --model-a to get them.")
        if self.compact:
            raise ConvdiffError(
                f"model A ({self.spec.path}) is stored compact (--convdiff-store compact, the default): its {what} "
                f"were reduced to what the metrics need and not stored. {STORE_FULL_HINT}")

    def own_tokens(self, pid: str) -> list[int]:
        """The ids this model's own tokenizer gives the prompt."""
        return [int(x) for x in self.entry.array(self._name(pid, "own_tokens"))]

    def inputs(self, pid: str) -> list[int]:
        """The ids the model was run on (A's for model B, so logits stay comparable)."""
        return [int(x) for x in self.entry.array(self._name(pid, "inputs"))]

    def pieces(self, pid: str) -> list[str]:
        return self.meta["pieces"][pid]

    def logits(self, pid: str) -> np.ndarray:
        self._arrays("logits")
        return self.entry.array(self._name(pid, "logits"))

    def hidden(self, pid: str) -> np.ndarray | None:
        self._arrays("hidden states")
        name = self._name(pid, "hidden")
        return self.entry.array(name) if self.entry.has(name) else None

    def hidden_swap(self, pid: str) -> np.ndarray | None:
        """Hidden states from the layer-swap run (A's states fed in for the first k layers), if any."""
        self._arrays("layer-swap hidden states")
        name = self._name(pid, "hidden_swap")
        return self.entry.array(name) if self.entry.has(name) else None

    def sublayers(self, pid: str) -> dict[str, np.ndarray]:
        self._arrays("attention and MLP outputs")
        out = {}
        for sub in self.meta.get("sublayers", []):
            name = self._name(pid, f"sub_{sub}")
            if self.entry.has(name):
                out[sub] = self.entry.array(name)
        return out

    def router(self, pid: str) -> tuple[np.ndarray, np.ndarray] | None:
        """A mixture of experts' kept router logits for the prompt (``core.routing.summarise``: expert ids
        and logits ``[L, T, KEPT]``); stored in every form, so served for a compact A too. None for a dense
        model, or a run made before routers were recorded."""
        if not self.meta.get("router") or self.streamed or self.base_file:
            return None
        ids, logits = self._name(pid, "router_ids"), self._name(pid, "router_logits")
        if not (self.entry.has(ids) and self.entry.has(logits)):
            return None
        return self.entry.array(ids), self.entry.array(logits)

    def vocab_width(self) -> int | None:
        """The width of the logits (the vocabulary they cover): from the arrays, or as a streamed run recorded it."""
        if self.streamed or self.compact or self.base_file:
            return (self.meta.get("shapes") or {}).get("vocab")
        first = self.prompt_ids[0] if self.meta.get("prompts") else None
        return int(self.logits(first).shape[-1]) if first is not None else None

    def hidden_dims(self) -> tuple[int, int] | None:
        """(layers, hidden size) of the hidden states; None when the run has none."""
        first = self.prompt_ids[0] if self.meta.get("prompts") else None
        if self.compact and (first is None or self.state_summary(first) is None):
            return None
        if self.streamed or self.compact or self.base_file:
            dims = (self.meta.get("shapes") or {}).get("hidden")
            return (int(dims[0]), int(dims[1])) if dims else None
        h = self.hidden(first) if first is not None else None
        return (int(h.shape[0]), int(h.shape[-1])) if h is not None else None

    @property
    def special(self) -> dict[str, Any]:
        return self.meta.get("special", {})

    @property
    def tokenizer_cases(self) -> dict[str, list[dict[str, Any]]]:
        return self.meta.get("tokenizer_cases", {})

    @property
    def causality(self) -> dict[str, Any] | None:
        return self.meta.get("causality")
