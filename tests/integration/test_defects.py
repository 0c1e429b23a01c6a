"""Regression tests for issue 20: a pair without any result under xdist, report file modes, the
deprecated KV-cache keyword in our greedy decoding, and a manifest's bad ``corpus`` value."""

from __future__ import annotations

import json
import os
import stat
import warnings
from pathlib import Path

import numpy as np
import pytest

from pytest_convdiff.core.results import PairResult
from pytest_convdiff.errors import ConvdiffError
from pytest_convdiff.manifest import load_manifest
from pytest_convdiff.store import atomic

# --------------------------------------------------------------------------- 1. a pair with no result


_BAD_BOUNDS_CONFTEST = """
    import pytest

    def pytest_collection_modifyitems(items):
        for item in items:
            if "convdiff[zoo-pair]" in item.nodeid:
                item.add_marker(pytest.mark.convdiff_bounds(rfn="not-a-number"))
"""


@pytest.mark.usefixtures("subprocess_env")
def test_xdist_pair_whose_items_all_error_before_a_result_is_reported(pytester, tiny_models, shared_cache):
    """Every item errors at setup (a bad ``convdiff_bounds`` marker), so no worker sends the pair's header;
    the controller never collected the manifest, yet it must still write the report, naming the models."""
    pytest.importorskip("xdist")
    a, b = tiny_models / "tiny-llama", tiny_models / "tiny-llama-fp16"
    pytester.makeconftest(_BAD_BOUNDS_CONFTEST)
    pytester.makefile(".convdiff.toml", zoo=f"""
        [[pair]]
        id = "zoo-pair"
        model_a = "{a}"
        model_b = "{b}"
        corpus = "quick"
    """)
    res = pytester.runpytest_subprocess("zoo.convdiff.toml", "-p", "xdist", "-n", "2", "-p", "no:randomly",
                                        "--convdiff-cache-dir", str(shared_cache), "--convdiff-no-tokenizer-cases",
                                        "--convdiff-json", "r.json")
    out = res.stdout.str() + res.stderr.str()
    assert "StopIteration" not in out and "INTERNALERROR" not in out, out[-3000:]
    assert res.ret == pytest.ExitCode.TESTS_FAILED, out[-3000:]
    (pair,) = json.loads((pytester.path / "r.json").read_text())["pairs"]
    assert pair["id"] == "zoo-pair" and pair["verdict"] == "error"
    assert pair["model_a"] == str(a) and pair["model_b"] == str(b)
    assert pair["checks"] and all(c["outcome"] == "error" for c in pair["checks"])
    assert "not-a-number" in pair["checks"][0]["message"] or "rfn" in pair["checks"][0]["message"]


def test_assemble_survives_a_pair_the_controller_never_collected():
    """The unit-level form of the above: payloads for a pair id the session has no spec or header for."""
    from pytest_convdiff.core.results import ERROR, CheckResult
    from pytest_convdiff.reporting.gather import Gathered, item_payload

    gathered = Gathered()
    gathered.add([item_payload("ghost", 0, CheckResult("rfn", "layer-0", None, None, ERROR, "bad marker"))])
    (pr,) = gathered.results([], {})
    assert isinstance(pr, PairResult) and pr.id == "ghost" and pr.verdict == "error"
    assert [c.outcome for c in pr.checks] == [ERROR]


# --------------------------------------------------------------------------- 2. report file modes


@pytest.fixture
def umask():
    def set_to(value: int) -> None:
        os.umask(value)

    old = os.umask(0o022)
    try:
        yield set_to
    finally:
        os.umask(old)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_atomic_writes_honour_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    atomic.write_text(tmp_path / "r.html", "<html></html>")
    atomic.write_json(tmp_path / "r.json", {"a": 1})
    atomic.write_bytes(tmp_path / "p.png", b"\x89PNG")
    for name in ("r.html", "r.json", "p.png"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
    # replacing a file keeps the write atomic and the mode right; no temporary file is left behind
    atomic.write_text(tmp_path / "r.html", "<html>2</html>")
    assert stat.S_IMODE((tmp_path / "r.html").stat().st_mode) == mode
    assert (tmp_path / "r.html").read_text() == "<html>2</html>"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png", "r.html", "r.json"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_reports_written_by_the_plugin_are_readable_by_others(tmp_path, umask):
    from pytest_convdiff import reporting
    from pytest_convdiff.core.results import CheckResult

    umask(0o022)
    pr = PairResult("p", "a", "b", None, None, [CheckResult("nmse", "", 0.001, 0.01, "passed", "")])
    lines = reporting.write_outputs([pr], json_path=tmp_path / "r.json", html_path=tmp_path / "r.html")
    assert not [m for level, m in lines if level == "error"], lines
    for name in ("r.json", "r.html"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def test_failed_atomic_write_leaves_nothing_behind(tmp_path):
    with pytest.raises(RuntimeError), atomic.atomic_open(tmp_path / "x.txt") as fh:
        fh.write("half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- 3. greedy decoding warnings


def test_greedy_decode_raises_no_future_warning(tiny_models: Path):
    pytest.importorskip("transformers", reason="transformers is not installed")
    from pytest_convdiff.backends import hf

    backend = hf.load(tiny_models / "tiny-llama", {})
    try:
        prefixes = [backend.tokenize("The quick brown fox jumps over")[:7], backend.tokenize("Hello")[:2]]
        steps = 4
        want = []
        for prefix in prefixes:
            ids = list(prefix)
            for _ in range(steps):
                ids.append(int(np.argmax(np.asarray(backend.forward(ids, hidden_states=False).logits[-1]))))
            want.append(ids[len(prefix):])
        got: list[list[int]] = [[] for _ in prefixes]

        def pick(i: int, logits: np.ndarray) -> int:
            token = int(np.argmax(logits))
            got[i].append(token)
            return token

        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            warnings.simplefilter("error", DeprecationWarning)
            backend.greedy_decode(prefixes, steps, pick)
        assert got == want
    finally:
        backend.close()


# --------------------------------------------------------------------------- 4. a manifest's bad corpus


@pytest.mark.parametrize(("value", "shown"), [
    ('"no-such-corpus.jsonl"', "no-such-corpus.jsonl"),
    ("3", "3"),
    ('""', "''"),
])
def test_bad_manifest_corpus_names_file_entry_key_and_accepted_values(tmp_path, value, shown):
    f = tmp_path / "z.convdiff.toml"
    f.write_text(f'[[pair]]\nid = "first"\nmodel_a = "a"\nmodel_b = "b"\n\n'
                 f'[[pair]]\nid = "second"\nmodel_a = "a"\nmodel_b = "c"\ncorpus = {value}\n')
    with pytest.raises(ConvdiffError) as exc:
        load_manifest(f)
    msg = str(exc.value)
    assert str(f) in msg and "pair 2" in msg and "'second'" in msg and "corpus" in msg and shown in msg, msg
    assert '"default"' in msg and '"quick"' in msg, msg
    assert "--convdiff-prompts" not in msg, msg


def test_manifest_corpus_values_that_are_accepted(tmp_path):
    (tmp_path / "prompts.txt").write_text("one prompt\nanother prompt\n")
    f = tmp_path / "z.convdiff.toml"
    f.write_text('[defaults]\ncorpus = "quick"\n\n[[pair]]\nmodel_a = "a"\nmodel_b = "b"\n\n'
                 '[[pair]]\nmodel_a = "a"\nmodel_b = "c"\ncorpus = "prompts.txt"\n\n'
                 '[[pair]]\nmodel_a = "a"\nmodel_b = "d"\ncorpus = "default"\n')
    first, second, third = load_manifest(f)
    assert first.corpus == "quick" and second.corpus == str(tmp_path / "prompts.txt") and third.corpus == "default"


@pytest.mark.usefixtures("subprocess_env")
def test_manifest_with_a_missing_corpus_is_a_collection_error_naming_it(pytester):
    pytester.makefile(".convdiff.toml", zoo="""
        [[pair]]
        id = "zoo-pair"
        model_a = "models/a"
        model_b = "models/b"
        corpus = "corpora/missing.jsonl"
    """)
    res = pytester.runpytest_subprocess("zoo.convdiff.toml", "-p", "no:randomly")
    out = res.stdout.str()
    assert res.ret == pytest.ExitCode.INTERRUPTED, out
    assert "ERROR collecting zoo.convdiff.toml" in out, out
    assert str(pytester.path / "zoo.convdiff.toml") in out and "'zoo-pair'" in out, out
    assert "corpus" in out and "missing.jsonl" in out and '"quick"' in out, out
    assert "--convdiff-prompts" not in out, out


# --------------------------------------------------------------------------- 5. file-only checks once


def test_file_only_checks_are_evaluated_once_per_pair_with_one_bounds_row(tiny_models, tmp_path, monkeypatch):
    """They were evaluated before the models ran and again after, possibly against another bounds row."""
    from dataclasses import replace

    from pytest_convdiff import checks, compare
    from pytest_convdiff.runner import RunSettings

    calls: list[dict] = []
    real = checks.families()

    def counted(f):
        def evaluate(ctx):
            calls.append(dict(ctx.bounds.to_dict()))
            return f.evaluate(ctx)
        return replace(f, evaluate=evaluate)

    patched = tuple(counted(f) if not f.needs_outputs else f for f in real)
    monkeypatch.setattr(checks, "families", lambda: patched)
    res = compare(tiny_models / "tiny-llama", tiny_models / "tiny-llama-bf16", corpus="quick",
                  cache_dir=tmp_path / "cache", settings=RunSettings(runtime_twin="off"))
    assert not res.error and any(c.name == "config" for c in res.checks)
    file_only = [f for f in real if not f.needs_outputs]
    assert len(calls) == len(file_only), f"{len(calls)} evaluations of {len(file_only)} file-only families"
    assert all(c == res.bounds for c in calls)


# --------------------------------------------------------------------------- 6. one pair id


def test_the_library_names_a_pair_as_the_command_line_and_manifests_do(tiny_models, tmp_path):
    """compare() wrote ``a--b`` where the plugin and manifests write ``a-vs-b``: baselines did not carry over."""
    from pytest_convdiff import compare
    from pytest_convdiff.core.pair_id import unique_pair_ids

    a, b = tiny_models / "tiny-llama", tiny_models / "tiny-llama-bf16"
    res = compare(a, b, static_only=True, cache_dir=tmp_path / "cache")
    (expected,) = unique_pair_ids(str(a), [str(b)])
    assert res.id == expected == "tiny-llama-vs-tiny-llama-bf16"
    manifest = tmp_path / "zoo.convdiff.toml"
    manifest.write_text(f'[[pair]]\nmodel_a = "{a}"\nmodel_b = "{b}"\n')
    (entry,) = load_manifest(manifest)
    assert entry.id == expected
