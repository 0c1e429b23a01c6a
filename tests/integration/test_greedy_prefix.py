"""B's greedy run continues from the state B's run over the prompt kept (``backends.base.PrefixKeeper``).

The greedy check teacher-forces B on A's continuation of a prompt's first tokens. B's run over the corpus computed
those tokens already (B is causal), so the llama.cpp backend keeps its KV cache after them and the forced run
computes only A's continuation. What that must give: the records a run from scratch gives, with the prefix not run
again."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_convdiff import ModelSpec, RunSettings, load_corpus, run_model
from pytest_convdiff.store.cache import Cache

pytestmark = pytest.mark.gguf


@pytest.fixture(scope="module")
def pair(tiny_models: Path) -> tuple[ModelSpec, ModelSpec]:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    gguf = tiny_models / "gguf" / "tiny-f32.gguf"
    if not gguf.is_file():
        pytest.skip("the tiny GGUF fixtures are not built (python -m fixtures.gguf_writer)")
    return ModelSpec(str(tiny_models / "tiny-llama")), ModelSpec(str(gguf), options={"flash_attn": False})


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
