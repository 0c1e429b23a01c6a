"""Markdown summary, plots and HTML report built from ``PairResult`` objects (no models run)."""

from __future__ import annotations

import base64
import copy
import importlib.util
import struct
import sys
from dataclasses import replace
from html.parser import HTMLParser
from typing import Any

import pytest

from pytest_convdiff.core.results import BUDGET, CORRECTNESS, LOWER, UPPER, CheckResult, PairResult
from pytest_convdiff.errors import ConvdiffError
from pytest_convdiff.reporting import html, markdown, plots
from pytest_convdiff.reporting.plots import PlotDependencyError, plot_pairs
from pytest_convdiff.store import atomic

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HAS_MPL = importlib.util.find_spec("matplotlib") is not None
needs_mpl = pytest.mark.skipif(not HAS_MPL, reason="matplotlib is not installed (pip install 'pytest-convdiff[plot]')")
DIRECTION = {"topk": LOWER}  # every other check here must stay at or below its bound
KIND = {"tokens": CORRECTNESS, "rfn": CORRECTNESS}

markdown_summary = markdown.render
html_report = html.render


def _check(name: str, param: str, value: float | None, threshold: float | None, outcome: str,
           message: str = "") -> CheckResult:
    return CheckResult(name, param, value, threshold, outcome, message,
                       direction=DIRECTION.get(name, UPPER) if threshold is not None else None,
                       kind=KIND.get(name, BUDGET))


def _layers(rfns: list[float], attn: list[float] | None = None) -> list[dict[str, Any]]:
    out = []
    for i, r in enumerate(rfns):
        layer = {"index": i, "rfn": r, "rfn_mlp": r * 1.1}
        layer["rfn_attn"] = attn[i] if attn else r * 0.7
        out.append(layer)
    return out


def _metrics(nmse: float, kl_mean: float, top1: float) -> dict[str, Any]:
    return {"positions": 100, "nmse": nmse, "nmse_db": -30.0, "nmse_label": "good match", "kl_mean": kl_mean,
            "kl_p99": kl_mean * 4, "kl_max": kl_mean * 20, "ppl_a": 10.0, "ppl_b": 10.1, "ppl_ratio": 1.01,
            "topk_ordered": {"1": top1, "2": top1 - 0.05}, "topk_overlap": {"1": top1, "2": top1 - 0.01}}


def _pairs() -> list[PairResult]:
    ok_rfn = [0.001, 0.0015, 0.002, 0.0025]
    bad_rfn = [0.001, 0.0015, 0.07, 0.08]
    passing = PairResult(
        id="ref-vs-good.gguf", model_a="/m/ref", model_b="/m/good.gguf",
        backend_a="transformers", backend_b="llama.cpp", precision_class="float",
        layers=_layers(ok_rfn),
        checks=[_check("nmse", "", 1e-5, 1e-2, "passed", "NMSE fine")]
        + [_check("rfn", f"layer-{i}", r, 0.02, "passed", "ok") for i, r in enumerate(ok_rfn)],
        metrics=_metrics(1.6e-5, 7.4e-6, 0.9977), from_cache={"A": True, "B": False},
        notes=["B's BOS <flag> | differs"],
    )
    failing = PairResult(
        id="ref-vs-bad|pipe.gguf", model_a="/m/ref", model_b="/m/bad|pipe.gguf",
        backend_a="transformers", backend_b="llama.cpp",
        first_divergent_layer=2, divergent_sublayer="attention", precision_class="float",
        layers=_layers(bad_rfn, attn=[0.0006, 0.003, 0.18, 0.04]),
        baseline_rfn=ok_rfn,
        checks=[_check("topk", "1", 0.882, 0.95, "failed", "Top-1 agreement is 0.882, below the bound 0.95.\nmore"),
                _check("kl", "mean", 0.003, 0.002, "failed", "Mean KL(P_A || P_B) is 0.003 <above> the bound & more")]
        + [_check("rfn", f"layer-{i}", r, 0.02, "failed" if r > 0.02 else "passed",
                  f"Relative Frobenius error after decoder layer {i} is {r}") for i, r in enumerate(bad_rfn)]
        + [_check("tokens", f"p{i}", 3.0, 0.0, "failed", f"Token ids differ for prompt 'p{i}': A '<s>' vs B 'The'")
           for i in range(30)],
        metrics=_metrics(6.7e-3, 3.0e-3, 0.882),
    )
    error = PairResult(
        id="ref-vs-missing.gguf", model_a="/m/ref", model_b="/m/missing.gguf",
        backend_a="transformers", backend_b="llama.cpp",
        error="ModelLoadError: /m/missing.gguf does not exist <no file>\nTraceback line 2",
        metrics={},
        checks=[_check("nmse", "", None, None, "error", "ModelLoadError: /m/missing.gguf does not exist"),
                _check("kl", "mean", None, None, "error", "ModelLoadError: /m/missing.gguf does not exist")],
    )
    return [passing, failing, error]


def _table_rows(md):
    """Data rows of the overview table (the first table in the document)."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| verdict |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return lines[start], rows


def _cells(row):
    """Split a GFM table row on unescaped pipes."""
    parts, cur, prev = [], "", ""
    for ch in row.strip()[1:-1]:
        if ch == "|" and prev != "\\":
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
        prev = ch
    parts.append(cur.strip())
    return parts


# --------------------------------------------------------------------------- Markdown


def test_markdown_table_has_one_row_per_pair_with_verdict_and_numbers():
    md = markdown_summary(_pairs())
    assert md.startswith("## convdiff summary\n")
    assert "3 pairs: 1 passed, 1 failed, 1 error." in md
    assert "2 pairs: 0 passed, 0 failed, 2 errors." in markdown_summary([_pairs()[2]] * 2)
    header, rows = _table_rows(md)
    head = _cells(header)
    assert head[0] == "verdict" and "first divergent layer" in head and "max rfn" in head and "top-1" in head
    assert len(rows) == 3
    cells = [_cells(r) for r in rows]
    assert all(len(c) == len(head) for c in cells), "an unescaped | would split a row into extra cells"
    ok, bad, err = (dict(zip(head, c, strict=True)) for c in cells)
    assert ok["verdict"] == "**PASS**" and bad["verdict"] == "**FAIL**" and err["verdict"] == "**ERROR**"
    assert ok["A → B"] == "ref → good.gguf" and ok["backends"] == "transformers → llama.cpp"
    assert ok["NMSE"] == "1.6e-05" and ok["KL mean"] == "7.4e-06" and ok["top-1"] == "0.9977"
    assert ok["first divergent layer"] == "-" and ok["failed"] == "0 of 5" and ok["bounds"] == "float"
    assert ok["max rfn"] == "0.0025 (layer 3)"
    assert bad["first divergent layer"] == "2 (attention)" and bad["max rfn"] == "0.08 (layer 3)"
    assert bad["failed"] == "34 of 36" and bad["top-1"] == "0.882"
    assert err["NMSE"] == "-" and err["max rfn"] == "-" and err["failed"] == "2 of 2"


def test_markdown_escapes_pipes_and_html():
    md = markdown_summary(_pairs())
    _, rows = _table_rows(md)
    assert "`ref-vs-bad\\|pipe.gguf`" in rows[1] and "bad\\|pipe.gguf" in rows[1]
    assert "ref-vs-bad|pipe" not in md.replace("\\|", "")  # every pipe in a value is escaped
    # messages in list items: pipes escaped, raw HTML neutralised
    assert "KL(P_A \\|\\| P_B)" in md and "&lt;above&gt; the bound &amp; more" in md
    assert "<above>" not in md and "'<s>'" not in md


def test_markdown_failed_checks_listed_only_for_failing_pairs_and_capped():
    md = markdown_summary(_pairs())
    assert "### PASS" not in md and "ref-vs-good.gguf`\n\n" not in md.split("| **ERROR**")[-1]
    section = md.split("### FAIL `ref-vs-bad\\|pipe.gguf`")[1].split("### ERROR")[0]
    items = [line for line in section.splitlines() if line.startswith("- ")]
    assert "- `topk[1]`: 0.882 (bound ≥ 0.95) — Top-1 agreement is 0.882, below the bound 0.95." in items
    assert any(line.startswith("- `kl[mean]`: 0.003 (bound ≤ 0.002)") for line in items)
    assert "- `rfn[layer-2]`: 0.07 (bound ≤ 0.02) — Relative Frobenius error after decoder layer 2 is 0.07" in items
    assert not any("rfn[layer-1]" in line for line in items)  # passed checks are not listed
    assert "more" not in items[0]  # only the first line of a message
    assert len(items) <= 16
    tokens = [line for line in items if line.startswith("- `tokens[")]
    assert 1 <= len(tokens) < 30
    assert any(line.startswith(f"- … and {30 - len(tokens)} more failing `tokens` checks") for line in items)
    assert "Failed checks (34):" in section
    # the collapsed layer table marks the first divergent layer and the layers over the bound
    assert "<details>" in section and "</details>" in section
    assert "<summary>Per-layer rfn (first divergent layer: 2 (attention))</summary>" in section
    layer_rows = [line for line in section.split("<details>")[1].splitlines() if line.startswith("| ")]
    assert layer_rows[0].startswith("| layer | rfn | rfn_attn | rfn_mlp | baseline rfn |")
    assert layer_rows[3] == "| 2 | 0.07 | 0.18 | 0.077 | 0.002 | **first divergent**, > bound |"
    assert layer_rows[4].endswith("| > bound |") and layer_rows[1].endswith("|  |")


def test_markdown_and_html_show_notes_and_extra_layer_series():
    pairs = _pairs()
    for layer in pairs[1].layers:
        layer["rfn_swap"] = layer["rfn"] / 3
    md = markdown_summary(pairs)
    assert "- `ref-vs-good.gguf`: B's BOS &lt;flag&gt; \\| differs" in md
    assert "| layer | rfn | rfn_attn | rfn_mlp | rfn_swap | baseline rfn |" in md
    page = html_report(pairs)
    assert "<li>B&#x27;s BOS &lt;flag&gt; | differs</li>" in page and "<th>rfn_swap</th>" in page


def test_markdown_error_pair_shows_error_in_a_fence():
    md = markdown_summary(_pairs())
    section = md.split("### ERROR `ref-vs-missing.gguf`")[1]
    assert "~~~\nModelLoadError: /m/missing.gguf does not exist <no file>\nTraceback line 2\n~~~" in section
    assert "All 2 checks of this pair report this error." in section
    assert "<details>" not in section  # no layers


def test_markdown_empty_and_odd_inputs():
    assert "0 pairs" in markdown_summary([])
    p = copy.deepcopy(_pairs()[1])
    p.metrics["topk_ordered"] = {1: 0.5}  # int keys (before a JSON round trip)
    p.layers[3]["rfn"] = float("nan")
    md = markdown_summary([p])
    _, rows = _table_rows(md)
    assert "| 0.5 |" in rows[0]
    assert "| 3 | nan |" in md and "nan" in md.split("<details>")[1]


# --------------------------------------------------------------------------- plots


def _png_size(data):
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _red_pixels(path):
    from matplotlib.image import imread

    img = imread(path)
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    return int(((r > 0.7) & (g < 0.35) & (b < 0.35)).sum())


@needs_mpl
def test_plot_pairs_writes_one_png_per_pair(tmp_path):
    pairs = _pairs()
    pairs[1].metrics["kl_hist"] = {"edges": [1e-6 * 10 ** (i / 2) for i in range(9)],
                                   "counts": [1, 5, 20, 40, 20, 6, 2, 1]}
    for layer in pairs[1].layers:
        layer["rfn_swap"] = layer["rfn"] / 3  # an extra per-layer series is drawn too
    paths = plot_pairs(pairs, tmp_path / "plots")
    assert [p.name for p in paths] == ["ref-vs-good.gguf.png", "ref-vs-bad_pipe.gguf.png", "ref-vs-missing.gguf.png"]
    for path in paths:
        assert path.parent == tmp_path / "plots"
        data = path.read_bytes()
        w, h = _png_size(data)
        assert 600 <= w <= 3000 and 300 <= h <= 2000, (w, h)
        assert 5_000 < len(data) < 2_000_000
    # the failing pair's plot shows more red (verdict, first divergent layer, points over the bound)
    assert _red_pixels(paths[1]) > 1.5 * _red_pixels(paths[0])


@needs_mpl
def test_plot_pairs_unsafe_and_duplicate_ids(tmp_path):
    p = _pairs()[0]
    weird = [replace(p, id="../../etc/passwd"), replace(p, id="a b/c"), replace(p, id="a_b_c"), replace(p, id=""),
             replace(p, id="cost $5 model $x_$", model_b="/m/$b.gguf", error="bad $ in ${path}", layers=[])]
    paths = plot_pairs(weird, tmp_path)  # $ must not start matplotlib mathtext
    assert len({x.name for x in paths}) == 5
    assert all(x.parent == tmp_path and x.suffix == ".png" for x in paths)
    assert paths[0].name == "etc_passwd.png" and paths[3].name == "pair.png"


def test_plot_pairs_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(ImportError, match=r"pip install 'pytest-convdiff\[plot\]'") as exc:
        plot_pairs(_pairs(), tmp_path)
    assert isinstance(exc.value, PlotDependencyError)
    assert not list(tmp_path.iterdir())


@needs_mpl
def test_plot_files_are_written_atomically(tmp_path, monkeypatch):
    (tmp_path / "ref-vs-good.gguf.png").write_bytes(b"old")

    def no_rename(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", no_rename)
    with pytest.raises(OSError, match="No space left"):
        plot_pairs(_pairs(), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["ref-vs-good.gguf.png"]
    assert (tmp_path / "ref-vs-good.gguf.png").read_bytes() == b"old"


@needs_mpl
def test_render_png_is_the_plot_file(tmp_path):
    pair = _pairs()[1]
    (path,) = plot_pairs([pair], tmp_path)
    data = plots.render_png(pair)
    assert data[:8] == PNG_MAGIC and _png_size(data) == _png_size(path.read_bytes())


# --------------------------------------------------------------------------- HTML


class _Checker(HTMLParser):
    VOID = {"meta", "br", "img", "hr", "input", "link"}

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.counts, self.text = [], [], {}, []

    def handle_starttag(self, tag, attrs):
        self.counts[tag] = self.counts.get(tag, 0) + 1
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def _parse(page):
    c = _Checker()
    c.feed(page)
    c.close()
    return c


def test_html_report_is_well_formed_and_escaped():
    pairs = _pairs()
    page = html_report(pairs)
    c = _parse(page)
    assert c.errors == [] and c.stack == []
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page and "<script" not in page
    # overview; the failed pair's failing and folded checks, metrics, layers; the error pair's checks; the passing
    # pair's folded checks, metrics and layers
    assert c.counts["table"] == 1 + 4 + 1 + 3
    text = "".join(c.text)
    for p in pairs:
        assert p.id in text
    assert "ref-vs-bad|pipe.gguf" in page  # no need to escape pipes in HTML
    assert "&lt;above&gt; the bound &amp; more" in page and "<above>" not in page
    assert "A &#x27;&lt;s&gt;&#x27; vs B &#x27;The&#x27;" in page
    assert "&lt;no file&gt;" in page and "<no file>" not in page
    assert "data:image/png" not in page  # no plots given


def test_html_checks_failed_first_with_messages_in_pre():
    page = html_report(_pairs())
    section = page.split('id="pair-0"')[1].split('id="pair-1"')[0]  # failed and errored pairs come first
    checks = section.split('<table class="checks">')[1].split("</table>")[0]
    rows = checks.split("<tr")[2:]
    outcomes = [r.split("<td>")[1].split("</td>")[0] for r in rows]
    assert outcomes == ["failed"] * 34  # the passed items are folded away below
    folded = section.split("<details><summary>2 passed or skipped items</summary>")[1].split("</details>")[0]
    assert folded.count('<tr class="passed">') == 2
    assert "<pre>Top-1 agreement is 0.882, below the bound 0.95.\nmore</pre>" in checks
    assert "≥ 0.95" in checks and "≤ 0.002" in checks
    layers = section.split('<table class="layers">')[1].split("</table>")[0]
    assert '<tr class="divergent">' in layers and "← first divergent" in layers
    assert layers.count('class="num over"') == 2 and "baseline rfn" in layers


def test_html_error_pair_shows_the_error():
    page = html_report(_pairs())
    section = page.split('id="pair-1"')[1].split('id="pair-2"')[0]
    assert '<pre class="error">ModelLoadError: /m/missing.gguf does not exist &lt;no file&gt;\nTraceback line 2</pre>' \
        in section
    assert '<table class="layers">' not in section


@needs_mpl
def test_html_embeds_plots_as_data_uris(tmp_path):
    pairs = _pairs()
    paths = plot_pairs(pairs, tmp_path)
    figures = {p.id: path for p, path in zip(pairs, paths, strict=True)}
    page = html_report(pairs, figures)
    assert page.count('src="data:image/png;base64,') == 3
    assert str(tmp_path) not in page  # self-contained: no file references
    c = _parse(page)
    assert c.errors == [] and c.counts["img"] == 3
    first = page.split('src="data:image/png;base64,')[1].split('"')[0]
    assert base64.b64decode(first)[:8] == PNG_MAGIC


def test_html_missing_plot_file_is_reported_not_raised(tmp_path):
    pairs = _pairs()[:1]
    page = html_report(pairs, {pairs[0].id: tmp_path / "gone.png"})
    assert "could not be read" in page and "data:image/png" not in page
    assert _parse(page).errors == []


def test_html_takes_png_bytes_too():
    pairs = _pairs()[:1]
    page = html_report(pairs, {pairs[0].id: PNG_MAGIC + b"rest"})
    first = page.split('src="data:image/png;base64,')[1].split('"')[0]
    assert base64.b64decode(first) == PNG_MAGIC + b"rest"


def test_markdown_and_html_name_the_kinds_that_failed():
    pairs = _pairs()
    md = markdown_summary(pairs)
    section = md.split("### FAIL")[1].split("### ERROR")[0]
    assert "Kind of failure: budget, correctness." in section
    assert "Kind of failure" not in md.split("### ERROR")[1]  # the model error says it all
    page = html_report(pairs)
    assert "failed: budget, correctness" in page.split('id="pair-0"')[1].split('id="pair-1"')[0]


def test_html_write_keeps_the_old_page_when_rendering_fails(tmp_path, monkeypatch):
    path = tmp_path / "report.html"
    path.write_text("old page")

    def broken(*args, **kwargs):
        raise RuntimeError("renderer bug")

    monkeypatch.setattr(html, "render", broken)
    with pytest.raises(RuntimeError):
        html.write(path, _pairs())
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"] and path.read_text() == "old page"
    monkeypatch.undo()

    def no_rename(src, dst):
        raise OSError(13, "Permission denied")

    monkeypatch.setattr(atomic.os, "replace", no_rename)
    with pytest.raises(PermissionError):
        html.write(path, _pairs())
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"] and path.read_text() == "old page"


def test_step_summary_is_appended_and_untouched_when_rendering_fails(tmp_path, monkeypatch):
    path = tmp_path / "summary.md"
    path.write_text("earlier step\n")
    markdown.append(path, _pairs()[:1])
    text = path.read_text()
    assert text.startswith("earlier step\n## convdiff summary\n") and text.count("## convdiff summary") == 1

    def broken(pairs):
        raise RuntimeError("renderer bug")

    monkeypatch.setattr(markdown, "render", broken)
    with pytest.raises(RuntimeError):
        markdown.append(path, _pairs())
    assert path.read_text() == text


def test_plot_dependency_error_is_a_convdiff_error():
    assert issubclass(PlotDependencyError, ConvdiffError) and issubclass(PlotDependencyError, ImportError)


def test_html_leads_with_the_failures_and_draws_where_they_are():
    """The failing pair and its first failing message come before any passing pair, on the first screen;
    each pair shows its rfn by layer (and, when the data is there, the weights map and KL by position)."""
    pairs = _pairs()
    page = html_report(pairs)
    lead = page.split('<table class="overview">')[0]
    bad = next(p for p in pairs if p.verdict == "fail")
    first = next(c for c in bad.checks if c.outcome == "failed")
    assert f'href="#pair-0">{bad.id}' in lead and f"{first.check_id}: {first.message.splitlines()[0]}" in lead
    assert "ref-vs-missing.gguf" in lead and "ModelLoadError" in lead and "ref-vs-good.gguf" not in lead
    assert f'aria-label="rfn by layer of {bad.id}"' in page
    assert _parse(page).errors == []


def test_figures_draw_the_weights_map_rfn_and_kl_by_position():
    from pytest_convdiff.reporting import figures

    checks = [CheckResult("weights", f"layer-{i}", 0.2, 1.0, "passed", "", {"scores": {
        "self_attn.q_proj.weight": 0.05, "self_attn.k_proj.weight": 3.0 if i == 1 else 0.3, "mlp.up_proj.weight": None}})
        for i in range(3)]
    layers = [{"index": i, "rfn": 0.01 * (i + 1), "rfn_attn": 0.004, "rfn_mlp": 0.02} for i in range(3)]
    profile = {"all": [{"bucket": "0-64", "positions": 64, "kl_mean": 1e-3, "kl_p99": 1e-2},
                       {"bucket": "64-256", "positions": 0}]}
    p = PairResult("p", "a", "b", "transformers", "llama.cpp", checks=checks, layers=layers, bounds={"rfn": 0.02},
                   metrics={"position_profile": profile}, first_divergent_layer=1)
    wm = figures.weights_map(p)
    assert wm is not None and wm.count("<rect") >= 9 + 4  # 3 layers x 3 roles, and the legend
    assert "layer 1 self_attn.k_proj: 3</title>" in wm and 'fill="#cf222e"' in wm  # over the bound: red
    assert "layer 0 mlp.up_proj: no score" in wm
    rfn = figures.rfn_by_layer(p)
    assert rfn.count("<polyline") == 3 and "bound 0.02" in rfn and "first divergent: 1" in rfn
    kl = figures.kl_by_position(p)
    assert kl.count("<rect") == 2 + 2 + 1 and "0-64: KL mean 0.001 (64 positions)" in kl  # empty bucket left out
    empty = PairResult("q", "a", "b", None, None)
    assert figures.weights_map(empty) is None and figures.rfn_by_layer(empty) is None \
        and figures.kl_by_position(empty) is None
