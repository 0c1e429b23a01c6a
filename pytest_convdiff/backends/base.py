"""The contract every backend meets, and the records they hand back.

A backend runs one model. It tokenizes with the model's own tokenizer, returns
logits for every position, and the hidden state after every decoder layer on a
common index: ``hidden[i]`` is the output of decoder layer ``i``; the last
layer's entry is taken *before* the final norm, so that index means the same
thing for transformers, llama.cpp and exllamav2.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..core.model_info import ModelInfo

# What a backend can do beyond logits, declared by each backend module as ``CAPABILITIES`` so that
# callers ask instead of trying and catching NotImplementedError.
HIDDEN_STATES = "hidden_states"  # per-layer hidden states in ``forward``
SUBBLOCKS = "subblocks"  # attention / MLP sub-block outputs in ``ForwardOutput.sublayers``
LAYER_SWAP = "layer_swap"  # ``forward(inject=...)`` replaces layer outputs
INCREMENTAL_DECODE = "incremental_decode"  # ``greedy_decode`` on the KV cache
# What a backend's model can be in the twins (docs/twins.md):
WEIGHTS_TWIN = "weights_twin"  # its tensors are remade here from A's (a quantiser or a dtype's rounding)
TWIN_HOST = "twin_host"  # its architecture runs another model's weights (``weights_from``): the runtime twin's code
TWIN_GUEST = "twin_guest"  # its tensors load into a host's architecture, and its runtime is its own: B of a twin
ALL_CAPABILITIES = frozenset({HIDDEN_STATES, SUBBLOCKS, LAYER_SWAP, INCREMENTAL_DECODE, WEIGHTS_TWIN, TWIN_HOST,
                              TWIN_GUEST})


@dataclass
class ForwardOutput:
    """One sequence's outputs.

    logits: float32 ``[T, V]``; hidden: float32 ``[L, T, H]`` or None;
    sublayers: optional per-layer sub-block outputs, e.g. ``{"attn": [L, T, H], "mlp": [L, T, H]}``;
    router: a mixture-of-experts model's router logits ``[L, T, E]`` (NaN rows for layers without a router),
    from which the experts each token is sent to are read (``core.routing``); None for a dense model.
    """

    logits: np.ndarray
    hidden: np.ndarray | None = None
    sublayers: dict[str, np.ndarray] = field(default_factory=dict)
    router: np.ndarray | None = None


def info_from_hf_config(path: Any, backend: str, cfg: dict[str, Any], **fields: Any) -> ModelInfo:
    """ModelInfo from a transformers-style config.json (text_config for multimodal configs);
    ``fields`` (dtype, library_version, quantization, extra) are the backend's own."""
    text_cfg = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    n_layers = text_cfg.get("num_hidden_layers") or text_cfg.get("n_layer") or text_cfg.get("num_layers")
    return ModelInfo(
        path=str(path),
        backend=backend,
        architecture=(cfg.get("architectures") or [cfg.get("model_type")])[0],
        num_layers=int(n_layers) if n_layers is not None else None,
        vocab_size=text_cfg.get("vocab_size"),
        hidden_size=text_cfg.get("hidden_size"),
        context_length=text_cfg.get("max_position_embeddings"),
        **fields,
    )


def installed_version(distribution: str) -> str | None:
    """A package's version from its metadata, without importing it (cheap at collection time)."""
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def special_token_flags(bos: int | None, eos: int | None, with_special: list[int], plain: list[int]) -> dict[str, Any]:
    """The ``special_tokens()`` record: whether tokenizing with special tokens adds BOS/EOS.

    ``with_special`` and ``plain`` are the same short text tokenized with and without special tokens.
    """
    return {
        "bos_id": bos, "eos_id": eos,
        "adds_bos": bool(bos is not None and with_special[:1] == [bos] and plain[:1] != [bos]),
        "adds_eos": bool(eos is not None and with_special[-1:] == [eos] and plain[-1:] != [eos]),
    }


@runtime_checkable
class Backend(Protocol):
    """A loaded model. Create with ``open_backend``; call ``close`` to free it."""

    info: ModelInfo

    def tokenize(self, text: str) -> list[int]:
        """Token ids as the model would see ``text``, special tokens (BOS) added as the model does."""

    def decode_piece(self, token_id: int) -> str:
        """The text of one token, for readable diffs."""

    def forward(self, tokens: Sequence[int], *, hidden_states: bool = True,
                inject: dict[int, np.ndarray] | None = None) -> ForwardOutput:
        """Logits for every position (and per-layer hidden states) for one sequence. ``inject`` (backends
        that declare ``LAYER_SWAP``): layer ``i``'s output replaced by ``inject[i]`` (float32 ``[T, H]``)."""

    def special_tokens(self) -> dict[str, Any]:
        """BOS/EOS ids and whether the tokenizer adds them, for the tokenizer checks."""

    def close(self) -> None:
        """Free the model's memory (CPU and GPU) deterministically."""


@runtime_checkable
class IncrementalDecoder(Protocol):
    """Optional for a backend: greedy decoding on its KV cache. Without it the greedy check runs one
    full forward per generated token (``steps`` x the prefix length, per prompt)."""

    def greedy_decode(self, sequences: Sequence[Sequence[int]], steps: int,
                      pick: Callable[[int, np.ndarray], int]) -> None:
        """Decode ``steps`` tokens after each prefix; ``pick(i, logits)`` gets sequence i's next-token
        logits (float32 ``[V]``) and returns the token appended to it."""


@runtime_checkable
class PrefixKeeper(Protocol):
    """Optional for a backend: keep the state a run leaves after some token prefixes, so that a later run that
    starts with one of them computes only what follows it. A causal model's state after a prefix is the same
    whatever follows, so this is the computation a run from scratch would repeat, not an approximation of it."""

    def keep_prefixes(self, prefixes: Sequence[Sequence[int]]) -> None:
        """Runs from now on keep their state after any of these prefixes they pass (each kept once)."""

    def forward_from(self, tokens: Sequence[int], start: int) -> np.ndarray:
        """Logits ``[len(tokens) - start, V]`` of positions ``start..`` of a run over ``tokens``: from the kept
        state after ``tokens[:start]`` when there is one (used once), else from a run from scratch."""


def logits_from(backend: Backend, tokens: Sequence[int], start: int) -> np.ndarray:
    """Logits of positions ``start..`` of a run over ``tokens``: ``forward_from`` where the backend keeps
    prefix states (``PrefixKeeper``), else a whole forward, cut."""
    if isinstance(backend, PrefixKeeper):
        return np.asarray(backend.forward_from(tokens, start))
    return whole_run_from(backend, tokens, start)


def whole_run_from(backend: Backend, tokens: Sequence[int], start: int) -> np.ndarray:
    """Logits of positions ``start..`` of a whole forward over ``tokens`` (no state kept or used)."""
    return np.asarray(backend.forward(tokens, hidden_states=False).logits)[start:]
