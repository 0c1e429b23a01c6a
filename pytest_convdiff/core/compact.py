"""The compact form of a reference model's outputs: what the metrics need of A, a few kB per token.

Full storage keeps A's fp32 logits and every layer's (and sub-block's) state at every position:
about 400 kB per token for SmolLM2-135M. The metrics need much less of A:

- KL, top-K agreement, PPL: A's top-``K`` logits and their token ids, the log-normaliser, the
  probability mass outside the top ``K`` (KL is taken over the top ``K`` plus one "rest" bucket, a
  lower bound of the full KL whose gap is the mass-weighted KL inside the rest), the target token's
  log-probability. Top-1..5 agreement and PPL are exact.
- KL inside the rest: ``REST_SAMPLES`` token ids per position drawn from A's distribution outside its
  top K (with their logits). With q = P_A restricted to the rest and q_B = P_B's, KL(q || q_B) =
  E_q[r - 1 - log r], r = q_B / q (E_q[r] = 1): a second-order, non-negative integrand, so a few
  samples per position give the corpus mean within a fraction of a percent. With the top K and the
  rest bucket this is the chain rule of KL: the estimate is unbiased.
- NMSE (logits) and rfn (layers, sub-blocks): ``||a - b||²`` is estimated by ``||S a - S b||²`` with a
  seeded CountSketch ``S`` (a random sign per element from a hash of the seed, the prompt id and the
  position), unbiased. Logits: one sketch of ``LOGIT_SKETCH`` buckets per position. States: one flat
  sketch per prompt, layer and position segment (``STATE_SKETCH`` buckets per position): the few
  positions that hold most of a layer's error (attention sinks: one position held half of SmolLM2's
  layer-15 error) are then estimated like any other, where a per-row sketch would leave the error of
  that one row. ``var(A)`` and ``||a||²`` are stored exactly, so only the numerators are estimated.
- Messages: the largest |b - a| over A's top-``K`` logits at every position and over every logit at a
  fixed sample of positions (every ``sample_every``-th, position 0 included), stored exactly; the mean
  |b - a| is taken over that sample.

B is never stored compact: its chunk is sketched with the same ``S`` while it streams
(``LogitAccumulator.update_compact``, ``LayerAccumulator.update_compact``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import code_version, kernels
from .kernels import exp_lse, topk_indices
from .threads import map_ordered

FORMAT = 1
SEED = 0x5EED_C0DE_2026  # fixed, and stored in each entry: A and every B must sketch with the same S
TOPK = 256  # A's top logits kept per position (their ids as uint16 when the vocabulary allows)
REST_SAMPLES = 128  # tokens drawn per position from A's distribution outside its top K (KL inside the rest)
LOGIT_SKETCH = 256  # sketch width of a logit row
STATE_SKETCH = 16  # buckets per position of a layer's (or sub-block's) sketch, over a whole position segment
LAST_SKETCH = 128  # buckets per position of the last layer's sketch: its position profile is judged bucket by bucket
ROW_SKETCH = 8  # sketch width of a hidden-state row (only to find the worst position)
SAMPLE_EVERY = 256  # about one position in this many keeps all its logits (chosen by hash)
SEGMENTS = (0, 64, 256, 1024, 4096)  # position segments sketched apart (metrics.POSITION_BUCKETS' edges)
# stats columns per position
LSE, SUM, SUMSQ, NONFINITE, TARGET_LP, REST = range(6)
N_STATS = 6
_STATE_SALT = np.uint64(0x9E3779B97F4A7C15)
_C1, _C2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


@dataclass(frozen=True)
class CompactConfig:
    """The parameters of a compact entry, recorded in its meta so every B reduces with the same ones."""

    seed: int = SEED
    topk: int = TOPK
    rest_samples: int = REST_SAMPLES
    logit_sketch: int = LOGIT_SKETCH
    state_sketch: int = STATE_SKETCH
    last_sketch: int = LAST_SKETCH
    row_sketch: int = ROW_SKETCH
    sample_every: int = SAMPLE_EVERY
    format: int = FORMAT

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CompactConfig:
        if int(d.get("format", -1)) != FORMAT:
            raise ValueError(f"compact format {d.get('format')!r}, this version reads {FORMAT}")
        return cls(**{k: int(d[k]) for k in cls.__dataclass_fields__})


def code_digest() -> str:
    """Part of a compact entry's cache key: another version of this module summarises differently."""
    return code_version.code_digest((__name__, kernels.__name__))


# --------------------------------------------------------------------------- the sketch


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (uint64 arithmetic wraps, as intended)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _C1
    x = x ^ (x >> np.uint64(27))
    x = x * _C2
    return x ^ (x >> np.uint64(31))


def row_keys(seed: int, prompt_id: str, positions: np.ndarray) -> np.ndarray:
    """One 64-bit key per position of a prompt: the same for A and B, independent across positions."""
    base = int.from_bytes(hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()[:8], "little")
    with np.errstate(over="ignore"):
        return _mix(np.uint64(base) + np.asarray(positions, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))


def _sign_bits(keys: np.ndarray, width: int) -> np.ndarray:
    """[T, width] 0/1 (uint8): a random sign per (row, column), 64 columns per hash."""
    words = -(-width // 64)
    with np.errstate(over="ignore"):
        h = _mix(keys[:, None] ^ (np.arange(1, words + 1, dtype=np.uint64) * _C2)[None, :])
    bits = np.unpackbits(np.ascontiguousarray(h).view(np.uint8), axis=1, bitorder="little")
    return bits[:, :width]


def _sign_mask(bits: np.ndarray) -> np.ndarray:
    """0/1 sign bits as the float32 sign-bit mask: XOR-ing it flips a value's sign exactly (NaN included), one
    pass instead of ``np.where(bits, -x, x)``'s three (8x faster on a 49k vocabulary). Widened and shifted in one
    pass."""
    return np.left_shift(bits, np.uint32(31), dtype=np.uint32)


def _flip(x: np.ndarray, mask: np.ndarray, *, reuse_mask: bool = False) -> np.ndarray:
    """``x`` (float32) with the sign flipped where ``mask`` has the sign bit; ``reuse_mask``: written into ``mask``
    (a temporary the caller no longer needs), so no new array of ``x``'s size is made."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    if reuse_mask:
        return np.bitwise_xor(mask, bits, out=mask).view(np.float32)
    return (bits ^ mask).view(np.float32)


def sign_mask(keys: np.ndarray, width: int) -> np.ndarray:
    """The sign mask ``sketch`` uses for rows with these keys and ``width`` columns: made once, it serves every
    array of the same rows (each layer of a prompt's states) through ``sketch_masked``."""
    return _sign_mask(_sign_bits(keys, width))


def sketch(x: np.ndarray, keys: np.ndarray, m: int) -> np.ndarray:
    """CountSketch of each row of ``x`` [T, D] into ``m`` buckets (column j to bucket j mod m), float32.

    Row by row the result does not depend on how many rows are sketched together, so A's stored sketch
    and B's streamed one round the same way (A == B gives exactly zero).
    """
    x = np.asarray(x, dtype=np.float32)
    return _bucket_sums(_flip(x, sign_mask(keys, x.shape[1]), reuse_mask=True), m)


def sketch_masked(x: np.ndarray, mask: np.ndarray, m: int) -> np.ndarray:
    """``sketch`` with the rows' sign mask made before (``sign_mask``): the same values."""
    return _bucket_sums(_flip(x, mask), m)


def _bucket_sums(signed: np.ndarray, m: int) -> np.ndarray:
    """Each row's signed values summed into ``m`` buckets (column j to bucket j mod m), in float64, as float32."""
    t, d = signed.shape
    pad = -d % m
    if pad:
        signed = np.concatenate([signed, np.zeros((t, pad), dtype=np.float32)], axis=1)
    return signed.reshape(t, -1, m).sum(axis=1, dtype=np.float64).astype(np.float32)


def state_keys(keys: np.ndarray) -> np.ndarray:
    """Keys for the hidden states: other signs than the logits' (the same for every layer)."""
    return keys ^ _STATE_SALT


def sampled_rows(keys: np.ndarray, every: int) -> np.ndarray:
    """Which positions (of these keys) keep all their logits: about one in ``every``, by hash, not by place
    (position 0 is no typical position)."""
    return (keys >> np.uint64(40)) % np.uint64(every) == 0


@dataclass(frozen=True)
class FlatLayout:
    """Where each element of a prompt's [T, H] states goes in its flat sketch: each position segment
    (``SEGMENTS``) has its own ``per_token * T_seg`` buckets (at least 16); a row lands on consecutive buckets from a
    random offset, with a random sign per element. Rows never collide with themselves, so a position that
    dominates the error (an attention sink) is estimated as well as any other."""

    index: np.ndarray  # [T * H] bucket of each element (row-major)
    negative: np.ndarray  # [T, H] sign of each element, as the float32 sign-bit mask (``_sign_mask``)
    bounds: tuple[tuple[int, int], ...]  # bucket range of each segment (empty segments included)
    size: int


def flat_layout(seed: int, prompt_id: str, t: int, width: int, per_token: int) -> FlatLayout:
    keys = state_keys(row_keys(seed, prompt_id, np.arange(t)))
    edges = [e for e in SEGMENTS if e < t] + [t]
    bounds: list[tuple[int, int]] = []
    index = np.empty((t, width), dtype=np.int64)
    off = 0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        m = max(per_token * (hi - lo), 16)
        start = (keys[lo:hi] >> np.uint64(20)) % np.uint64(m)
        index[lo:hi] = off + (start.astype(np.int64)[:, None] + np.arange(width)[None, :]) % m
        bounds.append((off, off + m))
        off += m
    return FlatLayout(index.reshape(-1), _sign_mask(_sign_bits(_mix(keys ^ _STATE_SALT), width)), tuple(bounds), off)


def flat_sketch(x: np.ndarray, layout: FlatLayout) -> np.ndarray:
    """The flat sketch of one prompt's [T, H] states, summed in float64 and rounded to float32 as stored (so
    equal states give exactly equal sketches on A's and B's side)."""
    signed = _flip(x, layout.negative)
    return np.bincount(layout.index, weights=signed.reshape(-1), minlength=layout.size).astype(np.float32)


def segment_sq(diff: np.ndarray, layout: FlatLayout) -> np.ndarray:
    """||S(b) - S(a)||² of each position segment: [n_segments]. Summed by numpy's own loop, not BLAS's ``dot``:
    OpenBLAS wakes its threads for a long vector, and they spin after the call on the cores the other layers'
    reductions run on (B's reduction took 1.5 x the time)."""
    return np.array([float(np.einsum("i,i->", diff[lo:hi], diff[lo:hi])) for lo, hi in layout.bounds])


# --------------------------------------------------------------------------- A's side: summarising


def nonfinite_rows(x: np.ndarray, sums: np.ndarray) -> np.ndarray:
    """The non-finite entries of each row of ``x`` (float32), given the rows' float64 ``sums`` (or sums of
    squares): a finite sum has none (a finite float32 is below 2^128 and its square below 2^256, so no float64 sum
    of fewer than 2^700 of them overflows, and an infinity or NaN makes the sum non-finite), so only the other rows
    are counted."""
    out = np.zeros(len(sums), dtype=np.int64)
    bad = ~np.isfinite(sums)
    if bad.any():
        out[bad] = (~np.isfinite(x[bad])).sum(axis=1)
    return out


def outside_top(e: np.ndarray, top: np.ndarray) -> np.ndarray:
    """A copy of ``e`` with the columns ``top`` zeroed: the (unnormalised) probabilities outside the top K."""
    rest = e.copy()
    np.put_along_axis(rest, top, 0.0, axis=1)
    return rest


def rest_mass(e: np.ndarray, total: np.ndarray, top: np.ndarray) -> np.ndarray:
    """The probability outside the columns ``top`` (summed, not 1 - the top's sum: no cancellation)."""
    return np.sum(outside_top(e, top), axis=-1, dtype=np.float64) / total


def summarise_logits(logits: np.ndarray, tokens: np.ndarray | None, prompt_id: str, cfg: CompactConfig,
                     chunk: int) -> dict[str, np.ndarray]:
    """One prompt's logits [T, V] (as stored: rounded to the cache dtype) reduced to the compact arrays:
    ``top_idx`` [T, K] int32, ``top_logit`` [T, K] float32, ``stats`` [T, 6] float64, ``sketch`` [T, m]
    float32, ``sample`` [n, V] (the logits at the sampled positions, their dtype)."""
    t, v = logits.shape
    k = min(cfg.topk, v)
    all_keys = row_keys(cfg.seed, prompt_id, np.arange(t))
    spans = [(start, min(t, start + chunk)) for start in range(0, t, chunk)]
    pieces = map_ordered(lambda span: _logit_chunk(logits, tokens, all_keys, span, k, cfg), spans)
    names = ("top_idx", "top_logit", "stats", "sketch", "rest_idx", "rest_logit")
    parts: dict[str, list[np.ndarray]] = {name: [p[name] for p in pieces] for name in names}
    out = {name: np.concatenate(p) for name, p in parts.items()}
    out["sample"] = np.array(logits[np.nonzero(sampled_rows(all_keys, cfg.sample_every))[0]])
    return out


def _logit_chunk(logits: np.ndarray, tokens: np.ndarray | None, all_keys: np.ndarray, span: tuple[int, int], k: int,
                 cfg: CompactConfig) -> dict[str, np.ndarray]:
    """``summarise_logits`` of the rows ``span``: each chunk's arrays depend on its own rows (and keys) only."""
    start, stop = span
    t, v = logits.shape
    keys = all_keys[start:stop]
    a32 = np.asarray(logits[start:stop], dtype=np.float32)
    a64 = a32.astype(np.float64)
    top = topk_indices(a32, k)
    stats = np.zeros((stop - start, N_STATS))
    with np.errstate(invalid="ignore", over="ignore"):
        e, total, lse = exp_lse(a32)
        rest = outside_top(e, top)
        del e
        stats[:, REST] = np.sum(rest, axis=-1, dtype=np.float64) / total
        rest_idx = _draw_rest(rest, keys, cfg.rest_samples)
        del rest
        stats[:, LSE] = lse
        stats[:, SUM] = a64.sum(axis=1)  # +inf and -inf in a row: NaN, counted below, without a warning
        stats[:, SUMSQ] = np.einsum("ij,ij->i", a64, a64)
    stats[:, NONFINITE] = nonfinite_rows(a32, stats[:, SUM])
    stats[:, TARGET_LP] = np.nan
    if tokens is not None and len(tokens) >= 2:
        targets = np.asarray(tokens[start + 1:min(stop + 1, t)], dtype=np.int64)
        rows = np.arange(len(targets))
        stats[rows, TARGET_LP] = a64[rows, targets] - lse[rows]
    return {"top_idx": top.astype(np.uint16 if v <= 1 << 16 else np.int32),
            "top_logit": np.take_along_axis(a32, top, axis=1), "stats": stats,
            "sketch": sketch(a32, keys, cfg.logit_sketch), "rest_idx": rest_idx.astype(np.int32),
            "rest_logit": np.take_along_axis(a32, np.maximum(rest_idx, 0), axis=1)}


_DRAW_BLOCK = 64


def _draw_rest(rest: np.ndarray, keys: np.ndarray, n: int) -> np.ndarray:
    """``n`` token ids per row drawn from ``rest`` (A's unnormalised probabilities with its top K zeroed; systematic
    sampling from one uniform per row, taken from the row's key); -1 where that mass is 0.

    The cumulative mass is taken block by block (sums of ``_DRAW_BLOCK`` columns, then a cumulative sum within
    the few blocks the draws land in), not over the whole vocabulary: a full float64 cumulative sum of every row
    cost more than the rest of the summary (numpy's cumsum does not vectorise)."""
    rows, v = rest.shape
    out = np.full((rows, n), -1, dtype=np.int64)
    pad = -v % _DRAW_BLOCK
    padded = np.concatenate([rest, np.zeros((rows, pad), dtype=rest.dtype)], axis=1) if pad else rest
    blocks = padded.reshape(rows, -1, _DRAW_BLOCK)
    cdf = np.cumsum(blocks.sum(axis=2, dtype=np.float64), axis=1)  # [rows, blocks]
    u0 = (keys >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    total = cdf[:, -1]
    live = np.nonzero((total > 0) & np.isfinite(total))[0]
    if not live.size:
        return out
    # every row's draws at once; only the search of each row's block sums is a call per row
    u = (np.arange(n, dtype=np.float64)[None, :] + u0[live, None]) / n * total[live, None]  # [live, n]
    j = np.stack([np.searchsorted(cdf[r], u[i], side="right") for i, r in enumerate(live)])
    j = np.minimum(j, cdf.shape[1] - 1)
    rows_ = live[:, None]
    within = u - np.where(j > 0, cdf[rows_, np.maximum(j - 1, 0)], 0.0)
    inner = np.cumsum(blocks[rows_, j], axis=2, dtype=np.float64)  # [live, n, block]: only the blocks drawn from
    k = np.minimum((inner <= within[:, :, None]).sum(axis=2), _DRAW_BLOCK - 1)
    out[live] = np.minimum(j * _DRAW_BLOCK + k, v - 1)
    return out


def summarise_states(states: np.ndarray, prompt_id: str, cfg: CompactConfig, rows: bool = True
                     ) -> dict[str, np.ndarray]:
    """One prompt's states [L, T, H] reduced to ``sketch`` [L, M] (the flat sketch, float32), ``norm2``
    (||a||² per position [L, T]), ``nonfinite`` [L] and, when ``rows``, ``rows`` [L, T, m]: a small sketch of
    each row, enough to find the worst position."""
    n_layers, t, h = states.shape
    layout = flat_layout(cfg.seed, prompt_id, t, h, cfg.state_sketch)
    keys = state_keys(row_keys(cfg.seed, prompt_id, np.arange(t)))
    flat = np.empty((n_layers, layout.size), dtype=np.float32)
    norm2 = np.empty((n_layers, t))
    bad = np.zeros(n_layers, dtype=np.int64)
    row_sk = np.empty((n_layers, t, cfg.row_sketch), dtype=np.float32) if rows else None
    row_mask = sign_mask(keys, h) if rows else None  # the same for every layer: made once

    def one(layer: int) -> None:  # each layer writes its own rows of the outputs: layers run on the cores
        a = np.asarray(states[layer], dtype=np.float32)
        a64 = a.astype(np.float64)
        norm2[layer] = np.einsum("ij,ij->i", a64, a64)
        bad[layer] = int(nonfinite_rows(a, norm2[layer]).sum())
        flat[layer] = flat_sketch(a, layout)
        if row_sk is not None:
            row_sk[layer] = sketch_masked(a, row_mask, cfg.row_sketch)

    map_ordered(one, range(n_layers))
    out = {"sketch": flat, "norm2": norm2, "nonfinite": bad}
    if row_sk is not None:
        out["rows"] = row_sk
        last = flat_layout(cfg.seed, prompt_id, t, h, cfg.last_sketch)
        out["last"] = flat_sketch(states[-1], last)
    return out


@dataclass
class LogitSummary:
    """A's compact logits for one prompt, as the accumulator reads them (arrays may be memory maps)."""

    top_idx: np.ndarray
    top_logit: np.ndarray
    stats: np.ndarray
    sketch: np.ndarray
    sample: np.ndarray
    rest_idx: np.ndarray
    rest_logit: np.ndarray
    vocab: int


@dataclass
class StateSummary:
    """A's compact states (hidden, or one sub-block's) for one prompt."""

    sketch: np.ndarray  # [L, M]: flat sketch (flat_layout)
    norm2: np.ndarray  # [L, T]
    nonfinite: np.ndarray  # [L]
    rows: np.ndarray | None = None  # [L, T, m] row sketches (hidden states only)
    last: np.ndarray | None = None  # the last layer's finer flat sketch (hidden states only)


def summary_bytes(vocab: int, layers: int, hidden: bool, n_sub: int, cfg: CompactConfig | None = None) -> float:
    """Bytes per token of a compact entry's arrays (without the two token arrays and the samples)."""
    cfg = cfg or CompactConfig()
    k = min(cfg.topk, vocab) if vocab else cfg.topk
    per = k * (6 if vocab and vocab <= 1 << 16 else 8) + cfg.rest_samples * 8 + N_STATS * 8 + cfg.logit_sketch * 4
    if hidden:
        per += (1 + n_sub) * layers * (cfg.state_sketch * 4 + 8) + layers * cfg.row_sketch * 4 + cfg.last_sketch * 4
    return per
