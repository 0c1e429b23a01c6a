"""Numeric kernels shared by the metrics and the compact reference: softmax pieces and top-k.

One public home for them, so ``metrics`` (which compares A with B) and ``compact`` (which summarises
A alone) use the same arithmetic without importing each other.
"""

from __future__ import annotations

import numpy as np

__all__ = ["exp_lse", "exp_lse_max", "log_softmax", "topk_indices"]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (stable)."""
    x = np.asarray(logits, dtype=np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    shifted = x - m
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def exp_lse(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row-wise ``e = exp(x - max)`` (float32), its row sums and ``logsumexp(x)`` (both float64)."""
    e, total, lse, _ = exp_lse_max(x)
    return e, total, lse


def exp_lse_max(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``exp_lse`` and the row maxima ``e`` is taken from (``np.exp(x - max[:, None])`` gives ``e`` again)."""
    m = x.max(axis=-1, keepdims=True)
    e = np.subtract(x, m)
    np.exp(e, out=e)  # in place: one temporary of the rows' size, not two (the same values)
    total = np.sum(e, axis=-1, dtype=np.float64)
    return e, total, m[:, 0].astype(np.float64) + np.log(total), m[:, 0]


def topk_indices(logits: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest logits per row, largest first; ties broken by lower index
    (exactly, also at the k-th place). NaN counts as smallest."""
    x = np.asarray(logits)
    if x.ndim == 2 and k > 0 and x.shape[-1] // _TOPK_GROUPS >= k and np.issubdtype(x.dtype, np.floating):
        return _topk_by_groups(x, k)
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


_TOPK_GROUPS = 16


def _topk_by_groups(x: np.ndarray, k: int) -> np.ndarray:
    """Top-k of each row of a large vocabulary from a few candidates, without a selection pass over the row.

    The columns fall into ``w = V // 16`` groups of 16 (column j with j + w, j + 2w, ...; the columns past 16w
    are groups of their own). The maxima of k groups are k values of the row, so tau, the k-th largest group
    maximum, is at most the row's k-th largest value: every value at or above that one (ties included) lies in
    a group whose maximum is at least tau. Those groups' values at or above tau are sorted (value down, index up)
    and the first k kept: the exact answer, ties at the k-th place included. A row holding NaN is sorted whole.
    """
    t, v = x.shape
    w = v // _TOPK_GROUPS
    body = x[:, : w * _TOPK_GROUPS].reshape(t, _TOPK_GROUPS, w)
    gmax = body.max(axis=1)  # [t, w]: elementwise over 16 slabs of w columns (NaN propagates)
    tail = x[:, w * _TOPK_GROUPS:]
    maxima = np.concatenate([gmax, tail], axis=1) if tail.shape[1] else gmax
    n = maxima.shape[1]
    tau = np.partition(maxima, n - k, axis=1)[:, n - k]
    rows_g, groups = np.nonzero(gmax >= tau[:, None])
    cols = groups[:, None] + w * np.arange(_TOPK_GROUPS)
    vals = body[rows_g, :, groups]  # [candidate groups, 16]
    keep = vals >= tau[rows_g, None]
    rows, cols, vals = np.broadcast_to(rows_g[:, None], cols.shape)[keep], cols[keep], vals[keep]
    if tail.shape[1]:
        rows_t, cols_t = np.nonzero(tail >= tau[:, None])
        rows = np.concatenate([rows, rows_t])
        cols = np.concatenate([cols, cols_t + w * _TOPK_GROUPS])
        vals = np.concatenate([vals, tail[rows_t, cols_t]])
    order = np.lexsort((cols, -vals, rows))
    counts = np.bincount(rows, minlength=t)
    first = np.cumsum(counts) - counts
    out = (cols[order][np.minimum(first[:, None] + np.arange(k), order.size - 1)].astype(np.int64) if order.size
           else np.zeros((t, k), dtype=np.int64))
    whole = (counts < k) | np.isnan(maxima).any(axis=1)
    if whole.any():
        r = np.nonzero(whole)[0]
        out[r] = np.argsort(-x[r], axis=-1, kind="stable")[:, :k]
    return out
