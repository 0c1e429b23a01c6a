"""The known-bad corpus on the tiny model, under default settings: every defect caught, every
correct conversion passed, every layer-local defect localised (docs/bounds.md keeps the table).

Each defect must fail at a correctness item (a config field, the tokens, a tensor against its twin): the
quality budgets (NMSE, KL, rfn against A) of a GGUF B are reported, not judged, by default."""

from __future__ import annotations

import pytest

from pytest_convdiff import compare

pytestmark = pytest.mark.gguf

# name -> (verdict, first divergent layer, sub-block, a check that must fail)
EXPECTED = {
    "tiny-f32": ("pass", None, None, None),
    "tiny-f16": ("pass", None, None, None),
    "tiny-q8_0": ("pass", None, None, None),
    "tiny-no-permute": ("fail", 2, "attention", "weights[layer-2]"),
    "tiny-rope-base": ("fail", 0, None, "config[rope_theta]"),
    "tiny-norm-eps": ("fail", 0, None, "config[norm_eps]"),
    "tiny-no-merges": ("fail", None, None, "tokens[long-essay]"),
    "tiny-bos-flag": ("fail", None, None, "tokenizer[special]"),
    "tiny-swap-layers": ("fail", 1, None, "weights[layer-1]"),
    "tiny-scaled-tensor": ("fail", 3, "mlp", "weights[layer-3]"),
    "tiny-final-norm": ("fail", None, None, "weights[other]"),
}


@pytest.fixture(scope="module")
def ggufs(tiny_models):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip install 'pytest-convdiff[llama-cpp]'")
    from fixtures import gguf_writer

    return gguf_writer.build_all()


@pytest.fixture(scope="module")
def cache(shared_cache):
    """The session's cache: the tiny reference's default-corpus run is shared with the other modules."""
    return shared_cache


@pytest.mark.parametrize("name", list(EXPECTED))
def test_default_settings_separate_correct_from_broken(tiny_ref, ggufs, cache, name):
    verdict, layer, sub, must_fail = EXPECTED[name]
    r = compare(tiny_ref, ggufs[name], cache_dir=cache)
    assert r.error is None
    assert r.verdict == verdict, [f"{c.id}: {c.value}" for c in r.failed]
    assert r.first_divergent_layer == layer
    if sub:
        assert r.divergent_sublayer == sub
    if must_fail:
        assert r.check(must_fail).outcome == "failed"
    if layer is not None:  # nothing before the defect's layer fails
        assert all(c.outcome == "passed" for c in r.checks if c.name == "rfn" and int(c.param[6:]) < layer)
