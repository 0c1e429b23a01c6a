"""Files quantised with an importance matrix: llama.cpp's matrix files read as llama-quantize reads them,
and the weights twin made with the matrix (``--convdiff-imatrix``) or, without it, judged by error ratio.

The matrices are fixtures/imatrix.py's (seeded, both of llama-imatrix's layouts); the files are tiny-qwen2's
F16 conversion quantised by ``llama_model_quantize`` with the matrix, as llama-quantize does, including
IQ2_XS, which llama.cpp makes only with a matrix.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pytest_convdiff.backends import imatrix

# --------------------------------------------------------------------------- the reader, by hand


def _dat(entries: list[tuple[str, int, list[float]]], trailer: tuple[int, bytes] | None = (7, b"wiki")) -> bytes:
    out = [struct.pack("<i", len(entries))]
    for name, ncall, values in entries:
        out += [struct.pack("<i", len(name)), name.encode(), struct.pack("<ii", ncall, len(values)),
                np.asarray(values, dtype="<f4").tobytes()]
    if trailer:
        out += [struct.pack("<i", trailer[0]), struct.pack("<i", len(trailer[1])), trailer[1]]
    return b"".join(out)


def test_legacy_values_are_divided_by_their_calls(tmp_path: Path) -> None:
    p = tmp_path / "m.dat"
    p.write_bytes(_dat([("blk.0.attn_q.weight", 4, [2.0, 8.0]), ("output.weight", 0, [3.0])]))
    m = imatrix.read(p)
    assert m.layout == "dat" and m.chunk_count == 7 and m.datasets == ["wiki"]
    assert m.weights["blk.0.attn_q.weight"].tolist() == [0.5, 2.0]
    assert m.weights["output.weight"].tolist() == [3.0]  # ncall 0: the values as stored, as llama-quantize
    assert m.get("blk.0.attn_q.weight", 2)[0].tolist() == [0.5, 2.0]
    assert m.get("blk.1.attn_q.weight", 2) == (None, None)  # no entry: quantised without weights
    w, why = m.get("blk.0.attn_q.weight", 3)
    assert w is None and "holds 2 weights" in why and "whose rows have 3 values" in why


def test_legacy_file_without_trailer(tmp_path: Path) -> None:
    p = tmp_path / "m.dat"
    p.write_bytes(_dat([("a.weight", 2, [1.0])], trailer=None))
    m = imatrix.read(p)
    assert m.chunk_count is None and m.datasets == [] and m.weights["a.weight"].tolist() == [0.5]


def test_gguf_layout_divides_sums_by_counts_per_expert(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    p = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(p), arch="")
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", ["a.txt", "b.txt"])
    w.add_uint32("imatrix.chunk_count", 3)
    w.add_uint32("imatrix.chunk_size", 512)
    w.add_tensor("blk.0.ffn_up.weight.in_sum2", np.array([[10.0, 20.0]], dtype=np.float32))
    w.add_tensor("blk.0.ffn_up.weight.counts", np.array([[5.0]], dtype=np.float32))
    w.add_tensor("blk.0.ffn_up_exps.weight.in_sum2", np.array([[4.0, 8.0], [1.0, 1.0]], dtype=np.float32))
    w.add_tensor("blk.0.ffn_up_exps.weight.counts", np.array([[2.0], [0.0]], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    m = imatrix.read(p)
    assert m.layout == "gguf" and m.chunk_count == 3 and m.datasets == ["a.txt", "b.txt"]
    assert m.weights["blk.0.ffn_up.weight"].tolist() == [2.0, 4.0]
    assert m.weights["blk.0.ffn_up_exps.weight"].tolist() == [2.0, 4.0, 1.0, 1.0]  # an expert never reached: 1


@pytest.mark.parametrize(("content", "message"), [
    (None, "no such file"),
    ("truncated", "claims 3 values"),
    (b"\xff\xff\xff\xff", "implausible entry count"),
    (b"\x00\x00\x00\x00", "holds no entries"),
    ("nan", "not all finite"),
])
def test_bad_files_are_named_with_what_is_wrong(tmp_path: Path, content: Any, message: str) -> None:
    p = tmp_path / "m.dat"
    if content == "nan":
        p.write_bytes(_dat([("a.weight", 1, [float("nan")])]))
    elif content == "truncated":
        p.write_bytes(_dat([("a.weight", 1, [1.0, 2.0, 3.0])], trailer=None)[:-3])
    elif content is not None:
        p.write_bytes(content)
    with pytest.raises(imatrix.ImatrixError, match=message) as err:
        imatrix.read(p)
    assert str(p) in str(err.value)


def test_a_model_file_is_not_a_matrix(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    p = tmp_path / "model.gguf"
    w = gguf.GGUFWriter(str(p), arch="llama")
    w.add_type("model")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(imatrix.ImatrixError, match="a model file, not an importance matrix"):
        imatrix.read(p)


# --------------------------------------------------------------------------- real quantisations


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """tiny-qwen2's F16 conversion, a matrix in both layouts, another matrix, and files made with the first:
    Q4_K_M, IQ2_XS, and Q4_K_M of a copy with one tensor scaled by 1.02 (far below Q4_K's noise)."""
    from fixtures import imatrix as fi
    from fixtures import pipeline

    pipeline.skip_without_tools()
    pipeline.build(["tiny-qwen2"], log=lambda _line: None)
    entry = next(e for e in pipeline.load_manifest() if e["model"] == "tiny-qwen2" and e["quant"] == "F16")
    src = Path(entry["path"])
    d = tmp_path_factory.mktemp("imatrix")
    weights = fi.make_weights(src, seed=1)
    out: dict[str, Any] = {"a": entry["source_path"], "cache": d / "cache",
                           "gguf": fi.write_gguf(weights, d / "m.imatrix.gguf"),
                           "dat": fi.write_dat(weights, d / "m.imatrix.dat"),
                           "other": fi.write_gguf(fi.make_weights(src, seed=2), d / "other.imatrix.gguf")}
    out["q4_k_m"] = fi.quantize_with(src, d / "q4_k_m.gguf", 15, out["gguf"])
    out["iq2_xs"] = fi.quantize_with(src, d / "iq2_xs.gguf", 20, out["gguf"])

    def scale(name: str, data: np.ndarray, _by: dict[str, np.ndarray]) -> np.ndarray:
        return (data.astype(np.float32) * 1.02).astype(data.dtype) if name == "blk.2.ffn_up.weight" else data

    pipeline.patch_tensors(src, d / "scaled.f16.gguf", scale)
    out["scaled"] = fi.quantize_with(d / "scaled.f16.gguf", d / "scaled.q4_k_m.gguf", 15, out["gguf"])
    return out


def _weights(made: dict[str, Any], file: str, matrix: str | None) -> dict[str, Any]:
    from pytest_convdiff import compare

    result = compare(made["a"], made[file], corpus="quick", cache_dir=made["cache"], static_only=True,
                     imatrix=made[matrix] if matrix else None)
    items = {c.param: c for c in result.checks if c.name == "weights"}
    assert items and not any(c.outcome in ("error", "skipped") for c in items.values()), \
        {k: c.message for k, c in items.items()}
    return items


@pytest.mark.gguf
@pytest.mark.parametrize("layout", ["gguf", "dat"])
@pytest.mark.parametrize("file", ["q4_k_m", "iq2_xs"])
def test_the_matrix_reproduces_the_file_exactly(made: dict[str, Any], file: str, layout: str) -> None:
    items = _weights(made, file, layout)
    assert all(c.outcome == "passed" and c.value == 0.0 for c in items.values()), \
        {k: (c.value, c.message) for k, c in items.items()}


@pytest.mark.gguf
def test_without_the_matrix_the_error_ratio_judges_and_says_so(made: dict[str, Any]) -> None:
    items = _weights(made, "q4_k_m", None)
    assert all(c.outcome == "passed" for c in items.values())
    assert max(c.value for c in items.values()) <= 0.8  # error within 1.2× the twin made without the matrix
    assert "without the importance matrix" in items["layer-0"].message, items["layer-0"].message


@pytest.mark.gguf
def test_another_matrix_fails_and_says_so(made: dict[str, Any]) -> None:
    items = _weights(made, "q4_k_m", "other")
    failed = [c for c in items.values() if c.outcome == "failed"]
    assert failed and "if B was quantised with another importance matrix than other.imatrix.gguf" in failed[0].message


@pytest.mark.gguf
def test_a_defect_below_the_noise_is_named_with_the_matrix(made: dict[str, Any]) -> None:
    with_matrix = _weights(made, "scaled", "gguf")
    failed = {k: c for k, c in with_matrix.items() if c.outcome == "failed"}
    assert list(failed) == ["layer-2"], {k: c.message for k, c in with_matrix.items()}
    assert "blk.2.ffn_up.weight" in failed["layer-2"].message and failed["layer-2"].value >= 2.0


# --------------------------------------------------------------------------- manifests


def test_a_manifest_entry_names_its_matrix_relative_to_itself(tmp_path: Path) -> None:
    from pytest_convdiff.manifest import load_manifest

    f = tmp_path / "zoo.convdiff.toml"
    f.write_text("[defaults]\nmodel_a = 'a'\n[[pair]]\nmodel_b = 'b.gguf'\nimatrix = 'mats/b.imatrix.gguf'\n"
                 "[[pair]]\nmodel_b = 'c.gguf'\n")
    first, second = load_manifest(f)
    assert first.imatrix == str(tmp_path / "mats" / "b.imatrix.gguf") and second.imatrix is None


def test_a_manifest_matrix_that_cannot_be_read_is_a_collection_error(pytester: pytest.Pytester, tiny_models) -> None:
    a, b = tiny_models / "tiny-llama", tiny_models / "gguf" / "tiny-f16.gguf"
    pytester.makefile(".convdiff.toml", zoo=f"[[pair]]\nid = 'q'\nmodel_a = '{a}'\nmodel_b = '{b}'\nimatrix = 'gone.dat'\n")
    res = pytester.runpytest_subprocess("zoo.convdiff.toml")
    assert res.ret == pytest.ExitCode.INTERRUPTED
    out = res.stdout.str()
    assert "zoo.convdiff.toml, pair 'q': imatrix:" in out and "gone.dat: no such file" in out
