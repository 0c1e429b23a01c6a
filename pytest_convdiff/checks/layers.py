"""``rfn[layer-<i>]``: the relative Frobenius error of the hidden state after each decoder layer, and
where a conversion starts to diverge (layer, and attention or MLP).

A layer fails when its rfn exceeds the bound, or when its attention or MLP output error stands out
from that sub-block's typical level over the layers by more than ``subblock_jump`` (a layer-local
defect that the residual stream dilutes below the rfn bound) — unless the weights family found every
tensor of that layer within the error its storage type gives: a correct quantisation can leave a few
sensitive layers standing out (SmolLM2's last two MLPs under Q4_0), and a jump alone is no defect.
"""

from __future__ import annotations

import math

from ..core import metrics
from ..core.bounds import BoundSpec
from ..core.results import BUDGET, CORRECTNESS, FAILED, PASSED, UPPER, CheckId, CheckResult, PairResult
from .base import (
    OVERRIDE_HINT,
    CheckFamily,
    EvalContext,
    Findings,
    PlanContext,
    fmt,
    judge,
    per_class,
    skipped,
)

BOUNDS = (
    BoundSpec("rfn", UPPER, per_class(0.02, 0.05, 0.12, 0.35, 0.6, 1.0),
              "relative Frobenius error of each decoder layer's hidden state"),
    BoundSpec("subblock_jump", UPPER, per_class(4.0, 4.0, 4.0, 5.0, 5.0, 8.0),
              "a layer's attention/MLP error over that sub-block's median over the layers"),
)
_SUB_NAMES = {"attn": "attention", "mlp": "mlp"}


def layer_id(i: int) -> CheckId:
    return CheckId("rfn", f"layer-{i}")


def plan(ctx: PlanContext) -> list[CheckId]:
    if not ctx.settings.hidden_states or not ctx.num_layers:
        return []
    return [layer_id(i) for i in range(ctx.num_layers)]


def layer_mismatch(ctx: EvalContext) -> str | None:
    """Why the layers were not compared; from the shapes (a streamed B recorded its own, it stored no states)."""
    da, db = ctx.a.hidden_dims(), ctx.b.hidden_dims()
    if da is None or db is None:
        return f"model {'A' if da is None else 'B'}'s backend gave no hidden states"
    if da != db:
        return (f"hidden-state shapes differ (A {da[0]} layers x {da[1]}, B {db[0]} layers x {db[1]}): "
                "layers cannot be paired")
    return None


def weights_vouch(res: PairResult, layer: int) -> bool:
    """Whether the weights family checked this layer's tensors and found each within the error its storage
    type gives: then a sub-block that stands out is a layer sensitive to quantisation, not a defect."""
    w = res.find(f"weights[layer-{layer}]")
    return w is not None and w.outcome == PASSED


def _tensor_sub(name: str) -> str:
    """The sub-block a layer's tensor belongs to, in either naming (transformers' or llama.cpp's)."""
    n = name.lower()
    if any(k in n for k in ("mlp", "ffn", "post_attention_layernorm", "feed_forward")):
        return "mlp"
    return "attn"


def _weights_divergence(res: PairResult) -> tuple[int, str] | None:
    """The first layer whose weights fail, and its sub-block: attention when any of its attention tensors
    (or their norm) fails, as attention runs first in a decoder layer. A wrong tensor is the surest
    location there is, and budgets loose enough for 4-bit noise may let its layer's rfn through."""
    failed = {int(c.param.split("-", 1)[1]): c for c in res.checks
              if c.name == "weights" and c.outcome == FAILED and c.param.startswith("layer-")}
    if not failed:
        return None
    layer = min(failed)
    subs = {_tensor_sub(str(t.get("b_name") or t.get("name") or "")) for t in failed[layer].details.get("failing", [])}
    return layer, ("attn" if "attn" in subs or not subs else "mlp")


def _localise(lm: metrics.LayerMetrics, rfn_bound: float, jump: float, res: PairResult, by_rfn: bool = True
              ) -> tuple[int | None, str | None, dict[int, list[tuple[str, float]]]]:
    """First divergent layer, its sub-block, and the sub-block anomalies by layer (those of layers whose
    weights are vouched for are left out). A layer whose weights fail wins over any later one. Without
    ``by_rfn`` (rfn against A is quality, reported), an rfn above the default row locates nothing."""
    fdl = metrics.first_divergent_layer(lm.rfn, rfn_bound) if by_rfn else None
    anomalies = [a for a in metrics.subblock_anomalies(lm.sublayers, jump, rfn_bound / 10.0,
                                                       inherited=[0.0] + list(lm.rfn[:-1]))
                 if not weights_vouch(res, a[0])]
    by_layer: dict[int, list[tuple[str, float]]] = {}
    for layer, name, ratio in anomalies:
        by_layer.setdefault(layer, []).append((name, ratio))
    sub = None
    if anomalies and (fdl is None or anomalies[0][0] <= fdl):
        fdl = anomalies[0][0]
        sub = max(by_layer[fdl], key=lambda nr: nr[1])[0]
    elif fdl is not None and {"attn", "mlp"} <= set(lm.sublayers):
        prev = lm.rfn[fdl - 1] if fdl > 0 else 0.0
        sub = "attn" if lm.sublayers["attn"][fdl] > max(rfn_bound, 4.0 * prev) else "mlp"
    from_weights = _weights_divergence(res)
    if from_weights is not None and (fdl is None or from_weights[0] < fdl):
        fdl, sub = from_weights
    return fdl, _SUB_NAMES.get(sub, sub) if sub else None, by_layer


def evaluate(ctx: EvalContext) -> list[CheckResult] | Findings:
    pm = ctx.pair_metrics
    lm = pm.layers
    if lm is None:
        planned = ctx.planned("rfn") if ctx.plan is not None else []
        dims = ctx.a.hidden_dims()
        if not planned and dims is not None:
            planned = [layer_id(i) for i in range(dims[0])]
        why = layer_mismatch(ctx) or "hidden states were not compared"
        return [skipped(cid, why, threshold=ctx.bounds.rfn, kind=BUDGET) for cid in planned]
    bound, jump = ctx.bounds.rfn, ctx.bounds.subblock_jump
    res = ctx.result
    by_rfn = not ctx.quality_reported or ctx.bounds.is_user_set("rfn")
    fdl, sub, by_layer = _localise(lm, bound, jump, res, by_rfn)
    swap = pm.swap_rfn
    table = [
        {"index": i, "rfn": lm.rfn[i], "worst_row_rfn": lm.worst_row_rfn[i],
         **{f"rfn_{k}": v[i] for k, v in lm.sublayers.items()},
         **{f"share_{k}": v[i] for k, v in lm.sub_contrib.items()},
         **({"rfn_swap": swap[i]} if swap is not None else {})}
        for i in range(len(lm.rfn))
    ]
    swap_k = (ctx.b.meta.get("layer_swap") or {}).get("k")
    out = []
    for i, value in enumerate(lm.rfn):
        extra = f"Worst position: {lm.worst_where[i]} (row rfn {fmt(lm.worst_row_rfn[i])}" + (
            ", a rough estimate: A is stored compact)." if lm.compact else ").")
        if lm.nonfinite_a[i] + lm.nonfinite_b[i]:
            extra = f"{lm.nonfinite_a[i]} non-finite values in A's hidden state, {lm.nonfinite_b[i]} in B's. " + extra
        if fdl is not None:
            extra += f"\nFirst divergent layer: {fdl}" + (f" ({sub} diverges first)" if sub else "") + "."
            if i > fdl:
                extra += f" This layer inherits the error from layer {fdl}."
        extra += "\nrfn by layer up to here: " + ", ".join(fmt(v) for v in lm.rfn[: i + 1])
        if swap is not None:
            extra += (f"\nWith A's hidden states fed into B for layers < {swap_k}: rfn {fmt(swap[i])} "
                      "(error this layer adds given a correct input, when i >= k).")
        cid = layer_id(i)
        check = judge(ctx, cid, "rfn", value, f"Relative Frobenius error of the hidden state after decoder layer {i}",
                      extra)
        if check.outcome == PASSED and i in by_layer:
            check = _anomaly(cid, value, i, by_layer[i], lm, bound, jump, extra)
        out.append(check)
    return Findings(out, layers=table, divergence=(fdl, sub) if fdl is not None else None)


def _anomaly(cid: CheckId, value: float, i: int, found: list[tuple[str, float]], lm: metrics.LayerMetrics,
             bound: float, jump: float, extra: str) -> CheckResult:
    """A layer within the rfn bound whose attention or MLP error stands out: a local defect."""
    parts = []
    for name, ratio in found:
        values = lm.sublayers[name]
        typical = metrics.typical_level(values)  # the same level the decision used
        v = values[i]
        parts.append(f"the {_SUB_NAMES.get(name, name)} output's relative error is {fmt(v)}"
                     + ("" if math.isinf(ratio) else f", {fmt(ratio)}x")
                     + f" the larger of that sub-block's median over the layers ({fmt(typical)}) and the error "
                     f"already in the layer's input ({fmt(lm.rfn[i - 1] if i else 0.0)})")
    where = (f"although its rfn {fmt(value)} is within the bound {fmt(bound)}" if value <= bound else
             f"(its rfn {fmt(value)} is quality, reported and not judged against {fmt(bound)})")
    return CheckResult(
        cid.name, cid.param, value, bound, FAILED,
        f"Decoder layer {i} has a local defect {where}: "
        + "; ".join(parts) + f", above the allowed {fmt(jump)}x.\n" + extra + "\n"
        + OVERRIDE_HINT.format(name="subblock_jump"), {"subblock": [n for n, _ in found]}, UPPER, CORRECTNESS)


FAMILY = CheckFamily("layers", 40, plan, evaluate, BOUNDS, doc="per-layer hidden states and localisation")
