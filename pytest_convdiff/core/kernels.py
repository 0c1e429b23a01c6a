"""Numeric kernels shared by the metrics and the compact reference: softmax pieces and top-k.

One public home for them, so ``metrics`` (which compares A with B) and ``compact`` (which summarises
A alone) use the same arithmetic without importing each other.
"""

from __future__ import annotations

import numpy as np

__all__ = ["exp_lse", "log_softmax", "topk_indices"]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (stable)."""
    x = np.asarray(logits, dtype=np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    shifted = x - m
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def exp_lse(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row-wise ``e = exp(x - max)`` (float32), its row sums and ``logsumexp(x)`` (both float64)."""
    m = x.max(axis=-1, keepdims=True)
    e = np.exp(x - m)
    total = np.sum(e, axis=-1, dtype=np.float64)
    return e, total, m[:, 0].astype(np.float64) + np.log(total)


def topk_indices(logits: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest logits per row, largest first; ties broken by lower index
    (exactly, also at the k-th place). NaN counts as smallest."""
    x = np.asarray(logits)
    if x.ndim == 2 and x.shape[-1] >= 64 * 8 * k and not np.issubdtype(x.dtype, np.integer):
        return _topk_by_blocks(x, k)
    if x.ndim == 2 and x.shape[-1] > 4 * k:
        # O(V) selection; exact unless ties at the k-th value (or NaN) leave the choice open
        part = np.argpartition(-x, k - 1, axis=-1)[:, :k]
        vals = np.take_along_axis(x, part, axis=-1)
        kth = vals.min(axis=-1)
        order = np.lexsort((part, -vals), axis=-1)
        out = np.take_along_axis(part, order, axis=-1)
        open_ = (np.sum(x >= kth[:, None], axis=-1) != k) | np.isnan(kth)
        if open_.any():
            out[open_] = np.argsort(-x[open_], axis=-1, kind="stable")[:, :k]
        return out
    return np.argsort(-x, axis=-1, kind="stable")[..., :k]


_TOPK_BLOCK = 64


def _topk_by_blocks(x: np.ndarray, k: int) -> np.ndarray:
    """Top-k over a large vocabulary without a full selection pass per row.

    Each row is cut into blocks of 64; the k largest values all lie in the blocks whose maxima are
    among the k largest block maxima (the k-th largest value is at least the k-th largest block
    maximum). Rows where ties at that block maximum make the choice ambiguous, or holding NaN, are
    sorted whole.
    """
    t, v = x.shape
    nb = v // _TOPK_BLOCK
    body = x[:, : nb * _TOPK_BLOCK].reshape(t, nb, _TOPK_BLOCK)
    bmax = body.max(axis=2)
    if nb * _TOPK_BLOCK < v:  # the tail is one more (short) block
        bmax = np.concatenate([bmax, x[:, nb * _TOPK_BLOCK:].max(axis=1, keepdims=True)], axis=1)
    nblk = bmax.shape[1]
    chosen = np.argpartition(bmax, nblk - k, axis=1)[:, nblk - k:]
    kth = np.take_along_axis(bmax, chosen, axis=1).min(axis=1)
    ambiguous = (np.sum(bmax >= kth[:, None], axis=1) != k) | np.isnan(kth)
    cols = chosen[:, :, None] * _TOPK_BLOCK + np.arange(_TOPK_BLOCK)
    cols = np.minimum(cols, v - 1).reshape(t, -1)  # the short tail block repeats its last column
    vals = np.take_along_axis(x, cols, axis=1)
    order = np.lexsort((cols, -vals), axis=-1)
    sorted_cols = np.take_along_axis(cols, order, axis=1)
    out = np.empty((t, k), dtype=np.int64)
    for r in range(t):  # drop the repeated tail column, keep the first k distinct
        row = sorted_cols[r]
        out[r] = row[np.concatenate(([True], row[1:] != row[:-1]))][:k] if not ambiguous[r] else 0
    if ambiguous.any():
        rows = np.nonzero(ambiguous)[0]
        out[rows] = np.argsort(-x[rows], axis=-1, kind="stable")[:, :k]
    return out
