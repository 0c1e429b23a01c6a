"""What a model path is, and what it can give: one declaration per kind of source.

A path given as ``--model-a``/``--model-b`` (or in a manifest) is one of three kinds:

- a **model** that a backend loads and runs (a transformers checkpoint, a GGUF, an EXL2 directory);
- a **saved reference** (``--convdiff-save-reference``): A's outputs, config and a sketch of its weights;
- a **llama-perplexity base file** (``--kl-divergence-base``): A's log-probabilities over its own chunks.

The checks and the session never test which kind (or which backend) they hold. They ask what it *gives*
(``ModelSpec.can``): the capabilities below, and for a model its backend's (``backends.base``:
hidden states, sub-blocks, a runtime twin's host or guest, a weights twin). A new kind of source is one
``SourceKind`` added to ``KINDS``; a new backend declares its capabilities in its own module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["CONFIG", "KINDS", "OUTPUTS", "OWN_CORPUS", "RUNS", "SCORES", "TENSORS", "WEIGHT_SKETCH", "SourceKind",
           "kind_of"]

# What a source gives (a model adds its backend's CAPABILITIES).
RUNS = "runs"  # a model is loaded and run on any tokens: it can be model B, take a GPU, be saved as a reference
TENSORS = "tensors"  # every tensor, readable one at a time (the weights family; a reference's sketch of A)
WEIGHT_SKETCH = "weight_sketch"  # a stored sample of A's tensors, which the weights family replays
CONFIG = "config"  # a configuration record (the config family)
OUTPUTS = "outputs"  # token ids, logits and states over the corpus (every family that reads A's run)
SCORES = "scores"  # log-probabilities of B's scored positions (the logits family, the baseline)
OWN_CORPUS = "own_corpus"  # the source fixes the corpus (its chunks): B is evaluated on them, whole


@dataclass(frozen=True)
class SourceKind:
    """One kind of source: how it is recognised, what it gives, and (for stored kinds) how it is read.

    ``recognise(spec)``: cheap (a name or a header). ``display``: what shows as its backend (None: the backend
    that runs it). ``only_as_a``: why it cannot be model B (None: it can). The stored kinds' readers
    (``probe``, ``open_run``, ``read_config``, ``check``) are looked up lazily, so recognising a path imports
    nothing heavy.
    """

    name: str
    gives: frozenset[str]
    recognise: Callable[[Any], bool]
    display: str | None = None
    only_as_a: str | None = None
    probe: Callable[[Any], Any] | None = None
    open_run: Callable[..., Any] | None = None
    read_config: Callable[[Any], dict[str, Any]] | None = None
    check: Callable[[str], None] | None = None
    corpus: Callable[[Any], Any] | None = None  # an ``OWN_CORPUS`` source's corpus


REFERENCE_NAMES = ("reference", "golden")


def _is_reference(spec: Any) -> bool:
    from .store.reference import is_reference

    if spec.backend and spec.backend.strip().lower() in REFERENCE_NAMES:
        return True
    return is_reference(spec.path)


def _is_base_file(spec: Any) -> bool:
    from .store.kld_file import is_kld

    return is_kld(spec.path)


def _reference_probe(spec: Any) -> Any:
    from .store.reference import reference_info

    return reference_info(spec.path)


def _reference_config(spec: Any) -> dict[str, Any]:
    from .store.reference import reference_config

    return reference_config(spec.path)


def _reference_run(spec: Any, corpus: Any, settings: Any) -> Any:
    from .store.reference import open_reference_run

    return open_reference_run(spec.path, corpus, settings, spec=spec)


def _base_probe(spec: Any) -> Any:
    from .store.kld_run import kld_info

    return kld_info(spec.path)


def _base_run(spec: Any, corpus: Any, settings: Any) -> Any:
    from .store.kld_run import open_kld_run

    return open_kld_run(spec.path, spec)


def _base_corpus(spec: Any) -> Any:
    from .store.kld_run import kld_corpus

    return kld_corpus(spec.path)


def _base_check(path: str) -> None:
    from .store.kld_file import read_kld

    read_kld(path)  # header against size: a truncated download is named now, not when the pair runs


REFERENCE = SourceKind(
    "saved reference", frozenset({WEIGHT_SKETCH, CONFIG, OUTPUTS, SCORES}), _is_reference, display="reference",
    only_as_a="a saved convdiff reference holds outputs, not a model that can be run on A's tokens",
    probe=_reference_probe, open_run=_reference_run, read_config=_reference_config)
BASE_FILE = SourceKind(
    "llama-perplexity base file", frozenset({SCORES, OWN_CORPUS}), _is_base_file, display="llama-perplexity base",
    only_as_a="a llama-perplexity base file holds log-probabilities, not a model that can be run",
    probe=_base_probe, open_run=_base_run, check=_base_check, corpus=_base_corpus)
MODEL = SourceKind("model", frozenset({RUNS, TENSORS, CONFIG, OUTPUTS, SCORES}), lambda spec: True)

KINDS: tuple[SourceKind, ...] = (REFERENCE, BASE_FILE, MODEL)  # the first that recognises a path is its kind


def kind_of(spec: Any) -> SourceKind:
    """The kind of source ``spec`` (a ``runner.ModelSpec``) names."""
    return next(k for k in KINDS if k.recognise(spec))
