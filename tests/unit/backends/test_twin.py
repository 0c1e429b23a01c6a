"""The re-quantisation twin (backends.twin, backends.ggml): llama.cpp's quantiser from Python, and B against it.

Hand-checkable values where there are any (round-to-nearest-even, Q8_0's one scale per 32 values), and
the property the weights check rests on: a defect far below a type's quantisation noise still moves most
blocks off the twin, while the twin itself is reproduced exactly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from pytest_convdiff.backends import twin

ggml = pytest.importorskip("pytest_convdiff.backends.ggml")


def _need_ggml() -> None:
    why = ggml.available()
    if why:
        pytest.skip(why)


def test_round_to_bf16_is_round_to_nearest_even() -> None:
    one = np.float32(1.0)
    ulp = 2.0 ** -7  # bf16 keeps 7 fraction bits
    x = np.array([one + ulp / 2, one + 3 * ulp / 2, one + ulp / 4, -(one + 3 * ulp / 2), np.nan], dtype=np.float32)
    got = twin.round_to(x, "BF16")
    assert got[0] == 1.0  # a tie rounds to the even neighbour (1.0)
    assert got[1] == one + 2 * ulp  # a tie between 1+ulp (odd) and 1+2ulp (even)
    assert got[2] == 1.0
    assert got[3] == -(one + 2 * ulp)
    assert math.isnan(got[4])


def test_round_to_f16_and_f32() -> None:
    x = np.array([1.0 + 2.0 ** -12, 65519.0, 70000.0], dtype=np.float32)
    got = twin.round_to(x, "F16")
    assert got[0] == 1.0 and got[1] == 65504.0 and math.isinf(got[2])
    assert twin.round_to(x, "F32") is not None and np.array_equal(twin.round_to(x, "F32"), x)


def test_q8_0_by_hand() -> None:
    """Q8_0: one f16 scale d = max|x| / 127 per 32 values, q = round(x / d); dequantised d * q."""
    _need_ggml()
    x = np.arange(32, dtype=np.float32)[None, :] - 10.0  # max |x| = 21
    raw = ggml.quantize("Q8_0", x)
    assert raw.shape == (1, 34)  # 2 bytes of scale, 32 of quants
    d = np.float32(np.float16(21.0 / 127.0))
    q = np.round(x / (21.0 / 127.0))
    assert np.frombuffer(raw[0, :2].tobytes(), dtype=np.float16)[0] == np.float16(21.0 / 127.0)
    assert np.array_equal(raw[0, 2:].view(np.int8), q[0].astype(np.int8))
    np.testing.assert_allclose(ggml.dequantize("Q8_0", raw, 32), d * q, rtol=0, atol=1e-6)


def test_quantize_is_deterministic_and_chunk_independent() -> None:
    _need_ggml()
    x = np.random.default_rng(1).standard_normal((64, 256)).astype(np.float32)
    whole = ggml.quantize("Q4_K", x)
    rows = np.concatenate([ggml.quantize("Q4_K", x[i:i + 8]) for i in range(0, 64, 8)])
    assert np.array_equal(whole, rows) and np.array_equal(whole, ggml.quantize("Q4_K", x))


def test_types_that_need_an_importance_matrix_say_so() -> None:
    _need_ggml()
    assert ggml.requires_imatrix("IQ2_XXS") and not ggml.requires_imatrix("Q4_K")
    with pytest.raises(ggml.GGMLUnavailable, match="importance matrix"):
        ggml.quantize("IQ2_XXS", np.zeros((1, 256), dtype=np.float32))
    with pytest.raises(ggml.GGMLUnavailable, match="blocks of 256"):
        ggml.quantize("Q4_K", np.zeros((1, 100), dtype=np.float32))


def _stats(a: np.ndarray, b_input: np.ndarray, type_name: str) -> twin.TwinStats:
    """B made by the quantiser from ``b_input``, against A's twin."""
    raw_t, vt = twin.twin_rows(a, type_name, "F32")
    raw_b, vb = twin.twin_rows(b_input, type_name, "F32")
    s = twin.TwinStats("F32")
    s.update(raw_b, raw_t, vb, vt, a, ggml.block_bytes(type_name)[0], np.arange(a.shape[0]))
    return s


def test_a_correct_file_is_its_twin() -> None:
    _need_ggml()
    a = np.random.default_rng(2).standard_normal((16, 512)).astype(np.float32)
    s = _stats(a, a, "Q2_K")
    assert s.differing == 0 and s.share == 0.0 and s.excess() == 0.0 and s.tie_ratio() == 0.0


def _sq(x: np.ndarray) -> float:
    x = np.where(np.isfinite(x), x, 0.0).astype(np.float64)
    return float((x * x).sum())


@pytest.mark.parametrize("nan_in_b", [False, True])
def test_the_sums_are_their_definitions_when_every_block_is_the_twins(nan_in_b: bool) -> None:
    """The path for a chunk whose every block is the twin's (one difference, no masks) sums what the definitions
    say, and a non-finite value in B still goes the masked way."""
    _need_ggml()
    a = np.random.default_rng(4).standard_normal((8, 512)).astype(np.float32)
    raw_t, vt = twin.twin_rows(a, "Q4_K", "F32")
    vb = vt.copy()
    if nan_in_b:
        vb[3, 7] = vt[3, 7] = np.nan  # as B's bytes read back: the twin's values are B's where the bytes agree
    s = twin.TwinStats("F32")
    s.update(raw_t.copy(), raw_t, vb, vt, a, 256, np.arange(8))
    assert s.differing == 0
    assert s.d2 == 0.0
    assert s.e2 == pytest.approx(_sq(vt - a), rel=1e-6) and s.b2 == pytest.approx(_sq(vb - a), rel=1e-6)
    assert math.isfinite(s.e2)


@pytest.mark.parametrize("type_name", ["Q2_K", "Q4_K", "Q8_0", "F16"])
def test_a_defect_below_the_noise_moves_most_blocks(type_name: str) -> None:
    """×1.02 is 2 % of A, some 15× below Q2_K's error: still nearly every block differs from the twin."""
    _need_ggml()
    a = np.random.default_rng(3).standard_normal((32, 512)).astype(np.float32)
    s = _stats(a, a * np.float32(1.02), type_name)
    noise = np.linalg.norm(twin.twin_rows(a, type_name, "F32")[1] - a) / np.linalg.norm(a)
    if type_name == "Q2_K":
        assert noise > 10 * 0.02  # the defect is far inside the type's own error
    assert s.share > 0.9, s.share  # 9× the default weights_twin_blocks of 0.1


def test_one_changed_row_shows_in_the_tie_ratio_and_its_place() -> None:
    """A zeroed row: a few blocks differ (share far below the bound), but there B is much farther from A than
    the twin: the tie ratio is sqrt(sum ||A_row||^2 / sum ||T_row - A_row||^2), about 1/noise."""
    _need_ggml()
    a = np.random.default_rng(4).standard_normal((64, 256)).astype(np.float32)
    b = a.copy()
    b[37] = 0.0
    s = _stats(a, b, "Q4_K")
    assert s.share == 1 / 64 and s.rows_hit == {37} and s.where[0] == (37, 0)
    t = twin.twin_rows(a, "Q4_K", "F32")[1]
    expected = np.linalg.norm(a[37]) / np.linalg.norm(t[37] - a[37])
    assert s.tie_ratio() == pytest.approx(expected, rel=1e-6)
    assert s.tie_ratio() > 2 * 1.5  # twice the default weights_twin_ratio


def test_float_types_floor_the_twin_error_at_half_an_ulp() -> None:
    """An exact type: a value one ulp off its rounding (the other neighbour) is a tie, not an infinite ratio."""
    a = np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)
    b = a.copy()
    b[0, 1] = np.nextafter(np.float32(2.0), np.float32(3.0))
    s = twin.TwinStats("F32", half_ulp=2.0 ** -24)
    s.update(None, None, b, a, a, 1, np.arange(1))
    assert s.differing == 1 and s.share == 0.25
    assert s.tie_ratio() == pytest.approx(2.0, rel=1e-6)  # one ulp against the half-ulp floor


def test_a_chunk_whose_bytes_are_the_twins_adds_what_update_adds() -> None:
    """``TwinStats.identical`` (the weights pass's shortcut when B's bytes are the twin's) is ``update`` on that
    chunk, given the chunk's |B - A|^2 summed already."""
    _need_ggml()
    from pytest_convdiff.backends.dequant import _same_bytes
    from pytest_convdiff.core.weight_errors import TensorStats

    a = (0.02 * np.random.default_rng(4).standard_normal((48, 256))).astype(np.float32)
    raw = ggml.quantize("Q4_K", a)
    b = ggml.dequantize("Q4_K", raw, 256)
    full, short = twin.TwinStats("F32", type="Q4_K"), twin.TwinStats("F32", type="Q4_K")
    full.update(raw, raw.copy(), b, b.copy(), a, 256, np.arange(48))
    d2 = TensorStats().update(a, b)
    assert d2 is not None and _same_bytes(raw, raw.copy())
    short.identical(48 * 1, d2)
    assert (short.blocks, short.differing, short.d2) == (full.blocks, full.differing, 0.0)
    assert short.e2 == pytest.approx(full.e2, rel=1e-5) and short.b2 == pytest.approx(full.b2, rel=1e-5)
    other = raw.copy()
    other[7, 100] ^= 1
    assert not _same_bytes(raw, other) and not _same_bytes(raw, raw[:, :-8])
