"""The terminal summary, the JSON file, JUnit properties and ``write_outputs``, from hand-made results."""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from pytest_convdiff import reporting
from pytest_convdiff.core.results import BUDGET, CORRECTNESS, LOWER, UPPER, CheckResult, PairResult
from pytest_convdiff.errors import ConvdiffError
from pytest_convdiff.reporting import html, jsonfile, rows, terminal
from pytest_convdiff.store import atomic

HAS_MPL = importlib.util.find_spec("matplotlib") is not None
REPORTING_DIR = Path(reporting.__file__).parent


def _check(name: str, param: str, value: float | None, outcome: str = "passed", threshold: float | None = 0.02,
           direction: str | None = UPPER, kind: str = BUDGET, message: str = "m") -> CheckResult:
    return CheckResult(name, param, value, threshold, outcome, message, direction=direction, kind=kind)


def _pair(checks: list[CheckResult], **kw: Any) -> PairResult:
    base: dict[str, Any] = {"id": "p", "model_a": "a", "model_b": "b", "backend_a": "transformers",
                            "backend_b": "llama.cpp", "precision_class": "float", "from_cache": {"A": True, "B": False},
                            "metrics": {"nmse": 0.5, "nmse_db": -3.0, "nmse_label": "poor match", "kl_mean": 0.25,
                                        "ppl_a": 10.0, "ppl_b": 12.5}}
    base.update(kw)
    return PairResult(checks=checks, **base)


def _failing_pair() -> PairResult:
    layers = [{"index": 0, "rfn": 0.001, "rfn_swap": 0.001}, {"index": 1, "rfn": 0.5, "rfn_swap": 0.01}]
    checks = [_check("tokens", "x", 0.0, threshold=0.0, direction=None, kind=CORRECTNESS),
              _check("tokens", "y", 0.0, threshold=0.0, direction=None, kind=CORRECTNESS),
              _check("rfn", "layer-0", 0.001), _check("rfn", "layer-1", 0.5, "failed")]
    return _pair(checks, layers=layers, first_divergent_layer=1, divergent_sublayer="mlp", notes=["a note"])


def _row(lines: list[str], name: str) -> str:
    return next(line for line in lines if line.split()[:1] == [name])


# --------------------------------------------------------------------------- terminal summary


def test_summary_layout():
    lines = terminal.summary_lines([_failing_pair()])
    text = "\n".join(lines)
    assert lines[0] == "FAIL  p  [transformers -> llama.cpp, bounds: float, A from cache]  failed: budget"
    # the quantisation's quality comes where the user looks first: right under the verdict
    assert lines[1] == "      quality: PPL ratio 1.25, KL mean 0.25, costliest layer 1 (adds 0.499 rfn)"
    assert lines[2] == "      check         items  failed  worst value           bound     "
    assert "tokens            2       0  0 " in text  # equal values: no misleading "worst" prompt
    assert _row(lines, "rfn").split() == ["rfn", "2", "1", "0.5", "(layer-1)", "≤", "0.02"]
    assert "      rfn by layer  0:0.001 1:0.5" in lines and "      rfn, layer swap 0:0.001 1:0.01" in lines
    assert "first divergent layer: 1 (mlp first)" in text and "note: a note" in text
    assert lines[-1] == "      NMSE 0.5 (-3 dB, poor match), KL mean 0.25, PPL A 10 B 12.5"


def test_kl_row_shows_the_worst_item_beside_its_own_bound():
    """Bug: the kl row showed the p99 value beside the kl_mean bound, so a passing pair looked failed."""
    pair = _pair([_check("kl", "mean", 0.001, threshold=0.002), _check("kl", "p99", 0.008, threshold=0.01)])
    assert pair.verdict == "pass"
    kl = _row(terminal.summary_lines([pair]), "kl")
    assert "0.008 (p99)" in kl and "≤ 0.01" in kl
    assert "0.002" not in kl  # never the p99 value beside the mean's bound
    (group,) = rows.group_rows(pair)
    assert group.worst_check is pair.check("kl[p99]") and group.failed == 0


def test_worst_is_relative_to_each_bound_and_follows_the_direction():
    # closest to its own bound wins, even though the other value is larger
    near = _pair([_check("kl", "mean", 0.0019, threshold=0.002), _check("kl", "p99", 0.005, threshold=0.01)])
    assert _row(terminal.summary_lines([near]), "kl").split()[3:] == ["0.0019", "(mean)", "≤", "0.002"]
    # a LOWER bound: the smallest value is the worst
    topk = _pair([_check("topk", "1", 0.97, threshold=0.95, direction=LOWER),
                  _check("topk", "5", 0.92, threshold=0.95, direction=LOWER)])
    assert _row(terminal.summary_lines([topk]), "topk").split()[3:] == ["0.92", "(5)", "≥", "0.95"]
    # relative to different LOWER bounds: 0.96 against 0.95 is nearer than 0.91 against 0.85
    mixed = _pair([_check("topk", "1", 0.96, threshold=0.95, direction=LOWER),
                   _check("topk", "5", 0.91, threshold=0.85, direction=LOWER)])
    assert _row(terminal.summary_lines([mixed]), "topk").split()[3:] == ["0.96", "(1)", "≥", "0.95"]
    # NaN never satisfies a bound: it is the worst; items without a value are left out
    nan = _pair([_check("nmse", "a", 0.5, "failed"), _check("nmse", "b", float("nan"), "failed"),
                 _check("nmse", "c", None, "skipped")])
    assert _row(terminal.summary_lines([nan]), "nmse").split()[:5] == ["nmse", "3", "2", "nan", "(b)"]
    # no values at all: "-" and the group's bound
    none = _pair([_check("greedy", "", None, "skipped", threshold=None, direction=None)])
    assert _row(terminal.summary_lines([none]), "greedy").split() == ["greedy", "1", "0", "-", "-"]


def test_summary_of_an_error_pair_is_its_first_error_line():
    pair = _pair([_check("nmse", "", None, "error", threshold=None)], error="ModelLoadError: gone\nTraceback")
    assert pair.verdict == "error"
    assert terminal.summary_lines([pair]) == [
        "ERROR p  [transformers -> llama.cpp, bounds: float, A from cache]", "      error: ModelLoadError: gone"]


def test_summary_names_every_kind_that_failed_and_keeps_pair_order():
    a = _pair([_check("tokens", "x", 3.0, "failed", kind=CORRECTNESS), _check("kl", "mean", 0.5, "failed")], id="a")
    b = _pair([_check("kl", "mean", 0.001)], id="b", from_cache={}, precision_class=None, layers=[])
    lines = terminal.summary_lines([b, a])
    headers = [line for line in lines if not line.startswith(" ")]
    assert headers == ["PASS  b  [transformers -> llama.cpp]",
                       "FAIL  a  [transformers -> llama.cpp, bounds: float, A from cache]  failed: budget, correctness"]
    assert not any("rfn by layer" in line for line in lines)


# --------------------------------------------------------------------------- JSON file


def test_json_round_trip_and_verdict_from_the_checks(tmp_path):
    pair = _failing_pair()
    pair.baseline_rfn = [0.001, None]
    pair.metrics["topk_ordered"] = {"1": 0.9}
    path = jsonfile.write(tmp_path / "out" / "r.json", [pair, _pair([_check("kl", "mean", 0.001)], id="q")])
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]
    doc = json.loads(path.read_text())
    assert doc["version"] == 1 and [p["verdict"] for p in doc["pairs"]] == ["fail", "pass"]
    back = jsonfile.read(path)
    assert back == [PairResult.from_dict(pair.to_dict()), PairResult.from_dict(_pair([_check("kl", "mean", 0.001)],
                                                                                     id="q").to_dict())]
    assert back[0].check("rfn[layer-1]").direction == UPPER and back[0].checks[0].kind == CORRECTNESS
    assert terminal.summary_lines(back) == terminal.summary_lines([pair, _pair([_check("kl", "mean", 0.001)], id="q")])
    # a stored verdict is not trusted: it is always computed from the checks
    doc["pairs"][0]["verdict"] = "pass"
    path.write_text(json.dumps(doc))
    assert jsonfile.read(path)[0].verdict == "fail"


@pytest.mark.parametrize("text", ["not json {", "[1, 2]", '{"version": 2, "pairs": []}', '{"version": 1}',
                                  '{"version": 1, "pairs": [{"id": "x"}]}'])
def test_reading_something_else_names_the_file(tmp_path, text):
    path = tmp_path / "other.json"
    path.write_text(text)
    with pytest.raises(jsonfile.ReportFormatError, match="other.json is not a convdiff JSON report") as exc:
        jsonfile.read(path)
    assert isinstance(exc.value, ConvdiffError) and isinstance(exc.value, ValueError)


def _only_file(directory: Path, name: str, content: str) -> None:
    """The directory holds just the target with its old content: no temporary file left behind."""
    assert sorted(p.name for p in directory.iterdir()) == [name]
    assert (directory / name).read_text() == content


def test_json_write_failures_keep_the_old_file_and_leave_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    path.write_text("old")
    unserialisable = _pair([_check("kl", "mean", 0.001)], metrics={"what": object()})
    with pytest.raises(TypeError):
        jsonfile.write(path, [unserialisable])
    _only_file(tmp_path, "r.json", "old")

    def no_rename(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", no_rename)  # the temporary file is written, then the rename fails
    with pytest.raises(OSError, match="No space left"):
        jsonfile.write(path, [_failing_pair()])
    _only_file(tmp_path, "r.json", "old")


# --------------------------------------------------------------------------- JUnit properties


def test_junit_item_properties():
    c = _check("rfn", "layer-1", 0.5, "failed", message="Relative Frobenius error")
    props = reporting.item_properties(c)
    assert props[:2] == [("convdiff_rfn", "0.5"), ("convdiff_bound", "0.02")]
    name, blob = props[2]
    assert name == "convdiff" and " " not in blob.replace("Relative Frobenius error", "")  # compact
    assert CheckResult.from_dict(json.loads(blob)) == c
    # no value, no bound: only the whole result
    bare = reporting.item_properties(_check("greedy", "", None, "skipped", threshold=None, direction=None))
    assert [n for n, _ in bare] == ["convdiff"]
    # a bound without a value is still reported; NaN is not valid JSON and becomes null
    nan = reporting.item_properties(_check("nmse", "", float("nan"), "failed"))
    assert nan[0] == ("convdiff_nmse", "nan") and json.loads(nan[2][1])["value"] is None


# --------------------------------------------------------------------------- write_outputs


def _pairs() -> list[PairResult]:
    return [_failing_pair(), _pair([_check("kl", "mean", 0.001)], id="q|x", notes=["B's <bos>"])]


def test_write_outputs_writes_everything_asked_for(tmp_path):
    summary = tmp_path / "step-summary.md"
    summary.write_text("earlier step\n")
    msgs = reporting.write_outputs(_pairs(), json_path=tmp_path / "r.json", html_path=tmp_path / "r.html",
                                   github_step_summary=summary)
    assert (reporting.INFO, f"JSON report written to {tmp_path / 'r.json'}") in msgs
    assert (reporting.INFO, f"HTML report written to {tmp_path / 'r.html'}") in msgs
    assert (reporting.INFO, "summary appended to $GITHUB_STEP_SUMMARY") in msgs
    assert all(level == reporting.INFO for level, _ in msgs), msgs
    assert jsonfile.read(tmp_path / "r.json") == [PairResult.from_dict(p.to_dict()) for p in _pairs()]
    md = summary.read_text()
    assert md.startswith("earlier step\n## convdiff summary\n") and "2 pairs: 1 passed, 1 failed, 0 errors." in md
    page = (tmp_path / "r.html").read_text()
    assert "q|x" in page
    # with no plot directory asked for, the page still carries its plots (rendered in memory)
    assert page.count("data:image/png;base64,") == (2 if HAS_MPL else 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html", "r.json", "step-summary.md"]
    assert reporting.write_outputs(_pairs()) == []


@pytest.mark.skipif(not HAS_MPL, reason="matplotlib is not installed")
def test_write_outputs_plots_and_embeds_the_same_files(tmp_path):
    msgs = reporting.write_outputs(_pairs(), html_path=tmp_path / "r.html", plot_dir=tmp_path / "plots")
    assert msgs == [("info", f"2 plot(s) written to {tmp_path / 'plots'}"),
                    ("info", f"HTML report written to {tmp_path / 'r.html'}")]
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["p.png", "q_x.png"]
    assert (tmp_path / "r.html").read_text().count("data:image/png;base64,") == 2


def test_write_outputs_keeps_going_after_one_output_fails(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("x")
    old_html = tmp_path / "r.html"
    old_html.write_text("old page")
    summary = tmp_path / "summary.md"

    def broken(*args, **kwargs):
        raise RuntimeError("renderer bug")

    monkeypatch.setattr(html, "render", broken)
    msgs = reporting.write_outputs(_pairs(), json_path=tmp_path / "a-file" / "r.json", html_path=old_html,
                                   plot_dir=tmp_path / "a-file" / "plots", github_step_summary=summary)
    levels = [level for level, _ in msgs]
    errors = [text for level, text in msgs if level == reporting.ERROR]
    assert any(text.startswith(f"could not write the JSON report {tmp_path / 'a-file' / 'r.json'}: ") for text in errors)
    assert f"could not write the HTML report {old_html}: RuntimeError: renderer bug" in errors
    if HAS_MPL:
        assert any(text.startswith("could not write the plots in") for text in errors)
    assert levels[-1] == reporting.INFO and "## convdiff summary" in summary.read_text()  # the last one still ran
    assert (tmp_path / "a-file").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "r.html", "summary.md"]
    assert old_html.read_text() == "old page"  # the previous page is kept, no temporary file beside it


def test_write_outputs_without_matplotlib_warns_and_writes_the_rest(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    msgs = reporting.write_outputs(_pairs(), json_path=tmp_path / "r.json", plot_dir=tmp_path / "plots",
                                   html_path=tmp_path / "r.html")
    assert [level for level, _ in msgs] == ["info", "warning", "info"]
    assert "pip install 'pytest-convdiff[plot]'" in msgs[1][1]
    assert not (tmp_path / "plots").exists() and "data:image/png" not in (tmp_path / "r.html").read_text()
    # an HTML page alone says why it has no plots
    msgs = reporting.write_outputs(_pairs(), html_path=tmp_path / "r2.html")
    assert msgs[0][0] == "warning" and msgs[0][1].startswith("the HTML report has no plots: ")
    assert msgs[1] == ("info", f"HTML report written to {tmp_path / 'r2.html'}")


# --------------------------------------------------------------------------- the package itself


def test_importing_reporting_loads_neither_pytest_nor_matplotlib():
    code = ("import sys, pytest_convdiff.reporting, pytest_convdiff.reporting.plots; "
            "print(sorted(m for m in ('pytest', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_no_module_level_numpy_or_matplotlib_import_in_reporting():
    heavy = {"numpy", "matplotlib"}
    for path in sorted(REPORTING_DIR.glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] in heavy for n in names), f"{path.name} imports {names} at module level"


def test_old_dict_api_is_gone():
    assert importlib.util.find_spec("pytest_convdiff.reporting.extra") is None
    for name in ("item_payload", "merge_payload", "build_pairs", "write_json"):
        assert not hasattr(terminal, name)
    assert replace(_failing_pair(), error="x").verdict == "error"  # the verdict lives on PairResult only


def test_the_reports_say_where_each_model_ran():
    p = _pair([_check("kl", "mean", 0.001)], info_a={"extra": {"device": "cuda:0"}},
              info_b={"extra": {"device": "gpu 0 (all layers offloaded)"}})
    assert "[transformers on cuda:0 -> llama.cpp on gpu 0 (all layers offloaded)," in terminal.summary_lines([p])[0]
    page = html.render([p])
    assert "(transformers on cuda:0)" in page and "(llama.cpp on gpu 0 (all layers offloaded))" in page
    bare = _pair([_check("kl", "mean", 0.001)])  # a report written before devices were recorded
    assert "[transformers -> llama.cpp," in terminal.summary_lines([bare])[0]


def test_quality_is_stated_in_llama_perplexitys_terms_with_errors_when_the_pair_has_them():
    import numpy as np

    from pytest_convdiff.core import llama_stats
    from pytest_convdiff.reporting import rows

    sums = llama_stats.Sums()
    n = 400
    sums.add(llama_stats.TokenScores(np.full(n, 2.1) + np.linspace(0, 0.4, n), np.full(n, 2.0) + np.linspace(0, 0.2, n),
                                     np.linspace(0.0, 0.02, n), np.linspace(-0.01, 0.01, n), np.arange(n) % 5 != 0))
    p = _failing_pair()
    p.metrics = dict(p.metrics or {}, ppl_a=2.0, ppl_b=2.2, llama=sums.stats().to_dict())
    line = rows.quality_line(p)
    # exp(mean nll_Q - mean nll_base) = exp(0.2); RMS of a uniform ramp over ±1 % = 1 % * sqrt(401 / 1197)
    assert line.startswith("quality: PPL ratio 1.221 ± ") and "KLD 0.01 ± 0.00029" in line
    assert "RMS Δp 0.579 ± 0.013 %" in line and "same top p 80.0 ± 2.0 %" in line and line.endswith("(adds 0.499 rfn)")
    table = dict(rows.metric_rows(p))
    assert table["llama: same top p"] == "80 ± 2 %" and table["llama: scored tokens"] == "400"
    assert table["llama: KLD percentiles"].startswith("max: 0.02, 99.9: 0.01998")


def test_a_nan_statistic_back_from_json_renders_as_missing_not_a_crash():
    """A NaN in B makes llama-perplexity's statistics NaN; JSON (the xdist and merge path) brings them back as
    None, and the rows and the HTML page still render, with '-' for them."""
    import numpy as np

    from pytest_convdiff.core import llama_stats
    from pytest_convdiff.reporting import html, rows

    sums = llama_stats.Sums()
    n = 40
    sums.add(llama_stats.TokenScores(np.full(n, np.nan), np.full(n, 2.0), np.full(n, np.nan), np.full(n, np.nan),
                                     np.arange(n) % 2 == 0))
    lp = sums.stats().to_dict()
    back = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in lp.items()}
    back["p_diff_quantiles"] = {k: None for k in lp["p_diff_quantiles"]}
    assert any(v is None for v in back.values())
    table = dict(rows.llama_rows(back))
    assert table["llama: RMS Δp"].startswith("- ± ") and table["llama: same top p"] == "50 ± 8.01 %"
    p = _failing_pair()
    p.metrics = dict(p.metrics or {}, ppl_a=2.0, ppl_b=3.0, llama=back)
    assert "RMS Δp - ± " in rows.quality_line(p)
    assert "llama: mean KLD" in html.render([p])
