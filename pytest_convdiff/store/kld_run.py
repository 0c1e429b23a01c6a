"""A llama-perplexity base-logit file served as model A: ``--model-a base.kld``.

People who check quantisations with ``llama-perplexity --kl-divergence`` already keep base files
(``store.kld_file``). Given as model A, such a file is a golden reference of its own kind: its chunks
are the corpus (``kld_corpus``: one prompt per chunk, the text's token ids rather than a text), B is
run on each chunk as llama-perplexity runs it (first token replaced by BOS where B adds one), and B's
logits at each chunk's second half are scored against the file's rows (``pair.PairReducer`` through
``core.metrics.LogitAccumulator.update_base``). No model is loaded for A.

The file holds log-probabilities rounded to 16 bits within 16 nats of each row's top, nothing else:
no config, weights, tokenizer, hidden states or logits. So only the check families that read
nothing but ``sources.SCORES`` are planned (``checks.applies``), and the logits family measures what the file
defines (KL over the kept entries, top-K, PPL, delta p), not NMSE.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..core.corpus import Corpus, Prompt
from ..core.model_info import ModelInfo
from .cache import content_fingerprint
from .kld_file import KldFile, read_kld, scored_rows
from .run import BASE_FILE_FORM, ModelRun, RunSource

BACKEND = "llama-perplexity base"  # what a base file shows as its backend (``sources.BASE_FILE.display``)


def chunk_id(i: int) -> str:
    """A chunk's prompt id, numbered from 1 as llama-perplexity prints them."""
    return f"chunk-{i + 1}"


def kld_info(path: str | os.PathLike[str], kld: KldFile | None = None) -> ModelInfo:
    """What a base file says about the model that wrote it: its vocabulary and chunk length."""
    kld = kld or read_kld(path)
    return ModelInfo(str(path), BACKEND, vocab_size=kld.n_vocab, context_length=kld.n_ctx,
                     extra={"n_ctx": kld.n_ctx, "n_chunk": kld.n_chunk, "scored_per_chunk": scored_rows(kld.n_ctx)})


def kld_corpus(path: str | os.PathLike[str], kld: KldFile | None = None) -> Corpus:
    """The file's chunks as a corpus: prompt ids ``chunk-1``…, no text, keyed by the token ids."""
    kld = kld or read_kld(path)
    digest = hashlib.sha256(np.ascontiguousarray(kld.tokens).tobytes()).hexdigest()[:16]
    prompts = tuple(Prompt(chunk_id(i), "", "tokens") for i in range(kld.n_chunk))
    return Corpus(prompts, f"{path} (llama-perplexity base: {kld.n_chunk} chunks of {kld.n_ctx} tokens)", digest)


class KldEntry:
    """A base file read like a stored entry (``store.entry.Entry``): per chunk, its token ids
    (``p{i}.inputs``, ``p{i}.own_tokens``) and its encoded rows (``p{i}.base_rows``), memory-mapped."""

    def __init__(self, path: str | os.PathLike[str], kld: KldFile | None = None) -> None:
        self.path = Path(path)
        self.kld = kld or read_kld(self.path)
        k = self.kld
        prompts = [chunk_id(i) for i in range(k.n_chunk)]
        self._names = {f"p{i}.{what}" for i in range(k.n_chunk) for what in ("inputs", "own_tokens", "base_rows")}
        self.meta: dict[str, Any] = {
            "info": kld_info(self.path, k).to_dict(), "prompts": prompts, "pieces": {p: [] for p in prompts},
            "truncated": {}, "sublayers": [], "special": {}, "files": dict.fromkeys(sorted(self._names), ""),
            "store": {"form": BASE_FILE_FORM, "n_ctx": k.n_ctx, "first": k.first, "rows": scored_rows(k.n_ctx)},
            "shapes": {"vocab": k.n_vocab, "hidden": None},
        }
        self._identity = "kld-" + content_fingerprint([self.path], self.path.parent)

    @property
    def identity(self) -> str:
        return self._identity

    def has(self, name: str) -> bool:
        return name in self._names

    def array(self, name: str) -> np.ndarray:
        if not self.has(name):
            raise KeyError(f"{self.path}: a llama-perplexity base file holds no array {name!r}")
        head, what = name.split(".", 1)
        i = int(head[1:])
        if what == "base_rows":
            return self.kld.rows[i]
        return np.asarray(self.kld.tokens[i], dtype=np.int64)

    def release(self) -> None:
        """Nothing to release: the memory maps go with the entry."""


def open_kld_run(path: str | os.PathLike[str], spec: RunSource) -> ModelRun:
    """Model A served from a base file (no model is loaded)."""
    return ModelRun(spec, KldEntry(path), from_cache=True)
