"""Default verdicts on architectures the bounds were never set on: tiny Qwen2, tiny Gemma-3 (200k vocabulary,
sliding windows, norm offsets, q/k norms) and a Llama whose reference is partly on a quantisation grid.

Every file llama.cpp's own quantizer makes without an importance matrix, with tensor-type overrides, must
reproduce its weights twin (``weights[...]`` pass), and every defect, each far below Q2_K's own noise
(×1.02, 1 % noise, two rows swapped, one block zeroed, a norm shifted by 0.01), must fail the weights item
of its layer, naming its tensor (docs/twins.md tabulates the margins). Nothing here is tied to one model:
the same test runs on each architecture.

The weights family reads only the files (``compare(static_only=True)``, a second or two a file). The
runtime twin runs the models: one correct file per quantisation family and one per architecture's defect
type would take minutes, so the full runs are on F16 and Q2_K of each model (Q2_K only for tiny-gemma3), where they must agree with
their runtime twin (``runtime[...]`` pass) and pass overall apart from a tokenizer finding of llama.cpp's
own (below).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest

from fixtures import pipeline

pytestmark = pytest.mark.gguf

MODELS = ("tiny-qwen2", "tiny-gemma3", "tiny-ongrid")


@functools.cache
def _entries(model: str) -> tuple[dict[str, Any], ...]:
    pipeline.skip_without_tools()
    pipeline.build([model], log=lambda _line: None)
    return tuple(e for e in pipeline.load_manifest() if e["model"] == model)


def _cases() -> list[Any]:
    out = []
    for model in MODELS:
        marks = [pytest.mark.slow] if model == "tiny-gemma3" else []
        for r in pipeline.recipes(pipeline.LAYOUTS[model]):
            out.append(pytest.param(model, r.file, id=f"{model}:{r.file.split('.', 1)[1] if r.kind == 'correct' else r.file}",
                                    marks=marks))
    return out


def _entry(model: str, file: str) -> dict[str, Any]:
    entry = next((e for e in _entries(model) if Path(e["file"]).name == file), None)
    assert entry is not None, f"{file} is a recipe but not in MANIFEST.json"
    return entry


@pytest.mark.parametrize(("model", "file"), _cases())
def test_weights_against_their_twin(model: str, file: str, tmp_path: Path) -> None:
    from pytest_convdiff import compare

    entry = _entry(model, file)
    result = compare(entry["source_path"], entry["path"], corpus="quick", cache_dir=tmp_path, static_only=True)
    weights = {f"weights[{c.param}]": c for c in result.checks if c.name == "weights"}
    assert weights and not any(c.outcome in ("error", "skipped") for c in weights.values()), \
        {k: c.message for k, c in weights.items() if c.outcome != "passed"}
    failed = {k: c for k, c in weights.items() if c.outcome == "failed"}
    if entry["kind"] == "correct":
        assert not failed, {k: c.message for k, c in failed.items()}
        assert max(c.value for c in weights.values()) <= 0.5  # the margin docs/twins.md promises
        return
    layer = entry["expect"]["layer"]
    assert list(failed) == [f"weights[layer-{layer}]"], {k: c.message for k, c in failed.items()}
    item = failed[f"weights[layer-{layer}]"]
    assert any(t in item.message for t in entry["expect"]["tensors"]), item.message
    assert item.value >= 2.0  # at least twice its bound


# A correct llama.cpp conversion of tiny-qwen2 tokenizes decomposed diacritics differently from transformers
# (transformers' Qwen2 tokenizer composes "e" + U+0301 to "é" first, llama.cpp does not): a real difference
# between the two runtimes that users of Qwen2 GGUFs meet, reported as it is.
KNOWN = {"tiny-qwen2": {"tokenizer[diacritics]"}}


# F16 and Q2_K of each model; tiny-gemma3's 200k vocabulary makes each of its runs a minute, so Q2_K only
@pytest.mark.parametrize(("model", "quant"), [
    pytest.param(m, q, marks=[pytest.mark.slow] if m == "tiny-gemma3" else [], id=f"{q}-{m}")
    for m in MODELS for q in (("q2_k",) if m == "tiny-gemma3" else ("f16", "q2_k"))])
def test_runtime_twin_on_a_new_architecture(model: str, quant: str, tmp_path: Path) -> None:
    from pytest_convdiff import compare

    entry = _entry(model, f"{model}.{quant}.gguf")
    result = compare(entry["source_path"], entry["path"], corpus="quick", cache_dir=tmp_path)
    assert result.error is None, result.error
    runtime = {f"runtime[{c.param}]": c for c in result.checks if c.name == "runtime"}
    assert set(runtime) == {"runtime[logits]", "runtime[layers]"}
    for c in runtime.values():
        assert c.outcome == "passed" and c.value <= 0.5 * c.threshold, c.message
    failed = {c.id for c in result.checks if c.outcome in ("failed", "error")}
    assert failed <= KNOWN.get(model, set()), failed
    quality = [c for c in result.checks if c.kind == "budget" and c.value is not None]
    assert quality and all(c.details.get("reported") for c in quality if c.threshold is None)
