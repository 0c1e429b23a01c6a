"""``baseline[<metric>]`` (regression mode, ``--convdiff-baseline``): each metric must not be worse than
the value stored for this pair beyond its tolerance. A model zoo must not get worse when the
converter changes, even where every pair is still inside its absolute bounds."""

from __future__ import annotations

from .. import sources
from ..core.results import BUDGET, FAILED, PASSED, CheckId, CheckResult
from ..store import baseline_file
from .base import CheckFamily, EvalContext, Findings, PlanContext, skipped

ORDER = 90  # after every family whose metrics it compares


def plan(ctx: PlanContext) -> list[CheckId]:
    return [CheckId("baseline", name) for name in baseline_file.METRICS] if ctx.baseline is not None else []


def _tolerance_text(kind: str, tol: float) -> str:
    return f"{tol:.0%}" if kind == "rel" else f"abs {tol:g}"


def evaluate(ctx: EvalContext) -> list[CheckResult] | Findings:
    cfg = ctx.baseline
    if cfg is None:
        return []
    res = ctx.result
    if cfg.update:
        return [CheckResult("baseline", name, None, None, PASSED,
                            f"baseline for {res.id} will be updated in {cfg.path}", kind=BUDGET)
                for name in baseline_file.METRICS]
    stored = baseline_file.load(cfg.path).get(res.id)
    if stored is None:
        return [skipped(CheckId("baseline", name), f"no baseline for pair {res.id} in {cfg.path}; record one with "
                        "--convdiff-baseline-update", kind=BUDGET) for name in baseline_file.METRICS]
    current = baseline_file.snapshot(res) or {}
    found = baseline_file.regressions(current, stored, cfg.tolerances)
    out = []
    for name, worse_up in baseline_file.METRICS.items():
        r = found[name]
        kind, tol = cfg.tolerances[name]
        tol_text = _tolerance_text(kind, tol)
        value = r["new"] if name != "rfn" else None  # rfn is a curve: its worst layer is in the message
        if r["worse"]:
            msg = (f"{name} got worse than the baseline for {res.id} beyond the tolerance ({tol_text}): "
                   f"baseline {r['old']!r}, now {r['new']!r}, allowed {'<=' if worse_up else '>='} {r['allowed']!r}."
                   + (f"\n{r['detail']}" if r["detail"] else "")
                   + f"\nBaseline recorded {stored.get('recorded', '?')} from {stored.get('model_b')}.\n"
                   f"Accept the new values with --convdiff-baseline-update, or widen it with "
                   f"--convdiff-baseline-tolerance {name}:PCT%.")
            out.append(CheckResult("baseline", name, r["new"], r["allowed"], FAILED, msg,
                                   direction="upper" if worse_up else "lower", kind=BUDGET))
        else:
            out.append(CheckResult("baseline", name, value, r["allowed"], PASSED,
                                   f"{name}: within {tol_text} of the baseline ({r['old']!r} -> {r['new']!r})"
                                   + (f"; {r['detail']}" if r["detail"] else ""),
                                   direction="upper" if worse_up else "lower", kind=BUDGET))
    return Findings(out, baseline_rfn=stored.get("rfn"))


FAMILY = CheckFamily("baseline", ORDER, plan, evaluate, doc="no regression against stored metrics",
                     reads=frozenset({sources.SCORES}))
