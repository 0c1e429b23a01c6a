"""The sharded-zoo GitHub Actions workflow that docs/ci.md shows (examples/github/convdiff-zoo.yml): the
same text in both places, actions pinned by commit hash, least permissions, and clean under a workflow
linter (zizmor) and GitHub's workflow schema where those tools are installed (they are in ``.[dev]``)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / "examples" / "github" / "convdiff-zoo.yml"


def _tool(name: str) -> str:
    found = shutil.which(name) or (Path(sys.executable).parent / name)
    if not Path(found).exists():
        pytest.skip(f"{name} is not installed (pip install -e '.[dev]' installs it)")
    return str(found)


def test_docs_show_the_example_workflow_verbatim():
    docs = (ROOT / "docs" / "ci.md").read_text(encoding="utf-8")
    m = re.search(r"<!-- zoo-workflow -->\s*```yaml\n(.*?)```", docs, re.S)
    assert m and m.group(1) == WORKFLOW.read_text(encoding="utf-8")


def test_actions_are_pinned_and_permissions_least():
    import yaml

    text = WORKFLOW.read_text(encoding="utf-8")
    uses = re.findall(r"uses:\s*(\S+)", text)
    assert uses and all(re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", u) for u in uses), uses
    doc = yaml.safe_load(text)
    assert doc["permissions"] == {"contents": "read"}
    assert doc["jobs"]["shard"]["strategy"]["matrix"]["shard"] == [1, 2, 3, 4]
    assert "--convdiff-shard" in text and "python -m pytest_convdiff merge" in text


def test_the_workflow_passes_zizmor_and_the_workflow_schema():
    lint = subprocess.run([_tool("zizmor"), "--offline", "--min-severity", "low", str(WORKFLOW)],
                          capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    schema = subprocess.run([_tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", str(WORKFLOW)],
                            capture_output=True, text=True)
    assert schema.returncode == 0, schema.stdout + schema.stderr


def test_ci_runs_the_readmes_setup_and_test_commands_word_for_word():
    """What CI runs is what a reader of the README runs: its two commands are the setup script and the suite."""
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S)
    assert block, "the README starts with a bash block of its two commands"
    main_job, tests = block.group(1).strip().splitlines()
    assert main_job.startswith("bash scripts/setup.sh && ")
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    assert "bash scripts/setup.sh" in ci and tests in ci, (tests, ci)
