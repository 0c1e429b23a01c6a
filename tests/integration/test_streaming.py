"""B streamed by default: its outputs are reduced against A's as it runs, and its cache entry keeps its
tokens, its records and the pair's metrics, not its arrays. What that must not change: the metrics (a
kept B gives the same), the checks, the custom-check fixture (which keeps B's arrays), the layer swap;
and what it must give: a cache of A's entry plus a little per B, an entry valid only for its A."""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pytest_convdiff import ModelSpec, RunSettings, load_corpus, run_model
from pytest_convdiff.checks import default_bounds
from pytest_convdiff.comparison import evaluate
from pytest_convdiff.errors import ConvdiffError
from pytest_convdiff.pair import pair_metrics
from pytest_convdiff.store.budget import expected_entry_bytes
from pytest_convdiff.store.cache import Cache

ROOT = Path(__file__).resolve().parents[2]
MB = 10**6


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _entries(cache: Path) -> dict[Path, dict[str, Any]]:
    return {p: json.loads((p / "meta.json").read_text()) for p in cache.iterdir() if (p / "meta.json").is_file()}


def _same(x: Any, y: Any, where: str = "") -> None:
    """Equal, floats up to a relative 1e-9 (NaN equal to NaN)."""
    if isinstance(x, dict):
        assert set(x) == set(y), (where, set(x) ^ set(y))
        for k in x:
            _same(x[k], y[k], f"{where}.{k}")
    elif isinstance(x, (list, tuple)):
        assert len(x) == len(y), where
        for i, (u, v) in enumerate(zip(x, y, strict=True)):
            _same(u, v, f"{where}[{i}]")
    elif isinstance(x, float) and isinstance(y, float):
        assert (math.isnan(x) and math.isnan(y)) or x == y or abs(x - y) <= 1e-9 * max(abs(x), abs(y)), (where, x, y)
    else:
        assert x == y, (where, x, y)


def _copies(src: Path, where: Path, n: int) -> list[Path]:
    """``n`` copies of a checkpoint directory under other names (hard links where the disk allows): each is
    another model to the cache, whose key holds the model's resolved path."""
    out = []
    for i in range(n):
        dst = where / f"{src.name}-{i:02d}"
        dst.mkdir(parents=True)
        for f in src.iterdir():
            try:
                os.link(f, dst / f.name)
            except OSError:
                shutil.copy2(f, dst / f.name)
        out.append(dst)
    return out


@pytest.fixture(scope="module")
def quick():
    return load_corpus("quick")


@pytest.fixture(scope="module")
def run_a(tiny_models, quick, tmp_path_factory):
    return run_model(ModelSpec(str(tiny_models / "tiny-llama")), quick, Cache(tmp_path_factory.mktemp("a-cache")))


@pytest.mark.parametrize("which", ["bf16", "no-permute-gguf"])
def test_streamed_and_kept_b_give_the_same_metrics_and_checks(which, tiny_models, quick, run_a, tmp_path):
    if which.endswith("gguf"):
        pytest.importorskip("llama_cpp")
        from fixtures import gguf_writer

        spec = ModelSpec(str(gguf_writer.build_all()["tiny-no-permute"]))
    else:
        spec = ModelSpec(str(tiny_models / "tiny-llama-bf16"))
    streamed = run_model(spec, quick, Cache(tmp_path / "s"), feed=run_a)
    kept = run_model(spec, quick, Cache(tmp_path / "k"), feed=run_a, settings=RunSettings(keep_b=True))
    assert streamed.streamed and not kept.streamed
    pm_s, pm_k = pair_metrics(run_a, streamed, quick), pair_metrics(run_a, kept, quick)
    assert pm_s.logits is not None and pm_s.layers is not None and pm_s.layers.position_profile
    _same(pm_s.to_dict(), pm_k.to_dict())

    # every check, message included, from the recorded shapes and the streamed metrics
    cls, bounds = default_bounds(run_a.info, streamed.info)
    res_s = evaluate(run_a, streamed, quick, bounds, pair_id="p", precision=cls)
    res_k = evaluate(run_a, kept, quick, bounds, pair_id="p", precision=cls)
    assert [(c.id, c.outcome, c.message) for c in res_s.checks] == [(c.id, c.outcome, c.message) for c in res_k.checks]
    assert res_s.first_divergent_layer == res_k.first_divergent_layer
    if which.endswith("gguf"):
        assert res_s.verdict == "fail" and res_s.first_divergent_layer == 2
    assert streamed.vocab_width() == kept.vocab_width() and streamed.hidden_dims() == kept.hidden_dims() == (6, 128)

    # nothing of B's arrays was written, and asking for them says how to keep them
    files = set(streamed.meta["files"])
    assert files and all(n.endswith((".inputs", ".own_tokens")) for n in files)
    assert _bytes(streamed.entry.path) < MB
    with pytest.raises(ConvdiffError, match="--convdiff-keep-b"):
        streamed.logits(quick.prompts[0].id)
    with pytest.raises(ConvdiffError, match="streamed"):
        streamed.hidden(quick.prompts[0].id)
    # what stays of B: its tokens and records, read as before
    for key in ("pieces", "tokenizer_cases", "greedy", "causality", "special"):
        assert streamed.meta[key] == kept.meta[key], key
    assert streamed.own_tokens("prose-en") == kept.own_tokens("prose-en")


def test_layer_swap_is_streamed_too(tiny_models, quick, tmp_path):
    settings = RunSettings(layer_swap=4, store="full")  # the swap feeds A's full hidden states into B
    run_a = run_model(ModelSpec(str(tiny_models / "tiny-llama")), quick, Cache(tmp_path / "a"), settings=settings)
    spec = ModelSpec(str(tiny_models / "tiny-llama-broken-layer3"))
    streamed = run_model(spec, quick, Cache(tmp_path / "s"), feed=run_a, settings=settings)
    kept = run_model(spec, quick, Cache(tmp_path / "k"), feed=run_a, settings=replace(settings, keep_b=True))
    swap = pair_metrics(run_a, streamed, quick).swap_rfn
    assert swap is not None and swap[:4] == [0.0] * 4 and max(swap[4:]) < 1e-5
    _same(swap, pair_metrics(run_a, kept, quick).swap_rfn)
    assert not any("hidden_swap" in n for n in streamed.meta["files"])


def test_warm_streamed_b_reduces_nothing_and_another_a_is_not_served_it(tiny_models, quick, run_a, tmp_path,
                                                                       monkeypatch):
    cache = Cache(tmp_path / "c")
    spec = ModelSpec(str(tiny_models / "tiny-llama-bf16"))
    cold = run_model(spec, quick, cache, feed=run_a)
    from pytest_convdiff.core import metrics

    def no_work(*_a, **_k):
        raise AssertionError("a streamed B's metrics were reduced again")

    with monkeypatch.context() as m:
        for acc in (metrics.LogitAccumulator, metrics.LayerAccumulator):
            m.setattr(acc, "update", no_work)
        warm = run_model(spec, quick, cache, feed=run_a)
        assert warm.from_cache and warm.entry.path == cold.entry.path
        _same(pair_metrics(run_a, warm, quick, cache).to_dict(), pair_metrics(run_a, cold, quick).to_dict())
    assert not (cache.root / "pairs").exists()  # a streamed pair needs no pair document: B's entry holds it

    # Another A on the same token ids (the fp16 copy): B's metrics of the first A are not reused for it
    other_a = run_model(ModelSpec(str(tiny_models / "tiny-llama-fp16")), quick, cache)
    assert [other_a.inputs(p.id) for p in quick] == [run_a.inputs(p.id) for p in quick]
    with pytest.raises(ConvdiffError, match="streamed against other outputs of model A"):
        pair_metrics(other_a, cold, quick)
    again = run_model(spec, quick, cache, feed=other_a)
    assert not again.from_cache and again.entry.path != cold.entry.path
    assert again.meta["streamed"]["a"] == other_a.entry.identity != cold.meta["streamed"]["a"]


def test_a_kept_b_serves_a_later_streamed_run(tiny_models, quick, run_a, tmp_path, monkeypatch):
    """B's arrays kept by a run with custom checks spare the next run without them from loading B again."""
    cache = Cache(tmp_path / "c")
    spec = ModelSpec(str(tiny_models / "tiny-llama-bf16"))
    kept = run_model(spec, quick, cache, feed=run_a, settings=RunSettings(keep_b=True))
    hf = pytest.importorskip("pytest_convdiff.backends.hf")
    monkeypatch.setattr(hf, "load", lambda *_a, **_k: pytest.fail("B was loaded although its arrays are cached"))
    served = run_model(spec, quick, cache, feed=run_a)
    assert served.from_cache and served.entry.path == kept.entry.path and not served.streamed


def test_budget_estimate_of_a_streamed_b_is_small_and_covers_the_entry(tiny_models, quick, run_a, tmp_path):
    b = run_model(ModelSpec(str(tiny_models / "tiny-llama-bf16")), quick, Cache(tmp_path), feed=run_a)
    tokens = sum(len(run_a.inputs(p.id)) for p in quick)
    streamed = expected_entry_bytes(b.info, tokens, RunSettings(), fed=True)
    kept = expected_entry_bytes(b.info, tokens, RunSettings(keep_b=True), fed=True)
    written = _bytes(b.entry.path)
    assert written <= streamed < MB
    assert kept == expected_entry_bytes(b.info, tokens, RunSettings(store="full")) > 50 * streamed  # a full A
    assert RunSettings(keep_b=True).key(fed=False) == RunSettings().key(fed=False)  # A's key ignores it


def test_keep_b_option_and_ini(pytester, tiny_models):
    from pytest_convdiff.plugin.session import STASH

    a, b = f"--model-a={tiny_models / 'tiny-llama'}", f"--model-b={tiny_models / 'tiny-llama-bf16'}"

    config = pytester.parseconfigure(a, b, "--convdiff-keep-b")
    assert config.stash[STASH].settings.keep_b
    config = pytester.parseconfigure(a, b)
    assert not config.stash[STASH].settings.keep_b
    pytester.makeini("[pytest]\nconvdiff_keep_b = true\n")
    config = pytester.parseconfigure(a, b)
    assert config.stash[STASH].settings.keep_b


# --------------------------------------------------------------------------- through the plugin


@pytest.mark.usefixtures("subprocess_env")
def test_twenty_b_models_cost_a_few_hundred_kilobytes_each(pytester, tiny_models, tmp_path):
    """A zoo of 20 conversions of one reference: A's entry, then well under 1 MB per B. (Prompts cut and the
    greedy and causality checks off to keep 20 pairs quick on two cores: they add ~2 kB to a B's entry.)"""
    bs = _copies(tiny_models / "tiny-llama-bf16", tmp_path / "zoo", 20)
    cache = tmp_path / "cache"
    args = ["--model-a", tiny_models / "tiny-llama", *[x for b in bs for x in ("--model-b", b)],
            "--convdiff-prompts", "quick", "--convdiff-max-tokens", "256", "--convdiff-greedy-tokens", "0",
            "--convdiff-no-causality", "--convdiff-cache-dir", cache,
            "--convdiff-json", "r.json", "-q", "-p", "no:randomly"]
    res = pytester.runpytest_subprocess(*[str(a) for a in args])
    assert res.ret == 0, res.stdout.str()[-3000:]
    pairs = json.loads((pytester.path / "r.json").read_text())["pairs"]
    assert len(pairs) == 20 and {p["verdict"] for p in pairs} == {"pass"}
    entries = _entries(cache)
    a_entries = [p for p, meta in entries.items() if "streamed" not in meta]
    b_entries = [p for p, meta in entries.items() if "streamed" in meta]
    assert len(a_entries) == 1 and len(b_entries) == 20
    a_bytes = _bytes(a_entries[0])
    per_b = [_bytes(p) for p in b_entries]
    assert max(per_b) < MB, per_b
    assert {f.parent for f in cache.glob("*/*.c_top_logit.npy")} == set(a_entries)  # A's (compact) logits only
    assert _bytes(cache) < a_bytes + 20 * MB


@pytest.mark.usefixtures("subprocess_env")
def test_custom_check_example_keeps_b_arrays(pytester, tiny_models, tmp_path):
    """examples/test_custom_checks.py reads pair.b.logits: the fixture turns --convdiff-keep-b on by itself."""
    pytester.makepyfile(test_custom_checks=(ROOT / "examples" / "test_custom_checks.py").read_text())
    cache = tmp_path / "cache"
    res = pytester.runpytest_subprocess(
        "--model-a", str(tiny_models / "tiny-llama"), "--model-b", str(tiny_models / "tiny-llama-bf16"),
        "--convdiff-prompts", "quick", "--convdiff-cache-dir", str(cache), "-p", "no:randomly", "-v")
    assert res.ret == 0, res.stdout.str()[-3000:]
    res.stdout.fnmatch_lines(["*test_last_token_prediction_survives_conversion?tiny-llama-vs-tiny-llama-bf16? PASSED*"])
    entries = _entries(cache)
    assert len(entries) == 2 and not any("streamed" in meta for meta in entries.values())
    assert len(list(cache.glob("*/p0.logits.npy"))) == 2
    b = next(p for p, meta in entries.items() if meta["spec"]["path"].endswith("tiny-llama-bf16"))
    assert np.load(b / "p0.logits.npy", mmap_mode="r").shape[-1] == 512


def test_a_large_vocabulary_corpus_is_bounded_by_one_prompt_in_memory_and_by_the_compact_entry_on_disk(tmp_path):
    """bench/stream_memory.py's pipeline part, small: A compact and B streamed through ``run_model`` with a
    synthetic backend. The entries must be a small share of full storage, B's a few bytes a token, and the
    resident memory between prompts must not grow with the prompts seen (one prompt's outputs at a time)."""
    import subprocess
    import sys

    out = tmp_path / "stream.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "stream_memory.py"), "--part", "pipeline", "--tokens", "4096",
                    "--pipeline-prompts", "8", "--vocab", "20000", "--layers", "4", "--hidden", "64",
                    "--workdir", str(tmp_path), "--out", str(out)], check=True, capture_output=True, timeout=600)
    res = json.loads(out.read_text())["pipeline"]
    assert res["tokens"] == 4096 and res["metrics"]["nmse"] > 0 and res["metrics"]["kl_mean"] > 0
    assert res["a_entry_bytes"] < res["full_entry_bytes_per_model"] / 5  # compact: top-256 of 20k logits and sketches
    assert res["b_entry_bytes"] < 100 * res["tokens"]  # B streamed: its tokens and records only
    a_rss = [r["rss_mib"] for r in res["rss_trace"] if r["what"].startswith("A")]
    assert len(a_rss) == 8 and max(a_rss[4:]) < max(a_rss[:4]) + 0.5 * res["one_prompt_outputs_mib"] + 20
    assert not list(tmp_path.glob("convdiff-stream-*"))  # the bench cleans its cache up
