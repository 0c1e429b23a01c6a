"""``ModelSpec`` takes what a notebook passes: a ``pathlib.Path`` is held as the str the cache keys and stores."""

from __future__ import annotations

import json
from pathlib import Path

from pytest_convdiff.runner import ModelSpec


def test_a_path_is_kept_as_a_string_so_that_the_spec_serialises(tmp_path: Path):
    spec = ModelSpec(tmp_path / "b.gguf", "llama.cpp", {"flash_attn": "auto"})
    assert spec.path == str(tmp_path / "b.gguf") and isinstance(spec.path, str)
    assert json.loads(json.dumps(spec.__dict__))["path"] == str(tmp_path / "b.gguf")
    assert ModelSpec(str(tmp_path / "b.gguf"), "llama.cpp", {"flash_attn": "auto"}) == spec
