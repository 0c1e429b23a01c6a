"""The plugin end to end on the tiny transformers models (pytester, subprocess where models load)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.usefixtures("subprocess_env")


def _run(pytester, *args):
    return pytester.runpytest_subprocess(*[str(a) for a in args], "-p", "no:randomly")


def _report(pytester, name="r.json"):
    return json.loads((pytester.path / name).read_text())


def test_bf16_conversion_passes_with_every_check_kind(pytester, tiny_models, shared_cache):
    res = _run(pytester, "--model-a", tiny_models / "tiny-llama", "--model-b", tiny_models / "tiny-llama-bf16",
               "--convdiff-json", "r.json", "--convdiff-cache-dir", shared_cache, "-v")
    assert res.ret == 0, res.stdout.str()[-3000:]
    out = res.stdout.str()
    for check in ("tokens[prose-en]", "nmse", "topk[1]", "kl[mean]", "rfn[layer-0]", "rfn[layer-5]",
                  "tokenizer[emoji]", "causality[B]"):
        assert f"convdiff[tiny-llama-vs-tiny-llama-bf16]::{check} PASSED" in out
    rep = _report(pytester)
    assert rep["version"] == 1
    (pair,) = rep["pairs"]
    assert pair["verdict"] == "pass" and pair["error"] is None and pair["first_divergent_layer"] is None
    assert [layer["index"] for layer in pair["layers"]] == list(range(6))
    assert all(0 < layer["rfn"] < 0.05 for layer in pair["layers"])
    assert {"id", "model_a", "model_b", "backend_a", "backend_b", "verdict", "error", "first_divergent_layer",
            "layers", "checks"} <= set(pair)
    nmse = next(c for c in pair["checks"] if c["name"] == "nmse")
    # quality against A is reported for a transformers B (its weights twin judges it), with the default
    # row's value kept in the details; the summary leads with it
    assert nmse["outcome"] == "passed" and nmse["threshold"] is None and 0 < nmse["value"] < 1e-2
    assert nmse["details"]["reported"] is True and nmse["details"]["default_bound"] == 1e-2
    assert "convdiff summary" in out and "PASS  tiny-llama-vs-tiny-llama-bf16" in out
    # ... in llama-perplexity's terms, each figure with its standard error, also in the JSON
    assert "quality: PPL ratio " in out and " ± " in out and "same top p " in out
    lp = rep["pairs"][0]["metrics"]["llama"]
    assert lp["count"] > 1000 and 0 < lp["kld_mean"] < 1e-2 and lp["kld_err"] > 0 and 0.9 < lp["same_top"] <= 1


def test_perturbed_layer_fails_from_that_layer_on(pytester, tiny_models, shared_cache):
    """With an rfn bound the user sets, quality against A is judged again, layer by layer."""
    res = _run(pytester, "--model-a", tiny_models / "tiny-llama", "--model-b", tiny_models / "tiny-llama-broken-layer3",
               "--convdiff-json", "r.json", "--convdiff-cache-dir", shared_cache, "-rA", "--convdiff-bound", "rfn=0.02")
    assert res.ret == 1
    rep = _report(pytester)
    (pair,) = rep["pairs"]
    assert pair["verdict"] == "fail" and pair["first_divergent_layer"] == 3
    outcomes = {c["param"]: c["outcome"] for c in pair["checks"] if c["name"] == "rfn"}
    assert outcomes == {"layer-0": "passed", "layer-1": "passed", "layer-2": "passed",
                        "layer-3": "failed", "layer-4": "failed", "layer-5": "failed"}
    out = res.stdout.str()
    # assert_close-style message: what, value, bound, where, how to change it
    assert "Relative Frobenius error of the hidden state after decoder layer 3 is" in out
    assert "above the bound 0.02" in out and "Worst position: layer 3, prompt" in out
    assert "First divergent layer: 3 (mlp diverges first)" in out
    assert "--convdiff-bound rfn=VALUE" in out
    assert "first divergent layer: 3" in out  # terminal summary


def test_second_run_is_served_from_cache_without_loading(pytester, tiny_models, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    args = ["--model-a", tiny_models / "tiny-llama", "--model-b", tiny_models / "tiny-llama-fp16",
            "--convdiff-cache-dir", cache, "--convdiff-json", "r.json"]
    first = _run(pytester, *args)
    assert first.ret == 0
    assert _report(pytester)["pairs"][0]["from_cache"] == {"A": False, "B": False}
    # In-process, with every backend's loader made to fail: a valid cache must not need them. Modules are
    # taken from sys.modules (what the run will import), not from a package attribute that an earlier
    # in-process run may have left pointing at a stale copy.
    import importlib

    hf = importlib.import_module("pytest_convdiff.backends.hf")

    def no_load(*_a, **_k):
        raise AssertionError("a model was loaded although the cache was valid")

    monkeypatch.setattr(hf, "load", no_load)
    # ... nor re-reduce the arrays (the pair's metrics are cached too), nor hash gigabytes to trust them
    metrics = importlib.import_module("pytest_convdiff.core.metrics")
    cache_mod = importlib.import_module("pytest_convdiff.store.cache")

    def no_work(*_a, **_k):
        raise AssertionError("warm run redid work the cache holds")

    for target, name in ((metrics.LogitAccumulator, "update"), (metrics.LayerAccumulator, "update"),
                         (cache_mod, "sha256_file")):
        monkeypatch.setattr(target, name, no_work)
    cold_metrics = _report(pytester)["pairs"][0]["metrics"]
    second = pytester.runpytest_inprocess(*[str(a) for a in args])
    assert second.ret == 0, second.stdout.str()[-2000:]
    assert _report(pytester)["pairs"][0]["from_cache"] == {"A": True, "B": True}
    assert _report(pytester)["pairs"][0]["metrics"] == cold_metrics
    # --convdiff-refresh recomputes (and so needs the loader)
    third = pytester.runpytest_inprocess(*[str(a) for a in args], "--convdiff-refresh")
    assert third.ret != 0 and "a model was loaded although the cache was valid" in third.stdout.str()


def test_compact_cache_halves_the_entries_and_still_passes(pytester, tiny_models, tmp_path):
    cache = tmp_path / "cache"
    res = _run(pytester, "--model-a", tiny_models / "tiny-llama", "--model-b", tiny_models / "tiny-llama-bf16",
               "--convdiff-cache-dir", cache, "--convdiff-json", "r.json", "--convdiff-cache-dtype", "fp16",
               "--convdiff-keep-b", "--convdiff-store", "full")  # both models' arrays stored in full
    assert res.ret == 0, res.stdout.str()[-3000:]
    import numpy as np

    logits = sorted(cache.glob("*/p0.logits.npy"))
    hidden = sorted(cache.glob("*/p0.hidden.npy"))
    assert len(logits) == 2 and len(hidden) == 2
    assert {np.load(f, mmap_mode="r").dtype for f in logits + hidden} == {np.dtype("float16")}
    pair = _report(pytester)["pairs"][0]
    assert pair["verdict"] == "pass" and pair["metrics"]["nmse"] > 0


def test_xdist_gives_the_same_results(pytester, tiny_models, shared_cache):
    pytest.importorskip("xdist")
    args = ["--model-a", tiny_models / "tiny-llama", "--model-b", tiny_models / "tiny-llama-fp16",
            "--model-b", tiny_models / "tiny-llama-broken-layer3", "--convdiff-cache-dir", shared_cache]
    plain = _run(pytester, *args, "--convdiff-json", "plain.json")
    dist = _run(pytester, *args, "--convdiff-json", "dist.json", "-n", "2")
    assert plain.ret == dist.ret == 1
    a, b = _report(pytester, "plain.json"), _report(pytester, "dist.json")
    strip = [{k: v for k, v in p.items() if k != "from_cache"} for p in a["pairs"]]
    assert strip == [{k: v for k, v in p.items() if k != "from_cache"} for p in b["pairs"]]
    assert "convdiff summary" in dist.stdout.str()
    dist.assert_outcomes(passed=plain.parseoutcomes()["passed"], failed=plain.parseoutcomes()["failed"])


def test_a_missing_model_is_a_usage_error_before_any_model_loads(pytester, tiny_models, tmp_path):
    """It used to run A first (27 s on SmolLM2), then print the error once per item: 396 lines, exit 1."""
    cache = tmp_path / "cache"
    res = _run(pytester, "--model-a", tiny_models / "tiny-llama", "--model-b", tiny_models / "tiny-llama-fp16",
               "--model-b", pytester.path / "no-such-model", "--convdiff-cache-dir", cache)
    assert res.ret == pytest.ExitCode.USAGE_ERROR
    out = (res.stdout.str() + res.stderr.str()).strip().splitlines()
    assert len(out) <= 15, out
    text = "\n".join(out)
    assert "--model-b" in text and "no-such-model: no such file or directory" in text and ".gguf file" in text
    assert "Traceback" not in text and "loading" not in text
    assert not cache.exists() or not any(cache.rglob("*.safetensors"))  # no model ran


@pytest.mark.parametrize(("extra", "says"), [
    (["--backend-b", "llama.cpp"], "the llama.cpp backend was named for it, but it is not a model that backend runs"),
    ([], "pass the checkpoint directory"),
])
def test_a_path_of_the_wrong_kind_is_a_usage_error(pytester, tiny_models, extra, says):
    b = tiny_models / "tiny-llama-bf16" if extra else tiny_models / "tiny-llama-bf16" / "config.json"
    res = pytester.runpytest_subprocess("--model-a", str(tiny_models / "tiny-llama"), "--model-b", str(b), *extra)
    assert res.ret == pytest.ExitCode.USAGE_ERROR
    assert says in res.stderr.str() and "--model-b" in res.stderr.str()


def test_a_missing_model_in_a_manifest_is_a_collection_error_naming_file_and_entry(pytester, tiny_models):
    pytester.makefile(".convdiff.toml", zoo=f"""
        [[pair]]
        id = "good"
        model_a = "{tiny_models / 'tiny-llama'}"
        model_b = "{tiny_models / 'tiny-llama-fp16'}"

        [[pair]]
        id = "typo"
        model_a = "{tiny_models / 'tiny-llama'}"
        model_b = "missing.gguf"
    """)
    res = pytester.runpytest_subprocess("zoo.convdiff.toml", "--collect-only", "-q")
    assert res.ret == pytest.ExitCode.INTERRUPTED
    out = res.stdout.str()
    assert "zoo.convdiff.toml, pair 'typo': model_b:" in out and "missing.gguf: no such file or directory" in out


@pytest.mark.parametrize(("args", "message"), [
    (["--model-b", "x"], "--model-b was given without --model-a"),
    (["--model-a", "x"], "--model-a was given without --model-b"),
    (["--model-a", "x", "--model-b", "y", "--convdiff-bound", "rfn=abc"], "rfn must be a number"),
    (["--model-a", "x", "--model-b", "y", "--convdiff-bound", "bogus=1"], "unknown bound 'bogus'"),
    (["--model-a", "x", "--model-b", "y", "--convdiff-option-a", "dtype"], "--convdiff-option-a: expected KEY=VALUE"),
    (["--model-a", "x", "--model-b", "y", "--backend-b", "onnx"], "--convdiff-backend-b: unknown backend 'onnx'"),
    (["--model-a", "x", "--model-b", "y", "--convdiff-max-tokens", "-3"], "--convdiff-max-tokens"),
    (["--model-a", "x", "--model-b", "y", "--convdiff-greedy-tokens", "many"], "--convdiff-greedy-tokens"),
    (["--model-a", "x", "--model-b", "y", "--convdiff-layer-swap", "-1"], "--convdiff-layer-swap: expected an integer >= 0"),
    (["--model-a", "x", "--model-b", "y", "--convdiff-prompts", "missing.txt"], "--convdiff-prompts: missing.txt"),
    (["--model-a", "x", "--model-b", "y", "--convdiff-cache-dtype", "bfloat8"], "--convdiff-cache-dtype: 'bfloat8'"),
    (["--model-a", "x", "--model-b", "y", "--convdiff-imatrix", "none.dat"], "--convdiff-imatrix: none.dat: no such file"),
])
def test_bad_options_are_usage_errors_naming_the_option(pytester, args, message):
    res = pytester.runpytest_inprocess(*args)
    assert res.ret == pytest.ExitCode.USAGE_ERROR
    assert message in res.stderr.str()


def test_ini_options_and_custom_checks_through_the_fixture(pytester, tiny_models, shared_cache):
    pytester.makeini(f"""
        [pytest]
        convdiff_model_a = {tiny_models / 'tiny-llama'}
        convdiff_model_b = {tiny_models / 'tiny-llama-fp16'}
        convdiff_cache_dir = {shared_cache}
        convdiff_bounds = rfn=0.03
    """)
    pytester.makepyfile(test_custom="""
        import numpy as np

        def test_last_position_logits_close(convdiff_pair):
            pid = convdiff_pair.corpus.prompts[0].id
            a = np.asarray(convdiff_pair.a.logits(pid))[-1]
            b = np.asarray(convdiff_pair.b.logits(pid))[-1]
            assert convdiff_pair.metrics.nmse(a, b) < 1e-3
            assert convdiff_pair.result.bounds["rfn"] == 0.03
    """)
    res = _run(pytester, "-v")
    assert res.ret == 0, res.stdout.str()[-2000:]
    res.stdout.fnmatch_lines(["*test_last_position_logits_close?tiny-llama-vs-tiny-llama-fp16? PASSED*",
                              "*convdiff?tiny-llama-vs-tiny-llama-fp16?::rfn?layer-5? PASSED*"])


def test_deselect_with_k_and_marker(pytester, tiny_models, shared_cache):
    res = _run(pytester, "--model-a", tiny_models / "tiny-llama", "--model-b", tiny_models / "tiny-llama-fp16",
               "--convdiff-cache-dir", shared_cache, "-k", "rfn and layer", "-m", "convdiff")
    res.assert_outcomes(passed=6)


def test_layer_swap_separates_local_from_accumulated_error(pytester, tiny_models, shared_cache):
    res = _run(pytester, "--model-a", tiny_models / "tiny-llama", "--model-b", tiny_models / "tiny-llama-broken-layer3",
               "--convdiff-cache-dir", shared_cache, "--convdiff-json", "r.json", "--convdiff-layer-swap", "4", "--convdiff-store", "full")
    assert res.ret == 1
    (pair,) = _report(pytester)["pairs"]
    swap = [layer["rfn_swap"] for layer in pair["layers"]]
    plain = [layer["rfn"] for layer in pair["layers"]]
    # layers 0-3 take A's states; layers 4 and 5 are intact, so given A's input they add no error
    assert swap[:4] == [0.0, 0.0, 0.0, 0.0]
    assert max(swap[4:]) < 1e-5 and min(plain[3:]) > 0.5
    assert "rfn, layer swap" in res.stdout.str()


def test_layer_swap_on_a_backend_without_injection_is_noted(pytester, tiny_models, shared_cache):
    pytest.importorskip("llama_cpp")
    from fixtures import gguf_writer

    gguf = gguf_writer.build_all()["tiny-f16"]
    res = _run(pytester, "--model-a", tiny_models / "tiny-llama", "--model-b", gguf, "--convdiff-no-tokenizer-cases",
               "--convdiff-cache-dir", shared_cache, "--convdiff-json", "r.json", "--convdiff-layer-swap", "2", "--convdiff-store", "full")
    assert res.ret == 0
    (pair,) = _report(pytester)["pairs"]
    assert "cannot take injected hidden states" in " ".join(pair["notes"])
    assert "rfn_swap" not in pair["layers"][0]


def test_reports_plots_html_step_summary_and_junit_properties(pytester, tiny_models, shared_cache, monkeypatch):
    summary = pytester.path / "step-summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    res = _run(pytester, "--model-a", tiny_models / "tiny-llama", "--model-b", tiny_models / "tiny-llama-fp16",
               "--model-b", tiny_models / "tiny-llama-broken-layer3", "--convdiff-cache-dir", shared_cache,
               "--convdiff-plot", "plots", "--convdiff-html", "report.html", "--junitxml", "junit.xml", "-n", "2")
    assert res.ret == 1
    pngs = sorted((pytester.path / "plots").glob("*.png"))
    assert len(pngs) == 2 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    html = (pytester.path / "report.html").read_text()
    assert "tiny-llama-vs-tiny-llama-broken-layer3" in html and "data:image/png;base64," in html
    md = summary.read_text()
    assert md.startswith("earlier step\n")
    assert "**FAIL**" in md and "**PASS**" in md and "rfn[layer-3]" in md
    junit = (pytester.path / "junit.xml").read_text()
    assert 'name="convdiff_rfn"' in junit and 'name="convdiff_bound"' in junit and 'name="convdiff"' in junit


def test_saved_reference_replaces_the_reference_model(pytester, tiny_models, tmp_path):
    import shutil

    moved = tmp_path / "ref-ckpt"
    shutil.copytree(tiny_models / "tiny-llama", moved)
    args = ["--model-b", tiny_models / "tiny-llama-broken-layer3", "--convdiff-no-tokenizer-cases"]
    first = _run(pytester, "--model-a", moved, *args, "--convdiff-save-reference", tmp_path / "ref.safetensors",
                 "--convdiff-cache-dir", tmp_path / "c1", "--convdiff-json", "live.json")
    assert first.ret == 1 and (tmp_path / "ref.safetensors").is_file()
    shutil.rmtree(moved)  # the reference model is gone
    second = _run(pytester, "--model-a", tmp_path / "ref.safetensors", *args, "--convdiff-cache-dir", tmp_path / "c2",
                  "--convdiff-json", "saved.json")
    assert second.ret == 1
    live, saved = _report(pytester, "live.json")["pairs"][0], _report(pytester, "saved.json")["pairs"][0]
    static = ("config", "weights")  # they read the model files; a reference has none, so they skip there

    def outputs(pair):
        return [(c["name"], c["param"], c["value"], c["outcome"]) for c in pair["checks"] if c["name"] not in static]

    assert outputs(live) == outputs(saved) and len(outputs(live)) > 20
    assert saved["first_divergent_layer"] == 3


def test_collection_reports_the_pair_items_it_will_run(pytester, tiny_models):
    """It printed ``collected 0 items`` and then ran every pair item."""
    args = ["--model-a", str(tiny_models / "tiny-llama"), "--model-b", str(tiny_models / "tiny-llama-bf16"),
            "--collect-only"]
    res = pytester.runpytest_subprocess(*args, "-q")
    n = len([line for line in res.stdout.lines if line.startswith("convdiff[")])
    assert n > 20
    assert f"collected {n} items" in pytester.runpytest_subprocess(*args).stdout.str()
    assert f"collected {n} items / {n - 1} deselected / 1 selected" in \
        pytester.runpytest_subprocess(*args, "-k", "nmse").stdout.str()
