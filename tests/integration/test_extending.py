"""docs/extending.md's example family, installed as a package with an entry point, runs on the tiny models:
adding a family is one module (nothing in pytest_convdiff names it)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pytest_convdiff import checks

ROOT = Path(__file__).resolve().parents[2]


def _example() -> str:
    text = (ROOT / "docs" / "extending.md").read_text(encoding="utf-8")
    m = re.search(r"<!-- example-family -->\s*```python\n(.*?)```", text, re.S)
    assert m, "docs/extending.md lost its example family block"
    return m.group(1)


@pytest.fixture
def installed_family(tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "docs_example").mkdir(parents=True)
    (site / "docs_example" / "__init__.py").write_text("")
    (site / "docs_example" / "first_word.py").write_text(_example())
    info = site / "docs_example-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: docs-example\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{checks.ENTRY_POINT_GROUP}]\nfirst_word = docs_example.first_word\n")
    monkeypatch.syspath_prepend(str(site))
    checks.families.cache_clear()
    checks.bound_table.cache_clear()
    yield site
    checks.families.cache_clear()
    checks.bound_table.cache_clear()


def test_the_example_family_is_found_through_its_entry_point(installed_family):
    fam = {f.name: f for f in checks.families()}["first_word"]
    assert fam.produce is not None and any(p.key == "first_word" for p in checks.producers())


@pytest.mark.usefixtures("subprocess_env")
def test_the_example_family_runs_in_a_pytest_session(pytester, installed_family, tiny_models, tmp_path):
    pytester.makeconftest(f"import sys\nsys.path.insert(0, {str(installed_family)!r})\n")
    res = pytester.runpytest_subprocess(
        "--model-a", str(tiny_models / "tiny-llama"), "--model-b", str(tiny_models / "tiny-llama-bf16"),
        "--convdiff-cache-dir", str(tmp_path / "cache"), "--convdiff-prompts", "quick", "--convdiff-json", "r.json",
        "--convdiff-runtime-twin", "off", "-p", "no:randomly", "-k", "first_word or nmse", "-v")
    assert "::first_word PASSED" in res.stdout.str(), res.stdout.str()[-3000:]
    (pair,) = json.loads((pytester.path / "r.json").read_text())["pairs"]
    (item,) = [c for c in pair["checks"] if c["name"] == "first_word"]
    assert item["outcome"] == "passed" and "among A's top five" in item["message"]


def test_a_broken_family_entry_point_is_reported_by_name(tmp_path, monkeypatch):
    from pytest_convdiff.errors import ConvdiffError

    info = tmp_path / "broken-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{checks.ENTRY_POINT_GROUP}]\nghost = no_such_checks_module\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    checks.families.cache_clear()
    try:
        with pytest.raises(ConvdiffError, match="check-family entry point 'ghost'"):
            checks.families()
    finally:
        checks.families.cache_clear()
