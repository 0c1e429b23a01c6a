"""One code-version scheme: a stored result is keyed on the source of every module it depends on and the
versions of its libraries (core.code_version), so an edit or an upgrade never serves a stale result."""

from __future__ import annotations

import pytest

from pytest_convdiff import checks
from pytest_convdiff.comparison import family_measurement_key
from pytest_convdiff.core import code_version
from pytest_convdiff.runner import ModelSpec


@pytest.fixture
def fake_sources(monkeypatch):
    """Edit a module's source or a library's version without touching the installed files."""
    edits: dict[str, bytes] = {}
    versions: dict[str, str] = {}
    # private: the file and version readers are the seams that simulate an edit or an upgrade
    real_source, real_version = code_version._module_source, code_version._library_version
    monkeypatch.setattr(code_version, "_module_source", lambda name: edits.get(name) or real_source(name))
    monkeypatch.setattr(code_version, "_library_version", lambda dist: versions.get(dist) or real_version(dist))
    return edits, versions


def test_the_digest_follows_each_named_module_and_library(fake_sources):
    edits, versions = fake_sources
    mods = ("pytest_convdiff.core.metrics", "pytest_convdiff.core.kernels")
    before = code_version.code_digest(mods, ("numpy",))
    assert code_version.code_digest(reversed(mods), ("numpy",)) == before  # order does not matter
    edits["pytest_convdiff.core.kernels"] = b"# edited\n"
    after_edit = code_version.code_digest(mods, ("numpy",))
    versions["numpy"] = "0.0.1"
    after_upgrade = code_version.code_digest(mods, ("numpy",))
    assert len({before, after_edit, after_upgrade}) == 3
    edits["pytest_convdiff.core.corpus"] = b"# not named: no effect\n"
    assert code_version.code_digest(mods, ("numpy",)) == after_upgrade


@pytest.mark.parametrize("changed", ["pytest_convdiff.checks._config_fields", "pytest_convdiff.core.config_fields",
                                     "pytest_convdiff.backends.hf_config", "pytest_convdiff.backends.gguf_config",
                                     "pytest_convdiff.backends.gguf_header", "pytest_convdiff.backends.hfdir",
                                     "pytest_convdiff.store.reference", "library:transformers"])
def test_the_config_measurement_is_keyed_on_every_module_that_reads_the_files(fake_sources, tiny_models, changed):
    """It was keyed on _config_fields.py alone: an edit of the GGUF header reader served a stale result. The
    readers are the backends' (hf_config, gguf_config), the field vocabulary core's (config_fields)."""
    edits, versions = fake_sources
    family = {f.name: f for f in checks.families()}["config"]
    a, b = ModelSpec(str(tiny_models / "tiny-llama")), ModelSpec(str(tiny_models / "tiny-llama-bf16"))
    before = family_measurement_key(family, a, b)
    if changed.startswith("library:"):
        versions[changed.partition(":")[2]] = "0.0.0-test"
    else:
        edits[changed] = b"# edited\n"
    assert family_measurement_key(family, a, b) != before


def test_the_weights_measurement_follows_llama_cpp_and_its_readers(fake_sources, tiny_models):
    edits, versions = fake_sources
    family = {f.name: f for f in checks.families()}["weights"]
    a, b = ModelSpec(str(tiny_models / "tiny-llama")), ModelSpec(str(tiny_models / "tiny-llama-bf16"))
    before = family_measurement_key(family, a, b)
    versions["llama-cpp-python"] = "0.0.0-test"  # its quantiser makes the twins
    assert family_measurement_key(family, a, b) != before
