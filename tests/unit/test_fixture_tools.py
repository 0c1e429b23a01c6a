"""fixtures/llama_tools.py: a tool built once on a machine serves every later clone from the user's cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fixtures import llama_tools


def test_a_clone_copies_the_tool_from_the_users_cache_instead_of_building_it(tmp_path, monkeypatch):
    if llama_tools.why_not_buildable() is not None:
        pytest.skip(llama_tools.why_not_buildable())
    monkeypatch.setenv("CONVDIFF_TOOLS_CACHE", str(tmp_path / "user-cache"))
    monkeypatch.setattr(llama_tools, "TOOLS_DIR", tmp_path / "clone" / "_tools")
    kept = llama_tools.user_cache_path()
    assert kept.parent == tmp_path / "user-cache" and llama_tools._version() in kept.name
    kept.parent.mkdir(parents=True)
    kept.write_text("#!/bin/sh\necho built once\n")
    kept.chmod(0o755)
    monkeypatch.setattr(llama_tools.subprocess, "run", lambda *a, **k: pytest.fail(f"built again: {a}"))
    path = llama_tools.build_perplexity(log=lambda _line: None)
    assert path.parent == tmp_path / "clone" / "_tools" and path.read_text() == kept.read_text()
    assert os.access(path, os.X_OK)


def test_an_empty_setting_turns_the_users_cache_off(monkeypatch):
    if llama_tools.why_not_buildable() is not None:
        pytest.skip(llama_tools.why_not_buildable())
    monkeypatch.setenv("CONVDIFF_TOOLS_CACHE", "")
    assert llama_tools.user_cache_path() == Path()
