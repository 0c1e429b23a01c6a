"""``causality[A]``, ``causality[B]``: the logits of the first n tokens must not change when more tokens
follow. A backend whose attention has no causal mask (exllamav2 0.3.2's SDPA path) fails here."""

from __future__ import annotations

import math

from ..core.bounds import BoundSpec
from ..core.results import CORRECTNESS, UPPER, CheckId, CheckResult
from .base import CheckFamily, EvalContext, PlanContext, judge, per_class, skipped

BOUNDS = (BoundSpec("causality", UPPER, per_class(*[1e-4] * 6),
                    "NMSE of a prefix's logits against the same positions of the full run"),)
ROLES = ("A", "B")


def plan(ctx: PlanContext) -> list[CheckId]:
    return [CheckId("causality", r) for r in ROLES] if ctx.settings.causality else []


def evaluate(ctx: EvalContext) -> list[CheckResult]:
    runs = (("A", ctx.a), ("B", ctx.b))
    if all(run.causality is None for _, run in runs) and not ctx.planned("causality"):
        return []
    out = []
    for role, run in runs:
        cid = CheckId("causality", role)
        c = run.causality
        if not c:
            out.append(skipped(cid, "no prompt long enough for the probe", threshold=ctx.bounds.causality))
            continue
        value = c["nmse"] if c["nmse"] is not None else math.nan
        backend = run.info.get("backend")
        hint = ""
        if backend == "exllamav2":
            hint = ("exllamav2 without flash-attn computes attention through SDPA without a causal mask; "
                    f"set its no_sdpa option: --convdiff-option-{role.lower()} no_sdpa=true.")
        extra = (f"Logits of the first {c['prefix_len']} tokens of {c['prompt']!r} change when the other "
                 f"{c['full_len'] - c['prefix_len']} tokens follow (max abs change {c['max_abs']:.4g} at position "
                 f"{c['worst_position']}): model {role} attends to future tokens.\n" + hint)
        out.append(judge(ctx, cid, "causality", value,
                         f"Causality of model {role} ({backend}): NMSE of prefix logits vs the full run",
                         extra.strip(), kind=CORRECTNESS))
    return out


FAMILY = CheckFamily("causality", 60, plan, evaluate, BOUNDS, doc="no attention to future tokens")
