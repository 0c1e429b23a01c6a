"""llama-perplexity's ``--kl-divergence-base`` files: read and written with its layout and semantics.

Layout (native byte order; little-endian on every machine llama.cpp ships for):

1. ``_logits_`` (8 bytes);
2. int32 ``n_ctx``, int32 ``n_vocab``, int32 ``n_chunk``;
3. int32 tokens ``[n_chunk * n_ctx]``: the evaluation text, tokenized once, cut into chunks;
4. per chunk, ``n_ctx - 1 - n_ctx // 2`` rows of ``core.llama_stats.row_width(n_vocab)`` uint16: only
   the second half of a chunk is scored, row ``r`` holding the base model's log-probabilities at
   position ``n_ctx // 2 + r``, which predict the token at ``n_ctx // 2 + r + 1``.

Each chunk is evaluated on its own, its first token replaced by BOS where the model adds one
(the file keeps the text's own first token).
A file is read memory-mapped and validated against its size, so a truncated download is named as such.
A file is written through ``store.atomic``, so a crash never leaves half a file behind.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.llama_stats import row_width
from ..errors import ConvdiffError
from .atomic import atomic_open

MAGIC = b"_logits_"
_HEAD = struct.Struct("<8siii")


class KldFileError(ConvdiffError):
    """A file that is not, or no longer, a llama-perplexity base-logit file."""


def scored_rows(n_ctx: int) -> int:
    """Rows a chunk holds: positions ``n_ctx // 2`` .. ``n_ctx - 2`` (each predicts the next token)."""
    return n_ctx - 1 - n_ctx // 2


@dataclass
class KldFile:
    """A base-logit file, memory-mapped: ``tokens [n_chunk, n_ctx]`` and ``rows [n_chunk, scored, width]``."""

    path: Path
    n_ctx: int
    n_vocab: int
    n_chunk: int
    tokens: np.ndarray
    rows: np.ndarray

    @property
    def first(self) -> int:
        """The first scored position of a chunk."""
        return self.n_ctx // 2

    def targets(self, chunk: int) -> np.ndarray:
        """The token each of a chunk's rows predicts."""
        return self.tokens[chunk, self.first + 1:]


def read_kld(path: str | os.PathLike[str]) -> KldFile:
    """Open a ``--kl-divergence-base`` file; KldFileError names what is wrong with a bad one."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(_HEAD.size)
    except OSError as exc:
        raise KldFileError(f"{p}: cannot read it ({exc.strerror or exc}).") from exc
    if len(head) < _HEAD.size or head[:8] != MAGIC:
        raise KldFileError(f"{p}: not a llama-perplexity base-logit file (it does not start with '_logits_'). "
                           "Write one with `llama-perplexity --kl-divergence-base FILE` or "
                           "`python -m pytest_convdiff kld base`.")
    _, n_ctx, n_vocab, n_chunk = _HEAD.unpack(head)
    if n_ctx < 4 or n_vocab < 1 or n_chunk < 1:
        raise KldFileError(f"{p}: header says n_ctx={n_ctx}, n_vocab={n_vocab}, n_chunk={n_chunk}; not a usable "
                           "base-logit file.")
    width, per_chunk = row_width(n_vocab), scored_rows(n_ctx)
    expected = _HEAD.size + 4 * n_chunk * n_ctx + 2 * n_chunk * per_chunk * width
    if size < expected:
        raise KldFileError(f"{p}: {size} bytes where n_ctx={n_ctx}, n_vocab={n_vocab}, n_chunk={n_chunk} need "
                           f"{expected}; the file is truncated. Write it again.")
    tokens = np.memmap(p, dtype="<i4", mode="r", offset=_HEAD.size, shape=(n_chunk, n_ctx))
    rows = np.memmap(p, dtype="<u2", mode="r", offset=_HEAD.size + 4 * n_chunk * n_ctx,
                     shape=(n_chunk, per_chunk, width))
    return KldFile(p, n_ctx, n_vocab, n_chunk, tokens, rows)


def write_kld(path: str | os.PathLike[str], tokens: np.ndarray, n_vocab: int,
              chunk_rows: Callable[[int], np.ndarray]) -> Path:
    """Write a base file for ``tokens [n_chunk, n_ctx]``; ``chunk_rows(i)`` gives chunk i's encoded rows
    (``core.llama_stats.encode_rows`` of its logits at the scored positions). Atomic."""
    t = np.ascontiguousarray(tokens, dtype="<i4")
    if t.ndim != 2 or t.shape[1] < 4:
        raise ValueError(f"tokens must be [n_chunk, n_ctx >= 4], got {t.shape}")
    n_chunk, n_ctx = t.shape
    width, per_chunk = row_width(n_vocab), scored_rows(n_ctx)
    with atomic_open(path, "wb") as f:
        f.write(_HEAD.pack(MAGIC, n_ctx, n_vocab, n_chunk))
        f.write(t.tobytes())
        for i in range(n_chunk):
            rows = np.ascontiguousarray(chunk_rows(i), dtype="<u2")
            if rows.shape != (per_chunk, width):
                raise ValueError(f"chunk {i}: rows of shape {rows.shape}, expected {(per_chunk, width)}")
            f.write(rows.tobytes())
    return Path(path)


def is_kld(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a base-logit file, by its first 8 bytes (whatever it is called)."""
    p = Path(path)
    try:
        if not p.is_file():
            return False
        with open(p, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def evaluated_chunk(tokens: np.ndarray | list[int], special: dict) -> list[int]:
    """A chunk as llama-perplexity evaluates it: its first token replaced by BOS where the model adds one."""
    seq = [int(t) for t in tokens]
    if seq and special.get("adds_bos") and special.get("bos_id") is not None:
        seq[0] = int(special["bos_id"])
    return seq
