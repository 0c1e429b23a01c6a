"""The new-architecture pipeline fixtures (fixtures/archs.py through fixtures/pipeline.py).

tiny-qwen2, tiny-gemma3 and tiny-ongrid converted by llama.cpp's own converter and quantizer: every
file is there, each header says the architecture and file type it should, Gemma-3 keeps its 200k
vocabulary and sliding window, the tensor-type overrides took, each defect changed only its named
tensor (and by less than Q2_K's own error on it), and the on-grid reference really is on its grid.

No model is run; headers are read with pytest_convdiff's header reader (a 200k-token vocabulary in a
fraction of a second), tensors through gguf-py's dequantisers. Built on first use when missing:
~30 s each for tiny-qwen2 and tiny-ongrid, ~70 s for tiny-gemma3 (``slow``) on 2 cores; scripts/setup.sh
builds them. Once built the whole file takes a few seconds.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fixtures import archs, pipeline

pytestmark = pytest.mark.gguf

gguf = pytest.importorskip("gguf")


def _need_tools() -> None:
    pipeline.skip_without_tools()


@functools.cache
def _built(model: str) -> tuple[dict[str, Any], ...]:
    pipeline.build([model], log=lambda _line: None)
    return tuple(e for e in pipeline.load_manifest() if e["model"] == model)


MODELS = [
    pytest.param("tiny-qwen2", id="qwen2"),
    pytest.param("tiny-gemma3", id="gemma3", marks=pytest.mark.slow),
    pytest.param("tiny-ongrid", id="ongrid"),
]


@pytest.fixture(params=MODELS)
def built(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    _need_tools()
    return list(_built(request.param))


@functools.lru_cache(maxsize=64)
def _header(path: Path) -> Any:
    from pytest_convdiff.backends.gguf_header import read_header

    return read_header(path)


def _types(path: Path) -> dict[str, int]:
    return {name: ttype for name, _ne, ttype, _off in _header(path).tensors}


def _raw(path: Path, name: str) -> tuple[int, np.ndarray]:
    """A tensor's type and bytes, one row of blocks per tensor row."""
    hdr = _header(path)
    ((ne, ttype, off),) = [(ne, t, off) for n, ne, t, off in hdr.tensors if n == name]
    block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
    rows = int(np.prod(ne[1:]))
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=hdr.data_start + off, shape=(rows, ne[0] // block * nbytes))
    return ttype, raw


def _values(path: Path, name: str) -> np.ndarray:
    ttype, raw = _raw(path, name)
    qt = gguf.GGMLQuantizationType(ttype)
    return np.asarray(gguf.quants.dequantize(np.asarray(raw), qt), dtype=np.float32).reshape(raw.shape[0], -1)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _by_name(entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {e["path"].name: e for e in entries}


# --------------------------------------------------------------------------- the build


def test_every_recipe_is_built_and_listed(built: list[dict[str, Any]]) -> None:
    model = built[0]["model"]
    src = pipeline.LAYOUTS[model]
    assert {e["path"].name for e in built} == {r.file for r in pipeline.recipes(src)}
    for e in built:
        assert e["path"].is_file() and e["path"].stat().st_size == e["size"], e["file"]
        assert e["source_path"] == (pipeline.MODELS_DIR / model).resolve()
    correct = {e["quant"] for e in built if e["kind"] == "correct"}
    assert correct == {"F16", "BF16"} | {q.upper() for q in archs.ARCH_QUANTS}
    assert {"IQ3_M", "IQ3_S", "Q3_K_L", "Q3_K_S", "Q5_K_S", "Q5_1", "Q4_1"} <= correct
    overrides = {e["path"].name: e["overrides"] for e in built if "overrides" in e}
    assert overrides == {f"{model}.{label}.gguf": over for label, (_q, over) in archs.OVERRIDES.items()}
    bugs = [e for e in built if e["kind"] == "bug"]
    assert {e["quant"] for e in bugs} == {"Q4_K_M", "Q2_K"}
    assert sum(e["quant"] == "Q2_K" for e in bugs) == 1
    assert len(bugs) == (6 if src.norm_shift else 5)
    for e in bugs:
        assert e["base_path"].is_file() and e["base_path"].name == f"{model}.{e['quant'].lower()}.gguf"
        assert len(e["expect"]["tensors"]) == 1 and e["expect"]["tensors"][0].startswith(f"blk.{e['expect']['layer']}.")


def test_second_build_is_a_no_op(built: list[dict[str, Any]]) -> None:
    mdir = built[0]["path"].parent
    before = {p: p.stat().st_mtime_ns for p in sorted(mdir.iterdir())}
    pipeline.build([built[0]["model"]], log=lambda _line: None)
    assert {p: p.stat().st_mtime_ns for p in sorted(mdir.iterdir())} == before


def test_headers_say_architecture_and_file_type(built: list[dict[str, Any]]) -> None:
    from pytest_convdiff.backends.gguf_header import FILE_TYPES

    model = built[0]["model"]
    src = pipeline.LAYOUTS[model]
    config = json.loads((built[0]["source_path"] / "config.json").read_text())
    for e in built:
        kv = _header(e["path"]).kv
        assert kv["general.architecture"] == src.arch, e["file"]
        assert kv["general.file_type"] == e["file_type"], e["file"]
        if e["kind"] == "correct":
            assert FILE_TYPES[e["file_type"]] == e["quant"], e["file"]
        assert _header(e["path"]).array_len["tokenizer.ggml.tokens"] == config["vocab_size"], e["file"]
        assert kv[f"{src.arch}.block_count"] == src.n_layer


def test_architecture_specifics(built: list[dict[str, Any]]) -> None:
    model = built[0]["model"]
    f16 = _by_name(built)[f"{model}.f16.gguf"]["path"]
    hdr, types = _header(f16), _types(f16)
    if model == "tiny-gemma3":
        assert hdr.array_len["tokenizer.ggml.tokens"] >= 200_000
        assert hdr.kv["gemma3.attention.sliding_window"] == 64
        assert hdr.kv["gemma3.rope.freq_base_swa"] == 10000.0 and hdr.kv["gemma3.rope.freq_base"] == 1e6
        config = json.loads((built[0]["source_path"] / "config.json").read_text())
        # llama.cpp's Gemma-3 has a fixed pattern (5 sliding layers, then one global): the checkpoint matches it
        assert config["layer_types"] == ["sliding_attention"] * 5 + ["full_attention"]
        assert "output.weight" not in types  # tied embeddings
        ne = {n: ne for n, ne, _t, _o in hdr.tensors}
        assert ne["token_embd.weight"] == (128, archs.GEMMA_VOCAB)
        assert {"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight", "blk.0.post_ffw_norm.weight"} <= set(types)
        # the converter stores Gemma's (1 + w) norms: the checkpoint's w is near 0, the file's near 1
        from safetensors import safe_open

        with safe_open(str(built[0]["source_path"] / "model.safetensors"), "np") as st:
            w = st.get_tensor("model.layers.0.pre_feedforward_layernorm.weight")
        assert np.array_equal(_values(f16, "blk.0.ffn_norm.weight").ravel(), (w + 1.0).astype(np.float32))
    elif model == "tiny-qwen2":
        assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias", "output.weight"} <= set(types)
        assert hdr.kv["tokenizer.ggml.pre"] == "qwen2" and hdr.kv["qwen2.attention.head_count_kv"] == 2
    else:
        assert "output.weight" in types and hdr.kv["llama.attention.head_count_kv"] == 2


def test_tensor_type_overrides(built: list[dict[str, Any]]) -> None:
    from pytest_convdiff.backends.gguf_header import GGML_TYPES

    model = built[0]["model"]
    files = _by_name(built)
    name = {n: GGML_TYPES[t][0] for n, t in _types(files[f"{model}.q4_k_m-pure.gguf"]["path"]).items()}
    matrices = {t for n, t in name.items() if n.endswith(".weight") and "norm" not in n}
    # pure: every matrix Q4_K, or Q5_0 where a row of 128 does not divide into 256-blocks (Gemma's hidden 128)
    assert matrices == ({"Q4_K", "Q5_0"} if model == "tiny-gemma3" else {"Q4_K"})
    name = {n: GGML_TYPES[t][0] for n, t in _types(files[f"{model}.q4_k_m-output-q8_0-embd-q4_0.gguf"]["path"]).items()}
    assert name["token_embd.weight"] == "Q4_0"
    if "output.weight" in name:
        assert name["output.weight"] == "Q8_0"
    default = {n: GGML_TYPES[t][0] for n, t in _types(files[f"{model}.q4_k_m.gguf"]["path"]).items()}
    assert default["token_embd.weight"] != "Q4_0" and default.get("output.weight") in (None, "Q6_K")


# --------------------------------------------------------------------------- the defects


def _bug_ids() -> list[Any]:
    out = []
    for model, src in archs.LAYOUTS.items():
        marks = [pytest.mark.slow] if model == "tiny-gemma3" else []
        out += [pytest.param(model, r.file, id=r.file, marks=marks) for r in archs.recipes(src) if r.kind == "bug"]
    return out


@pytest.mark.parametrize(("model", "file"), _bug_ids())
def test_defect_is_where_named_and_below_q2k_noise(model: str, file: str) -> None:
    _need_tools()
    (e,) = [x for x in _built(model) if x["path"].name == file]
    bug, base = e["path"], e["base_path"]
    ex = e["expect"]
    (named,) = ex["tensors"]
    bt, at = _types(bug), _types(base)
    assert bt == at  # the quantizer chose the same type for every tensor
    differing = {n for n in bt if not np.array_equal(_raw(bug, n)[1], _raw(base, n)[1])}
    assert differing == {named}

    # rows are quantised independently: a row-local defect leaves the other rows' bytes as they were
    b, a = _raw(bug, named)[1], _raw(base, named)[1]
    if "rows_swapped" in ex:
        i, j = ex["rows_swapped"]
        assert np.array_equal(b[i], a[j]) and np.array_equal(b[j], a[i])
        assert {int(r) for r in np.nonzero((b != a).any(axis=1))[0]} == {i, j}
    if "zero_block" in ex:
        assert {int(r) for r in np.nonzero((b != a).any(axis=1))[0]} == {ex["zero_block"]["row"]}
    if "shift" in ex:  # norms stay F32: the shift is exact
        np.testing.assert_allclose(_values(bug, named), _values(base, named) + ex["shift"], rtol=0, atol=1e-6)

    # the defect, applied to the F16 tensor, is smaller than the model's correct Q2_K's error on that tensor
    if "shift" not in ex:
        f16_path = bug.parent / f"{model}.f16.gguf"
        f16 = _values(f16_path, named)
        # private: the fixture builder's own F16 edit, checked against what the converter writes
        edited = pipeline._f16_edit(_params(model, file))(named, f16.astype(np.float16), {}).astype(np.float32)
        q2k = _values(bug.parent / f"{model}.q2_k.gguf", named)
        defect, noise = _rel(edited, f16), _rel(q2k, f16)
        assert 0 < defect < 0.35 and defect < noise, (defect, noise)
        if "factor" in ex:
            assert defect == pytest.approx(ex["factor"] - 1, rel=1e-2)
        if "noise_rel_rms" in ex:
            assert defect == pytest.approx(ex["noise_rel_rms"], rel=0.1)


def _params(model: str, file: str) -> dict[str, Any]:
    (r,) = [r for r in archs.recipes(archs.LAYOUTS[model]) if r.file == file]
    return r.params


# --------------------------------------------------------------------------- the on-grid reference


@pytest.fixture(scope="module")
def ongrid() -> list[dict[str, Any]]:
    _need_tools()
    return list(_built("tiny-ongrid"))


def test_on_grid_tensors_are_on_their_grid(ongrid: list[dict[str, Any]]) -> None:
    from safetensors.numpy import load_file

    ckpt = ongrid[0]["source_path"]
    tensors = load_file(str(ckpt / "model.safetensors"))
    recorded = json.loads((ckpt / archs.ON_GRID_FILE).read_text())
    assert {k: (v["grid"], v["gguf"]) for k, v in recorded.items()} == archs.ON_GRID
    for name, (grid, _g) in archs.ON_GRID.items():
        assert archs.is_on_grid(tensors[name], grid), name  # quantise-dequantise is a no-op
        assert not archs.is_on_grid(tensors[name], "Q4_0" if grid == "Q8_0" else "Q8_0"), name
    for name in ("model.layers.0.self_attn.k_proj.weight", "model.layers.1.self_attn.v_proj.weight",
                 "model.layers.3.mlp.down_proj.weight"):
        assert not archs.is_on_grid(tensors[name], "Q8_0") and not archs.is_on_grid(tensors[name], "Q4_0"), name


def test_on_grid_survives_the_real_pipeline(ongrid: list[dict[str, Any]]) -> None:
    """The scales were chosen so that the converter's F16 keeps the grid; llama.cpp's Q8_0 and Q4_0 of a
    tensor on that grid then give the reference back exactly, and a tensor off it does not."""
    from safetensors.numpy import load_file

    ckpt = ongrid[0]["source_path"]
    tensors = load_file(str(ckpt / "model.safetensors"))
    config = json.loads((ckpt / "config.json").read_text())
    files = _by_name(ongrid)
    for name, (grid, g) in archs.ON_GRID.items():
        ref = tensors[name]
        if ".attn_q." in g:  # the converter permutes q rows for rope; rows, and so blocks, stay whole
            ref = pipeline.permute(ref, config["num_attention_heads"], config["num_attention_heads"])
        assert np.array_equal(_values(files["tiny-ongrid.f16.gguf"]["path"], g), ref), g
        same = files[f"tiny-ongrid.{grid.lower()}.gguf"]["path"]
        assert np.array_equal(_values(same, g), ref), (g, same.name)
        other = files[f"tiny-ongrid.{'q4_0' if grid == 'Q8_0' else 'q8_0'}.gguf"]["path"]
        assert _rel(_values(other, g), ref) > 1e-3, (g, other.name)
    off = "blk.1.attn_v.weight"
    assert _rel(_values(files["tiny-ongrid.q8_0.gguf"]["path"], off), tensors["model.layers.1.self_attn.v_proj.weight"]) > 1e-3


def test_on_grid_round_trip_helpers() -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.05, (8, 64)).astype(np.float32)
    for grid in ("Q8_0", "Q4_0"):
        g = archs.on_grid(w, grid)
        assert archs.is_on_grid(g, grid) and not archs.is_on_grid(w, grid)
        assert np.array_equal(g.astype(np.float16).astype(np.float32), g)  # exact in float16 too
        assert _rel(g, w) < (0.05 if grid == "Q8_0" else 0.2)  # block peaks rounded up to a short scale
