"""llama-perplexity's KL-divergence run, with any convdiff backend on either side.

``write_base`` does what ``llama-perplexity --kl-divergence-base FILE`` does, for a model llama.cpp
cannot run (a transformers checkpoint, the reference a GGUF was converted from): it tokenizes a text
once, cuts it into ``n_ctx``-token chunks, evaluates each chunk on its own (first token replaced by
BOS where the model adds one) and stores the log-probabilities of each chunk's second half.
``write_base_from_reference`` writes one from a golden reference stored full, loading no model.
``score`` does what ``llama-perplexity --kl-divergence`` does: the model under test is run on the
file's chunks and scored against its rows, giving ``core.llama_stats.PerplexityStats``.

Either file direction works with llama-perplexity itself: a base written here is read by it, and one
it wrote is scored here (tests/integration/test_kld_file.py checks both against the tool).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .backends import open_backend
from .backends.base import Backend
from .core.llama_stats import PerplexityStats, Sums, encode_rows, score_rows
from .store.kld_file import KldFile, KldFileError, evaluated_chunk, read_kld, scored_rows, write_kld

DEFAULT_CTX = 512  # llama-perplexity's default
Progress = Callable[[str], None]


def chunk_tokens(tokens: list[int], n_ctx: int, n_chunks: int | None = None) -> np.ndarray:
    """The text's tokens as ``[n_chunk, n_ctx]``, as llama-perplexity cuts them (the tail is dropped)."""
    if n_ctx < 4:
        raise ValueError(f"a context of {n_ctx} tokens is too short (at least 4)")
    available = len(tokens) // n_ctx
    if available < 1:
        raise ValueError(f"the text tokenizes to {len(tokens)} tokens, fewer than one chunk of {n_ctx}: "
                         "give a longer text or a smaller context")
    n = available if n_chunks is None or n_chunks < 0 else min(n_chunks, available)
    return np.asarray(tokens[:n * n_ctx], dtype=np.int32).reshape(n, n_ctx)


def _scored_logits(model: Backend, chunk: np.ndarray) -> np.ndarray:
    """The chunk's logits at its scored positions, run as llama-perplexity runs a chunk."""
    seq = evaluated_chunk(chunk, model.special_tokens())
    logits = model.forward(seq, hidden_states=False).logits
    first = len(seq) // 2
    return np.asarray(logits[first:first + scored_rows(len(seq))], dtype=np.float32)


def _best_ctx(lengths: list[int]) -> int:
    """The chunk length that scores most tokens when each prompt gives at most one chunk (its start)."""
    candidates = sorted({n for n in lengths if n >= 4})
    if not candidates:
        raise ValueError("no prompt of the reference has 4 tokens or more")
    return max(candidates, key=lambda n: (sum(length >= n for length in lengths) * scored_rows(n), n))


def write_base_from_reference(reference: str | os.PathLike[str], out: str | os.PathLike[str], *,
                              n_ctx: int | None = None, progress: Progress | None = None) -> KldFile:
    """A base file from a convdiff golden reference stored full (``--convdiff-store full``), no model loaded.

    Each prompt at least ``n_ctx`` tokens long gives one chunk, its first ``n_ctx`` tokens: a causal model's
    logits there are those of the chunk run alone, and its first token is already BOS where the model adds
    one, as llama-perplexity makes it. ``n_ctx`` defaults to the length that scores most tokens.
    """
    from .store.reference import ReferenceEntry, ReferenceSource
    from .store.run import ModelRun

    entry = ReferenceEntry(reference)
    entry.verify()
    run = ModelRun(ReferenceSource(str(reference)), entry, from_cache=True)
    if run.compact:
        raise KldFileError(f"{reference}: this reference is stored compact (its top logits and a sketch), but a base "
                           "file holds every log-probability within 16 nats of the top one. Save the reference "
                           "with --convdiff-store full, or write the base from the model itself.")
    lengths = {pid: len(run.inputs(pid)) for pid in run.prompt_ids}
    n_ctx = n_ctx or _best_ctx(list(lengths.values()))
    used = [pid for pid, length in lengths.items() if length >= n_ctx]
    if not used:
        raise ValueError(f"no prompt of {reference} has {n_ctx} tokens; the longest has {max(lengths.values())}")
    tokens = np.asarray([run.inputs(pid)[:n_ctx] for pid in used], dtype=np.int32)
    first = n_ctx // 2

    def rows(i: int) -> np.ndarray:
        if progress:
            progress(f"chunk {i + 1}/{len(used)}: prompt {used[i]}")
        return encode_rows(np.asarray(run.logits(used[i])[first:first + scored_rows(n_ctx)], dtype=np.float32))

    write_kld(out, tokens, int(run.vocab_width() or 0), rows)
    return read_kld(out)


def write_base(model_path: str | os.PathLike[str], text: str, out: str | os.PathLike[str], *,
               n_ctx: int = DEFAULT_CTX, n_chunks: int | None = None, backend: str | None = None,
               options: dict[str, Any] | None = None, progress: Progress | None = None) -> KldFile:
    """Write a ``--kl-divergence-base`` file for ``text`` from any model convdiff can run."""
    model = open_backend(model_path, backend, options)
    try:
        chunks = chunk_tokens(model.tokenize(text), n_ctx, n_chunks)
        probe = _scored_logits(model, chunks[0])
        n_vocab = probe.shape[1]

        def rows(i: int) -> np.ndarray:
            if progress:
                progress(f"chunk {i + 1}/{len(chunks)}")
            return encode_rows(probe if i == 0 else _scored_logits(model, chunks[i]))

        write_kld(out, chunks, n_vocab, rows)
    finally:
        model.close()
    return read_kld(out)


def _same_vocab(kld: KldFile, model_path: str | os.PathLike[str], size: int | None) -> None:
    if size and size != kld.n_vocab:
        raise KldFileError(f"{kld.path}: written for a vocabulary of {kld.n_vocab} entries, but "
                           f"{Path(model_path).name} has {size}; score a model with the base model's vocabulary.")


def score(model_path: str | os.PathLike[str], base: str | os.PathLike[str] | KldFile, *,
          backend: str | None = None, options: dict[str, Any] | None = None,
          progress: Progress | None = None) -> PerplexityStats:
    """Score a model against a base file: llama-perplexity's ``--kl-divergence`` statistics."""
    kld = base if isinstance(base, KldFile) else read_kld(base)
    model = open_backend(model_path, backend, options, as_tools=True)  # llama-perplexity's own run
    sums = Sums()
    try:
        _same_vocab(kld, model_path, model.info.vocab_size)  # before any forward pass, where the model says
        for i in range(kld.n_chunk):
            if progress:
                progress(f"chunk {i + 1}/{kld.n_chunk}")
            logits = _scored_logits(model, np.asarray(kld.tokens[i]))
            _same_vocab(kld, model_path, logits.shape[1])  # the logits' width is what the rows must match
            sums.add(score_rows(np.asarray(kld.rows[i]), logits, kld.targets(i)))
    finally:
        model.close()
    return sums.stats()
