"""Logit checks over every position of every prompt: ``finite``, ``nmse``, ``topk[1]``, ``topk[5]``,
``kl[mean]``, ``kl[p99]``, ``ppl[ratio]``. They bound numeric drift, so their defaults depend on the
precision class (a correct 4-bit file is legitimately further from its reference than an F16 one)."""

from __future__ import annotations

import math

from .. import sources
from ..core.bounds import BoundSpec
from ..core.results import BUDGET, LOWER, UPPER, CheckId, CheckResult
from .base import CheckFamily, EvalContext, Findings, PlanContext, fmt, judge, per_class, result, skipped

FINITE = CheckId("finite")
NMSE = CheckId("nmse")
TOP1, TOP5 = CheckId("topk", "1"), CheckId("topk", "5")
KL_MEAN, KL_P99 = CheckId("kl", "mean"), CheckId("kl", "p99")
PPL = CheckId("ppl", "ratio")
ALL = [FINITE, NMSE, TOP1, TOP5, KL_MEAN, KL_P99, PPL]

BOUNDS = (
    BoundSpec("nmse", UPPER, per_class(1e-2, 1e-2, 1e-2, 0.12, 0.4, 0.8),
              "NMSE of B's logits, mean((B-A)^2)/var(A) over all positions; never looser than llama.cpp's 1e-2 "
              "for float and 8-bit models"),
    BoundSpec("kl_mean", UPPER, per_class(2e-3, 5e-3, 1.5e-2, 0.12, 0.5, 1.0), "mean KL(P_A || P_B), nats"),
    BoundSpec("kl_p99", UPPER, per_class(1e-2, 3e-2, 0.2, 0.8, 3.0, 5.0),
              "99th percentile of per-position KL: one bad position in a hundred"),
    BoundSpec("top1", LOWER, per_class(0.95, 0.9, 0.9, 0.55, 0.33, 0.2), "fraction of positions with the same argmax"),
    BoundSpec("top5", LOWER, per_class(0.9, 0.85, 0.85, 0.65, 0.45, 0.3), "mean |top5(A) & top5(B)| / 5"),
    BoundSpec("ppl_ratio", UPPER, per_class(1.01, 1.02, 1.03, 1.15, 1.35, 1.8), "PPL(B) / PPL(A) on the corpus"),
)


def _percentiles(p: dict[str, float]) -> str:
    return ", ".join(f"p{q} {fmt(v)}" for q, v in p.items()) or "n/a"


def _profile(m) -> str:
    rows = m.position_profile.get("all") or []
    return ", ".join(f"{r['bucket']} {fmt(r['kl_mean'])}" for r in rows) or "n/a"


def plan(ctx: PlanContext) -> list[CheckId]:  # noqa: ARG001 - always planned
    return list(ALL)


def vocab_mismatch(ctx: EvalContext) -> str | None:
    """Why the logits were not compared; from the shapes (a streamed B recorded its own, it stored no logits)."""
    va, vb = ctx.a.vocab_width(), ctx.b.vocab_width()
    if va == vb:
        return None
    return (f"vocabulary sizes differ (A {va} vs B {vb}, reported {ctx.a.info.get('vocab_size')} vs "
            f"{ctx.b.info.get('vocab_size')}): logits cannot be compared position by position")


def evaluate(ctx: EvalContext) -> list[CheckResult] | Findings:
    m = ctx.pair_metrics.logits
    if m is None:
        why = vocab_mismatch(ctx) or "logits were not compared"
        return [skipped(cid, why, kind=BUDGET) for cid in ALL]
    worst_prompt = max(m.per_prompt.items(), key=lambda kv: (math.isnan(kv[1]["nmse"]), kv[1]["nmse"]))
    shape = f"{m.positions} positions of {len(ctx.corpus)} prompts, A's token ids fed to both"
    if m.base_file:
        shape = (f"{m.positions} positions: the second half of {len(ctx.corpus)} chunks of the base file, "
                 "as llama-perplexity scores them")
    out = []
    if m.nonfinite_a or m.nonfinite_b:
        out.append(result(FINITE, float(m.nonfinite_a + m.nonfinite_b), False,
                          f"Non-finite logits: {m.nonfinite_a} in A, {m.nonfinite_b} in B; first at "
                          f"{m.nonfinite_where}. NaN or Inf never satisfies a bound."))
    else:
        out.append(result(FINITE, 0.0, True, f"all logits finite ({shape})"))
    if m.base_file:
        out.append(skipped(NMSE, f"A is a llama-perplexity base file: it holds log-probabilities rounded to 16 bits "
                                 f"within 16 nats of each row's top, not logits, so NMSE of the logits is not "
                                 f"defined against it; KL, top-K and PPL are ({shape}).", kind=BUDGET))
    else:
        out.append(_nmse(ctx, m, shape, worst_prompt))
    for cid, bound, value in ((TOP1, "top1", m.topk_ordered[1]), (TOP5, "top5", m.topk_overlap[5])):
        k = int(cid.param)
        wp, wv = m.topk_worst_prompt.get(k, ("", math.nan))
        what = "Top-1 agreement (same argmax)" if k == 1 else "Top-5 overlap (mean |top5(A) & top5(B)| / 5)"
        if k > 1 and m.base_file:  # the rows keep 16 nats: below that, A's order is the file's rounding
            what += (", A's top 5 from the base file's rows (where fewer than 5 entries lie within 16 nats of the "
                     "top, the rest of A's top 5 is arbitrary)")
        failing = round((1 - m.topk_ordered[k]) * m.positions)
        same = (f"Same top-1: {100 * m.topk_ordered[1]:.2f} ± {100 * m.top1_stderr:.2f} % (binomial standard "
                f"error).\n") if k == 1 and not math.isnan(m.top1_stderr) else ""
        extra = same + (f"{failing} of {m.positions} positions have a different {'argmax' if k == 1 else 'ordered top-5'}; "
                 f"worst prompt {wp!r} ({fmt(wv)} ordered agreement).\n"
                 f"Ordered top-K agreement K=1..5: {', '.join(fmt(v) for v in m.topk_ordered.values())}.")
        out.append(judge(ctx, cid, bound, value, what, extra))
    over = (" (over the base entries within 16 nats of each row's top, as llama-perplexity sums it)"
            if m.base_file else "")
    out.append(judge(ctx, KL_MEAN, "kl_mean", m.kl_mean, f"Mean KL(P_A || P_B) over {m.positions} positions{over}",
                     f"max {fmt(m.kl_max)} at {m.kl_max_where}; percentiles (as llama-perplexity reports them): "
                     f"{_percentiles(m.kl_percentiles)}.\nKL mean by position: {_profile(m)}."))
    out.append(judge(ctx, KL_P99, "kl_p99", m.kl_p99, "99th percentile of per-position KL(P_A || P_B)",
                     f"max {fmt(m.kl_max)} at {m.kl_max_where}; mean {fmt(m.kl_mean)}."))
    out.append(judge(ctx, PPL, "ppl_ratio", m.ppl_ratio, "Perplexity ratio PPL(B) / PPL(A) on the corpus",
                     f"PPL(A) {fmt(m.ppl_a)}, PPL(B) {fmt(m.ppl_b)}; change in the true token's probability "
                     f"(delta p): mean {fmt(m.delta_p_mean)}, RMS {fmt(m.delta_p_rms)}, percentiles "
                     f"{_percentiles(m.delta_p_percentiles)}.{_llama_errors(m.llama)}"))
    return Findings(out, metrics=m.to_dict())


def _nmse(ctx: EvalContext, m, shape: str, worst_prompt: tuple[str, dict[str, float]]) -> CheckResult:
    return judge(
        ctx, NMSE, "nmse", m.nmse, f"NMSE of B's logits against A's ({shape})",
        f"NMSE {fmt(m.nmse)} = {fmt(m.nmse_db)} dB ({m.nmse_label}); max abs difference {fmt(m.max_abs)} at "
        f"{m.max_abs_where}; mean abs difference {fmt(m.mean_abs)}"
        + (" (A stored compact: NMSE from a sketch, within 1 %; the max over A's top 256 logits and a sample of "
           "positions, the mean over that sample; --convdiff-store full for exact values)" if m.compact else "")
        + ".\n"
        f"Worst prompt: {worst_prompt[0]!r} (NMSE {fmt(worst_prompt[1]['nmse'])}).",
        details={"nmse_db": m.nmse_db, "label": m.nmse_label, "max_abs": m.max_abs, "mean_abs": m.mean_abs})


def _llama_errors(lp: dict) -> str:
    """llama-perplexity's figures with their standard errors, so a value is read against its noise."""
    if not lp:
        return ""
    return (f"\nAs llama-perplexity states them ({lp['count']} scored tokens, ± one standard error): PPL ratio "
            f"{lp['ppl_ratio']:.6f} ± {lp['ppl_ratio_err']:.6f}, ln ratio {lp['ln_ppl_ratio']:.6f} ± "
            f"{lp['ln_ppl_ratio_err']:.6f}, mean KLD {lp['kld_mean']:.6f} ± {lp['kld_err']:.6f}, RMS Δp "
            f"{100 * lp['rms_p_diff']:.3f} ± {100 * lp['rms_p_diff_err']:.3f} %, same top p "
            f"{100 * lp['same_top']:.3f} ± {100 * lp['same_top_err']:.3f} %.")


FAMILY = CheckFamily("logits", 30, plan, evaluate, BOUNDS, doc="numeric agreement of the logits",
                     reads=frozenset({sources.SCORES}))
