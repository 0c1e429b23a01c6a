"""What a run is asked to produce: ``RunSettings`` and the validation of each of its values.

Core, not the runner: the options (command line, ini, manifests, ``compare()``), the runner and the checks
all read these, and one definition keeps their spellings and error messages the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["CACHE_DTYPES", "LAYER_SWAP_NEEDS_FULL", "RUNTIME_TWIN", "STORES", "RunSettings", "cache_dtype_name",
           "runtime_twin_name", "store_name"]

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


WEIGHTS_TWIN = ("auto", "full", "sampled")


def weights_twin_name(name: str) -> str:
    """``auto``, ``full`` or ``sampled``; ValueError naming the valid values otherwise."""
    key = str(name).strip().lower()
    if key not in WEIGHTS_TWIN:
        raise ValueError(f"{name!r} is not one of {', '.join(WEIGHTS_TWIN)}")
    return key


def runtime_twin_name(name: str) -> str:
    """``quick``, ``full`` or ``off``; ValueError naming the valid values otherwise."""
    key = str(name).strip().lower()
    if key not in RUNTIME_TWIN:
        raise ValueError(f"{name!r} is not one of {', '.join(RUNTIME_TWIN)}")
    return key


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
    # the weights twin (backends/dequant.py): "full" quantises every row of A, "sampled" a seeded share of each
    # tensor's rows and checks every row of B cheaply, "auto" samples above dequant.SAMPLED_ABOVE parameters
    weights_twin: str = "auto"

    def __post_init__(self) -> None:
        self.cache_dtype = cache_dtype_name(self.cache_dtype)  # one spelling, so one cache key
        self.store = store_name(self.store)
        self.runtime_twin = runtime_twin_name(self.runtime_twin)
        self.weights_twin = weights_twin_name(self.weights_twin)
        if self.layer_swap and self.hidden_states and self.store != "full":
            raise ValueError(LAYER_SWAP_NEEDS_FULL)

    def key(self, fed: bool = True) -> dict[str, Any]:
        out = dict(self.__dict__)
        out.pop("runtime_twin")  # which extra runs a pair makes, not what a run produces
        out.pop("imatrix")  # read by the weights check only, keyed there
        out.pop("weights_twin")  # likewise
        if not fed:  # A's entry is the same whatever is done with B
            out.pop("layer_swap")
            out.pop("keep_b")
        else:  # B is never stored compact; what it is reduced against is in its key (reduced_against)
            out.pop("store")
        return out
