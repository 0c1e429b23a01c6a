"""Architectures none of pytest_convdiff's code names, through llama.cpp's own converter and quantiser
(fixtures/anyarch.py: a tiny random checkpoint of the model type, its defaults with small sizes).

For each: the correct F16 and Q4_K_M pass every item but the vocabulary's (``fixtures.anyarch.VOCABULARY_ITEMS``:
the checkpoint borrows a tokenizer, and docs/architectures.md says why those are set apart), each correctness value at most half its bound; one 2-D
weight of the middle layer ×1.25 fails ``weights[layer-2]``, naming the tensor; for a mixture of experts, two
experts of the middle layer swapped fail there too, naming both. The same judgement as bench/arch_sweep.py's,
on the model types the suite carries (built by scripts/setup.sh).
"""

from __future__ import annotations

from typing import Any

import pytest

from fixtures.anyarch import SUITE as ARCHS  # the model types scripts/setup.sh builds
from fixtures.anyarch import VOCABULARY_ITEMS  # set apart: the checkpoint borrows its tokenizer

pytestmark = pytest.mark.gguf

HALF = 0.5


@pytest.fixture(scope="module")
def arch_files() -> dict[str, dict[str, Any]]:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip install 'pytest-convdiff[llama-cpp]'")
    from fixtures import anyarch, pipeline

    pipeline.skip_without_tools()
    return {mt: {"paths": anyarch.build(mt)} for mt in ARCHS}


@pytest.mark.parametrize("key", ["f16", "q4_k_m"])
@pytest.mark.parametrize("model_type", ARCHS)
def test_a_correct_file_passes(arch_files, shared_cache, model_type: str, key: str) -> None:
    from pytest_convdiff import compare

    paths = arch_files[model_type]["paths"]
    result = compare(paths["hf"], paths[key], corpus="quick", cache_dir=shared_cache)
    assert result.error is None, result.error
    bad = {c.id: c.message for c in result.checks
           if c.outcome in ("failed", "error") and not c.id.startswith(VOCABULARY_ITEMS)}
    assert not bad, bad
    over = {c.id: (c.value, c.threshold) for c in result.checks
            if c.kind == "correctness" and c.outcome == "passed" and c.threshold and c.value is not None
            and c.value > HALF * c.threshold}
    assert not over, over
    weights = [c for c in result.checks if c.name == "weights"]
    assert weights and sum(c.details.get("tensors", 0) for c in weights) > 0
    assert {c.id for c in result.checks if c.name == "runtime"} == {"runtime[logits]", "runtime[layers]"}


@pytest.mark.parametrize("model_type", ARCHS)
@pytest.mark.parametrize("defect", ["scaled", "swap"])
def test_a_defect_fails_at_its_layer_by_name(arch_files, shared_cache, model_type: str, defect: str) -> None:
    from fixtures import anyarch
    from pytest_convdiff import compare

    paths = arch_files[model_type]["paths"]
    if defect not in paths:
        pytest.skip(f"{model_type} has no stacked experts to swap")
    tensor = anyarch.defect_targets(paths["f16"])[defect][0]
    result = compare(paths["hf"], paths[defect], corpus="quick", cache_dir=shared_cache, static_only=True)
    failed = [c.id for c in result.checks if c.outcome == "failed" and not c.id.startswith(VOCABULARY_ITEMS)]
    item = f"weights[layer-{anyarch.LAYERS // 2}]"
    assert failed == [item], failed
    message = result.check(item).message
    assert tensor in message, message
    if defect == "swap":
        assert all(f"{tensor.removesuffix('.weight')}.weight[{e}]" in message for e in anyarch.SWAP), message


def test_a_split_tensor_is_compared_piece_by_piece(arch_files, shared_cache, tmp_path) -> None:
    """Latent attention: the converter writes A's ``kv_b_proj`` as ``attn_k_b`` (per head, transposed) and
    ``attn_v_b``. The split is established from the files (no table names it), each piece is compared with A's
    values cut the same way, and one piece scaled in one layer fails that layer by the piece's name."""
    from fixtures import anyarch, pipeline
    from pytest_convdiff import compare

    if "deepseek_v2" not in arch_files:
        pytest.skip("the suite carries no latent-attention model type")
    paths = arch_files["deepseek_v2"]["paths"]
    result = compare(paths["hf"], paths["f16"], corpus="quick", cache_dir=shared_cache, static_only=True)
    mid = anyarch.LAYERS // 2
    item = result.check(f"weights[layer-{mid}]")
    assert item.outcome == "passed", item.message
    convs = {c["role"]: c["transform"] for c in result.check("weights[other]").details["conventions"]}
    assert convs["attn_kv_b.weight"].startswith("split per head, into attn_k_b"), convs
    assert "no counterpart" not in item.message and "has no tensor" not in item.message
    bad = tmp_path / "v_b-scaled.f16.gguf"
    target = f"blk.{mid}.attn_v_b.weight"
    pipeline.patch_tensors(paths["f16"], bad, lambda name, x, _all: (x * 1.25).astype(x.dtype) if name == target else x)
    result = compare(paths["hf"], bad, corpus="quick", cache_dir=shared_cache, static_only=True)
    assert [c.id for c in result.checks if c.outcome == "failed"] == [f"weights[layer-{mid}]"]
    assert target in result.check(f"weights[layer-{mid}]").message


def test_a_fused_projection_whose_rows_the_converter_reorders(arch_files, shared_cache, tmp_path) -> None:
    """Bloom keeps q, k and v of each head together in ``query_key_value``; its converter writes every head's q,
    then k, then v. The regrouping is established from the files (no table names it), A's rows are reordered the
    same way before they are compared, and one layer's tensor scaled fails that layer by name. A converter that
    forgot the reordering in every layer looks like a convention to the files, and the runtime twin (A's code on
    B's rows, put back in A's order by that convention) catches it instead."""
    from fixtures import anyarch, pipeline
    from pytest_convdiff import compare
    from pytest_convdiff.backends.restructure import Regroup

    if "bloom" not in arch_files:
        pytest.skip("the suite carries no model type with a reordered fused projection")
    paths = arch_files["bloom"]["paths"]
    mid = anyarch.LAYERS // 2
    result = compare(paths["hf"], paths["f16"], corpus="quick", cache_dir=shared_cache, static_only=True)
    convs = {c["role"]: c["transform"] for c in result.check("weights[other]").details["conventions"]}
    assert convs["attn_qkv.weight"].startswith("rows regrouped from 4 heads x 3 parts"), convs
    assert result.check(f"weights[layer-{mid}]").outcome == "passed"
    target = f"blk.{mid}.attn_qkv.weight"
    bad = tmp_path / "qkv-scaled.f16.gguf"
    pipeline.patch_tensors(paths["f16"], bad, lambda name, x, _all: (x * 1.25).astype(x.dtype) if name == target else x)
    result = compare(paths["hf"], bad, corpus="quick", cache_dir=shared_cache, static_only=True)
    assert [c.id for c in result.checks if c.outcome == "failed"] == [f"weights[layer-{mid}]"]
    assert target in result.check(f"weights[layer-{mid}]").message
    # every layer's q/k/v left in A's order: the plain pairing explains the files, the runtime twin does not
    regroup = Regroup(4, 3)
    kept = tmp_path / "qkv-not-regrouped.f16.gguf"
    pipeline.patch_tensors(paths["f16"], kept, lambda name, x, _all: regroup.invert(x).astype(x.dtype)
                           if name.endswith("attn_qkv.weight") or name.endswith("attn_qkv.bias") else x)
    result = compare(paths["hf"], kept, corpus="quick", cache_dir=shared_cache)
    failed = {c.id for c in result.checks if c.outcome == "failed"}
    assert not {f for f in failed if f.startswith("weights")}, failed
    assert "runtime[layers]" in failed, failed
    assert "leaves its twin at decoder layer 0" in result.check("runtime[layers]").message


def test_a_config_value_llama_cpp_does_not_implement_fails_the_runtime_twin_alone(tmp_path) -> None:
    """Qwen3-MoE's config class defaults to ``norm_topk_prob=False``; llama.cpp's graph renormalises the
    top-k expert weights whatever the file says. The converter copies every weight faithfully, so every
    static item passes, and the file still computes otherwise than A: the runtime twin (A's code on B's
    weights) fails, at the first layer with experts. The sweep builds every such class default
    (fixtures/anyarch.FAITHFUL) and records the same verdict."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip install 'pytest-convdiff[llama-cpp]'")
    from fixtures import anyarch, pipeline
    from pytest_convdiff import compare

    pipeline.skip_without_tools()
    assert anyarch.tiny_config("qwen3_moe").norm_topk_prob is True  # the sweep's faithful checkpoint
    paths = anyarch.build("qwen3_moe", out=tmp_path / "models", faithful=False, correct_only=True)
    assert anyarch.tiny_config("qwen3_moe", faithful=False).norm_topk_prob is False
    result = compare(paths["hf"], paths["f16"], corpus="quick", cache_dir=tmp_path / "cache")
    failed = {c.id for c in result.checks if c.outcome == "failed"}
    assert {"runtime[logits]", "runtime[layers]"} <= failed, failed
    assert not {f for f in failed if f.startswith(("weights", "config"))}, failed
    assert "leaves its twin at decoder layer 0" in result.check("runtime[layers]").message
