"""Mixture-of-experts conversions by llama.cpp's own converter (fixtures/moe.py): Qwen3-MoE (``qwen3moe``) and
Mixtral (converted as ``llama``), neither known to any table of pytest_convdiff's.

- the correct F16 and Q4_K_M files pass every weights item and both runtime items, each at most half its bound,
  with every expert compared as itself (a slice of the stacked ``ffn_*_exps`` tensor) and nothing of B left out;
- the whole pair passes: near-tied router logits flip which experts a few tokens use (core.routing), and those
  positions, reported by ``routing[flips]``, are left out of the position profile (before they were, tiny
  Mixtral's F16 failed ``position[rfn]`` at 6.6 against 3 on three such tokens);
- a file with two experts of one layer swapped fails that layer's weights item only, naming the stacked tensor,
  the expert, and the expert of A it holds instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.gguf

MODELS = ("tiny-qwen3moe", "tiny-mixtral")


@pytest.fixture(scope="module")
def moe_files() -> dict[str, dict[str, Path]]:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip install 'pytest-convdiff[llama-cpp]'")
    from fixtures import moe, pipeline

    pipeline.skip_without_tools()
    return {name: moe.build(name) for name in MODELS}


def _items(result: Any, name: str) -> dict[str, Any]:
    return {c.id: c for c in result.checks if c.name == name}


@pytest.mark.parametrize("key", ["f16", "q4_k_m"])
@pytest.mark.parametrize("model", MODELS)
def test_a_correct_moe_file_reproduces_its_twins(moe_files, shared_cache, model: str, key: str) -> None:
    from pytest_convdiff import compare

    files = moe_files[model]
    result = compare(files["hf"], files[key], corpus="quick", cache_dir=shared_cache)
    assert result.error is None, result.error
    assert result.verdict == "pass", {c.id: c.message for c in result.checks if c.outcome != "passed"}
    flips = result.check("routing[flips]").details["routing"]
    # every layer has experts; both runs' routers were read at every position of every prompt
    assert [layer["layer"] for layer in flips["layers"]] == [0, 1, 2]
    assert flips["positions"] == result.metrics["positions"] and flips["k"] == 2
    assert flips["rerouted"] < 0.02 * flips["positions"] if key == "f16" else flips["rerouted"] > 0
    weights, runtime = _items(result, "weights"), _items(result, "runtime")
    assert weights and all(c.outcome == "passed" for c in weights.values()), \
        {k: c.message for k, c in weights.items() if c.outcome != "passed"}
    assert max(c.value for c in weights.values()) <= 0.5  # the margin docs/twins.md promises
    assert set(runtime) == {"runtime[logits]", "runtime[layers]"}
    assert all(c.outcome == "passed" and c.value <= 0.5 * c.threshold for c in runtime.values()), \
        {k: (c.value, c.message) for k, c in runtime.items()}
    layer1 = weights["weights[layer-1]"]
    assert layer1.details["tensors"] >= 4 * 3 + 1  # every expert's three matrices and the router, each compared
    assert "no counterpart in A" not in layer1.message and "not compared" not in layer1.message
    roles = {r["role"]: r["transform"] for r in weights["weights[other]"].details["conventions"]}
    # what the converter did, found from the files: Mixtral goes through LlamaModel (q/k rows permuted for
    # llama.cpp's rope), Qwen3-MoE does not permute
    assert roles["attn_q.weight"] == ("rope-permute" if model == "tiny-mixtral" else "none")


@pytest.mark.parametrize("model", MODELS)
def test_a_swapped_expert_fails_its_layer_naming_the_tensor_and_both_experts(moe_files, shared_cache,
                                                                             model: str) -> None:
    from pytest_convdiff import compare

    result = compare(moe_files[model]["hf"], moe_files[model]["swap"], corpus="quick", cache_dir=shared_cache,
                     static_only=True)
    failed = [c.id for c in result.checks if c.outcome == "failed"]
    assert failed == ["weights[layer-1]"], failed
    message = result.check("weights[layer-1]").message
    assert "ffn_gate_exps.weight[1]" in message and "ffn_down_exps.weight[2]" in message, message
    assert ".experts.1." in message and "It matches A's model.layers.1." in message and ".experts.2." in message
