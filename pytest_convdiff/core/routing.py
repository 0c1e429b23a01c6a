"""Which experts a mixture-of-experts model sends each token to, and where B's routers decide otherwise.

A router picks each token's top-k experts by its logits. Where A's k-th and (k+1)-th logits are nearly
tied, the small error any correct conversion makes (F16 rounding, a quantised router, llama.cpp's own
kernels) can flip the choice: B then runs that token through another expert, and its hidden state there
differs from A's by a whole expert's output. Such flips are sparse and discrete; a dense model never shows
them, and a check built for dense models (error growing with position) reads one as a defect.

So both runs keep each layer's top ``KEPT`` router logits and their expert ids (``summarise``), and a pair
is reduced here (``RouterAccumulator``):

- a **flip** is a position and layer where A's and B's chosen sets of k experts differ;
- A's **margin** there is its k-th logit minus its (k+1)-th: how near the tie was;
- B's **router error** is |logit_B - logit_A| over the experts both keep, per position: how far B's
  routers move at all. Near ties are flips whose margin lies within that error; a flip at a position an
  earlier layer already rerouted follows from that one (its input differs by a whole expert).

Positions rerouted at any layer are left out of the position profile (``position[*]``), which judges
growth with position; every other metric of B against A keeps them, and ``routing[flips]`` reports them.
The runtime twin (B against A's code run with B's weights, where a flip is a rounding near-tie and nothing
else) leaves out every state a flip can reach (``PromptFlips.cone``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

KEPT = 16  # router logits kept per position and layer, highest first (k + 1 of them are needed)
EXAMPLES = 5  # flips named in a message


def stack_layers(found: dict[int, np.ndarray], n_layers: int, n_tokens: int) -> np.ndarray | None:
    """Per-layer router logits ``{layer: [T, E]}`` as a backend captured them, to ``ForwardOutput.router``'s
    ``[L, T, E]`` (NaN rows for layers without experts); None when no layer has a router of the prompt's length."""
    found = {i: np.asarray(a, dtype=np.float32) for i, a in found.items()}
    found = {i: a for i, a in found.items() if a.ndim == 2 and a.shape[0] == n_tokens}
    if not found:
        return None
    width = next(iter(found.values())).shape[1]
    out = np.full((n_layers, n_tokens, width), np.nan, dtype=np.float32)
    for i, a in found.items():
        if a.shape[1] == width:
            out[i] = a
    return out


def summarise(router: np.ndarray, kept: int = KEPT) -> tuple[np.ndarray, np.ndarray]:
    """``[L, T, E]`` router logits (NaN rows: a layer without experts) to the top ``kept`` expert ids
    (int16, -1 where the layer has none) and their logits (float32, highest first)."""
    router = np.asarray(router, dtype=np.float32)
    n = min(kept, router.shape[-1])
    filled = np.where(np.isnan(router), -np.inf, router)
    ids = np.argsort(-filled, axis=-1, kind="stable")[..., :n]
    logits = np.take_along_axis(router, ids, axis=-1)
    none = np.isnan(router).all(axis=-1)
    ids = np.where(none[..., None], -1, ids).astype(np.int16)
    logits = np.where(none[..., None], np.nan, logits).astype(np.float32)
    return ids, logits


@dataclass
class PromptFlips:
    """One prompt's flips: ``rerouted`` [T] (any layer), and per layer the flipped positions."""

    rerouted: np.ndarray
    by_layer: dict[int, np.ndarray]

    def cone(self, num_layers: int) -> np.ndarray:
        """``[L, T]``: the states a flip can reach in a causal model. A flip at layer l', position t' changes
        that state, and through attention every state of a later layer at position t' or after; the rest
        are computed exactly as if no router had flipped."""
        t = self.rerouted.shape[0]
        out = np.zeros((num_layers, t), dtype=bool)
        first = t  # the earliest position flipped at a layer before this one
        for layer in range(num_layers):
            if first < t:
                out[layer, first:] = True
            where = self.by_layer.get(layer)
            if where is not None and where.size:
                out[layer, where] = True
                first = min(first, int(where.min()))
        return out

    def logit_cone(self) -> np.ndarray:
        """``[T]``: the positions whose logits a flip can reach: at or after the prompt's first flip."""
        out = np.zeros(self.rerouted.shape[0], dtype=bool)
        if self.rerouted.any():
            out[int(np.argmax(self.rerouted)):] = True
        return out


def flips(a_ids: np.ndarray, a_logits: np.ndarray, b_ids: np.ndarray, k: int
          ) -> tuple[np.ndarray, np.ndarray]:
    """(flipped ``[L, T]`` bool, A's margin ``[L, T]``): where the top-``k`` sets differ, and A's k-th
    minus (k+1)-th logit (inf when fewer than k + 1 were kept; NaN on layers without experts)."""
    a_set = np.sort(a_ids[..., :k], axis=-1)
    b_set = np.sort(b_ids[..., :k], axis=-1)
    routed = a_ids[..., 0] >= 0
    flipped = (a_set != b_set).any(axis=-1) & routed & (b_ids[..., 0] >= 0)
    if a_logits.shape[-1] > k:
        margin = (a_logits[..., k - 1] - a_logits[..., k]).astype(np.float64)
    else:
        margin = np.full(a_ids.shape[:-1], np.inf)
    margin = np.where(routed, margin, np.nan)
    return flipped, margin


def router_error(a_ids: np.ndarray, a_logits: np.ndarray, b_ids: np.ndarray, b_logits: np.ndarray) -> np.ndarray:
    """``[L, T]``: the largest |logit_B - logit_A| over the experts both runs kept (NaN where none)."""
    same = a_ids[..., :, None] == b_ids[..., None, :]
    diff = np.abs(a_logits[..., :, None].astype(np.float64) - b_logits[..., None, :])
    diff = np.where(same & (a_ids[..., :, None] >= 0), diff, -np.inf)
    out = diff.max(axis=(-1, -2))
    return np.where(np.isfinite(out), out, np.nan)


@dataclass
class RoutingMetrics:
    """The pair's routing: per layer, positions, flips, A's margins at flips and B's router error."""

    k: int
    positions: int
    rerouted: int  # positions rerouted at one layer or more
    layers: list[dict[str, Any]] = field(default_factory=list)
    examples: list[dict[str, Any]] = field(default_factory=list)  # the widest-margin flips

    @property
    def share(self) -> float:
        return self.rerouted / self.positions if self.positions else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {"k": self.k, "positions": self.positions, "rerouted": self.rerouted, "layers": self.layers,
                "examples": self.examples}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RoutingMetrics:
        return cls(int(d["k"]), int(d["positions"]), int(d["rerouted"]), list(d["layers"]), list(d["examples"]))


class RouterAccumulator:
    """Streams each prompt's kept router logits of A and B into the pair's ``RoutingMetrics``."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.positions = 0
        self.rerouted = 0
        self.n: dict[int, int] = {}
        self.margins: dict[int, list[np.ndarray]] = {}  # A's margin at every position (the typical margin)
        self.errors: dict[int, list[np.ndarray]] = {}  # B's router error at every position
        self.flips: dict[int, list[tuple[str, int, float, bool]]] = {}  # (prompt, position, margin, first)

    def update(self, prompt: str, a_ids: np.ndarray, a_logits: np.ndarray, b_ids: np.ndarray,
               b_logits: np.ndarray) -> PromptFlips:
        if a_ids.shape[:2] != b_ids.shape[:2]:
            raise ValueError(f"prompt {prompt!r}: router shapes differ, A {a_ids.shape[:2]} vs B {b_ids.shape[:2]}")
        flipped, margin = flips(a_ids, a_logits, b_ids, self.k)
        err = router_error(a_ids, a_logits, b_ids, b_logits)
        t = flipped.shape[1]
        self.positions += t
        seen = np.zeros(t, dtype=bool)  # rerouted at an earlier layer: this layer's input already differs
        by_layer: dict[int, np.ndarray] = {}
        for layer in range(flipped.shape[0]):
            if not (a_ids[layer, :, 0] >= 0).any():
                continue
            self.n[layer] = self.n.get(layer, 0) + t
            self.margins.setdefault(layer, []).append(margin[layer])
            self.errors.setdefault(layer, []).append(err[layer])
            where = np.nonzero(flipped[layer])[0]
            by_layer[layer] = where
            self.flips.setdefault(layer, []).extend(
                (prompt, int(p), float(margin[layer, p]), not bool(seen[p])) for p in where)
            seen |= flipped[layer]
        self.rerouted += int(seen.sum())
        return PromptFlips(seen, by_layer)

    def result(self) -> RoutingMetrics:
        layers, candidates = [], []
        for layer in sorted(self.n):
            margins = np.concatenate(self.margins[layer])
            errors = np.concatenate(self.errors[layer])
            finite = errors[np.isfinite(errors)]
            err99 = float(np.percentile(finite, 99)) if finite.size else math.nan
            fl = self.flips.get(layer, [])
            # a flip where an earlier layer already rerouted the token follows from that one: its input differs
            first = [f[2] for f in fl if f[3] and math.isfinite(f[2])]
            layers.append({"layer": layer, "positions": self.n[layer], "flips": len(fl),
                           "first_flips": sum(1 for f in fl if f[3]),
                           "max_flip_margin": max(first) if first else None,
                           "median_margin": float(np.nanmedian(margins)) if np.isfinite(margins).any() else None,
                           "router_error_p99": err99})
            candidates += [{"prompt": p, "position": pos, "layer": layer, "margin": m, "first": first,
                            "router_error_p99": err99} for p, pos, m, first in fl]
        candidates.sort(key=lambda f: (not f["first"], -f["margin"] if math.isfinite(f["margin"]) else 0.0))
        return RoutingMetrics(self.k, self.positions, self.rerouted, layers, candidates[:EXAMPLES])
