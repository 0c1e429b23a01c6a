"""float16 conversions (backends.ggml.f16_round / f16_widen): numpy's cast, bit for bit, whichever way it is made.

The twin writes every value of A through the converter's F16 intermediate; numpy's cast is the converter's own
(gguf-py writes with numpy), so any faster conversion must give exactly its bits, or not be used.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from pytest_convdiff.backends import ggml


def _values(n: int) -> np.ndarray:
    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n) * np.exp(rng.uniform(-27.0, 13.0, n))).astype(np.float32)
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 65504.0, 65519.0, 65520.0, -65520.0, 2.0 ** -24,
                         2.0 ** -25, 3 * 2.0 ** -26, 1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -11], dtype=np.float32)
    k = min(n, len(specials))
    x[:k] = specials[:k]
    return x


def _same_bits(got: np.ndarray, want: np.ndarray) -> bool:
    nan = np.isnan(want)
    return bool(np.array_equal(np.isnan(got), nan)) and np.array_equal(got.view(np.uint32)[~nan],
                                                                        want.view(np.uint32)[~nan])


@pytest.fixture(params=["ggml", "numpy"])
def conversion(request, monkeypatch):
    """Each test once through ggml's vector conversion (where this machine has it) and once through numpy's."""
    if request.param == "ggml":
        if ggml._cpu() is None:
            pytest.skip("ggml's CPU library is not installed here, or its conversion is not numpy's")
    else:
        monkeypatch.setattr(ggml, "_cpu_state", [None])
    return request.param


@pytest.mark.parametrize("n", [1, 13, 64, 65, 4099, (1 << 16) + 3, 3 * (1 << 16)])
def test_f16_round_is_numpys_cast(conversion, n):
    x = _values(n)
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).astype(np.float32)
    got = ggml.f16_round(x)
    assert got.dtype == np.float32 and got.shape == x.shape
    assert _same_bits(got, want)
    assert got[0] == 0.0 and not np.signbit(got[0])
    if n >= 14:  # -0.0 keeps its sign; 65519 rounds down, 65520 up to infinity; ties go to the even neighbour
        assert np.signbit(got[1]) and got[5] == 65504.0 and got[6] == 65504.0 and np.isposinf(got[7])
        assert got[9] == 2.0 ** -24 and got[10] == 0.0 and got[11] == 2.0 ** -24 and got[12] == 1.0
        assert got[13] == 1.0 + 2.0 ** -9


def test_f16_round_keeps_a_matrix_shape(conversion):
    x = _values(6 * 40000).reshape(6, 40000)
    with np.errstate(over="ignore"):
        assert _same_bits(ggml.f16_round(x), x.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("n", [1, 70, (1 << 16) + 5])
def test_f16_widen_is_numpys_cast(conversion, n):
    with np.errstate(over="ignore"):
        h = _values(n).astype(np.float16)
    assert _same_bits(ggml.f16_widen(h), h.astype(np.float32))


class _FlushingLib:
    """A conversion that flushes float16's subnormals to zero, as a build without them would: not numpy's."""

    def ggml_cpu_fp32_to_fp16(self, src: int, dst: int, n: int) -> None:
        x = np.ctypeslib.as_array(ctypes.cast(src, ctypes.POINTER(ctypes.c_float)), (n,))
        y = np.ctypeslib.as_array(ctypes.cast(dst, ctypes.POINTER(ctypes.c_uint16)), (n,))
        with np.errstate(over="ignore"):
            h = x.astype(np.float16)
        h[np.abs(h) < np.float16(2.0 ** -14)] = 0
        y[:] = h.view(np.uint16)

    def ggml_cpu_fp16_to_fp32(self, src: int, dst: int, n: int) -> None:
        x = np.ctypeslib.as_array(ctypes.cast(src, ctypes.POINTER(ctypes.c_uint16)), (n,))
        y = np.ctypeslib.as_array(ctypes.cast(dst, ctypes.POINTER(ctypes.c_float)), (n,))
        y[:] = x.view(np.float16).astype(np.float32)


class _NumpyLib(_FlushingLib):
    def ggml_cpu_fp32_to_fp16(self, src: int, dst: int, n: int) -> None:
        x = np.ctypeslib.as_array(ctypes.cast(src, ctypes.POINTER(ctypes.c_float)), (n,))
        y = np.ctypeslib.as_array(ctypes.cast(dst, ctypes.POINTER(ctypes.c_uint16)), (n,))
        with np.errstate(over="ignore"):
            y[:] = x.astype(np.float16).view(np.uint16)


def test_a_conversion_that_is_not_numpys_is_not_used():
    assert not ggml._agrees(_FlushingLib())
    assert ggml._agrees(_NumpyLib())  # the probe itself passes a conversion that is numpy's
