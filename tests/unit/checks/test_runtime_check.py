"""The runtime family's cost follows its setting: with the twin off, none of its three runs is made."""

from __future__ import annotations

import pytest

from pytest_convdiff import compare
from pytest_convdiff.runner import RunSettings

pytestmark = pytest.mark.gguf


def test_the_twin_runs_only_when_it_is_on(tiny_models, tmp_path, monkeypatch):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip install 'pytest-convdiff[llama-cpp]'")
    from pytest_convdiff.checks import runtime

    calls: list[str] = []
    real = runtime._runs  # private: the one place the twin's three model runs are made

    def counted(*args, **kwargs):
        calls.append("runs")
        return real(*args, **kwargs)

    monkeypatch.setattr(runtime, "_runs", counted)
    a, b = tiny_models / "tiny-llama", tiny_models / "gguf" / "tiny-f16.gguf"
    off = compare(a, b, corpus="quick", cache_dir=tmp_path, settings=RunSettings(runtime_twin="off"))
    assert off.error is None and off.verdict == "pass"
    assert calls == [] and not [c for c in off.checks if c.name == "runtime"]
    on = compare(a, b, corpus="quick", cache_dir=tmp_path, settings=RunSettings(runtime_twin="quick"))
    assert calls == ["runs"]
    assert {c.param: c.outcome for c in on.checks if c.name == "runtime"} == {"logits": "passed", "layers": "passed"}
