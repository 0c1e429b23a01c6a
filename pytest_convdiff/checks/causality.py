"""``causality[A]``, ``causality[B]``: the logits of the first n tokens must not change when more tokens
follow. A backend whose attention has no causal mask (exllamav2 0.3.2's SDPA path) fails here."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..core import metrics
from ..core.bounds import BoundSpec
from ..core.results import CORRECTNESS, UPPER, CheckId, CheckResult
from ..runner import ProduceContext
from .base import CheckFamily, EvalContext, PlanContext, judge, per_class, skipped

BOUNDS = (BoundSpec("causality", UPPER, per_class(*[1e-4] * 6),
                    "NMSE of a prefix's logits against the same positions of the full run"),)
ROLES = ("A", "B")


def _probe_length(tokens: int) -> int:
    """How many first positions of the longest prompt the causality probe runs alone."""
    return min(128, tokens // 2)


def produce(ctx: ProduceContext) -> dict[str, Any] | None:
    """Logits of the first n tokens must not change when more tokens follow: the longest prompt's first n
    positions run alone, against the full run's first n logits as stored (kept in memory by the runner: a
    streamed B stores none)."""
    if ctx.longest is None or ctx.leading_logits is None or len(ctx.longest[1]) < 8:
        return None
    backend, (pid, tokens) = ctx.backend, ctx.longest
    n = _probe_length(len(tokens))
    stored = ctx.leading_logits[:n]
    prefix = backend.forward(tokens[:n], hidden_states=False).logits
    # float32 holds the stored values (float16 or float32) exactly; nmse sums in float64
    full = np.asarray(stored, dtype=np.float32)
    # rounded as the stored logits were (--convdiff-cache-dtype float16), so storage is not mistaken for leakage
    prefix = np.asarray(np.asarray(prefix, dtype=stored.dtype), dtype=np.float32)
    diff = np.abs(prefix - full)
    worst = int(np.argmax(diff.max(axis=1))) if diff.size else 0
    value = metrics.nmse(full, prefix)
    return {"prompt": pid, "prefix_len": n, "full_len": len(tokens), "nmse": value if not math.isnan(value) else None,
            "max_abs": float(diff.max()) if diff.size else 0.0, "worst_position": worst}


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
        hint = _hint(backend, role)
        extra = (f"Logits of the first {c['prefix_len']} tokens of {c['prompt']!r} change when the other "
                 f"{c['full_len'] - c['prefix_len']} tokens follow (max abs change {c['max_abs']:.4g} at position "
                 f"{c['worst_position']}): model {role} attends to future tokens.\n" + hint)
        out.append(judge(ctx, cid, "causality", value,
                         f"Causality of model {role} ({backend}): NMSE of prefix logits vs the full run",
                         extra.strip(), kind=CORRECTNESS))
    return out



def _hint(backend: str | None, role: str) -> str:
    """The backend's own advice for a model that attends to future tokens (its ``HINTS["causality"]``)."""
    from ..backends import registry

    try:
        return registry.get(backend).hint("causality", role=role.lower()) if backend else ""
    except Exception:  # noqa: BLE001 - advice only: an unknown backend gives none
        return ""

FAMILY = CheckFamily("causality", 60, plan, evaluate, BOUNDS, doc="no attention to future tokens",
                     produce=produce, produce_key="causality", produce_when=lambda settings: settings.causality)
