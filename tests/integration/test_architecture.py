"""The shape of the project: an inert plugin, one pipeline, check families found by the registry,
and the bugs the architecture review found (each test fails on the code before the redesign)."""

from __future__ import annotations

import json
import math
import re
import sys
import textwrap
from pathlib import Path

import pytest

from pytest_convdiff import checks
from pytest_convdiff.checks import layers
from pytest_convdiff.checks.base import EvalContext, PlanContext
from pytest_convdiff.core import metrics
from pytest_convdiff.core.bounds import Bounds
from pytest_convdiff.core.corpus import Corpus, Prompt
from pytest_convdiff.core.results import ERROR, FAILED, LOWER, UPPER, CheckId, PairResult
from pytest_convdiff.runner import RunSettings

ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- an inert plugin


def test_a_run_without_convdiff_options_imports_creates_and_registers_nothing(pytester):
    pytester.makepyfile(test_plain="""
        import sys

        def test_plain():
            loaded = sorted(m for m in sys.modules if m.startswith("pytest_convdiff"))
            assert "numpy" not in sys.modules, "the plugin imported numpy"
            assert loaded == ["pytest_convdiff", "pytest_convdiff.options", "pytest_convdiff.plugin",
                              "pytest_convdiff.plugin.options"], loaded
    """)
    res = pytester.runpytest_subprocess("-p", "no:randomly")
    res.assert_outcomes(passed=1)
    assert not (pytester.path / ".pytest_cache" / "d" / "convdiff").exists()
    markers = pytester.runpytest_subprocess("--markers").stdout.str()
    assert "@pytest.mark.convdiff:" in markers
    assert "@pytest.mark.slow" not in markers and "@pytest.mark.gpu" not in markers


def test_reports_are_written_without_the_terminal_plugin(pytester, tiny_models, shared_cache, subprocess_env):
    res = pytester.runpytest_subprocess(
        "--model-a", str(tiny_models / "tiny-llama"), "--model-b", str(tiny_models / "tiny-llama-bf16"),
        "--convdiff-cache-dir", str(shared_cache), "--convdiff-json", "r.json", "-p", "no:terminal",
        "-p", "no:randomly")
    assert res.ret == 0
    (pair,) = json.loads((pytester.path / "r.json").read_text())["pairs"]
    assert pair["verdict"] == "pass" and pair["checks"]


# --------------------------------------------------------------------------- the registry


def test_every_bound_is_declared_once_with_a_direction_and_a_default_per_class():
    table = checks.bound_table()
    assert {"nmse", "kl_mean", "kl_p99", "top1", "top5", "ppl_ratio", "rfn", "subblock_jump", "causality"} <= set(
        table.names())
    assert table.specs["top1"].direction == LOWER and table.specs["rfn"].direction == UPPER
    assert table.row("q4").rfn > table.row("float").rfn  # a looser row for a less precise class


def test_a_new_family_is_one_module(tmp_path, monkeypatch):
    """Dropping one module into the package adds its items, its bound and its results."""
    (tmp_path / "zz_extra.py").write_text(textwrap.dedent("""
        from pytest_convdiff.checks.base import CheckFamily, judge, per_class
        from pytest_convdiff.core.bounds import BoundSpec
        from pytest_convdiff.core.results import UPPER, CheckId

        def plan(ctx):
            return [CheckId("extra", p.id) for p in ctx.corpus]

        def evaluate(ctx):
            return [judge(ctx, CheckId("extra", p.id), "extra_max", 0.5, "a new metric") for p in ctx.corpus]

        FAMILY = CheckFamily("extra", 99, plan, evaluate,
                             (BoundSpec("extra_max", UPPER, per_class(1, 1, 1, 1, 1, 0.1), "new"),))
    """))
    monkeypatch.setattr(checks, "__path__", [*checks.__path__, str(tmp_path)])
    monkeypatch.syspath_prepend(str(tmp_path))
    for fn in (checks.families, checks.bound_table):
        fn.cache_clear()
    try:
        corpus = Corpus([Prompt("p1", "x"), Prompt("p2", "y")])
        plan = checks.plan_all(PlanContext(corpus, None, RunSettings(greedy_tokens=0, causality=False,
                                                                       tokenizer_cases=False)))
        assert [str(c) for c in plan if c.name == "extra"] == ["extra[p1]", "extra[p2]"]
        cls, bounds = checks.default_bounds({"quantization": "Q2_K"}, {})
        assert cls == "q2-3" and bounds["extra_max"] == 0.1
        ctx = EvalContext(None, None, corpus, bounds, RunSettings(), PairResult("p", "a", "b", None, None),
                          lambda: None)
        ctx.specs = checks.bound_table().specs
        family = next(f for f in checks.families() if f.name == "extra")
        (r1, _) = family.evaluate(ctx)
        assert r1.outcome == FAILED and "above the bound 0.1" in r1.message and "extra_max=VALUE" in r1.message
    finally:
        sys.modules.pop("pytest_convdiff.checks.zz_extra", None)
        for fn in (checks.families, checks.bound_table):
            fn.cache_clear()


def test_a_planned_check_without_a_result_is_an_error_not_a_silent_gap(monkeypatch):
    corpus = Corpus([Prompt("p1", "x")])
    ctx = EvalContext(None, None, corpus, checks.bound_table().row("float"), RunSettings(),
                      PairResult("p", "a", "b", None, None), lambda: None, plan=[CheckId("ghost", "1")])
    monkeypatch.setattr(checks, "families", lambda: ())  # no family answers: only the coverage rule runs
    (ghost,) = checks.evaluate_all(ctx, ctx.plan)
    assert ghost.id == "ghost[1]" and ghost.outcome == ERROR and "planned" in ghost.message


def test_bound_overrides_are_validated_against_the_declared_bounds():
    assert checks.parse_bound_overrides("rfn=0.1,kl_mean=0.02") == {"rfn": 0.1, "kl_mean": 0.02}
    with pytest.raises(ValueError, match="unknown bound 'rfnn' \\(did you mean 'rfn'\\?\\)"):
        checks.parse_bound_overrides("rfnn=1")
    with pytest.raises(KeyError):
        Bounds({"rfn": 1.0}).with_overrides({"nope": 2.0})


# --------------------------------------------------------------------------- bugs the review found


def test_sub_block_message_uses_the_median_the_decision_used_even_with_nan_layers():
    """Three NaN layers of six: the message's 'median' was sorted(finite)[len(all)//2] -> IndexError."""
    sub = [math.nan, math.nan, math.nan, 0.01, 0.01, 0.5]
    lm = metrics.LayerMetrics(rfn=[0.001] * 6, worst_row_rfn=[0.0] * 6, worst_where=[None] * 6,
                              nonfinite_a=[0] * 6, nonfinite_b=[0] * 6, sublayers={"mlp": sub},
                              sub_contrib={"mlp": sub})
    assert metrics.typical_level(sub) == pytest.approx(0.01)
    found = metrics.subblock_anomalies(lm.sublayers, 4.0, 0.002, inherited=[0.0] + lm.rfn[:-1])
    assert (5, "mlp", pytest.approx(50.0)) in found
    # private: the anomaly message's wording for a hand-made LayerMetrics (no public way to build one)
    r = layers._anomaly(CheckId("rfn", "layer-5"), 0.001, 5, [("mlp", 50.0)], lm, 0.02, 4.0, "")
    assert r.outcome == FAILED and "median over the layers (0.01)" in r.message
    assert metrics.typical_level([math.nan, math.nan, 1.0]) is None  # too few finite layers to call typical


def test_a_pair_that_cannot_load_prints_one_block_and_one_line_per_item(pytester, tiny_models, tmp_path,
                                                                        subprocess_env):
    broken = tmp_path / "truncated.gguf"  # exists (a missing path is a usage error at start-up) but cannot load
    broken.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(8))  # a readable version, then cut short
    res = pytester.runpytest_subprocess("--model-a", str(tiny_models / "tiny-llama"), "--model-b",
                                        str(broken), "--convdiff-cache-dir", str(tmp_path / "c"),
                                        "-p", "no:randomly")
    full = res.stdout.str()
    # the short summary repeats the first item's message in full where pytest sees a CI (CI=1): count above it
    out = full.split("short test summary info")[0]
    outcomes = res.parseoutcomes()
    assert res.ret == 1 and outcomes["errors"] > 30 and "passed" not in outcomes
    assert out.count("The pair could not be run:") == 1  # the whole reason once ...
    assert out.count("could not be run (the first item") >= outcomes["errors"] - 1  # ... then one line per item
    assert "Traceback" not in full and "_pytest" not in full
    assert len(full.splitlines()) < 4 * outcomes["errors"] + 40  # was ~500 lines per item


def test_the_same_pair_id_in_two_manifests_is_a_collection_error(pytester, tiny_models, subprocess_env):
    for name in ("a.convdiff.toml", "b.convdiff.toml"):
        pytester.path.joinpath(name).write_text(
            f'[[pair]]\nid = "same"\nmodel_a = "{tiny_models / "tiny-llama"}"\n'
            f'model_b = "{tiny_models / "tiny-llama-bf16"}"\n')
    res = pytester.runpytest_subprocess("--collect-only", "-q", "-p", "no:randomly")
    assert res.ret != 0
    out = res.stdout.str()
    assert "pair id 'same' is already used by a pair from" in out and "a.convdiff.toml" in out


def test_unknown_backend_option_is_a_usage_error_listing_the_valid_keys(pytester, tiny_models):
    res = pytester.runpytest_inprocess("--model-a", str(tiny_models / "tiny-llama"), "--model-b",
                                       str(tiny_models / "tiny-llama-bf16"), "--convdiff-option-b", "dtyp=float16")
    assert res.ret == pytest.ExitCode.USAGE_ERROR
    err = res.stderr.str()
    assert "--convdiff-option-b: unknown option 'dtyp'" in err and "dtype" in err and "device" in err


def test_a_backend_that_declares_layer_swap_and_raises_errors_the_pair(pytester, tiny_models, tmp_path,
                                                                      subprocess_env):
    """The runner used to swallow TypeError from forward and call it 'cannot take injected hidden states'."""
    pytester.makeconftest("""
        import pytest_convdiff.backends.hf as hf

        class Broken(hf.TransformersBackend):
            def forward(self, tokens, *, hidden_states=True, inject=None):
                if inject:
                    raise TypeError("bad inject handling")
                return super().forward(tokens, hidden_states=hidden_states)

        hf.load = lambda path, options: Broken(path, options)
    """)
    res = pytester.runpytest_subprocess(
        "--model-a", str(tiny_models / "tiny-llama"), "--model-b", str(tiny_models / "tiny-llama-bf16"),
        "--convdiff-cache-dir", str(tmp_path), "--convdiff-layer-swap", "2", "--convdiff-store", "full", "--convdiff-json", "r.json",
        "--convdiff-prompts", "quick", "-p", "no:randomly")
    assert res.ret == 1
    (pair,) = json.loads((pytester.path / "r.json").read_text())["pairs"]
    assert pair["verdict"] == "error" and "TypeError" in pair["error"] and "bad inject handling" in pair["error"]


def test_the_readme_bounds_table_is_the_declared_bounds():
    """One definition: the README's table is checked against the families' BoundSpecs, direction included."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| class | nmse"))
    header = [c.strip() for c in lines[start].strip("|").split("|")][1:]
    table = checks.bound_table()
    names = []
    for cell in header:
        name, op = cell.rsplit(" ", 1)
        assert table.specs[name].direction == (UPPER if op == "≤" else LOWER), cell
        names.append(name)
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].split()[0]] = [float(c) for c in cells[1:]]
    assert set(rows) == set(checks.bound_table().defaults())
    for cls, values in rows.items():
        assert dict(zip(names, values, strict=True)) == {n: table.row(cls)[n] for n in names}, cls
    rest = set(table.names()) - set(names)
    text = "\n".join(lines)
    for name in rest:  # the bounds that are the same in every class are stated under the table
        (value,) = {table.row(c)[name] for c in rows}
        assert f"`{name} ≤ {value:g}`" in text, name


def readme_bound_names(readme: str) -> list[str]:
    """Bound names in the README's Bounds section: the per-class table's columns, then the rows of the
    table of bounds that are the same in every class (cells like `` `causality ≤ 0.0001` ``)."""
    section = readme.split("\n## Bounds\n", 1)[1].split("\n## ", 1)[0]
    names = []
    for line in section.splitlines():
        if line.startswith("| class |"):
            names += [c.strip().rsplit(" ", 1)[0] for c in line.strip().strip("|").split("|")[1:]]
        elif m := re.match(r"^\|\s*`([a-z][a-z0-9_]*) [≤≥] [^`]+`\s*\|", line):
            names.append(m[1])
    return names


def test_every_declared_bound_is_in_the_readme_bounds_tables():
    """The bound list a user reads is complete: every bound a check family declares (a BoundSpec) is in the
    README's bounds tables, once, with its value and direction when it is the same in every class; and the
    `--convdiff-bound` rows (README and docs/options.md) send the reader to those tables."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = checks.bound_table()
    documented = readme_bound_names(readme)
    declared = set(table.names())
    assert declared, "no BoundSpec found through checks.bound_table()"
    missing = sorted(declared - set(documented))
    assert not missing, f"declared bounds missing from the README's bounds tables: {missing}"
    assert set(documented) <= declared, f"README bounds not declared by any family: {sorted(set(documented) - declared)}"
    assert len(documented) == len(set(documented)), f"a bound is listed twice: {documented}"
    section = readme.split("\n## Bounds\n", 1)[1].split("\n## ", 1)[0]
    for m in re.finditer(r"^\|\s*`([a-z][a-z0-9_]*) ([≤≥]) ([^`]+)`\s*\|", section, re.M):
        spec = table.specs[m[1]]
        assert spec.direction == (UPPER if m[2] == "≤" else LOWER), m[0]
        assert set(spec.defaults.values()) == {float(m[3])}, f"{m[1]}: README {m[3]}, declared {dict(spec.defaults)}"
    rows = {
        "README.md": (readme, "](#bounds)"),
        "docs/options.md": ((ROOT / "docs" / "options.md").read_text(encoding="utf-8"), "](../README.md#bounds)"),
    }
    for where, (text, link) in rows.items():
        row = re.search(r"^\|\s*`--convdiff-bound NAME=VALUE`.*$", text, re.M)
        assert row, f"{where} has no `--convdiff-bound NAME=VALUE` option row"
        assert link in row[0], f"{where}'s --convdiff-bound row does not link the README's bounds tables ({link})"
