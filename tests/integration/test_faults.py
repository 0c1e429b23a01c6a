"""Fault injection: bad inputs and faults give clear errors, never a false pass, never a corrupt cache.

Each test here backs one row of docs/faults.md.
"""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from pytest_convdiff import compare
from pytest_convdiff.backends import open_backend
from pytest_convdiff.errors import MissingDependencyError, ModelLoadError

pytestmark = pytest.mark.usefixtures("subprocess_env")


@pytest.fixture(scope="module")
def variants(tiny_models, tmp_path_factory):
    """Damaged copies of the tiny model, made with transformers in a few seconds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("variants")
    ref = tiny_models / "tiny-llama"

    def save(model, name):
        model.save_pretrained(out / name)
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(ref / f, out / name / f)
        return out / name

    nan = LlamaForCausalLM.from_pretrained(ref)
    with torch.no_grad():
        nan.model.layers[4].mlp.down_proj.weight[0, 0] = float("nan")
    wide = LlamaForCausalLM.from_pretrained(ref)
    wide.resize_token_embeddings(520)
    cfg = LlamaConfig.from_pretrained(ref)
    cfg.num_hidden_layers = 4
    shallow = LlamaForCausalLM(cfg)
    shallow.load_state_dict(LlamaForCausalLM.from_pretrained(ref).state_dict(), strict=False)
    short = LlamaForCausalLM.from_pretrained(ref)
    short.config.max_position_embeddings = 64
    return {"ref": ref, "nan": save(nan, "nan-layer4"), "wide": save(wide, "vocab-520"),
            "shallow": save(shallow, "four-layers"), "short": save(short, "ctx-64")}


def _run(pytester, *args):
    return pytester.runpytest_subprocess(*[str(a) for a in args], "-p", "no:randomly")


def _pair(pytester):
    (pair,) = json.loads((pytester.path / "r.json").read_text())["pairs"]
    return pair


def test_nan_fails_counts_and_locates(variants, tmp_path):
    r = compare(variants["ref"], variants["nan"], corpus="quick", cache_dir=tmp_path)
    finite = r.check("finite")
    assert finite.outcome == "failed" and "Non-finite logits: 0 in A," in finite.message
    assert "first at prompt" in finite.message
    assert r.check("nmse").outcome == "failed"  # NaN never satisfies a bound
    assert r.check("kl[mean]").outcome == "failed"
    rfn = {c.param: c for c in r.checks if c.name == "rfn"}
    assert [rfn[f"layer-{i}"].outcome for i in range(6)] == ["passed"] * 4 + ["failed"] * 2
    assert "non-finite values in A's hidden state" in rfn["layer-4"].message
    assert r.first_divergent_layer == 4


def test_vocab_mismatch_skips_logit_checks_with_reason(variants, tmp_path):
    r = compare(variants["ref"], variants["wide"], corpus="quick", cache_dir=tmp_path)
    nmse = r.check("nmse")
    assert nmse.outcome == "skipped" and "vocabulary sizes differ (A 512 vs B 520" in nmse.message
    assert all(c.outcome == "passed" for c in r.checks if c.name in ("tokens", "rfn"))


def test_architecture_mismatch_skips_layer_checks_with_reason(variants, tmp_path):
    r = compare(variants["ref"], variants["shallow"], corpus="quick", cache_dir=tmp_path)
    rfn = [c for c in r.checks if c.name == "rfn"]
    assert rfn and all(c.outcome == "skipped" and "hidden-state shapes differ" in c.message for c in rfn)
    # the missing layers are a correctness failure (their tensors); the logits' distance is quality, reported
    assert r.verdict == "fail" and r.check("weights[layer-4]").outcome == "failed"
    assert "B has no tensor for A's model.layers.4." in r.check("weights[layer-4]").message
    nmse = r.check("nmse")
    assert nmse.outcome == "passed" and nmse.details.get("reported") and nmse.value > 1e-2


def test_prompt_longer_than_context_is_cut_to_fit_with_a_note(pytester, variants, tmp_path):
    """A model with a 64-token context used to error every item ("longer than max_position_embeddings");
    by default its prompts are now cut to fit and the report says which and from how long."""
    res = _run(pytester, "--model-a", variants["ref"], "--model-b", variants["short"], "--convdiff-json", "r.json",
               "--convdiff-cache-dir", tmp_path)
    pair = _pair(pytester)
    assert pair["verdict"] != "error" and pair["error"] is None, pair["error"]
    note = " ".join(pair["notes"])
    assert "prompts cut to 64 tokens (the shorter model context" in note and "long-essay (was " in note
    assert "errors" not in res.parseoutcomes()
    res = _run(pytester, "--model-a", variants["ref"], "--model-b", variants["short"], "--convdiff-json", "r.json",
               "--convdiff-cache-dir", tmp_path, "--convdiff-max-tokens", "32")
    assert "prompts cut to 32 tokens" in " ".join(_pair(pytester)["notes"])


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: p / "missing", "no such file or directory"),
    (lambda p: (p / "empty-dir").mkdir() or p / "empty-dir", "a directory but not a model: it has no config.json"),
    (lambda p: (p / "notes.txt").write_text("hi") and p / "notes.txt", "not a model this plugin recognises"),
    (lambda p: (p / "fake.gguf").write_bytes(b"NOPE" * 10) and p / "fake.gguf", "does not start with the GGUF magic"),
    (lambda p: (p / "v99.gguf").write_bytes(b"GGUF" + (99).to_bytes(4, "little") + bytes(64)) and p / "v99.gguf",
     "GGUF version 99, but this build reads GGUF versions 2 and 3 only"),
])
def test_bad_paths_are_usage_errors_in_one_line(pytester, variants, tmp_path, make, message):
    """On the command line, before any model loads (exit 4, one line); through compare(), the pair's error."""
    bad = make(tmp_path)
    res = _run(pytester, "--model-a", variants["ref"], "--model-b", bad, "--convdiff-cache-dir", tmp_path / "cache")
    assert res.ret == pytest.ExitCode.USAGE_ERROR
    (line,) = [x for x in res.stderr.str().splitlines() if x.strip()]
    assert line.startswith(f"ERROR: --model-b {bad}") and message in line
    r = compare(variants["ref"], bad, corpus="quick", cache_dir=tmp_path / "cache")
    assert r.verdict == "error" and message in r.error and "\n" not in r.error.strip()


def test_truncated_gguf_is_detected(pytester, variants, tmp_path):
    pytest.importorskip("llama_cpp")
    from fixtures import gguf_writer

    src = gguf_writer.build_all()["tiny-f16"]
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    r = compare(variants["ref"], cut, corpus="quick", cache_dir=tmp_path)
    assert r.verdict == "error" and "cut.gguf" in r.error
    assert "truncated" in r.error.lower() or "incomplete" in r.error.lower()
    assert all(c.outcome == "error" for c in r.checks)


def test_missing_extra_is_named(monkeypatch, tmp_path):
    from fixtures import gguf_writer

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as if not installed
    with pytest.raises(MissingDependencyError, match=r"pip install 'pytest-convdiff\[llama-cpp\]'"):
        open_backend(gguf_writer.build_all()["tiny-f16"])


def _outcome(pair, check_id):
    return next(c["outcome"] for c in pair["checks"] if f"{c['name']}[{c['param']}]" == check_id)


@pytest.mark.parametrize(("exc", "expected", "bug"), [
    ("RuntimeError('kernel exploded')", "running model B", False),  # a backend's own failure: its word, no "bug"
    ("KeyError('kernel exploded')", "unexpected KeyError", True),  # anything else is a bug, said as such
])
def test_backend_crash_errors_the_pair_not_a_pass(pytester, variants, tmp_path, exc, expected, bug):
    pytester.makeconftest(f"""
        import pytest_convdiff.backends.hf as hf

        class Boom(hf.TransformersBackend):
            def forward(self, *a, **k):
                raise {exc}

        def crash(path, options):
            if "ctx-64" in str(path):
                return Boom(path, options)
            return hf.TransformersBackend(path, options)

        hf.load = crash
    """)
    res = _run(pytester, "--model-a", variants["ref"], "--model-b", variants["short"], "--convdiff-json", "r.json",
               "--convdiff-cache-dir", tmp_path)
    assert res.ret == 1
    pair = _pair(pytester)
    assert pair["verdict"] == "error" and expected in pair["error"]
    assert "kernel exploded" in pair["error"]
    assert ("This is a bug" in pair["error"]) is bug
    # Nothing computed from the outputs passes; the checks that read only the files (config, weights) keep
    # their own results (ctx-64's context length differs from the reference's: config says so).
    from_outputs = [c for c in pair["checks"] if c["name"] not in ("config", "weights")]
    assert from_outputs and all(c["outcome"] == "error" for c in from_outputs)
    assert _outcome(pair, "config[context_length]") == "failed"


@pytest.mark.parametrize("store", ["compact", "full"])
def test_damaged_cache_entry_is_recomputed(pytester, variants, tmp_path, store):
    cache = tmp_path / "cache"
    args = ["--model-a", variants["ref"], "--model-b", tiny_fp16(variants), "--convdiff-cache-dir", cache,
            "--convdiff-json", "r.json", "--convdiff-prompts", "quick", "--convdiff-store", store]
    assert _run(pytester, *args).ret == 0
    # The largest array of the first prompt: full logits in a full entry, a sketch or top-K table in a
    # compact one. Either way one flipped bit must be caught.
    arrays = sorted(cache.glob("*/p0.*.npy"), key=lambda f: f.stat().st_size)
    assert arrays, f"no arrays in the {store} cache entry under {cache}"
    logits = arrays[-1]
    data = bytearray(logits.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    logits.write_bytes(bytes(data))
    res = _run(pytester, *args, "-W", "always")
    assert res.ret == 0
    assert "fails its checksum); recomputing it" in res.stdout.str()
    assert _pair(pytester)["from_cache"] in ({"A": False, "B": True}, {"A": True, "B": False})


def tiny_fp16(variants):
    return variants["ref"].parent / "tiny-llama-fp16"


def test_gpu_out_of_memory_names_the_model_and_the_fix(variants, monkeypatch):
    import torch

    backend = open_backend(variants["ref"])

    def oom(*_a, **_k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(backend.model, "forward", oom)
    with pytest.raises(ModelLoadError, match="out of GPU memory on a 5-token prompt") as exc:
        backend.forward([1, 2, 3, 4, 5])
    assert str(variants["ref"]) in str(exc.value) and "--convdiff-max-tokens" in str(exc.value)
    backend.close()


def test_empty_corpus_is_a_usage_error(pytester, variants):
    (pytester.path / "empty.txt").write_text("\n\n")
    res = pytester.runpytest_inprocess("--model-a", str(variants["ref"]), "--model-b", str(variants["ref"]),
                                       "--convdiff-prompts", "empty.txt")
    assert res.ret == pytest.ExitCode.USAGE_ERROR and "the corpus is empty" in res.stderr.str()
