"""B is loaded once: its run over the corpus also writes the runtime twin's B run (``runner.Companion``).

A causal model's outputs at a prompt's first n positions are those of a run over those n tokens, so B's main
run reduces its outputs at the twin prompts' first positions against T as well. What that must give: the very
entry (and metrics) a separate twin run of B writes, one load of B per pair instead of two, and a companion that
the main run cannot compute (its tokens are not a prefix of the main run's) left to run by itself. The same
reasoning lets the greedy check's B run continue from the state B's run over the prompt kept (last section).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from pytest_convdiff import ModelSpec, RunSettings, compare, load_corpus, run_model
from pytest_convdiff.checks import runtime
from pytest_convdiff.runner import Companion
from pytest_convdiff.store.cache import Cache

pytestmark = pytest.mark.gguf


@pytest.fixture(scope="module")
def pair(tiny_models: Path) -> tuple[ModelSpec, ModelSpec]:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    gguf = tiny_models / "gguf" / "tiny-f16.gguf"
    if not gguf.is_file():
        pytest.skip("the tiny GGUF fixtures are not built (python -m fixtures.gguf_writer)")
    return ModelSpec(str(tiny_models / "tiny-llama")), ModelSpec(str(gguf))


def _twin_runs(a: ModelSpec, b: ModelSpec, cache: Cache, settings: RunSettings, companion: bool):
    """A, T, then B over the corpus (with the twin's B as its companion, or not), then the twin's B run: (B's run
    over the corpus, the twin's B run)."""
    corpus = load_corpus("quick")
    run_a = run_model(a, corpus, cache, settings=settings)
    tw_settings, tw_corpus = runtime.twin_settings(settings), runtime.twin_corpus(corpus, settings)
    run_t = run_model(runtime.twin_spec(a, b), tw_corpus, cache, settings=tw_settings)
    extra = [Companion(tw_corpus, run_t, tw_settings)] if companion else []
    main = run_model(b, corpus, cache, feed=run_a, settings=settings, companions=extra)
    return main, run_model(b, tw_corpus, cache, feed=run_t, settings=tw_settings)


def test_the_companion_is_the_entry_a_separate_run_writes(pair, tmp_path):
    a, b = pair
    main_together, together = _twin_runs(a, b, Cache(tmp_path / "together"), RunSettings(), companion=True)
    main_alone, alone = _twin_runs(a, b, Cache(tmp_path / "alone"), RunSettings(), companion=False)
    # B's rows reduced against T first lend B's own figures to the reduction against A: its metrics unchanged
    assert main_together.meta["pair_metrics"] == main_alone.meta["pair_metrics"]
    assert together.from_cache and not alone.from_cache  # written by B's main run; the other ran by itself
    assert together.meta["companion_of"] == b.path
    assert together.meta["pair_metrics"] == alone.meta["pair_metrics"]
    for key in ("prompts", "pieces", "truncated", "max_tokens", "sublayers", "shapes", "router", "streamed"):
        assert together.meta[key] == alone.meta[key], key
    for pid in together.prompt_ids:
        assert list(together.inputs(pid)) == list(alone.inputs(pid))
        assert list(together.own_tokens(pid)) == list(alone.own_tokens(pid))


def test_a_companion_the_main_run_cannot_compute_runs_by_itself(pair, tmp_path):
    """B's main run cut to 64 tokens cannot give the twin's 1,024: no entry is written for it."""
    a, b = pair
    _, run = _twin_runs(a, b, Cache(tmp_path / "short"), RunSettings(max_tokens=64), companion=True)
    assert run.meta["max_tokens"] == 64 and run.from_cache  # the twin's prompts are cut to 64 as well: a prefix
    _, run = _twin_runs(a, b, Cache(tmp_path / "other"), RunSettings(max_tokens=64), companion=False)
    assert not run.from_cache
    corpus = load_corpus("quick")
    cache = Cache(tmp_path / "mismatch")
    run_a = run_model(a, corpus, cache, settings=RunSettings(max_tokens=64))
    tw = runtime.twin_settings(RunSettings())  # 1,024 tokens: longer than the main run's 64
    run_t = run_model(runtime.twin_spec(a, b), runtime.subset(corpus), cache, settings=tw)
    run_model(b, corpus, cache, feed=run_a, settings=RunSettings(max_tokens=64),
              companions=[Companion(runtime.subset(corpus), run_t, tw)])
    assert not run_model(b, runtime.subset(corpus), cache, feed=run_t, settings=tw).from_cache


def test_a_comparison_loads_b_once(pair, tmp_path, monkeypatch):
    from pytest_convdiff.backends import llamacpp

    loads: list[str] = []
    real = llamacpp.load
    monkeypatch.setattr(llamacpp, "load", lambda path, *args, **kw: (loads.append(str(path)), real(path, *args, **kw))[1])
    a, b = pair
    result = compare(a, b, corpus="quick", cache_dir=tmp_path / "cache")
    assert result.error is None, result.error
    assert {c.id: c.outcome for c in result.checks if c.name == "runtime"} == {
        "runtime[logits]": "passed", "runtime[layers]": "passed"}
    assert loads == [b.path]  # B's main run wrote the twin's B run too
    loads.clear()
    again = compare(a, b, corpus="quick", cache_dir=tmp_path / "cache")
    assert loads == [] and [c.value for c in again.checks] == [c.value for c in result.checks]
    off = compare(a, b, corpus="quick", cache_dir=tmp_path / "off", settings=replace(RunSettings(), runtime_twin="off"))
    assert off.error is None and {c.outcome for c in off.checks if c.name == "runtime"} <= {"skipped"}


def test_a_companion_that_fails_leaves_the_main_run_whole(pair, tmp_path, monkeypatch):
    """A companion is an optimisation: its reduction raising drops it (the twin's B then runs by itself), never
    B's main run."""
    from pytest_convdiff import runner

    def broken(self, *args, **kwargs):
        raise RuntimeError("the companion's reduction failed")

    monkeypatch.setattr(runner._CompanionWriter, "add", broken)
    a, b = pair
    _, run = _twin_runs(a, b, Cache(tmp_path / "broken"), RunSettings(), companion=True)
    assert not run.from_cache and run.meta["pair_metrics"]
    assert not list((tmp_path / "broken").glob(".tmp*"))  # its writer was aborted, nothing half-written is left


def test_t8_runs_on_ts_model_and_gives_what_it_gives_alone(pair, tmp_path, monkeypatch):
    """T and T8 are one checkpoint with one file's weights: within ``sharing_weights`` T8 takes T's model (B's file
    read once) and sets its own roundings; its entry is the one a T8 loaded by itself writes, and the model is
    freed when the block ends."""
    import contextlib
    import gc
    import weakref

    from pytest_convdiff.backends import hf

    a, b = pair
    settings = runtime.twin_settings(RunSettings())
    corpus = runtime.twin_corpus(load_corpus("quick"), RunSettings())
    reads: list[str] = []
    real = hf.TransformersBackend._load_weights_from
    monkeypatch.setattr(hf.TransformersBackend, "_load_weights_from",
                        lambda self, other: (reads.append(str(other)), real(self, other))[1])
    kept: list[weakref.ref] = []

    def t_and_t8(cache: Cache, share: bool):
        with hf.sharing_weights() if share else contextlib.nullcontext():
            run_t = run_model(runtime.twin_spec(a, b), corpus, cache, settings=settings)
            if share:
                kept.append(weakref.ref(hf._kept_slot[0][1][1]))  # T's model, kept for T8
            run_8 = run_model(runtime.twin_spec(a, b, emulate=True), corpus, cache, feed=run_t, settings=settings)
        return run_t, run_8

    shared = t_and_t8(Cache(tmp_path / "shared"), True)
    assert len(reads) == 1  # B's weights read once for both
    gc.collect()
    assert kept and kept[0]() is None and hf._kept_slot == []  # freed on leaving the block
    alone = t_and_t8(Cache(tmp_path / "alone"), False)
    assert len(reads) == 3
    assert shared[1].meta["pair_metrics"] == alone[1].meta["pair_metrics"]  # T8's roundings were set on T's model
    from pytest_convdiff.pair import PairMetrics

    assert PairMetrics.from_dict(shared[1].meta["pair_metrics"]).logits.nmse > 0  # T8 is not T: roundings applied


# --------------------------------------------------------------------------- the greedy check's B run
# The greedy check teacher-forces B on A's continuation of a prompt's first tokens. B's run over the corpus computed
# those tokens already (B is causal), so the llama.cpp backend keeps its KV cache after them
# (``backends.base.PrefixKeeper``) and the forced run computes only A's continuation: the records a run from
# scratch gives, with the prefix not run again.


def _greedy_of_b(pair, cache: Cache, monkeypatch, keep: bool) -> tuple[dict, list[int]]:
    from pytest_convdiff.backends import llamacpp

    a, b = pair
    corpus = load_corpus("quick")
    settings = RunSettings(runtime_twin="off")
    run_a = run_model(a, corpus, cache, settings=settings)
    decoded: list[int] = []
    real = llamacpp.LlamaCppBackend._decode
    monkeypatch.setattr(llamacpp.LlamaCppBackend, "_decode",
                        lambda self, toks, *args, **kw: decoded.append(len(toks)) or real(self, toks, *args, **kw))
    if not keep:
        monkeypatch.setattr(llamacpp.LlamaCppBackend, "keep_prefixes", lambda self, prefixes: None)
    run_b = run_model(b, corpus, cache, feed=run_a, settings=settings)
    monkeypatch.undo()
    return run_b.meta["greedy"], decoded


def test_the_forced_runs_compute_only_as_continuation_and_give_what_runs_from_scratch_give(pair, tmp_path,
                                                                                             monkeypatch):
    kept, decoded = _greedy_of_b(pair, Cache(tmp_path / "kept"), monkeypatch, keep=True)
    scratch, decoded_scratch = _greedy_of_b(pair, Cache(tmp_path / "scratch"), monkeypatch, keep=False)
    assert kept and kept == scratch
    n_new = RunSettings().greedy_tokens
    forced = [r["prefix_len"] + n_new - 1 for r in kept.values()]  # prefix + A's continuation but its last token
    assert all(n in decoded_scratch for n in forced)
    # each forced run from its prefix's last position: n_new tokens, never the prefix again
    assert decoded.count(n_new) - decoded_scratch.count(n_new) == len(kept)
    assert sum(decoded_scratch) - sum(decoded) == sum(r["prefix_len"] - 1 for r in kept.values())
