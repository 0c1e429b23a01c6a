"""T8's rounding of a matmul's input (``hf._round_activation``) against the rules of llama.cpp's reference
quantisers, written out here element by element in float32."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pytest_convdiff.backends.hf import _round_activation  # noqa: E402 - the rounding itself is the unit


def _q8_k_by_rule(x: np.ndarray) -> np.ndarray:
    """Blocks of 256: the first value of largest magnitude sets iscale = -127 / max (float32), each value is
    round-half-to-even(iscale * x) capped at 127, times the float32 scale 1 / iscale."""
    out = np.zeros_like(x)
    for b in range(0, x.size, 256):
        blk = x[b:b + 256]
        j = int(np.argmax(np.abs(blk)))
        if blk[j] == 0:
            continue
        iscale = np.float32(-127.0) / blk[j]
        q = np.minimum(np.rint(iscale * blk), 127).astype(np.float32)
        out[b:b + 256] = q * (np.float32(1.0) / iscale)
    return out


def _q8_0_by_rule(x: np.ndarray) -> np.ndarray:
    """Blocks of 32: d = max |x| / 127, values round-half-away(x * (1 / d)) times d stored in float16."""
    out = np.zeros_like(x)
    for b in range(0, x.size, 32):
        blk = x[b:b + 32]
        d = np.float32(np.abs(blk).max() / np.float32(127.0))
        if d == 0:
            continue
        v = blk * (np.float32(1.0) / d)
        q = np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))
        out[b:b + 32] = q * np.float32(np.float16(d))
    return out


def _row() -> np.ndarray:
    rng = np.random.default_rng(7)
    x = (rng.standard_normal(1024) * 0.3).astype(np.float32)
    x[5] = -4.0  # block 0: the extreme is negative
    x[256 + 3], x[256 + 9] = 2.0, -2.0  # block 1: equal magnitudes, the first one sets the sign
    x[512:768] = 0.0  # block 2: all zero
    x[768] = -127.0  # block 3: iscale = 1, so the ties below are exact
    x[769:772] = [2.5, -3.5, 0.5]
    return x


def test_q8_k_rounds_with_a_float32_scale_from_the_signed_extreme_and_ties_to_even():
    x = _row()
    got = _round_activation(torch, torch.from_numpy(x[None, :].copy()), "Q8", 256).numpy()[0]
    want = _q8_k_by_rule(x)
    assert np.array_equal(got, want)
    assert list(got[769:772]) == [2.0, -4.0, 0.0]  # half to even, not away from zero
    assert (got[512:768] == 0).all()
    # not the f16 scale of the 32-blocks: the two rules give different values on the same input
    assert not np.array_equal(got, _q8_0_by_rule(x))


def test_q8_0_rounds_half_away_from_zero_with_a_float16_scale():
    x = np.zeros(64, dtype=np.float32)
    x[0] = 127.0  # d = 1: exact ties
    x[1:4] = [2.5, -3.5, 0.5]
    x[32:] = np.linspace(-1.3, 0.9, 32, dtype=np.float32)
    got = _round_activation(torch, torch.from_numpy(x[None, :].copy()), "Q8", 32).numpy()[0]
    assert np.array_equal(got, _q8_0_by_rule(x))
    assert list(got[1:4]) == [3.0, -4.0, 1.0]


@pytest.mark.gguf
def test_each_linear_gets_its_own_input_rounded_and_a_shared_input_is_rounded_once(tiny_models, monkeypatch):
    """T8 rounds what q, k and v (gate and up) share once: each linear still receives exactly the rounding of its
    own input, and there are fewer roundings than rounded linears."""
    gguf = tiny_models / "gguf" / "tiny-q8_0.gguf"
    if not gguf.is_file():
        pytest.skip("the tiny GGUF fixtures are not built (python -m fixtures.gguf_writer)")
    from pytest_convdiff.backends import hf, open_backend

    calls: list[object] = []  # the tensors rounded, kept alive so that their ids stay theirs
    real = hf._round_activation
    monkeypatch.setattr(hf, "_round_activation", lambda t, x, *vd: calls.append(x) or real(t, x, *vd))
    backend = open_backend(tiny_models / "tiny-llama", options={"weights_from": str(gguf), "emulate": "llama.cpp"})
    try:
        seen: list[tuple[str, object, object]] = []
        hooks = []
        for name, mod in backend.model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name != "lm_head":
                hooks.append(mod.register_forward_pre_hook(
                    lambda m, args, name=name: seen.append((name, "in", args[0])), prepend=True))
                hooks.append(mod.register_forward_pre_hook(lambda m, args, name=name: seen.append((name, "got", args[0]))))
        backend.forward(backend.tokenize("The quick brown fox jumps over the lazy dog."), hidden_states=False)
        for h in hooks:
            h.remove()
        ins = [(n, x) for n, what, x in seen if what == "in"]
        got = [x for _, what, x in seen if what == "got"]
        assert len(ins) == len(got) > 0
        for (name, x), y in zip(ins, got, strict=True):
            if name.endswith(".o_proj"):  # the attention's output is first rounded to F16 (flash attention's)
                x = x.to(torch.float16).to(x.dtype)
            assert torch.equal(y, real(torch, x, "Q8", 32)), name
        assert len({id(x) for x in calls}) == len(calls) < len(ins)  # a shared input once, never one input twice
    finally:
        backend.close()
