"""Shared fixtures for the project's own tests: the tiny models, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import numpy  # noqa: F401 - before any in-process pytester run: numpy cannot be imported twice in
import pytest  # one process, and pytester's in-process runs drop modules first imported inside them

ROOT = Path(__file__).resolve().parent


def _import_the_plugin() -> None:
    """Every module of the plugin, imported before any in-process pytester run (0.4 s; none imports torch,
    transformers or llama_cpp). Such a run drops the modules first imported inside it, so a later import made
    second copies beside modules that kept the first: their classes then failed ``isinstance`` against each
    other (the registry's ``BackendSpec``, ``tensors.GGUFWeights``), and tests failed or passed by their order."""
    import importlib
    import pkgutil

    import pytest_convdiff

    for mod in pkgutil.walk_packages(pytest_convdiff.__path__, "pytest_convdiff."):
        importlib.import_module(mod.name)


_import_the_plugin()

pytest_plugins = ["pytester"]


@pytest.fixture(scope="session")
def tiny_models() -> Path:
    """fixtures/models, built deterministically if missing (a few seconds)."""
    from fixtures.tiny import build

    return build(ROOT / "fixtures" / "models")


@pytest.fixture(scope="session")
def tiny_ref(tiny_models: Path) -> Path:
    return tiny_models / "tiny-llama"


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for every run that only reads results, so each model runs once per test session.

    Its entries are keyed by content, as in production (the models' fingerprints, corpus, settings and code),
    so any test may share it; under xdist the workers share it too (their base temp folders are siblings),
    and its writes are atomic, so two workers that compute the same entry at once both store a whole one."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    path = root / "convdiff-cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture
def subprocess_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plugin runs in subprocesses: quiet, deterministic, single-threaded BLAS is not required."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    monkeypatch.setenv("PYTHONHASHSEED", "0")
    monkeypatch.delenv("PYTEST_ADDOPTS", raising=False)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
