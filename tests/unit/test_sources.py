"""The checks ask a source what it gives (``ModelSpec.can``), never which kind or backend it is.

So a backend that declares the twin capabilities gets a runtime twin and twin-judged budgets whatever its name,
and a new kind of source is one ``SourceKind`` in ``sources.KINDS``: the planner, the runner and the options
follow from what it declares.
"""

from __future__ import annotations

import types
from pathlib import Path

import pytest

from pytest_convdiff import sources
from pytest_convdiff.backends import registry
from pytest_convdiff.backends.base import TWIN_GUEST, TWIN_HOST, WEIGHTS_TWIN
from pytest_convdiff.checks import applies, families
from pytest_convdiff.checks.runtime import _applies, twin_spec
from pytest_convdiff.comparison import quality_policy, quality_reported
from pytest_convdiff.core.corpus import Corpus, Prompt
from pytest_convdiff.runner import ModelSpec, run_model


def _backend(name: str, capabilities: frozenset[str], suffix: str) -> registry.BackendSpec:
    module = types.ModuleType(f"fake_{name}")
    module.CAPABILITIES = capabilities  # type: ignore[attr-defined]
    module.HINTS = {"causality": "mind option {role}"}  # type: ignore[attr-defined]
    import sys

    sys.modules[module.__name__] = module
    return registry.BackendSpec(name, module.__name__, detect=lambda p: p.suffix == suffix, priority=100)


@pytest.fixture
def fake_backends(tmp_path: Path):
    """A host (runs other weights in its architecture) and a guest (its tensors load into a host), named so that
    no check could know them."""
    host = _backend("acme-host", frozenset({TWIN_HOST, WEIGHTS_TWIN}), ".host")
    guest = _backend("acme-guest", frozenset({TWIN_GUEST, WEIGHTS_TWIN}), ".guest")
    plain = _backend("acme-plain", frozenset(), ".plain")
    for b in (host, guest, plain):
        registry.register(b)
    paths = {}
    for suffix in ("host", "guest", "plain"):
        paths[suffix] = tmp_path / f"m.{suffix}"
        paths[suffix].write_bytes(b"x")
    yield {k: ModelSpec(str(v)) for k, v in paths.items()}
    for b in (host, guest, plain):
        registry.unregister(b.name)


def test_a_runtime_twin_follows_the_declared_capabilities_not_the_backend_names(fake_backends):
    host, guest, plain = fake_backends["host"], fake_backends["guest"], fake_backends["plain"]
    assert host.resolved_backend() == "acme-host" and host.can(TWIN_HOST) and not host.can(TWIN_GUEST)
    assert _applies(host, guest) is None
    t = twin_spec(host, guest, emulate=True)
    assert t.backend == "acme-host" and t.options["weights_from"] == guest.path  # A's own backend hosts it
    assert "cannot load into A's architecture" in _applies(host, plain)
    assert ": its runtime is A's own" in _applies(host, host)
    assert "cannot run B's weights" in _applies(plain, guest)


def test_the_quality_budgets_are_reported_where_b_has_a_twin(fake_backends):
    assert quality_reported(fake_backends["guest"]) and quality_reported(fake_backends["host"])
    assert not quality_reported(fake_backends["plain"])
    assert quality_policy(fake_backends["host"], fake_backends["plain"]) == {"quality_reported": False}


def test_a_backend_gives_its_own_advice():
    assert "--convdiff-option-b no_sdpa=true" in registry.get("exllamav2").hint("causality", role="b")
    assert registry.get("llama.cpp").hint("causality", role="b") == ""


def test_a_model_gives_what_its_backend_declares(tiny_ref):
    a = ModelSpec(str(tiny_ref))
    assert a.kind() is sources.MODEL
    assert a.can(sources.RUNS, sources.TENSORS, sources.CONFIG, sources.OUTPUTS, TWIN_HOST, WEIGHTS_TWIN)
    assert not a.can(TWIN_GUEST) and not a.can(sources.OWN_CORPUS)
    assert all(applies(f, a) for f in families())


def test_a_new_kind_of_source_is_one_declaration(tmp_path: Path, monkeypatch, tiny_corpus):
    """A kind that stores only scores, like a base file, added in one place: it cannot be model B, only the
    families that read scores are planned against it, and the runner serves its run without loading anything."""
    path = tmp_path / "scores.acme"
    path.write_bytes(b"scores")
    served = types.SimpleNamespace(meta={})
    kind = sources.SourceKind("acme score file", frozenset({sources.SCORES}), lambda s: s.path.endswith(".acme"),
                              display="acme scores", only_as_a="an acme score file holds scores only",
                              open_run=lambda spec, corpus, settings: served)
    monkeypatch.setattr(sources, "KINDS", (kind, *sources.KINDS))
    spec = ModelSpec(str(path))
    assert spec.kind() is kind and spec.resolved_backend() == "acme scores"
    assert spec.can(sources.SCORES) and not spec.can(sources.OUTPUTS)
    assert {f.name for f in families() if applies(f, spec)} == {"logits", "baseline"}
    assert quality_policy(spec, spec)["quality_why"].startswith("A is a acme score file")
    with pytest.raises(Exception, match="holds scores only, so it can only be model A"):
        run_model(spec, tiny_corpus, None, feed=object())  # type: ignore[arg-type]
    assert run_model(spec, tiny_corpus, None) is served  # type: ignore[arg-type]


@pytest.fixture
def tiny_corpus() -> Corpus:
    return Corpus((Prompt("p0", "Hello there"),))
