"""``position[kl]``, ``position[rfn]``: error must not grow with position beyond what the same pair
shows at short positions.

Quantisation noise is the same at position 50 and at position 3,000; a wrong rope base, lost rope
scaling or an ignored sliding window is invisible early and grows with position. So the check
compares, within the prompts long enough to reach past 1k tokens (the same texts early and late,
so the kind of text does not masquerade as position), each later bucket's error with the error of
their first 256 positions. A floor (a quarter of the class's own budget) keeps ratios of small
errors (an F16 file's KV-cache rounding) from counting as growth.
"""

from __future__ import annotations

import math
from typing import Any

from ..core.bounds import BoundSpec
from ..core.results import CORRECTNESS, UPPER, CheckId, CheckResult
from .base import CheckFamily, EvalContext, PlanContext, fmt, judge, per_class, skipped

KL, RFN = CheckId("position", "kl"), CheckId("position", "rfn")
BOUNDS = (BoundSpec("position_growth", UPPER, per_class(*[3.0] * 6),
                    "a later position bucket's error over the same prompts' first 256 positions"),)
EARLY = 256  # positions that make the reference level
# Growth counts only once the error is a real part of the class's budget: llama.cpp's F16 KV cache alone
# makes a correct F16 file's last-layer rfn grow 3.5x from 0.0017 to 0.006 over 3k positions (budget 0.02).
FLOOR = 0.25


def plan(ctx: PlanContext) -> list[CheckId]:
    ids = [KL]
    if ctx.settings.hidden_states and ctx.num_layers:
        ids.append(RFN)
    return ids


def growth(profile: list[dict[str, Any]], key: str, floor: float) -> tuple[float, str | None, float]:
    """(worst ratio of a later bucket to the early level, that bucket, the early level)."""
    early = [b for b in profile if b["stop"] is not None and b["stop"] <= EARLY]
    late = [b for b in profile if b["start"] >= EARLY]
    n_early = sum(b["positions"] for b in early)
    if not early or not late or not n_early:
        return math.nan, None, math.nan
    level = sum(b[key] * b["positions"] for b in early) / n_early  # position-weighted mean
    if math.isnan(level):
        return math.nan, None, level
    worst, where = 0.0, None
    for b in late:
        v = b[key]
        ratio = math.inf if math.isnan(v) else v / max(level, floor)
        if ratio > worst or where is None:
            worst, where = ratio, b["bucket"]
    return worst, where, level


def _line(profile: list[dict[str, Any]], key: str) -> str:
    return ", ".join(f"{b['bucket']}: {fmt(b[key])} ({b['positions']} pos.)" for b in profile)


def _judge(ctx: EvalContext, cid: CheckId, profile: list[dict[str, Any]], key: str, floor: float,
           what: str) -> CheckResult:
    if not profile:
        return skipped(cid, "no prompt reaches past 1,024 tokens: the corpus cannot show growth with position "
                            "(the default corpus has one; --convdiff-max-tokens may have cut it)")
    ratio, where, level = growth(profile, key, floor)
    if where is None:
        return skipped(cid, f"the long prompts do not reach past {EARLY} positions")
    extra = (f"Worst bucket {where}: {what} there is {fmt(ratio)}x the level of the first {EARLY} positions "
             f"({fmt(level)}; floor {fmt(floor)}).\nBy position (prompts past 1k tokens): {_line(profile, key)}.\n"
             "Quantisation noise does not grow with position; a wrong rope base or rope scaling, or a sliding "
             "window ignored, does.")
    return judge(ctx, cid, "position_growth", ratio,
                 f"Growth of {what} with position (worst later bucket over the first {EARLY} positions)", extra,
                 kind=CORRECTNESS, details={"profile": profile})


def evaluate(ctx: EvalContext) -> list[CheckResult]:
    out: list[CheckResult] = []
    planned = {str(c) for c in ctx.planned("position")} if ctx.plan is not None else {str(KL), str(RFN)}
    m = ctx.pair_metrics.logits
    if str(KL) in planned:
        if m is None:
            out.append(skipped(KL, "logits were not compared"))
        else:
            out.append(_judge(ctx, KL, m.position_profile.get("long", []), "kl_mean", ctx.bounds.kl_mean * FLOOR,
                              "mean KL"))
    if str(RFN) in planned:
        lm = ctx.pair_metrics.layers
        if lm is None:
            out.append(skipped(RFN, "hidden states were not compared"))
        else:
            out.append(_judge(ctx, RFN, lm.position_profile, "rfn", ctx.bounds.rfn * FLOOR,
                              "the last layer's rfn"))
    return out


FAMILY = CheckFamily("position", 45, plan, evaluate, BOUNDS, doc="error that grows with position")
