"""The scale-search tie test of the weights twin (``backends.twin.scale_search_ties``): Q2_K, Q4_K, Q5_K.

Another build's float32 least-squares solve chooses other scale codes for some blocks, and the quantiser then
rounds every value again under the codes it stored. Such a block is accepted; a block whose values are not that
rounding of the quantiser's input (a scaled, noisy, offset or moved input, a zeroed sub-block) is not. The other
build's block is made here as the quantiser would write it: the installed build's block with ``d`` one half-float
step away and every value rounded again under it (Q4_K's values are repacked; the files another build really
wrote are tests/integration/test_other_build.py's).
"""

from __future__ import annotations

import numpy as np
import pytest

from pytest_convdiff.backends.twin import SCALE_SEARCH_TYPES, TwinStats, scale_search_ties

ggml = pytest.importorskip("pytest_convdiff.backends.ggml")


def _input(rows: int = 256, seed: int = 0) -> np.ndarray:
    """Rows of 256 values as an F16 intermediate hands them to the quantiser."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((rows, 256)) * 0.05).astype(np.float16).astype(np.float32)


def _judge(type_name: str, x: np.ndarray, raw: np.ndarray) -> np.ndarray:
    return scale_search_ties(type_name, x, raw, ggml.dequantize(type_name, raw, 256))


@pytest.mark.parametrize("type_name", sorted(SCALE_SEARCH_TYPES))
def test_every_block_the_installed_quantiser_writes_is_its_own_rounding(type_name: str) -> None:
    """The decoding of the codes and the final rounding reproduce the quantiser exactly: its own blocks pass."""
    x = _input()
    assert _judge(type_name, x, ggml.quantize(type_name, x)).all()


def _q4k_with_other_d(x: np.ndarray, raw: np.ndarray) -> np.ndarray:
    """Q4_K blocks with ``d`` one half-float step larger and every value rounded again under the stored codes, as
    ``quantize_row_q4_K_ref`` writes them once its search has chosen that ``d``."""
    from pytest_convdiff.backends.twin import _k4_scales

    out = raw.copy()
    d = np.ascontiguousarray(raw[:, :2]).view(np.float16)[:, 0]
    d2 = np.nextafter(d, np.float16(np.inf)).astype(np.float16)
    out[:, :2] = d2.reshape(-1, 1).view(np.uint8)
    dmin = np.ascontiguousarray(raw[:, 2:4]).view(np.float16)[:, 0].astype(np.float32)
    sc, m = _k4_scales(raw)
    step = (d2.astype(np.float32)[:, None] * sc).astype(np.float32)
    low = (dmin[:, None] * m).astype(np.float32)
    xs = x.reshape(len(x), 8, 32)
    q = np.clip(np.rint(((xs + low[..., None]).astype(np.float32) / step[..., None]).astype(np.float32)), 0, 15)
    q = q.astype(np.uint8).reshape(len(x), 4, 2, 32)  # (group of 64, low or high nibble, 32)
    out[:, 16:] = (q[:, :, 0, :] | (q[:, :, 1, :] << 4)).reshape(len(x), 128)
    return out


def test_a_block_with_the_scale_another_build_chose_is_a_tie() -> None:
    x = _input()
    raw = ggml.quantize("Q4_K", x)
    other = _q4k_with_other_d(x, raw)
    changed = (other != raw).any(axis=1)
    assert changed.mean() > 0.9  # the repacked values changed too: not the same block under another name
    assert _judge("Q4_K", x, other).all()
    # the same bytes judged against an input they were not rounded from are not
    assert not _judge("Q4_K", (x * np.float32(1.02)).astype(np.float32), other).any()


DEFECTS = {
    "x1.02": lambda x, rng: x * np.float32(1.02),
    "noise 1%": lambda x, rng: x * (1 + np.float32(0.01) * rng.standard_normal(x.shape).astype(np.float32)),
    "offset": lambda x, rng: x + np.float32(0.001),
    "rows moved": lambda x, rng: np.roll(x, 1, axis=0),
    "sub-block zeroed": lambda x, rng: np.concatenate([x[:, :32], np.zeros_like(x[:, 32:64]), x[:, 64:]], axis=1),
}
# the least share of blocks each defect must leave differing (docs/twins.md's table, with room): Q2_K's four
# levels keep some blocks of a small defect consistent with their own codes; the others keep none of these
LEAST = {"Q2_K": {"x1.02": 0.6, "noise 1%": 0.3, "offset": 0.8, "rows moved": 0.99, "sub-block zeroed": 0.99}}


@pytest.mark.parametrize("defect", sorted(DEFECTS))
@pytest.mark.parametrize("type_name", sorted(SCALE_SEARCH_TYPES))
def test_a_defect_in_the_quantisers_input_is_no_tie(type_name: str, defect: str) -> None:
    x = _input(seed=1)
    rng = np.random.default_rng(2)
    raw = ggml.quantize(type_name, DEFECTS[defect](x, rng).astype(np.float32))
    differ = (raw != ggml.quantize(type_name, x)).any(axis=1)
    assert differ.all()
    still = 1.0 - _judge(type_name, x, raw).mean()
    assert still >= LEAST.get(type_name, {}).get(defect, 0.7), still
    # the share the weights item is judged by stays above its bound (0.1) by the same margin
    stats = TwinStats("F16", type=type_name)
    vb = ggml.dequantize(type_name, raw, 256)
    stats.update(raw, ggml.quantize(type_name, x), vb, ggml.dequantize(type_name, ggml.quantize(type_name, x), 256),
                 x, 256, np.arange(len(x)), quantised=x)
    assert stats.share == pytest.approx(still) and stats.scale_ties == round((1 - still) * len(x))


def test_twin_stats_counts_scale_ties_apart_and_keeps_them_out_of_the_ratio() -> None:
    x = _input()
    raw_t = ggml.quantize("Q4_K", x)
    raw_b = _q4k_with_other_d(x, raw_t)
    stats = TwinStats("F16", type="Q4_K")
    stats.update(raw_b, raw_t, ggml.dequantize("Q4_K", raw_b, 256), ggml.dequantize("Q4_K", raw_t, 256), x, 256,
                 np.arange(len(x)), quantised=x)
    assert stats.differing == 0 and stats.scale_ties == int((raw_b != raw_t).any(axis=1).sum()) > 0
    assert stats.tie_ratio() == 0.0 and stats.to_dict()["scale_ties"] == stats.scale_ties
    # without the quantiser's input (a twin that cannot say what was rounded) they differ, as before
    plain = TwinStats("F16", type="Q4_K")
    plain.update(raw_b, raw_t, ggml.dequantize("Q4_K", raw_b, 256), ggml.dequantize("Q4_K", raw_t, 256), x, 256,
                 np.arange(len(x)))
    assert plain.differing == stats.scale_ties and plain.scale_ties == 0
