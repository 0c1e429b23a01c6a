"""Golden references: save A's outputs, move the checkpoint away, and every check still gives the same result.

A reference is recognised by its content whatever it is called, so the module-scoped reference
here is saved to a path without an extension (what ``--convdiff-save-reference out/golden`` writes).
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from pytest_convdiff import ModelSpec, RunSettings, load_corpus, run_model, sources
from pytest_convdiff.backends import detect_backend, open_backend
from pytest_convdiff.checks import default_bounds
from pytest_convdiff.comparison import evaluate
from pytest_convdiff.core.corpus import Corpus, Prompt
from pytest_convdiff.errors import ModelLoadError
from pytest_convdiff.store.cache import Cache
from pytest_convdiff.store.entry import Entry
from pytest_convdiff.store.reference import (
    is_reference,
    open_reference_run,
    read_header,
    reference_info,
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
    settings = RunSettings(store="full")  # every array, bit for bit (the compact form: test_compact_reference.py)
    ckpt = tmp / "tiny-llama-copy"
    shutil.copytree(tiny_models / "tiny-llama", ckpt)
    cache = Cache(tmp / "cache")
    run_a = run_model(ModelSpec(str(ckpt)), corpus, cache, settings=settings)
    spec_b = ModelSpec(str(tiny_models / "tiny-llama-broken-layer3"))
    run_b = run_model(spec_b, corpus, cache, feed=run_a, settings=settings)
    cls, bounds = default_bounds(run_a.info, run_b.info)
    live = evaluate(run_a, run_b, corpus, bounds, pair_id="p", precision=cls)
    ref = save_reference(run_a, tmp / "out" / "golden", corpus, settings)  # no extension: content decides
    arrays = {n: np.array(run_a.entry.array(n)) for n in run_a.entry.meta["files"]}
    shutil.rmtree(ckpt)
    return {"tmp": tmp, "corpus": corpus, "settings": settings, "ref": ref, "spec_b": spec_b, "live": live,
            "arrays": arrays, "cls": cls, "bounds": bounds, "run_a": run_a}


def _from_outputs(checks: list) -> list:
    from pytest_convdiff.checks import families

    static = {f.name for f in families() if not f.needs_outputs}  # family names are their items' names here
    return [c for c in checks if c.name not in static]


def test_checks_from_the_reference_equal_the_live_ones_with_the_checkpoint_gone(saved):
    assert not (saved["tmp"] / "tiny-llama-copy").exists()
    corpus, settings = saved["corpus"], saved["settings"]
    ref_run = open_reference_run(saved["ref"], corpus, settings, spec=ModelSpec(str(saved["ref"])))
    assert ref_run.from_cache
    # A fresh cache: B really runs again, on the token ids read from the reference.
    run_b = run_model(saved["spec_b"], corpus, Cache(saved["tmp"] / "fresh-cache"), feed=ref_run, settings=settings)
    assert not run_b.from_cache
    cls, bounds = default_bounds(ref_run.info, run_b.info)
    assert cls == saved["cls"] and bounds == saved["bounds"]
    res = evaluate(ref_run, run_b, corpus, bounds, pair_id="p", precision=cls)
    live = saved["live"]
    # The families that read the model files (config, weights) have no files on a reference's side: they skip
    # there by design. Every check computed from the outputs must be the same.
    res.checks, live.checks = _from_outputs(res.checks), _from_outputs(live.checks)
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
    ref_run = open_reference_run(saved["ref"], saved["corpus"])
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
    run = open_reference_run(other, saved["corpus"])
    assert np.array_equal(run.logits("prose-en"), saved["run_a"].logits("prose-en"))


def test_probe_and_detection_read_the_header_only(saved, monkeypatch):
    spec = ModelSpec(str(saved["ref"]))
    assert is_reference(saved["ref"]) and spec.kind() is sources.REFERENCE and spec.resolved_backend() == "reference"
    assert spec.can(sources.WEIGHT_SKETCH, sources.OUTPUTS) and not spec.can(sources.RUNS)
    # no tensor is read: memory-mapping anything would fail here
    monkeypatch.setattr(np, "memmap", lambda *a, **k: pytest.fail("probing read a tensor"))
    info = spec.probe()
    assert info == reference_info(saved["ref"])
    assert info.num_layers == 6 and info.num_layers == saved["run_a"].info["num_layers"]
    assert info.vocab_size == saved["run_a"].info["vocab_size"] and info.backend == "transformers"
    assert info.extra["reference"] == str(saved["ref"])


def test_a_reference_is_recognised_by_content_not_name(saved, tiny_models, tmp_path):
    for name in ("golden", "golden.bin", "ref.safetensors", "ref.gguf.old"):
        copy = tmp_path / name
        shutil.copyfile(saved["ref"], copy)
        assert is_reference(copy) and ModelSpec(str(copy)).resolved_backend() == "reference", name
    cut = tmp_path / "cut"
    cut.write_bytes(saved["ref"].read_bytes()[:-100])
    assert is_reference(cut)  # still a reference: opening it says it is truncated
    st = pytest.importorskip("safetensors.numpy")
    st.save_file({"w": np.zeros((2, 2), np.float32)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "fake.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 64)
    (tmp_path / "empty").write_bytes(b"")
    for other in (tmp_path / "model.safetensors", tmp_path / "fake.gguf", tmp_path / "empty", tmp_path / "missing",
                  tiny_models / "tiny-llama", tiny_models / "tiny-llama" / "config.json"):
        assert not is_reference(other), other
    # the backend registry knows nothing of references any more: only the runner does
    assert detect_backend(tiny_models / "tiny-llama") == "transformers"
    with pytest.raises(ModelLoadError, match="not a model this plugin recognises"):
        detect_backend(saved["ref"])


def test_a_reference_saved_without_an_extension_is_model_a(saved, tmp_path):
    """``--convdiff-save-reference out/golden`` then ``--model-a out/golden``: the path is used as given."""
    path = saved["ref"]
    assert path.suffix == "" and path.is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == ["golden"]  # no temporary file left beside it
    spec = ModelSpec(str(path))
    assert spec.probe().num_layers == 6
    run_a = run_model(spec, saved["corpus"], Cache(tmp_path / "cache"), settings=saved["settings"])
    assert run_a.from_cache and run_a.spec is spec and isinstance(run_a.entry, Entry)
    assert np.array_equal(run_a.logits("prose-en"), saved["run_a"].logits("prose-en"))
    run_b = run_model(saved["spec_b"], saved["corpus"], Cache(tmp_path / "cache"), feed=run_a,
                      settings=saved["settings"])
    res = evaluate(run_a, run_b, saved["corpus"], saved["bounds"], pair_id="p", precision=saved["cls"])
    assert res.first_divergent_layer == 3 and res.verdict == "fail"


@pytest.mark.usefixtures("subprocess_env")
def test_plugin_saves_to_a_path_without_extension_and_reads_it_back_as_model_a(pytester, tiny_models, tmp_path):
    golden = tmp_path / "out" / "golden"
    common = ["--model-b", tiny_models / "tiny-llama-broken-layer3", "--convdiff-no-tokenizer-cases",
              "--convdiff-greedy-tokens", "0", "--convdiff-no-causality", "--convdiff-prompts", "quick",
              "-p", "no:randomly"]
    first = pytester.runpytest_subprocess(*map(str, ["--model-a", tiny_models / "tiny-llama", *common,
                                                     "--convdiff-save-reference", golden,
                                                     "--convdiff-cache-dir", tmp_path / "c1"]))
    assert first.ret == 1 and golden.is_file() and is_reference(golden), first.stdout.str()[-3000:]
    second = pytester.runpytest_subprocess(*map(str, ["--model-a", golden, *common, "--convdiff-cache-dir",
                                                      tmp_path / "c2", "--convdiff-json", "saved.json"]))
    assert second.ret == 1, second.stdout.str()[-3000:]
    (pair,) = json.loads((pytester.path / "saved.json").read_text())["pairs"]
    assert pair["model_a"] == str(golden) and pair["from_cache"]["A"] and pair["error"] is None
    assert pair["first_divergent_layer"] == 3


def test_other_corpus_is_refused_naming_the_corpus(saved):
    other = Corpus((Prompt("x", "something else entirely"),), "other.jsonl")
    with pytest.raises(ModelLoadError, match="saved with another corpus") as exc:
        open_reference_run(saved["ref"], other)
    assert "--convdiff-prompts" in str(exc.value) and "other.jsonl" in str(exc.value)


def test_other_max_tokens_is_refused_and_switched_off_checks_are_hidden(saved):
    corpus = saved["corpus"]
    with pytest.raises(ModelLoadError, match="--convdiff-max-tokens"):
        open_reference_run(saved["ref"], corpus, settings=RunSettings(max_tokens=16))
    run = open_reference_run(saved["ref"], corpus,
                             settings=RunSettings(hidden_states=False, tokenizer_cases=False, causality=False))
    assert run.hidden("prose-en") is None and run.sublayers("prose-en") == {}
    assert run.tokenizer_cases == {} and run.causality is None


@pytest.mark.parametrize("content", [b"", b"hello", b"\xff" * 64, b"\x08\x00\x00\x00\x00\x00\x00\x00not json"])
def test_not_a_safetensors_file_is_a_readable_error(tmp_path, saved, content):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(content)
    with pytest.raises(ModelLoadError, match="not a convdiff reference") as exc:
        open_reference_run(bad, saved["corpus"])
    assert str(bad) in str(exc.value) and "--convdiff-save-reference" in str(exc.value)
    with pytest.raises(ModelLoadError, match="not a convdiff reference"):
        ModelSpec(str(bad), backend="reference").probe()
    with pytest.raises(ModelLoadError, match="not a model this plugin recognises"):
        ModelSpec(str(bad)).probe()  # not recognised as a reference, nor as anything else


def test_weights_without_a_convdiff_header_are_refused(tmp_path, saved):
    st = pytest.importorskip("safetensors.numpy")
    weights = tmp_path / "model.safetensors"
    st.save_file({"w": np.zeros((2, 2), np.float32)}, str(weights))
    with pytest.raises(ModelLoadError, match="without a convdiff header"):
        open_reference_run(weights, saved["corpus"])


def test_truncated_or_modified_file_is_refused(tmp_path, saved):
    data = saved["ref"].read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-100])
    with pytest.raises(ModelLoadError, match="truncated or damaged"):
        open_reference_run(cut, saved["corpus"])
    flipped = bytearray(data)
    flipped[-10] ^= 0xFF
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(ModelLoadError, match="fails its checksum"):
        open_reference_run(bad, saved["corpus"])


def test_a_reference_cannot_be_model_b(saved, tmp_path):
    a = open_reference_run(saved["ref"], saved["corpus"])
    with pytest.raises(ModelLoadError, match="can only be model A.*--model-b"):
        run_model(ModelSpec(str(saved["ref"])), saved["corpus"], Cache(tmp_path), feed=a)
    with pytest.raises(ModelLoadError, match="can only be model A"):
        run_model(ModelSpec(str(saved["ref"]), backend="golden"), saved["corpus"], Cache(tmp_path), feed=a)
    with pytest.raises(ModelLoadError):  # no backend runs it
        open_backend(saved["ref"])


def test_a_reference_can_be_saved_again_from_a_reference_run(saved, tmp_path):
    run = open_reference_run(saved["ref"], saved["corpus"])
    again = save_reference(run, tmp_path / "again.safetensors", saved["corpus"], saved["settings"])
    rerun = open_reference_run(again, saved["corpus"], settings=saved["settings"])
    assert all(np.array_equal(rerun.entry.array(n), a) for n, a in saved["arrays"].items())
    assert read_header(again).metadata["fingerprint"] == read_header(saved["ref"]).metadata["fingerprint"]


def test_run_model_serves_a_reference_as_model_a(saved):
    run = run_model(ModelSpec(str(saved["ref"])), saved["corpus"], Cache(saved["tmp"] / "unused"),
                    settings=saved["settings"])
    assert run.from_cache and run.meta["prompts"] == saved["run_a"].meta["prompts"]
    with pytest.raises(ModelLoadError, match="model A"):
        run_model(ModelSpec(str(saved["ref"])), saved["corpus"], Cache(saved["tmp"] / "unused"), feed=run)
