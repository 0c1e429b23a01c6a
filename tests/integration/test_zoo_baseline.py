"""Zoo manifests collected as test files, and regression mode against stored baselines."""

from __future__ import annotations

import json

import pytest

from pytest_convdiff.errors import ConvdiffError
from pytest_convdiff.manifest import load_manifest
from pytest_convdiff.store import baseline_file

pytestmark = pytest.mark.usefixtures("subprocess_env")


def _manifest(pytester, tiny_models, extra=""):
    return pytester.makefile(".convdiff.toml", zoo=f"""
        [defaults]
        corpus = "quick"
        options_b = {{ dtype = "auto" }}

        [[pair]]
        id = "fp16"
        model_a = "{tiny_models / 'tiny-llama'}"
        model_b = "{tiny_models / 'tiny-llama-fp16'}"

        [[pair]]
        id = "broken"
        model_a = "{tiny_models / 'tiny-llama'}"
        model_b = "{tiny_models / 'tiny-llama-broken-layer3'}"
        marks = ["slow"]
        {extra}
    """)


def test_manifest_pairs_are_collected_and_marks_select(pytester, tiny_models, shared_cache):
    _manifest(pytester, tiny_models)
    res = pytester.runpytest_subprocess("zoo.convdiff.toml", "--convdiff-cache-dir", str(shared_cache),
                                        "--convdiff-json", "r.json", "-m", "not slow", "--co", "-q")
    out = res.stdout.str()
    assert "zoo.convdiff.toml::convdiff[fp16]::rfn[layer-5]" in out
    assert "convdiff[broken]" not in out
    res = pytester.runpytest_subprocess("zoo.convdiff.toml", "--convdiff-cache-dir", str(shared_cache),
                                        "--convdiff-json", "r.json", "--convdiff-no-tokenizer-cases")
    assert res.ret == 1
    pairs = {p["id"]: p for p in json.loads((pytester.path / "r.json").read_text())["pairs"]}
    assert pairs["fp16"]["verdict"] == "pass" and pairs["broken"]["first_divergent_layer"] == 3
    assert len([c for c in pairs["fp16"]["checks"] if c["name"] == "tokens"]) == 4  # the quick corpus


def test_manifest_under_xdist_matches_serial(pytester, tiny_models, shared_cache):
    _manifest(pytester, tiny_models)
    args = ["zoo.convdiff.toml", "--convdiff-cache-dir", str(shared_cache), "--convdiff-no-tokenizer-cases"]
    serial = pytester.runpytest_subprocess(*args, "--convdiff-json", "serial.json")
    dist = pytester.runpytest_subprocess(*args, "--convdiff-json", "dist.json", "-n", "2")
    strip = lambda f: [{k: v for k, v in p.items() if k != "from_cache"}  # noqa: E731
                       for p in json.loads((pytester.path / f).read_text())["pairs"]]
    assert serial.ret == dist.ret == 1
    assert strip("serial.json") == strip("dist.json")


@pytest.mark.parametrize(("body", "message"), [
    ("[[pair]]\nmodel_a = 'a'\n", "needs model_a and model_b"),
    ("[[pair]]\nmodel_a = 'a'\nmodel_b = 'b'\ncolour = 1\n", "unknown key(s) ['colour']"),
    ("[[pair]]\nmodel_a = 'a'\nmodel_b = 'b'\nbounds = { rfn = 'x' }\n", "rfn must be a number"),
    ("[[pair]]\nmodel_a = 'a'\nmodel_b = 'b'\nbackend_b = 'onnx'\n", "unknown backend 'onnx'"),
    ("[[pair]]\nmodel_a = 'a'\nmodel_b = ['b', 'b']\n", "used twice"),
    ("this is = not toml [", "not a readable TOML manifest"),
    ("[defaults]\ncorpus = 'quick'\n", "no [[pair]] entries"),
])
def test_bad_manifests_name_file_entry_and_problem(tmp_path, body, message):
    f = tmp_path / "z.convdiff.toml"
    f.write_text(body)
    with pytest.raises(ConvdiffError, match=None) as exc:
        load_manifest(f)
    assert message in str(exc.value) and str(f) in str(exc.value)


def test_bad_manifest_is_a_collection_error(pytester):
    pytester.makefile(".convdiff.toml", zoo="[[pair]]\nmodel_a = 'a'\n")
    res = pytester.runpytest_subprocess("zoo.convdiff.toml")
    assert res.ret == pytest.ExitCode.INTERRUPTED
    assert "needs model_a and model_b" in res.stdout.str()


def test_tolerance_parsing_and_regressions():
    tol = baseline_file.parse_tolerances("nmse:10%,top1:abs:0.05")
    assert tol["nmse"] == ("rel", 0.1) and tol["top1"] == ("abs", 0.05) and tol["rfn"] == ("rel", 0.25)
    with pytest.raises(ValueError, match="unknown metric 'bogus'"):
        baseline_file.parse_tolerances("bogus:5%")
    with pytest.raises(ValueError, match="is not NAME:PCT% or NAME:abs:VALUE"):
        baseline_file.parse_tolerances("nmse:5")
    old = {"nmse": 1e-3, "top1": 0.95, "rfn": [0.01, 0.02], "kl_mean": 1e-3}
    new = {"nmse": 1.09e-3, "top1": 0.89, "rfn": [0.01, 0.03], "kl_mean": float("nan")}
    r = baseline_file.regressions(new, old, tol)
    assert not r["nmse"]["worse"] and r["nmse"]["allowed"] == pytest.approx(1.1e-3)
    assert r["top1"]["worse"] and r["top1"]["allowed"] == pytest.approx(0.90)
    assert r["rfn"]["worse"] and "layer 1: 0.02 -> 0.03" in r["rfn"]["detail"]
    assert r["kl_mean"]["worse"]  # NaN is never as good as the baseline


def test_baseline_update_then_regression_fails_with_old_and_new(pytester, tiny_models, shared_cache):
    base = pytester.path / "baseline.json"
    a, good, bad = tiny_models / "tiny-llama", tiny_models / "tiny-llama-fp16", tiny_models / "tiny-llama-broken-layer3"
    # the greedy check has no bound to loosen, so it is off here: only the baseline items may fail
    common = ["--convdiff-cache-dir", str(shared_cache), "--convdiff-no-tokenizer-cases", "--convdiff-prompts", "quick",
              "--convdiff-baseline", str(base), "--convdiff-greedy-tokens", "0"]
    # no baseline yet: the baseline items skip and say how to record one
    res = pytester.runpytest_subprocess("--model-a", str(a), "--model-b", str(good), *common, "-rs")
    assert res.ret == 0 and "record one with --convdiff-baseline-update" in res.stdout.str()
    # record
    res = pytester.runpytest_subprocess("--model-a", str(a), "--model-b", str(good), *common, "--convdiff-baseline-update")
    assert res.ret == 0 and base.is_file()
    stored = json.loads(base.read_text())["pairs"]["tiny-llama-vs-tiny-llama-fp16"]
    assert stored["nmse"] > 0 and len(stored["rfn"]) == 6
    # "re-convert in place": the same pair id now points at a worse model, still inside loose absolute bounds
    (pytester.path / "conv").mkdir()
    import shutil

    shutil.copytree(bad, pytester.path / "conv" / "tiny-llama-fp16")
    res = pytester.runpytest_subprocess("--model-a", str(a), "--model-b", str(pytester.path / "conv" / "tiny-llama-fp16"),
                                        *common, "--convdiff-bound", "nmse=1,top1=0,top5=0,kl_mean=1,kl_p99=9,rfn=2,"
                                        "ppl_ratio=9,subblock_jump=1000,weights_twin_blocks=2,weights_twin_ratio=1e12,weights_margin=1e9,weights_scale=1e9",
                                        "--convdiff-json", "r.json")
    assert res.ret == 1
    (pair,) = json.loads((pytester.path / "r.json").read_text())["pairs"]
    failed = {c["param"] for c in pair["checks"] if c["outcome"] == "failed"}
    assert failed >= {"nmse", "kl_mean", "rfn"} and all(
        c["name"] == "baseline" for c in pair["checks"] if c["outcome"] == "failed")
    out = res.stdout.str()
    assert "nmse got worse than the baseline for tiny-llama-vs-tiny-llama-fp16" in out
    assert "baseline 5." in out or "baseline 4." in out  # the old value is shown
    # accepting the new state
    res = pytester.runpytest_subprocess("--model-a", str(a), "--model-b", str(pytester.path / "conv" / "tiny-llama-fp16"),
                                        *common, "--convdiff-bound", "nmse=1,top1=0,top5=0,kl_mean=1,kl_p99=9,rfn=2,"
                                        "ppl_ratio=9,subblock_jump=1000,weights_twin_blocks=2,weights_twin_ratio=1e12,weights_margin=1e9,weights_scale=1e9",
                                        "--convdiff-baseline-update")
    assert res.ret == 0
    assert json.loads(base.read_text())["pairs"]["tiny-llama-vs-tiny-llama-fp16"]["nmse"] > 0.1


def test_each_xdist_worker_gets_its_own_gpu(pytester, monkeypatch, tiny_models):
    from pytest_convdiff.runner import ModelSpec
    from pytest_convdiff.zoo import gpu_for_worker, on_gpu

    assert [gpu_for_worker(f"gw{k}", 2) for k in range(4)] == [0, 1, 0, 1]
    assert gpu_for_worker("", 2) is None and gpu_for_worker("master", 2) is None
    # The GPU reaches each model through its backend's device option, never through the environment
    # (which belongs to the user's own tests in that worker too); a device the user chose is kept.
    gguf = str(tiny_models / "gguf" / "tiny-f16.gguf")
    assert on_gpu(ModelSpec(gguf), 1).options == {"main_gpu": 1}
    assert on_gpu(ModelSpec(gguf, options={"main_gpu": 0}), 1).options == {"main_gpu": 0}
    assert on_gpu(ModelSpec(str(tiny_models / "tiny-llama"), options={"device": "cuda"}), 1).options == {
        "device": "cuda:1"}
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    pytester.makepyfile(test_env="""
        import os
        def test_env(worker_id):
            assert worker_id.startswith("gw") and "CUDA_VISIBLE_DEVICES" not in os.environ
    """)
    pytester.runpytest_subprocess("-n", "2", "--convdiff-gpus", "2", "-p", "xdist").assert_outcomes(passed=1)
    bad = pytester.runpytest_inprocess("--convdiff-gpus", "zero")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR and "--convdiff-gpus" in bad.stderr.str()


# --------------------------------------------------------------------------- shards across CI jobs


@pytest.mark.usefixtures("subprocess_env")
def test_two_shards_and_their_merge_equal_one_unsharded_run(pytester, tiny_models, shared_cache):
    import subprocess
    import sys

    bs = [tiny_models / "tiny-llama-bf16", tiny_models / "tiny-llama-fp16", tiny_models / "gguf" / "tiny-f16.gguf",
          tiny_models / "gguf" / "tiny-no-permute.gguf"]
    common = ["--model-a", str(tiny_models / "tiny-llama"), *[a for b in bs for a in ("--model-b", str(b))],
              "--convdiff-cache-dir", str(shared_cache), "--convdiff-prompts", "quick", "--convdiff-no-tokenizer-cases",
              "--convdiff-greedy-tokens", "0", "--convdiff-runtime-twin", "off", "-p", "no:randomly", "-q"]
    whole = pytester.runpytest_subprocess(*common, "--convdiff-json", "whole.json")
    shards = [pytester.runpytest_subprocess(*common, "--convdiff-shard", f"{k}/2", "--convdiff-json", f"s{k}.json")
              for k in (1, 2)]
    assert whole.ret == 1  # the no-permute file fails
    ids = [{p["id"] for p in json.loads((pytester.path / f"s{k}.json").read_text())["pairs"]} for k in (1, 2)]
    assert ids[0] and ids[1] and not ids[0] & ids[1] and len(ids[0] | ids[1]) == len(bs)  # whole pairs, none twice
    merged = subprocess.run([sys.executable, "-m", "pytest_convdiff", "merge", "s1.json", "s2.json",
                             "--json", "merged.json", "--html", "merged.html", "--summary", "summary.md"],
                            cwd=pytester.path, capture_output=True, text=True)
    assert merged.returncode == 1, merged.stderr
    assert "FAIL  tiny-llama-vs-tiny-no-permute.gguf" in merged.stdout
    assert (pytester.path / "merged.html").is_file() and "tiny-no-permute" in (pytester.path / "summary.md").read_text()

    def pairs(name):
        out = sorted(json.loads((pytester.path / name).read_text())["pairs"], key=lambda p: p["id"])
        for p in out:
            p.pop("from_cache", None)  # the shards read what the whole run cached
        return out

    assert pairs("merged.json") == pairs("whole.json")
    assert [s.ret for s in shards].count(1) == 1  # the shard holding the failing pair fails, the other passes


def test_merge_refuses_overlapping_or_missing_reports(pytester, tmp_path):
    import subprocess
    import sys

    from pytest_convdiff.core.results import PairResult
    from pytest_convdiff.reporting import write_json

    write_json(tmp_path / "a.json", [PairResult("p", "a", "b", "transformers", "llama.cpp")])
    run = [sys.executable, "-m", "pytest_convdiff", "merge"]
    twice = subprocess.run([*run, str(tmp_path / "a.json"), str(tmp_path / "a.json")], capture_output=True, text=True)
    assert twice.returncode == 2 and "pair 'p' is in both" in twice.stderr
    missing = subprocess.run([*run, str(tmp_path / "nope.json")], capture_output=True, text=True)
    assert missing.returncode == 2 and "nope.json: no such report" in missing.stderr
