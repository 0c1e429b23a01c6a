"""GGUFs quantised by another build of llama.cpp (fixtures/otherbuild.py): its quantiser compiled with fused
multiply-adds, as an arm64 build is, judged against the twin the installed x86-64 build makes (issue 30).

- Every correct file passes with every quantised tensor at ≤ 0.5 of its bound, on a model whose rows are
  K-quant blocks (tiny-qwen2) and two whose widths make the quantiser fall back to 32-value types (SmolLM2,
  tiny-gemma3). On tiny-qwen2 the two builds differ in up to a third of a tensor's Q2_K, Q4_K and Q5_K
  blocks (their float32 scale search, docs/twins.md): the scale-search tie test must accept each of them.
- A defect made by that build (a tensor scaled by 1.02 before it quantised the file, at every ftype on
  tiny-qwen2) still fails at its layer, naming its tensor, at least twice its bound: the tolerance for another
  build does not hide a defect.

The weights family reads only the files: a second or two a tiny file, 10–30 s a SmolLM2 file.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest

from fixtures import otherbuild, pipeline

pytestmark = pytest.mark.gguf

@functools.cache
def _files(model: str) -> tuple[otherbuild.File, ...]:
    pipeline.skip_without_tools()
    why = otherbuild.why_not_buildable()
    if why:
        pytest.skip(why)
    return tuple(otherbuild.build((model,), log=lambda _line: None))


def _cases(kind: str) -> list[Any]:
    out = []
    for model, types in otherbuild.TYPES.items():
        marks = [pytest.mark.slow] if model == "smollm2" else []
        for t in (types if kind == "correct" else otherbuild.DEFECT_TYPES[model]):
            out.append(pytest.param(model, t, id=f"{model}:{t}", marks=marks))
    return out


def _weights(model: str, type_: str, kind: str, tmp_path: Path) -> dict[str, Any]:
    from pytest_convdiff import compare

    f = next(f for f in _files(model) if f.type == type_ and f.kind == kind)
    result = compare(str(f.source_path), str(f.path), corpus="quick", cache_dir=tmp_path, static_only=True)
    weights = {f"weights[{c.param}]": c for c in result.checks if c.name == "weights"}
    assert weights and not any(c.outcome in ("error", "skipped") for c in weights.values()), \
        {k: c.message for k, c in weights.items() if c.outcome != "passed"}
    return weights


@pytest.mark.parametrize(("model", "type_"), _cases("bug"))
def test_a_defect_made_by_another_build_fails_at_its_layer(model: str, type_: str, tmp_path: Path) -> None:
    weights = _weights(model, type_, "bug", tmp_path)
    failed = {k: c for k, c in weights.items() if c.outcome == "failed"}
    assert list(failed) == [f"weights[layer-{otherbuild.DEFECT['layer']}]"], {k: c.message for k, c in failed.items()}
    item = next(iter(failed.values()))
    assert otherbuild.DEFECT["tensor"] in item.message and item.value >= 2.0, item.message


@pytest.mark.parametrize(("model", "type_"), _cases("correct"))
def test_a_correct_file_from_another_build(model: str, type_: str) -> None:
    from pytest_convdiff.backends import dequant, tensors
    from pytest_convdiff.checks import default_bounds
    from pytest_convdiff.checks.weights import judge_tensor, score

    f = next(f for f in _files(model) if f.type == type_ and f.kind == "correct")
    m = dequant.measure_weights(tensors.SafetensorsWeights(str(f.source_path)), tensors.GGUFWeights(str(f.path)))
    _, bounds = default_bounds({}, {})
    quantised = [e for e in m["tensors"] if e["type_b"] not in ("F32", "F16", "BF16")]
    assert quantised and all(e.get("twin") for e in quantised), [e["name"] for e in quantised if not e.get("twin")]
    differed = 0
    for e in quantised:
        s, why = score(e, bounds), [w for w, _ in judge_tensor(e, bounds)]
        assert not why and s <= 0.5, (e["name"], e["type_b"], s, e["twin"])
        differed += e["twin"]["ties"] + e["twin"]["scale_ties"] + e["twin"]["differing"]
    if model == "tiny-qwen2" and type_ in ("Q2_K", "Q4_K_M", "Q5_K_M"):  # the case the tie tests exist for
        assert differed > 0


def test_the_files_are_made_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A current stamp makes ``build`` a no-op (setup runs it, then every xdist worker)."""
    _files("tiny-qwen2")
    monkeypatch.setattr(otherbuild, "_quantize", lambda *a: pytest.fail(f"quantised again: {a[1:]}"))
    assert [f.path for f in otherbuild.build(("tiny-qwen2",), log=lambda _line: None)] == \
        [f.path for f in otherbuild.files("tiny-qwen2")]


def test_a_passing_item_says_what_another_build_changed(tmp_path: Path) -> None:
    """The item of a layer whose blocks the tie tests accepted says how many, and why they pass."""
    weights = _weights("tiny-qwen2", "Q5_K_M", "correct", tmp_path)
    item = weights["weights[layer-1]"]
    assert item.outcome == "passed", item.message
    assert "block(s) as another build of the quantiser writes them" in item.message, item.message
