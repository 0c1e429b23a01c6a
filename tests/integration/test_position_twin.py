"""``position[*]`` consults the runtime twin only for the growth B's weights cannot explain.

A rope base 1 % off is a runtime defect that grows with position: phase error accumulates with distance, the
first 256 positions barely show it. A's code run with B's weights (the twin T) keeps A's rope, so T's error
against A stays flat and B's growth over T's is B's own: the item still fails, and its message shows both
profiles. (The converse, a mixture of experts whose router flips make A's code with B's weights grow just as
B does, is the architecture sweep's: bench/arch_sweep.py, docs/architectures.md.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fixtures import pipeline

pytestmark = pytest.mark.gguf


def test_a_rope_base_one_percent_off_still_fails_position_against_the_twin(shared_cache: Path, tmp_path: Path):
    pipeline.skip_without_tools()
    pipeline.build(["tiny"], log=lambda _line: None)
    from pytest_convdiff import compare

    entry = next(e for e in pipeline.load_manifest() if e["model"] == "tiny" and e["file"].endswith("tiny.f16.gguf"))
    b = tmp_path / "tiny-rope-base-1.01.f16.gguf"

    def edit(fields: dict) -> None:
        fields["llama.rope.freq_base"][0] = float(fields["llama.rope.freq_base"][0]) * 1.01

    pipeline.copy_gguf(Path(entry["path"]), b, edit)
    result = compare(entry["source_path"], b, corpus="quick", cache_dir=shared_cache)
    items = {c.id: c for c in result.checks}
    rfn = items["position[rfn]"]
    assert rfn.outcome == "failed", rfn.message
    twin = rfn.details["twin_profile"]  # B grew past half its bound: the twin's profile was measured
    assert [t["bucket"] for t in twin] == [p["bucket"] for p in rfn.details["profile"]]
    assert "runtime twin" in rfn.message and "beyond what B's weights show" in rfn.message
    # the twin keeps A's rope: its own growth is far below B's, so nearly all of B's growth stands
    assert rfn.value > 0.8 * rfn.details["own_growth"]
    # and a correct F16 of the same model never sends for the twin's long run
    correct = compare(entry["source_path"], entry["path"], corpus="quick", cache_dir=shared_cache)
    ok = {c.id: c for c in correct.checks}["position[rfn]"]
    assert ok.outcome == "passed" and "twin_profile" not in ok.details
