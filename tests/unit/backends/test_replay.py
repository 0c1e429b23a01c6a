"""The weights check replayed from a golden reference, without A's files (backends/replay.py).

Unit tests of the count sketch (linear, chunk-independent, an unbiased norm), then the tiny model's real
pipeline files against a reference saved from its transformers checkpoint: every correct file passes
well inside ``weights_replay``, gross defects fail at their layer with what they match, and a full replay
localises a layer swap as the live run does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pytest_convdiff.backends import replay


def _sketch(x: np.ndarray, chunks: list[tuple[int, int]]) -> np.ndarray:
    out = np.zeros(replay.BUCKETS)
    for r0, r1 in chunks:
        replay.sketch_rows(x[r0:r1], r0, x.shape[1], out)
    return out


def test_the_sketch_is_linear_and_chunk_independent() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((40, 96)), rng.standard_normal((40, 96))
    whole = _sketch(x, [(0, 40)])
    np.testing.assert_allclose(_sketch(x, [(0, 7), (7, 31), (31, 40)]), whole, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(_sketch(x + 2 * y, [(0, 40)]), whole + 2 * _sketch(y, [(0, 40)]), atol=1e-9)
    assert not np.allclose(whole, _sketch(x[::-1].copy(), [(0, 40)]))  # where an entry sits matters


def test_the_sketch_norm_estimates_the_norm() -> None:
    rng = np.random.default_rng(1)
    for shape in ((300, 700), (5, 64), (1, 3)):
        x = rng.standard_normal(shape)
        est = np.linalg.norm(_sketch(x, [(0, shape[0])]))
        assert est == pytest.approx(np.linalg.norm(x), rel=0.15)  # sd about 2.2 % at 1,024 buckets
    one = np.zeros((4, 8))
    one[2, 5] = 3.0
    assert np.linalg.norm(_sketch(one, [(0, 4)])) == pytest.approx(3.0)  # a lone entry is kept exactly


# --------------------------------------------------------------------------- real files


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A reference saved from the tiny model's checkpoint, and the pipeline's files by name."""
    from fixtures import pipeline
    from pytest_convdiff.comparison import Comparison
    from pytest_convdiff.core.corpus import load_corpus
    from pytest_convdiff.runner import ModelSpec, RunSettings
    from pytest_convdiff.store.cache import Cache

    pipeline.skip_without_tools()
    pipeline.build(["tiny"], log=lambda _line: None)
    files = {Path(e["file"]).name: e for e in pipeline.load_manifest() if e["model"] == "tiny"}
    d = tmp_path_factory.mktemp("replay")
    ref = d / "tiny.reference.safetensors"
    first = files["tiny.f16.gguf"]
    Comparison(ModelSpec(str(first["source_path"])), ModelSpec(str(first["path"])), load_corpus("quick"),
               Cache(d / "cache"), RunSettings(runtime_twin="off"), {}, "save", None, ref).result()
    return {"ref": ref, "files": files, "cache": d / "cache"}


def _static(saved: dict[str, Any], file: str) -> dict[str, Any]:
    from pytest_convdiff import compare

    result = compare(saved["ref"], saved["files"][file]["path"], corpus="quick", cache_dir=saved["cache"],
                     static_only=True)
    items = {c.param: c for c in result.checks if c.name == "weights"}
    assert items and not any(c.outcome in ("error", "skipped") for c in items.values()), \
        {k: c.message for k, c in items.items()}
    return items


@pytest.mark.gguf
def test_the_reference_keeps_a_small_sketch(saved: dict[str, Any]) -> None:
    from pytest_convdiff.store.reference import ReferenceEntry

    entry = ReferenceEntry(saved["ref"])
    table, sketch = entry.meta["weights_sketch"], entry.array(replay.SKETCH_ARRAY)
    assert sketch.shape == (len(table["tensors"]), replay.BUCKETS) and sketch.nbytes < 2 << 20
    q = next(t for t in table["tensors"] if t["name"].endswith("q_proj.weight"))
    from pytest_convdiff.backends import ggml

    cols = q["shape"][-1]
    fits = {t for t in replay.TYPES if t in ("F16", "BF16") or cols % ggml.block_bytes(t)[0] == 0}
    assert fits == set(q["twin_error"]) - {"F32"} and q["sampled_rows"] > 0  # every type llama.cpp could store
    assert 0 < q["twin_error"]["F16"] < q["twin_error"]["Q8_0"] < q["twin_error"]["Q5_0"] < q["twin_error"]["Q4_0"] < 1


@pytest.mark.gguf
@pytest.mark.parametrize("file", ["tiny.f16.gguf", "tiny.bf16.gguf", "tiny.q8_0.gguf", "tiny.q4_k_m.gguf",
                                  "tiny.iq4_xs.gguf", "tiny.q2_k.gguf"])
def test_correct_files_pass_the_replay_with_margin(saved: dict[str, Any], file: str) -> None:
    items = _static(saved, file)
    assert all(c.outcome == "passed" for c in items.values()), {k: c.message for k, c in items.items()}
    assert max(c.value for c in items.values()) <= 0.5
    assert "estimated from the reference's sketch of A" in items["layer-0"].message


@pytest.mark.gguf
@pytest.mark.parametrize(("file", "layers", "says"), [
    ("tiny-bug-swap-layers-1-4.q4_k_m.gguf", ["layer-1", "layer-4"], "layers 1 and 4 swapped"),
    ("tiny-bug-qk-permute-layer-2.q4_k_m.gguf", ["layer-2"], "without llama.cpp's rope permutation"),
    ("tiny-bug-scale-0.5-blk-4-attn-v.q4_k_m.gguf", ["layer-4"], "× A's tensor"),
    ("tiny-bug-norm-plus-one-blk-1.q4_k_m.gguf", ["layer-1"], "blk.1.ffn_norm.weight"),
    ("tiny-bug-nan-blk-3-ffn-down.q4_k_m.gguf", ["layer-3"], "non-finite values"),
    ("tiny-bug-output-tied.q4_k_m.gguf", ["other"], "output"),
])
def test_gross_defects_fail_at_their_layer(saved: dict[str, Any], file: str, layers: list[str], says: str) -> None:
    items = _static(saved, file)
    failed = sorted(k for k, c in items.items() if c.outcome == "failed")
    assert failed == layers, {k: c.message for k, c in items.items() if c.outcome == "failed"}
    assert says in items[layers[0]].message, items[layers[0]].message


@pytest.mark.gguf
def test_a_full_replay_localises_a_layer_swap(saved: dict[str, Any]) -> None:
    from pytest_convdiff import compare

    result = compare(saved["ref"], saved["files"]["tiny-bug-swap-layers-1-4.q4_k_m.gguf"]["path"], corpus="quick",
                     cache_dir=saved["cache"])
    assert result.verdict == "fail" and result.first_divergent_layer == 1


@pytest.mark.gguf
def test_a_reference_without_sketches_says_why(saved: dict[str, Any], tmp_path: Path) -> None:
    from pytest_convdiff import compare
    from pytest_convdiff.comparison import Comparison
    from pytest_convdiff.core.corpus import load_corpus
    from pytest_convdiff.runner import ModelSpec, RunSettings
    from pytest_convdiff.store.cache import Cache

    f16, q8 = saved["files"]["tiny.f16.gguf"]["path"], saved["files"]["tiny.q8_0.gguf"]["path"]
    ref = tmp_path / "from-gguf.safetensors"  # A is a GGUF: nothing to sketch
    Comparison(ModelSpec(str(f16)), ModelSpec(str(q8)), load_corpus("quick"), Cache(saved["cache"]),
               RunSettings(runtime_twin="off"), {}, "gguf", None, ref).result()
    result = compare(ref, q8, corpus="quick", cache_dir=saved["cache"], static_only=True)
    items = [c for c in result.checks if c.name == "weights"]
    assert items and all(c.outcome == "skipped" for c in items)
    assert "keeps no sketch of A's weights (A was a llama.cpp model" in items[0].message
