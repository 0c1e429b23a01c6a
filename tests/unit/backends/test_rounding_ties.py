"""The rounding-tie test of the weights twin (``backends.twin.rounding_ties``), against another build.

Q4_0 and Q5_0 round ``x * id + 8.5`` (``16.5``) once per value. A build that contracts that into one fused
multiply-add (arm64's, or any built with ``-ffp-contract=fast``) rounds once where this machine's rounds twice, and
tips the few values that sit within an ulp or two of a rounding boundary: where ``x * id`` is near -7.5 its ulp is
8 times the sum's. Here the other build is emulated in numpy (the fused sum in float64, then one rounding to
float32), after checking that the emulation of the installed build reproduces its bytes exactly. Every block the
other build writes differently must count as a tie, not as differing; a value moved anywhere else, or a block whose
scale bytes differ, must not. (Q4_1 and Q5_1 add 0.5 to a product no smaller than the sum's own scale, so the two
roundings agree: the emulation finds no flip in 2^20 blocks. Their acceptance is tested on values that sit on a
boundary.)
"""

from __future__ import annotations

import numpy as np
import pytest

from pytest_convdiff.backends.twin import ROUNDING_TYPES, TwinStats

ggml = pytest.importorskip("pytest_convdiff.backends.ggml")
QK = 32
LIMIT = {"Q4_0": 15, "Q5_0": 31, "Q4_1": 15, "Q5_1": 255}  # the truncation's MIN() (Q5_1's uint8 cast: none)


def _emulate(type_name: str, x: np.ndarray, fused: bool) -> np.ndarray:
    """Each value's quant as quantize_row_*_ref computes it, the sum rounded apart from the product or fused."""
    kind, div, add = ROUNDING_TYPES[type_name]
    if kind == "signed-max":
        big = x[np.arange(len(x)), np.argmax(np.abs(x), axis=1)]
        d = (big / np.float32(div)).astype(np.float32)
        base = x
    else:
        lo = x.min(axis=1)
        d = ((x.max(axis=1) - lo) / np.float32(div)).astype(np.float32)
        base = (x - lo[:, None]).astype(np.float32)
    inv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, 1), 0).astype(np.float32)[:, None]
    if fused:
        t = (base.astype(np.float64) * inv.astype(np.float64) + add).astype(np.float32)
    else:
        t = ((base * inv).astype(np.float32) + np.float32(add)).astype(np.float32)
    return np.minimum(LIMIT[type_name], np.trunc(t)).astype(np.int64)


def _encode(type_name: str, head: np.ndarray, q: np.ndarray) -> np.ndarray:
    """One block's bytes from its scale bytes (d, and m for the _1 types) and its 32 quants."""
    qs = (q[:16] & 15) | ((q[16:] & 15) << 4)
    parts = [head]
    if type_name.startswith("Q5"):
        qh = np.uint32(sum(int((q[i] >> 4) & 1) << i for i in range(QK)))
        parts.append(np.frombuffer(qh.tobytes(), dtype=np.uint8))
    parts.append(qs.astype(np.uint8))
    return np.concatenate(parts)


@pytest.mark.parametrize("type_name", ["Q4_0", "Q5_0"])
def test_another_builds_fused_rounding_is_a_tie_and_nothing_else_is(type_name: str):
    rng = np.random.default_rng(7)
    n = 1 << 17
    x = rng.standard_normal((n, QK)).astype(np.float16).astype(np.float32)  # an F16 intermediate, as converted
    raw = ggml.quantize(type_name, x.reshape(1, -1)).reshape(n, -1)
    head = 4 if ROUNDING_TYPES[type_name][0] == "min-max" else 2
    mine, other = _emulate(type_name, x, fused=False), _emulate(type_name, x, fused=True)
    # the emulation is this build's quantiser, byte for byte
    assert all(np.array_equal(_encode(type_name, raw[i, :head], mine[i]), raw[i]) for i in range(64))
    flipped = np.nonzero((mine != other).any(axis=1))[0]
    assert len(flipped) >= 5, "the search found too few near-ties to test"
    rows = flipped[:40]
    raw_t = raw[rows]
    raw_b = np.stack([_encode(type_name, raw[i, :head], other[i]) for i in rows])
    vt = ggml.dequantize(type_name, raw_t, QK)
    vb = ggml.dequantize(type_name, raw_b, QK)
    stats = TwinStats("F16", type=type_name)
    stats.update(raw_b, raw_t, vb, vt, x[rows], QK, np.arange(len(rows)), quantised=x[rows])
    assert (stats.ties, stats.differing, stats.d2) == (len(rows), 0, 0.0)
    # without the quantiser's input the same blocks differ, as before the test existed
    plain = TwinStats("F16", type=type_name)
    plain.update(raw_b, raw_t, vb, vt, x[rows], QK, np.arange(len(rows)))
    assert (plain.ties, plain.differing) == (0, len(rows))
    # a value moved by one quantum where the rounding was nowhere near its boundary is no tie
    calm = np.nonzero((mine == other).all(axis=1))[0][:20]
    moved = mine[calm].copy()
    t_far = 5  # an element of each block, moved up one step (or down at the top of the range)
    moved[:, t_far] = np.where(moved[:, t_far] < LIMIT[type_name] - 1, moved[:, t_far] + 1, moved[:, t_far] - 1)
    raw_m = np.stack([_encode(type_name, raw[i, :head], q) for i, q in zip(calm, moved, strict=True)])
    bad = TwinStats("F16", type=type_name)
    bad.update(raw_m, raw[calm], ggml.dequantize(type_name, raw_m, QK), ggml.dequantize(type_name, raw[calm], QK),
               x[calm], QK, np.arange(len(calm)), quantised=x[calm])
    assert (bad.ties, bad.differing) == (0, len(calm))
    # the other build's flip with the scale bytes changed (a scaled tensor changes them) is no tie either
    raw_s = raw_b.copy()
    raw_s[:, 0] ^= 1
    scaled = TwinStats("F16", type=type_name)
    scaled.update(raw_s, raw_t, ggml.dequantize(type_name, raw_s, QK), vt, x[rows], QK, np.arange(len(rows)),
                  quantised=x[rows])
    assert (scaled.ties, scaled.differing) == (0, len(rows))


@pytest.mark.parametrize("type_name", ["Q4_1", "Q5_1"])
def test_a_min_max_block_tipped_at_a_value_on_its_boundary_is_a_tie(type_name: str):
    """Values whose ``(x - min) * id + 0.5`` is an integer within an ulp or two (an F16 input makes exact hits
    common) are where any other rounding of the sum lands one step lower; one step at such a value is a tie, one
    step anywhere else is not."""
    rng = np.random.default_rng(3)
    n = 4096
    x = rng.standard_normal((n, QK)).astype(np.float16).astype(np.float32)
    raw = ggml.quantize(type_name, x.reshape(1, -1)).reshape(n, -1)
    mine = _emulate(type_name, x, fused=False)
    assert all(np.array_equal(_encode(type_name, raw[i, :4], mine[i]), raw[i]) for i in range(64))
    lo = x.min(axis=1, keepdims=True)
    d = ((x.max(axis=1, keepdims=True) - lo) / np.float32(ROUNDING_TYPES[type_name][1])).astype(np.float32)
    prod = (x - lo).astype(np.float32).astype(np.float64) * (np.float32(1) / d).astype(np.float64)
    t = prod + 0.5
    on_edge = (np.abs(t - np.round(t)) <= 1e-6) & (np.round(t) >= 1) & (mine > 0)
    blocks = np.nonzero(on_edge.any(axis=1))[0][:30]
    assert len(blocks) >= 5
    tipped = mine[blocks].copy()
    for k, i in enumerate(blocks):
        j = int(np.nonzero(on_edge[i])[0][0])
        tipped[k, j] -= 1  # the other side of the boundary it sits on
    raw_b = np.stack([_encode(type_name, raw[i, :4], q) for i, q in zip(blocks, tipped, strict=True)])
    stats = TwinStats("F16", type=type_name)
    stats.update(raw_b, raw[blocks], ggml.dequantize(type_name, raw_b, QK), ggml.dequantize(type_name, raw[blocks], QK),
                 x[blocks], QK, np.arange(len(blocks)), quantised=x[blocks])
    assert (stats.ties, stats.differing) == (len(blocks), 0)
    far = mine[blocks].copy()
    for k, i in enumerate(blocks):
        j = int(np.argmax(np.abs(t[i] - np.round(t[i]))))  # the value farthest from a boundary
        far[k, j] = far[k, j] - 1 if far[k, j] > 0 else far[k, j] + 1
    raw_f = np.stack([_encode(type_name, raw[i, :4], q) for i, q in zip(blocks, far, strict=True)])
    bad = TwinStats("F16", type=type_name)
    bad.update(raw_f, raw[blocks], ggml.dequantize(type_name, raw_f, QK), ggml.dequantize(type_name, raw[blocks], QK),
               x[blocks], QK, np.arange(len(blocks)), quantised=x[blocks])
    assert (bad.ties, bad.differing) == (0, len(blocks))


def test_a_failing_tensor_says_how_many_blocks_were_taken_as_rounding_ties():
    """The message of a tensor that fails its twin counts the blocks accepted as another build's rounding apart,
    so a reader sees they were not held against it; a tensor without such blocks says nothing of them."""
    from pytest_convdiff.checks.weights import _twin_why
    from pytest_convdiff.core.bounds import Bounds

    bounds = Bounds({"weights_twin_blocks": 0.1, "weights_twin_ratio": 1.5, "weights_imatrix": 1.1})
    twin = {"intermediate": "F16", "blocks": 100, "differing": 40, "share": 0.4, "tie_ratio": 3.0, "excess": 2.0,
            "ties": 3, "row_range": None}
    why = _twin_why({"twin": twin, "type_b": "Q4_0"}, bounds)
    assert [k for k, _ in why] == ["weights_twin_blocks", "weights_twin_ratio", ""]
    assert "3 more block(s) differed only at a near-tie" in why[-1][1]
    assert all("near-tie of the quantiser's one rounding" not in text
               for _, text in _twin_why({"twin": {**twin, "ties": 0}, "type_b": "Q4_0"}, bounds))
