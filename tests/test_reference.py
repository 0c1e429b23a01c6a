"""Golden references: save A's outputs, move the checkpoint away, and every check still gives the same result."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from pytest_convdiff import ModelSpec, RunSettings, load_corpus, run_model
from pytest_convdiff.backends import detect_backend
from pytest_convdiff.bounds import default_bounds
from pytest_convdiff.cache import Cache
from pytest_convdiff.compare import evaluate
from pytest_convdiff.corpus import Corpus, Prompt
from pytest_convdiff.errors import ModelLoadError
from pytest_convdiff.reference import (
    compare_llamacpp_bins,
    load_reference_run,
    read_header,
    reference_run_for,
    save_reference,
)


def _same(x, y) -> bool:
    if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
        return True
    return x == y


def _checks(res):
    return [(c.id, c.value, c.threshold, c.outcome) for c in res.checks]


@pytest.fixture(scope="module")
def saved(tiny_models, tmp_path_factory):
    """A live pair (A = a copy of tiny-llama, B = the broken-layer-3 one), A saved as a reference, A deleted."""
    tmp = tmp_path_factory.mktemp("reference")
    corpus = load_corpus("quick")
    settings = RunSettings()
    ckpt = tmp / "tiny-llama-copy"
    shutil.copytree(tiny_models / "tiny-llama", ckpt)
    cache = Cache(tmp / "cache")
    run_a = run_model(ModelSpec(str(ckpt)), corpus, cache, settings=settings)
    spec_b = ModelSpec(str(tiny_models / "tiny-llama-broken-layer3"))
    run_b = run_model(spec_b, corpus, cache, feed=run_a, settings=settings)
    cls, bounds = default_bounds(run_a.info, run_b.info)
    live = evaluate(run_a, run_b, corpus, bounds, pair_id="p", precision=cls)
    ref = save_reference(run_a, tmp / "tiny-llama.convdiff.safetensors", corpus, settings)
    arrays = {n: np.array(run_a.entry.array(n)) for n in run_a.entry.meta["files"]}
    shutil.rmtree(ckpt)
    return {"tmp": tmp, "corpus": corpus, "settings": settings, "ref": ref, "spec_b": spec_b, "live": live,
            "arrays": arrays, "cls": cls, "bounds": bounds, "run_a": run_a}


def test_checks_from_the_reference_equal_the_live_ones_with_the_checkpoint_gone(saved):
    assert not (saved["tmp"] / "tiny-llama-copy").exists()
    corpus, settings = saved["corpus"], saved["settings"]
    ref_run = load_reference_run(saved["ref"], corpus, ModelSpec(str(saved["ref"])), settings)
    assert ref_run.from_cache
    # A fresh cache: B really runs again, on the token ids read from the reference.
    run_b = run_model(saved["spec_b"], corpus, Cache(saved["tmp"] / "fresh-cache"), feed=ref_run, settings=settings)
    assert not run_b.from_cache
    cls, bounds = default_bounds(ref_run.info, run_b.info)
    assert cls == saved["cls"] and bounds == saved["bounds"]
    res = evaluate(ref_run, run_b, corpus, bounds, pair_id="p", precision=cls)
    live = saved["live"]
    assert len(res.checks) == len(live.checks) > 20
    for got, want in zip(_checks(res), _checks(live), strict=True):
        assert got[0] == want[0] and got[2:] == want[2:] and _same(got[1], want[1]), (got, want)
    assert [c.message for c in res.checks] == [c.message for c in live.checks]
    assert res.first_divergent_layer == live.first_divergent_layer == 3
    assert res.divergent_sublayer == live.divergent_sublayer
    assert json.dumps(res.to_dict()["layers"]) == json.dumps(live.to_dict()["layers"])
    assert json.dumps(res.to_dict()["metrics"]) == json.dumps(live.to_dict()["metrics"])
    assert res.verdict == live.verdict == "fail"


def test_reference_holds_every_array_bit_for_bit_and_is_memory_mapped(saved):
    ref_run = load_reference_run(saved["ref"], saved["corpus"])
    entry = ref_run.entry
    assert set(entry.names) == set(saved["arrays"])
    for name, want in saved["arrays"].items():
        got = entry.array(name)
        assert isinstance(got, np.memmap) and got.dtype == want.dtype and np.array_equal(got, want), name
    assert not entry.has("p0.nothing")
    meta, live_meta = ref_run.meta, saved["run_a"].meta
    for key in ("info", "prompts", "pieces", "truncated", "sublayers", "special", "tokenizer_cases", "causality"):
        assert meta[key] == live_meta[key], key
    md = read_header(saved["ref"]).metadata
    assert md["convdiff_reference"] == "1" and md["corpus_digest"] == saved["corpus"].digest
    assert md["backend"] == "transformers" and md["fingerprint"] and md["key"] == live_meta["key"]
    versions = json.loads(md["versions"])
    assert versions["pytest_convdiff"] and versions["backend_library"]


def test_the_file_is_ordinary_safetensors(saved, tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    loaded = st.load_file(str(saved["ref"]))
    assert set(loaded) == set(saved["arrays"])
    assert all(np.array_equal(loaded[n], a) for n, a in saved["arrays"].items())
    # and a file written by the safetensors library with our header reads back too
    from safetensors import safe_open

    with safe_open(str(saved["ref"]), framework="numpy") as fh:
        md = fh.metadata()
    other = tmp_path / "rewritten.safetensors"
    md = {k: v for k, v in md.items() if k != "data_sha256"}
    st.save_file(loaded, str(other), metadata=md)
    run = load_reference_run(other, saved["corpus"])
    assert np.array_equal(run.logits("prose-en"), saved["run_a"].logits("prose-en"))


def test_probe_and_detection_read_the_header_only(saved):
    spec = ModelSpec(str(saved["ref"]))
    assert detect_backend(saved["ref"]) == "reference" == spec.resolved_backend()
    info = spec.probe()
    assert info.num_layers == 6 and info.num_layers == saved["run_a"].info["num_layers"]
    assert info.vocab_size == saved["run_a"].info["vocab_size"] and info.backend == "transformers"
    assert info.extra["reference"] == str(saved["ref"])


def test_other_corpus_is_refused_naming_the_corpus(saved):
    other = Corpus((Prompt("x", "something else entirely"),), "other.jsonl")
    with pytest.raises(ModelLoadError, match="saved with another corpus") as exc:
        load_reference_run(saved["ref"], other)
    assert "--convdiff-prompts" in str(exc.value) and "other.jsonl" in str(exc.value)


def test_other_max_tokens_is_refused_and_switched_off_checks_are_hidden(saved):
    corpus = saved["corpus"]
    with pytest.raises(ModelLoadError, match="--convdiff-max-tokens"):
        load_reference_run(saved["ref"], corpus, settings=RunSettings(max_tokens=16))
    run = load_reference_run(saved["ref"], corpus,
                             settings=RunSettings(hidden_states=False, tokenizer_cases=False, causality=False))
    assert run.hidden("prose-en") is None and run.sublayers("prose-en") == {}
    assert run.tokenizer_cases == {} and run.causality is None


@pytest.mark.parametrize("content", [b"", b"hello", b"\xff" * 64, b"\x08\x00\x00\x00\x00\x00\x00\x00not json"])
def test_not_a_safetensors_file_is_a_readable_error(tmp_path, saved, content):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(content)
    with pytest.raises(ModelLoadError, match="not a convdiff reference") as exc:
        load_reference_run(bad, saved["corpus"])
    assert str(bad) in str(exc.value) and "--convdiff-save-reference" in str(exc.value)
    with pytest.raises(ModelLoadError, match="not a convdiff reference"):
        ModelSpec(str(bad)).probe()


def test_weights_without_a_convdiff_header_are_refused(tmp_path, saved):
    st = pytest.importorskip("safetensors.numpy")
    weights = tmp_path / "model.safetensors"
    st.save_file({"w": np.zeros((2, 2), np.float32)}, str(weights))
    with pytest.raises(ModelLoadError, match="without a convdiff header"):
        load_reference_run(weights, saved["corpus"])


def test_truncated_or_modified_file_is_refused(tmp_path, saved):
    data = saved["ref"].read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-100])
    with pytest.raises(ModelLoadError, match="truncated or damaged"):
        load_reference_run(cut, saved["corpus"])
    flipped = bytearray(data)
    flipped[-10] ^= 0xFF
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(ModelLoadError, match="fails its checksum"):
        load_reference_run(bad, saved["corpus"])


def test_a_reference_cannot_be_model_b(saved):
    a = load_reference_run(saved["ref"], saved["corpus"])
    with pytest.raises(ModelLoadError, match="can only be model A"):
        reference_run_for(ModelSpec(str(saved["ref"])), saved["corpus"], feed=a)
    from pytest_convdiff.backends import open_backend

    with pytest.raises(ModelLoadError, match="only be given as model A"):
        open_backend(saved["ref"])


def test_a_reference_can_be_saved_again_from_a_reference_run(saved, tmp_path):
    run = load_reference_run(saved["ref"], saved["corpus"])
    again = save_reference(run, tmp_path / "again.safetensors", saved["corpus"], saved["settings"])
    rerun = load_reference_run(again, saved["corpus"], settings=saved["settings"])
    assert all(np.array_equal(rerun.entry.array(n), a) for n, a in saved["arrays"].items())
    assert read_header(again).metadata["fingerprint"] == read_header(saved["ref"]).metadata["fingerprint"]


def test_run_model_serves_a_reference_as_model_a(saved):
    run = run_model(ModelSpec(str(saved["ref"])), saved["corpus"], Cache(saved["tmp"] / "unused"),
                    settings=saved["settings"])
    assert run.from_cache and run.meta["prompts"] == saved["run_a"].meta["prompts"]
    with pytest.raises(ModelLoadError, match="model A"):
        run_model(ModelSpec(str(saved["ref"])), saved["corpus"], Cache(saved["tmp"] / "unused"), feed=run)


def test_llamacpp_script_files_compare_on_the_last_position(saved, tiny_models, tmp_path):
    run_a = saved["run_a"]
    data = tmp_path / "data"
    data.mkdir()
    pid = "prose-en"
    np.asarray(run_a.logits(pid)[-1], dtype=np.float32).tofile(data / "pytorch-tiny.bin")
    np.asarray(run_a.inputs(pid), dtype=np.int32).tofile(data / "pytorch-tiny-tokens.bin")
    same = compare_llamacpp_bins(data, tiny_models / "tiny-llama")
    assert same.tokens == len(run_a.inputs(pid)) and same.nmse < 1e-10 and same.top1_match
    broken = compare_llamacpp_bins(data / "pytorch-tiny.bin", tiny_models / "tiny-llama-broken-layer3")
    assert broken.nmse > same.nmse and 0 <= broken.top5_overlap <= 1 and broken.kl >= 0
    (data / "pytorch-tiny-tokens.bin").unlink()
    with pytest.raises(ModelLoadError, match="token ids file not found"):
        compare_llamacpp_bins(data, tiny_models / "tiny-llama")
