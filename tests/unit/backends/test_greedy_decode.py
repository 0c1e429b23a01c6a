"""Incremental greedy decoding (the greedy check's A side) equals one full forward per new token.

Backends decode on their KV cache (transformers: all prefixes in one left-padded batch) instead of
re-running the whole prefix for every token; this holds them to the slow, obviously right loop.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pytest_convdiff.backends import backend_module
from pytest_convdiff.core import metrics
from pytest_convdiff.core.corpus import default_corpus

STEPS = 12


def _by_full_forwards(backend, prefixes: list[list[int]]) -> list[list[int]]:
    out = []
    for prefix in prefixes:
        ids = list(prefix)
        for _ in range(STEPS):
            logits = np.asarray(backend.forward(ids, hidden_states=False).logits[-1])
            ids.append(int(metrics.topk_indices(logits[None, :], 1)[0, 0]))
        out.append(ids[len(prefix):])
    return out


def _incremental(backend, prefixes: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    got: list[list[int]] = [[] for _ in prefixes]
    rows: list[int] = []

    def pick(i: int, logits: np.ndarray) -> int:
        rows.append(logits.shape[0])
        token = int(metrics.topk_indices(np.asarray(logits)[None, :], 1)[0, 0])
        got[i].append(token)
        return token

    backend.greedy_decode(prefixes, STEPS, pick)
    return got, rows


def _prefixes(backend) -> list[list[int]]:
    # uneven lengths, so the batched path pads (and masks) the shorter prefixes
    texts = [p.text for p in default_corpus() if p.kind != "long"][:3]
    return [backend.tokenize(t)[:n] for t, n in zip(texts, (40, 17, 6), strict=True)]


@pytest.mark.parametrize("backend_name, model", [
    ("transformers", "tiny-llama"),
    ("llama.cpp", "gguf/tiny-f32.gguf"),
])
def test_incremental_greedy_equals_full_forwards(tiny_models: Path, backend_name: str, model: str):
    if backend_name == "llama.cpp":
        pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
        if not (tiny_models / model).is_file():
            pytest.skip("GGUF fixtures not built (python -m fixtures.gguf_writer)")
    else:
        pytest.importorskip("transformers", reason="transformers is not installed")
    backend = backend_module(backend_name).load(tiny_models / model, {})
    try:
        prefixes = _prefixes(backend)
        assert len({len(p) for p in prefixes}) == 3
        want = _by_full_forwards(backend, prefixes)
        got, rows = _incremental(backend, prefixes)
        assert got == want
        assert len(rows) == 3 * STEPS and set(rows) == {backend.info.vocab_size}
        # the KV cache is left clean: a plain forward afterwards is unaffected
        again = np.asarray(backend.forward(prefixes[0], hidden_states=False).logits[-1])
        assert int(np.argmax(again)) == want[0][0]
    finally:
        backend.close()
