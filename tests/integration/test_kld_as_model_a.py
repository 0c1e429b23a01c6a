"""A llama-perplexity ``--kl-divergence-base`` file as ``--model-a``, with files the real llama.cpp pipeline made.

The base is written from the tiny transformers checkpoint the pipeline converts (``kld base``, as
llama-perplexity writes one); B is each pipeline GGUF. Against a base file the pair's items are the logits
family's, scored as llama-perplexity scores them (``perplexity.score`` is that definition, and
tests/integration/test_kld_file.py checks it against the tool itself).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fixtures import pipeline
from pytest_convdiff import compare, perplexity
from pytest_convdiff.core.corpus import load_corpus

pytestmark = [pytest.mark.gguf, pytest.mark.usefixtures("subprocess_env")]

CORRECT, DEFECT = "tiny.q4_k_m.gguf", "tiny-bug-scale-1.25-blk-3-ffn-down.q4_k_m.gguf"


@pytest.fixture(scope="module")
def files(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pipeline.skip_without_tools()
    pipeline.build(["tiny"], log=lambda _line: None)
    found = {Path(e["file"]).name: Path(e["path"]) for e in pipeline.load_manifest() if e["model"] == "tiny"}
    base = tmp_path_factory.mktemp("kld") / "tiny.kld"
    text = " ".join(p.text for p in load_corpus(None))
    perplexity.write_base(tiny_models / "tiny-llama", text, base, n_ctx=128, n_chunks=4)
    return {"base": base, "correct": found[CORRECT], "defect": found[DEFECT]}


def _stats(m: dict[str, Any]) -> dict[str, float]:
    return {k: m[k] for k in ("count", "kld_mean", "same_top", "rms_p_diff", "ppl_ratio", "kld_err")}


def test_compare_against_a_base_file_is_llama_perplexitys_scoring(files, tmp_path):
    res = compare(files["base"], files["correct"], cache_dir=tmp_path / "cache")
    assert res.error is None and res.verdict == "pass", res.error
    assert res.backend_a == "llama-perplexity base"
    assert [c.id for c in res.checks] == ["finite", "nmse", "topk[1]", "topk[5]", "kl[mean]", "kl[p99]",
                                          "ppl[ratio]"]  # nothing that needs A's config, weights or states
    nmse = next(c for c in res.checks if c.id == "nmse")
    assert nmse.outcome == "skipped" and "not logits" in nmse.message
    scored = perplexity.score(files["correct"], files["base"]).to_dict()
    ours = _stats(res.metrics["llama"])
    assert ours["count"] == 4 * (128 - 1 - 64)
    for key, value in _stats(scored).items():
        assert ours[key] == pytest.approx(value, rel=1e-6), key
    assert ours["kld_mean"] > 1e-3  # a Q4_K_M of a random-weight model: not a comparison of zeros


def test_a_model_of_another_vocabulary_errors_its_pair_saying_so(files, tmp_path):
    other = next(Path(e["path"]) for e in pipeline.load_manifest() if e["model"] == "tiny-gemma3") \
        if any(e["model"] == "tiny-gemma3" for e in pipeline.load_manifest()) else None
    if other is None:
        pytest.skip("the tiny-gemma3 pipeline files are not built")
    res = compare(files["base"], other, cache_dir=tmp_path / "cache")
    assert res.verdict == "error" and "base file written for a vocabulary of" in res.error
    assert all(c.outcome == "error" for c in res.checks)  # never a pass made of skips


def test_bounds_the_user_sets_judge_a_pair_and_the_rest_is_reported(pytester, files):
    """No bound comes from a base file's contents (it holds no weights to make twins from): the figures are
    reported, and a bound the user sets (as with ``kld score --max-kld``) gates. Under xdist the same."""
    correct = compare(files["base"], files["correct"], cache_dir=pytester.path / "c0").metrics["llama"]["kld_mean"]
    defect = compare(files["base"], files["defect"], cache_dir=pytester.path / "c0").metrics["llama"]["kld_mean"]
    assert correct < defect  # the defect (one tensor x1.25) adds KL on top of the quantisation's
    bound = (correct + defect) / 2
    args = [f"--model-a={files['base']}", f"--model-b={files['correct']}", f"--model-b={files['defect']}",
            "--convdiff-bound", f"kl_mean={bound}", "-p", "no:randomly"]
    res = pytester.runpytest_subprocess(*args, "--convdiff-json", "r.json", "-rA")
    out = res.stdout.str()
    assert res.ret == 1, out[-3000:]
    res.assert_outcomes(passed=11, failed=1, skipped=2)
    assert "FAILED convdiff[tiny.kld-vs-tiny-bug-scale-1.25-blk-3-ffn-down.q4_k_m.gguf]::kl[mean]" in out
    assert "as llama-perplexity sums it) is " in out and f"above the bound {bound:.4g}" in out
    assert "llama-perplexity base -> llama.cpp" in out and "quality: PPL ratio" in out
    rep = json.loads((pytester.path / "r.json").read_text())
    p99 = next(c for p in rep["pairs"] for c in p["checks"] if c["name"] == "kl" and c["param"] == "p99")
    assert p99["outcome"] == "passed" and p99["details"]["reported"] is True  # and says why it is reported:
    assert "A is a llama-perplexity base file, which holds no weights" in p99["message"]
    verdicts = {p["model_b"].rsplit("/", 1)[-1]: p["verdict"] for p in rep["pairs"]}
    assert verdicts == {CORRECT: "pass", DEFECT: "fail"}

    xd = pytester.runpytest_subprocess(*args, "-n", "2", "--convdiff-json", "x.json")
    assert xd.ret == 1, xd.stdout.str()[-3000:]
    again = json.loads((pytester.path / "x.json").read_text())
    assert {p["model_b"].rsplit("/", 1)[-1]: p["verdict"] for p in again["pairs"]} == verdicts


def test_a_base_file_as_model_b_or_to_save_from_is_a_usage_error(pytester, files):
    res = pytester.runpytest_subprocess(f"--model-a={files['correct']}", f"--model-b={files['base']}")
    err = res.stderr.str()
    assert res.ret == 4 and "--model-b" in err and "give it as --model-a" in err and "Traceback" not in err
    assert len((res.stdout.str() + err).strip().splitlines()) <= 15
    res = pytester.runpytest_subprocess(f"--model-a={files['base']}", f"--model-b={files['correct']}",
                                        "--convdiff-save-reference=ref.safetensors")
    assert res.ret == 4 and "--convdiff-save-reference needs the reference model" in res.stderr.str()
    cut = pytester.path / "cut.kld"
    cut.write_bytes(files["base"].read_bytes()[:5000])
    res = pytester.runpytest_subprocess(f"--model-a={cut}", f"--model-b={files['correct']}")
    assert res.ret == 4 and "--model-a" in res.stderr.str() and "truncated" in res.stderr.str()
