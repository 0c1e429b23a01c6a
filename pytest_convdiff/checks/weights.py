"""``weights[layer-<i>]``, ``weights[other]``: B's tensors against A's, one by one, before any model runs.

A conversion bug in the tensors themselves (q/k rows not permuted for llama.cpp's rope, two layers
swapped, a tensor scaled, a norm stored in another convention, a NaN, an untrained output layer where A
ties it to the embedding) shows in the weights, and is reported here in seconds with the tensor's name,
where the forward checks can only say which layer's output drifts.

Each tensor of B is judged against its **twin** (``backends.twin``): what llama.cpp's quantiser, or a float
type's rounding, makes of A's tensor brought into B's convention (``backends.pairing``), with the importance
matrix B was made with when one is given (``backends.imatrix``). A correct conversion reproduces it up to
the quantiser's near-ties, so the bounds are the share of blocks that differ (``weights_twin_blocks``) and,
where they differ, B's error against A over the twin's (``weights_twin_ratio``); a file made with a matrix
not given is held to ``weights_imatrix``. Where no twin can be made, the storage type's tabled error
(``weights_margin``) and scale (``weights_scale``) judge, and the message says so. Replayed from a golden
reference (A's files absent), B's error against A is estimated from the reference's sketch of A and held
to ``weights_replay`` times the twin error the reference recorded (``backends.replay``). A failing tensor is
compared cheaply with what it may be instead (another layer's tensor, A's tensor without the rope
permutation, a multiple of A, A + 1, A transposed) and the message says what it matches.

One item per decoder layer and one for the rest (embeddings, output layer, final norm). A side whose
weights cannot be read here (an EXL2 model, a reference saved without weight sketches, an architecture
whose GGUF transforms are not known) skips with the reason.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .. import sources
from ..backends import (
    conventions,
    dequant,
    ggml,
    gguf_header,
    imatrix,
    pairing,
    registry,
    replay,
    tensors,
    twin,
)
from ..core import weight_errors
from ..core.bounds import BoundSpec
from ..core.results import CORRECTNESS, ERROR, FAILED, PASSED, SKIPPED, UPPER, CheckId, CheckResult
from ..errors import ConvdiffError
from .base import OVERRIDE_HINT, CheckFamily, EvalContext, PlanContext, fmt, per_class

NAME = "weights"
OTHER = "other"
BOUNDS = (
    BoundSpec("weights_twin_blocks", UPPER, per_class(*[0.1] * 6),
              "share of a tensor's blocks that differ from its twin (llama.cpp's quantiser on A's tensor); a "
              "correct conversion differs only where the quantiser met a near-tie"),
    BoundSpec("weights_twin_ratio", UPPER, per_class(*[1.5] * 6),
              "where a tensor differs from its twin: B's error against A over the twin's (about 1 at a near-tie)"),
    BoundSpec("weights_imatrix", UPPER, per_class(*[1.5] * 6),
              "a tensor quantised with an importance matrix not given here: its error against A over its twin's "
              "made without one"),
    BoundSpec("weights_replay", UPPER, per_class(*[1.5] * 6),
              "replayed from a golden reference (A's files absent): B's error against A, estimated from the "
              "reference's sketch of A, over the twin error the reference recorded for B's type"),
    BoundSpec("weights_margin", UPPER, per_class(*[2.0] * 6),
              "only where no twin can be made: a tensor's relative error over the error its storage type gives "
              "(a fallback table)"),
    BoundSpec("weights_scale", UPPER, per_class(*[0.1] * 6),
              "only where no twin can be made: |c - 1| for the least-squares scale c of B's tensor against A's"),
)
SHOWN = 6  # failing tensors written out per item (all are in the details)


def item_id(param: str) -> CheckId:
    return CheckId(NAME, param)


def plan(ctx: PlanContext) -> list[CheckId]:
    if not ctx.num_layers:
        return []
    return [item_id(f"layer-{i}") for i in range(ctx.num_layers)] + [item_id(OTHER)]


# --------------------------------------------------------------------------- reading the files


def _replay_source(spec: Any, role: str) -> replay.ReplayWeights:
    """A golden reference's sketch of A's weights (``backends.replay``), or WeightsUnreadable saying why not."""
    from ..store.reference import ReferenceEntry

    if role != "A":
        raise tensors.WeightsUnreadable("B is a saved convdiff reference: it keeps outputs and a sketch of A's "
                                        "weights, not weights to judge")
    try:
        entry = ReferenceEntry(spec.path)
    except ConvdiffError as exc:
        raise tensors.WeightsUnreadable(f"A is given as a saved convdiff reference but cannot be read as one "
                                        f"({exc})") from None
    table = entry.meta.get("weights_sketch")
    if not table or not entry.has(replay.SKETCH_ARRAY):
        why = entry.meta.get("weights_sketch_missing") or "it was saved by a version without weight sketches"
        raise tensors.WeightsUnreadable(f"the reference {spec.path} keeps no sketch of A's weights ({why}); save it "
                                        "again from A's transformers checkpoint to check weights without A")
    if table.get("format") != replay.FORMAT or table.get("buckets") != replay.BUCKETS:
        raise tensors.WeightsUnreadable(f"the reference {spec.path} keeps weight sketches of another format "
                                        f"({table.get('format')}); save it again with this version")
    return replay.ReplayWeights(spec.path, table, entry.array(replay.SKETCH_ARRAY))


def _open(spec: Any, role: str) -> tensors.Source:
    """The side's weights, or WeightsUnreadable saying why they cannot be compared here."""
    if spec.can(sources.WEIGHT_SKETCH):  # a saved reference: A's weights as a stored sketch
        return _replay_source(spec, role)
    backend = registry.get(spec.resolved_backend())
    if backend.open_weights is None:
        raise tensors.WeightsUnreadable(f"{role}'s backend {backend.name} has no weights this check reads")
    return backend.open_weights(Path(spec.path), dict(spec.options or {}), role)


def measure(ctx: EvalContext) -> dict[str, Any]:
    """Every tensor's comparison (bound-independent; cached per pair by the comparison)."""
    sources: list[tensors.Source] = []
    try:
        try:
            for spec, role in ((ctx.spec_a, "A"), (ctx.spec_b, "B")):
                sources.append(_open(spec, role))
        except ImportError as exc:
            return {"status": "skipped", "reason": f"the gguf package is needed to read GGUF tensors ({exc}): "
                                                   "pip install gguf"}
        n_layers = _num_layers(ctx)
        if isinstance(sources[0], replay.ReplayWeights):
            return replay.measure_replay(sources[0], sources[1], n_layers)
        matrix = imatrix.read(ctx.settings.imatrix) if ctx.settings.imatrix else None
        return dequant.measure_weights(sources[0], sources[1], n_layers, matrix,
                                       sample=_sample_share(ctx.settings.weights_twin, sources[1]))
    except imatrix.ImatrixError as exc:  # the user's file: an error to fix, not a reason to skip
        return {"status": "error", "reason": str(exc)}
    except tensors.WeightsUnreadable as exc:
        return {"status": "skipped", "reason": str(exc)}
    finally:
        for s in sources:
            s.close()


def _sample_share(mode: str, b: tensors.Source) -> float | None:
    """The share of each tensor's rows the twin quantises: None (all) in full mode, and in auto mode up to
    ``dequant.SAMPLED_ABOVE`` parameters of B."""
    if mode == "full":
        return None
    if mode == "auto" and sum(math.prod(t.shape) for t in b.tensors.values()) <= dequant.SAMPLED_ABOVE:
        return None
    return dequant.SAMPLE_SHARE


def _num_layers(ctx: EvalContext) -> int | None:
    planned = [c for c in ctx.plan or [] if c.name == NAME and c.param.startswith("layer-")]
    return len(planned) or None


# --------------------------------------------------------------------------- judging


def _type_label(e: dict[str, Any]) -> str:
    ta, tb = e["type_a"], e["type_b"]
    return tb if ta in ("F32", "F64", None) or ta == tb else f"A {ta}, B {tb}"


def _expected_text(e: dict[str, Any]) -> str:
    ta, tb = e["type_a"], e["type_b"]
    parts = [t for t in (ta, tb) if t and t not in ("F32", "F64")] or [tb or "F32"]
    estimated = [t for t in parts if not weight_errors.expected_error(t)[1]]
    text = f"the {' and '.join(dict.fromkeys(parts))} error {fmt(e['expected'])}"
    if estimated:
        text += f" (for {', '.join(estimated)} estimated from its bits per weight, not measured)"
    return text


def _ratio(e: dict[str, Any]) -> float | None:
    if e["error"] is None or not e["expected"]:
        return None
    return e["error"] / e["expected"]


def twin_score(e: dict[str, Any], bounds: Any) -> float | None:
    """How close a tensor is to failing against its twin, 1.0 being at the bound: the larger of its
    differing share over its bound, and how far its tie ratio is from a perfect tie (1) as a share of the way to
    its bound (with an importance matrix not given: its error ratio over ``weights_imatrix``). None when the
    tensor has no twin."""
    t = e.get("twin")
    if not t:
        return None
    if e.get("imatrix"):
        r = t.get("error_ratio")
        return math.inf if r is None else r / bounds.weights_imatrix
    ratio = t.get("tie_ratio")
    ratio = math.inf if ratio is None else ratio
    rows = _rows_score(t)
    return max(t["share"] / bounds.weights_twin_blocks if bounds.weights_twin_blocks else math.inf,
               tie_score(ratio, bounds.weights_twin_ratio), rows)


def tie_score(ratio: float, bound: float) -> float:
    """A tie ratio as a score, 1.0 at ``bound``: its distance from a perfect tie (1: B as far from A as the twin
    is) over the bound's. A flipped near-tie scores about 0 instead of 1/bound, which a tensor with one flipped
    block would otherwise carry as if it were two thirds of the way to failing; past the bound the score grows
    faster than ``ratio / bound``, so nothing that failed passes. A bound of 1 or less has no room above a tie:
    ``ratio / bound``."""
    if not bound:
        return math.inf
    if bound <= 1.0:
        return ratio / bound
    return max(0.0, (ratio - 1.0) / (bound - 1.0))


def _rows_score(t: dict[str, Any]) -> float:
    """A sampled twin's row check: the row of B farthest from A's scale over the limit the twin's rows set (1 at
    the limit); 0 for a twin of every row."""
    s = t.get("sampled")
    if not s:
        return 0.0
    top = s.get("max_row_dev")
    return math.inf if top is None else top / s["row_limit"] if s["row_limit"] > 0 else math.inf


ROW_LIMIT_TEXT = (f"{dequant.ROW_FACTOR:g}× the most a twin row's scale strays from 1; a correct row's error is "
                  "nearly uncorrelated with A's values")


def _where_text(t: dict[str, Any], block: str) -> str:
    rows = t.get("row_range")
    if not rows:
        return ""
    places = ", ".join(f"row {r} {block} {c}" for r, c in (t.get("where") or [])[:3])
    span = f"row {rows[0]}" if rows[0] == rows[1] else f"rows {rows[0]}–{rows[1]}"
    return f" in {t['rows_hit']} row(s), {span} (first: {places})"


def _twin_why(e: dict[str, Any], bounds: Any) -> list[tuple[str, str]]:
    t = e["twin"]
    tb = e["type_b"]
    block = "element" if tb in ("F32", "F16", "BF16", "F64") else "block"
    given = e.get("imatrix_given")
    matrix = f" and the importance matrix {given}" if given else ""
    s = t.get("sampled")
    on = f", on a seeded {s['twin_rows']} of its {s['rows']} rows" if s else ""
    made = (f"what llama.cpp's quantiser makes of A's tensor as {tb} (its twin, from an {t['intermediate']} "
            f"intermediate{matrix}{on})")
    if e.get("imatrix"):
        r = t.get("error_ratio")
        if r is None or not r <= bounds.weights_imatrix:
            return [("weights_imatrix", f"relative error {fmt(e['error'])} is {fmt(r)}× that of {made} without the "
                                        f"importance matrix B was made with, above the allowed "
                                        f"{fmt(bounds.weights_imatrix)}× (give the matrix with --convdiff-imatrix "
                                        "for an exact comparison)")]
        return []
    why = []
    share = t["share"]
    if not share <= bounds.weights_twin_blocks:
        why.append(("weights_twin_blocks",
                    f"{t['differing']} of {t['blocks']} {block}s ({100 * share:.3g} %) differ from {made}, above the "
                    f"allowed {100 * bounds.weights_twin_blocks:.3g} % (a correct conversion differs only at the "
                    f"quantiser's near-ties){_where_text(t, block)}; B is {fmt(t.get('excess'))}× the type's own "
                    f"error away from its twin"))
    ratio = t.get("tie_ratio")
    if ratio is None or not ratio <= bounds.weights_twin_ratio:
        why.append(("weights_twin_ratio",
                    f"where it differs from {made} ({t['differing']} {block}s{_where_text(t, block)}), B's error "
                    f"against A is {fmt(ratio) if ratio is not None else 'infinitely'}× the twin's, above the allowed "
                    f"{fmt(bounds.weights_twin_ratio)}× (a near-tie gives about 1): B holds other values than A's"))
    if s and s["rows_off"]:
        r, dev = s["worst_row"], s.get("worst_row_dev")
        worst = (f"row {r}'s least-squares scale against A's row is {fmt(dev)} away from 1" if dev is not None
                 else f"row {r} is zeros where A's is not, or holds non-finite values")
        why.append(("", f"{s['rows_off']} of its {s['rows']} rows stray from A's scale by more than the "
                        f"{fmt(s['row_limit'])} the twin's sampled rows allow ({ROW_LIMIT_TEXT}): {worst}; rows "
                        f"{', '.join(map(str, s['first_rows_off']))}; --convdiff-weights-twin full compares every "
                        "block"))
    if why and t.get("ties"):
        why.append(("", f"{t['ties']} more {block}(s) differed only at a near-tie of the quantiser's one rounding, "
                        "as another build rounds it, and are not counted"))
    if why and t.get("scale_ties"):
        why.append(("", f"{t['scale_ties']} more {block}(s) differed only in the scales another build's float32 "
                        "scale search can choose (their values are the type's rounding of A's under them), and are "
                        "not counted as differing"))
    if why and given:
        why.append(("", f"if B was quantised with another importance matrix than {given}, give that one"))
    if why and e.get("imatrix_problem"):
        why.append(("", e["imatrix_problem"]))
    return why


def replay_score(e: dict[str, Any], bounds: Any) -> float | None:
    """Replayed: how far B's error ratio is above 1 (a correct file's), over how far the bound is."""
    r = (e.get("replay") or {}).get("ratio")
    if r is None or not e.get("replay"):
        return None
    excess = bounds.weights_replay - 1.0
    return max(r - 1.0, 0.0) / excess if excess > 0 else math.inf


def _replay_text(e: dict[str, Any]) -> str:
    rp = e["replay"]
    sampled = f", on {rp['sampled_rows']} sampled rows" if rp.get("sampled_rows") else ""
    if not rp["twin_error"]:
        return (f"its error against A, estimated from the reference's sketch of A, is {fmt(e['error'])}, where "
                f"{e['type_b']} holds A's values exactly")
    return (f"its error against A, estimated from the reference's sketch of A, is {fmt(e['error'])}: "
            f"{fmt(rp['ratio'])}× the {e['type_b']} twin error {fmt(rp['twin_error'])} the reference recorded"
            f"{sampled}")


def _replay_why(e: dict[str, Any], bounds: Any) -> list[tuple[str, str]]:
    r = e["replay"].get("ratio")
    if r is not None and r <= bounds.weights_replay:
        return []
    allowed = (f"above the allowed {fmt(bounds.weights_replay)}×" if e["replay"]["twin_error"]
               else "above the float32 rounding the bound allows")
    return [("weights_replay", f"{_replay_text(e)}, {allowed} (replayed "
                               "without A's files: a defect smaller than about the type's own error needs the "
                               "live run)")]


def judge_tensor(e: dict[str, Any], bounds: Any) -> list[tuple[str, str]]:
    """Why this tensor fails, as (bound name or "", reason); empty when it passes. A NaN/Inf is always
    named. A tensor with a twin is judged against it alone; one without (no quantiser for its type here)
    against its storage type's tabled error and its scale, and the message says so."""
    if e.get("problem"):
        return [("", e["problem"])]
    if e.get("unreadable"):
        return []
    why: list[tuple[str, str]] = []
    if e["nonfinite_b"] or e["nonfinite_a"]:
        f = e["first_nonfinite"] or {}
        sides = [f"{n} in {s}" for n, s in ((e["nonfinite_b"], "B"), (e["nonfinite_a"], "A")) if n]
        why.append(("", f"non-finite values ({', '.join(sides)}); the first, {f.get('value')} in {f.get('side')}, "
                        f"at row {f.get('row')}, column {f.get('col')}"))
    err = e["error"]
    if err is None:
        return why + [("", "its relative error is infinite (A's tensor is all zeros, B's is not)")]
    if e.get("twin"):
        return why + _twin_why(e, bounds)
    if e.get("replay"):
        return why + _replay_why(e, bounds)
    if why:
        why.append(("", f"over the finite entries the relative error is {fmt(err)}, {fmt(_ratio(e))}× "
                        f"{_expected_text(e)}"))
    ratio = _ratio(e)
    c = e["scale"]
    fallback = f" (no twin: {e['twin_unavailable']})" if e.get("twin_unavailable") else ""
    if ratio is not None and not ratio <= bounds.weights_margin:
        why.append(("weights_margin", f"relative error {fmt(err)}, {fmt(ratio)}× {_expected_text(e)}, above the "
                                      f"allowed {fmt(bounds.weights_margin)}×{fallback}"))
    elif c is not None and not abs(c - 1.0) <= bounds.weights_scale and not e.get("b_zero"):
        why.append(("weights_scale", f"B ≈ {c:.4g} × A (least-squares scale), more than {fmt(bounds.weights_scale)} "
                                     f"from 1 (relative error {fmt(err)}, {fmt(ratio)}× {_expected_text(e)}){fallback}"))
    return why


def _match_text(m: dict[str, Any]) -> str:
    how = ", on a 64×64 sample" if m.get("sampled") else ""
    return f"{m['what']} (relative error {fmt(m['error'])}{how})"


def _tensor_text(e: dict[str, Any], why: list[tuple[str, str]]) -> str:
    names = []
    if e["a_name"] and e["a_name"] != e["name"]:
        names.append(f"A: {e['a_name']}")
    if e["b_name"] and e["b_name"] != e["name"]:
        names.append(f"B: {e['b_name']}")
    if e["type_b"]:
        names.append(_type_label(e))
    head = e["name"] + (f" ({', '.join(names)})" if names else "")
    lines = [f"- {head}: " + "; ".join(w for _, w in why) + "."]
    if e.get("note"):
        lines.append(f"  {e['note'][0].upper()}{e['note'][1:]}.")
    if e.get("matches"):
        best = e["matches"][0]
        lines.append(f"  It matches {_match_text(best)}: {best.get('meaning') or 'see above'}."
                     + "".join(f" Also close: {_match_text(m)}." for m in e["matches"][1:3]))
    elif e.get("error") is not None and not (e["nonfinite_a"] or e["nonfinite_b"]):
        lines.append("  Nothing cheaper to name matches it better (no other tensor of A of its shape, no transpose, "
                     "scale, offset or q/k row order).")
    return "\n".join(lines)


def _swap_summary(layer: int | None, failing: list[tuple[dict[str, Any], list[str]]]) -> str:
    """When every failing tensor of a layer matches the same role in one other layer: say it once."""
    if layer is None or len(failing) < 2:
        return ""
    others = set()
    for e, _ in failing:
        m = (e.get("matches") or [None])[0]
        if not m or m.get("kind") != "tensor" or m.get("role") != e["role"] or m.get("layer") is None:
            return ""
        others.add(m["layer"])
    if len(others) != 1:
        return ""
    (j,) = others
    return (f"Every failing tensor of layer {layer} matches A's layer {j} tensor of the same role: "
            f"layers {layer} and {j} swapped (or layer {j} written in its place).\n")


def score(e: dict[str, Any], bounds: Any) -> float | None:
    """A tensor's distance to failing, 1.0 at the bound: against its twin (``twin_score``), or, with no
    twin, its error over its type's tabled error over ``weights_margin``."""
    s = twin_score(e, bounds)
    if s is not None:
        return s
    s = replay_score(e, bounds)
    if s is not None:
        return s
    r = _ratio(e)
    return None if r is None else r / bounds.weights_margin


def _worst(checked: list[dict[str, Any]], bounds: Any) -> dict[str, Any] | None:
    rated = [e for e in checked if score(e, bounds) is not None]
    return max(rated, key=lambda e: score(e, bounds) or 0.0) if rated else None


def _state_text(e: dict[str, Any], bounds: Any) -> str:
    """How a passing tensor stands: against its twin, or its type's error."""
    t = e.get("twin")
    if t and e.get("imatrix"):
        return (f"error {fmt(t.get('error_ratio'))}× its twin's made without the importance matrix "
                f"(allowed {fmt(bounds.weights_imatrix)}×)")
    if t:
        ties = (f"; {t['ties']} block(s) tipped at a near-tie of the quantiser's one rounding, as another build "
                f"rounds it (docs/twins.md)") if t.get("ties") else ""
        if t.get("scale_ties"):
            ties += (f"; {t['scale_ties']} block(s) with other scales, as another build's scale search chooses, "
                     "each the type's rounding of A's values under them (docs/twins.md)")
        if not t["differing"]:
            return (f"identical to its twin ({e['type_b']} from an {t['intermediate']} intermediate)" if not ties
                    else f"its twin ({e['type_b']} from an {t['intermediate']} intermediate){ties}")
        return (f"{t['differing']} of {t['blocks']} blocks ({100 * t['share']:.3g} %) differ from its twin at "
                f"near-ties (tie ratio {fmt(t.get('tie_ratio'))}; allowed "
                f"{100 * bounds.weights_twin_blocks:.3g} % and {fmt(bounds.weights_twin_ratio)}×){ties}")
    if e.get("replay"):
        return f"{_replay_text(e)} (allowed {fmt(bounds.weights_replay)}×)"
    return (f"relative error {fmt(e['error'])} = {fmt(_ratio(e))}× {_expected_text(e)} (allowed "
            f"{fmt(bounds.weights_margin)}×; no twin: {e.get('twin_unavailable') or 'n/a'})")


def _item(cid: CheckId, where: str, layer: int | None, tensors: list[dict[str, Any]], bounds: Any,
          extra_notes: list[str]) -> CheckResult:
    if not tensors:
        return CheckResult(cid.name, cid.param, None, 1.0, SKIPPED,
                           f"A has no tensor {where}: nothing to compare.", {}, UPPER, CORRECTNESS)
    checked = [e for e in tensors if not e.get("unreadable")]
    failing = [(e, why) for e in checked if (why := judge_tensor(e, bounds))]
    worst = _worst(checked, bounds)
    value: float | None = score(worst, bounds) if worst else None
    if any(e["nonfinite_a"] or e["nonfinite_b"] for e, _ in failing):
        value = math.nan  # NaN never satisfies a bound
    elif any(e.get("problem") or e["error"] is None for e, _ in failing):
        value = math.inf  # missing, another shape, or an error that cannot be measured
    notes = [f"{e['name']} not compared: {e['unreadable']}" for e in tensors if e.get("unreadable")] + extra_notes
    details: dict[str, Any] = {
        "tensors": len(tensors),
        "failing": [{"name": e["name"], "b_name": e["b_name"], "type_a": e["type_a"], "type_b": e["type_b"],
                     "error": e["error"], "expected": e["expected"], "scale": e["scale"], "twin": e.get("twin"),
                     "score": score(e, bounds),
                     "why": [{"bound": b or None, "reason": w} for b, w in why],
                     "matches": e.get("matches", [])[:3], "first_nonfinite": e.get("first_nonfinite")}
                    for e, why in failing],
        "twinned": sum(1 for e in checked if e.get("twin")),
        # every tensor's score by role (the name without its layer prefix): the report's weights map
        "scores": {weight_errors.layer_and_role(e["name"])[1]: score(e, bounds) for e in checked},
    }
    if worst is not None:
        details["worst"] = {"name": worst["name"], "type": _type_label(worst), "error": worst["error"],
                            "expected": worst["expected"], "twin": worst.get("twin"), "score": value}
    if failing:
        shown = failing[:SHOWN]
        msg = (f"Weights {where}: {len(failing)} of {len(tensors)} tensors are not what a correct conversion of A's "
               "gives.\n" + _swap_summary(layer, failing)
               + "\n".join(_tensor_text(e, why) for e, why in shown)
               + (f"\n... and {len(failing) - SHOWN} more (all in the JSON report's details)." if len(failing) > SHOWN
                  else ""))
        others = len(checked) - len(failing)
        if others and worst is not None:
            fine = _worst([e for e in checked if all(e is not f for f, _ in failing)], bounds)
            if fine is not None:
                msg += f"\nThe other {others} pass (closest to its bound: {fine['name']}, {_state_text(fine, bounds)})."
        if notes:
            msg += "\n" + "\n".join(notes)
        used = [b for _, why in failing for b, _ in why if b]
        if used:
            msg += "\n" + OVERRIDE_HINT.format(name=used[0])
        return CheckResult(cid.name, cid.param, value, 1.0, FAILED, msg, details, UPPER, CORRECTNESS)
    if worst is None or all(e["error"] == 0.0 for e in checked):
        msg = f"{len(checked)} tensors {where} identical to A's."
    else:
        twinned = details["twinned"]
        msg = (f"{len(checked)} tensors {where} are what a correct conversion of A's gives"
               + (f" ({twinned} reproduced by llama.cpp's quantiser or the storage type's rounding"
                  f"{_other_build_text(checked)})" if twinned else "")
               + f"; closest to its bound: {worst['name']} ({_type_label(worst)}), {_state_text(worst, bounds)}; "
               "no NaN/Inf.")
    if notes:
        msg += "\n" + "\n".join(notes)
    return CheckResult(cid.name, cid.param, value, 1.0, PASSED, msg, details, UPPER, CORRECTNESS)


def _other_build_text(checked: list[dict[str, Any]]) -> str:
    """The blocks the tie tests accepted, counted over an item's tensors: what a user whose file was quantised on
    another machine sees differ, and why it passes."""
    per = [(e.get("twin") or {}).get("ties", 0) + (e.get("twin") or {}).get("scale_ties", 0) for e in checked]
    blocks, tensors = sum(per), sum(1 for n in per if n)
    if not blocks:
        return ""
    return (f", {tensors} of them with {blocks} block(s) as another build of the quantiser writes them: a near-tie "
            "of its rounding, or other scales from its search with every value rounded under them (docs/twins.md)")


def _notes(m: dict[str, Any], layer: int | None, layers: set[int]) -> list[str]:
    """What was left out of this item's comparison: tensors of A not compared, tensors of B with no
    counterpart in A (each in its layer's item; the rest in ``weights[other]``)."""
    def here(name: str) -> bool:
        i = weight_errors.layer_and_role(name)[0]
        return i == layer if layer is not None else i not in layers

    notes = []
    extra = [n for n in m.get("unmatched_b") or [] if here(n)]
    if extra:
        notes.append(f"B has {len(extra)} tensor(s) with no counterpart in A, not compared: "
                     + ", ".join(extra[:8]) + (" ..." if len(extra) > 8 else ""))
    left = [d for d in m.get("not_compared") or [] if here(d["name"])]
    if left:
        notes.append(f"{len(left)} tensor(s) of A not compared: "
                     + "; ".join(f"{d['name']} ({d['why']})" for d in left[:5]) + (" ..." if len(left) > 5 else ""))
    return notes


_TRANSFORM_TEXT = {conventions.NONE: "stored as transformers stores it",
                   conventions.ROPE_PERMUTE: "rows permuted for llama.cpp's rope",
                   conventions.NORM_PLUS_ONE: "stored as 1 + w"}


def convention_notes(m: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(what the files established, role by role; the findings about it that need a judge): a role whose
    files contradict the converter's known convention in every layer, or that no candidate explains."""
    roles = m.get("conventions") or []
    if not roles:
        return [], []
    est = "; ".join(f"{r['role']} {_TRANSFORM_TEXT.get(r['transform'], r['transform'])} ({r['agree']}/{r['layers']} "
                    "layers)" for r in roles)
    notes = [f"What the converter did, established from the files: {est}."]
    findings = []
    for r in roles:
        if not r["layers"]:
            findings.append(f"{r['role']}: taken as llama.cpp's converter is known to write it "
                            f"({_TRANSFORM_TEXT.get(r['transform'])}), not verified: no sample of it could be read.")
        elif r["contradicts_prior"]:
            findings.append(f"{r['role']}: every layer of B is {_TRANSFORM_TEXT.get(r['transform'])}, but llama.cpp's "
                            f"converter is known to write this architecture's {r['role']} "
                            f"{_TRANSFORM_TEXT.get(r['prior'])}: either the converter changed or it was not applied "
                            "to this file. B's tensors are compared in the convention its files show; only a run "
                            "decides which is right (the runtime twin runs A's code with B's tensors brought back "
                            "this way).")
        elif not r["explained"]:
            errs = ", ".join(f"{_TRANSFORM_TEXT.get(c, c)}: {fmt(e)}" for c, e in r["errors"].items())
            findings.append(f"{r['role']}: not verified: no transform the converter is known to apply reproduces B "
                            f"(relative error of each candidate, median over layers: {errs}); the runtime twin and "
                            "the other checks judge this pair.")
    return notes, findings


def _judge_conventions(out: list[CheckResult], m: dict[str, Any], runtime_planned: bool) -> None:
    """Add the established conventions to ``weights[other]``; a contradicted known convention fails it unless
    the runtime twin is planned to judge the pair (a role no candidate explains is reported, never failed here:
    its tensors already fail their layers if they differ from A)."""
    other = next((c for c in out if c.param == OTHER), None)
    notes, findings = convention_notes(m)
    if other is None or not notes:
        return
    other.details["conventions"] = m.get("conventions")
    other.message += "\n" + "\n".join(notes + findings)
    contradicted = [r for r in m.get("conventions") or [] if r["contradicts_prior"]]
    if contradicted and not runtime_planned and other.outcome == PASSED:
        other.outcome, other.value = FAILED, math.inf
        other.message += ("\nNo runtime twin is planned for this pair (--convdiff-runtime-twin=off, or B does not "
                          "run on llama.cpp), so nothing else would judge it: this item fails. Turn the runtime twin "
                          "on to have a run decide.")


def evaluate(ctx: EvalContext) -> list[CheckResult]:
    planned = ctx.planned(NAME) if ctx.plan is not None else None
    if planned is not None and not planned:
        return []
    try:
        m = ctx.measurement(FAMILY)
    except ConvdiffError:
        raise
    except Exception as exc:  # noqa: BLE001 - a bug here must error the items, never pass them or stop the run
        ids = planned or [item_id(OTHER)]
        return [CheckResult(c.name, c.param, None, None, ERROR,
                            f"weights checks could not run: unexpected {type(exc).__name__}: {exc}. This is a bug "
                            "in pytest-convdiff; please report it with this message.") for c in ids]
    tensors = m.get("tensors") or []
    if planned is None:
        layers = sorted({e["layer"] for e in tensors if e["layer"] is not None})
        planned = [item_id(f"layer-{i}") for i in range(max(layers) + 1 if layers else 0)] + [item_id(OTHER)]
    if m.get("status") == "error":
        return [CheckResult(c.name, c.param, None, None, ERROR, f"weights not compared: {m.get('reason')}", {},
                            UPPER, CORRECTNESS) for c in planned]
    if m.get("status") != "ok":
        why = f"weights not compared: {m.get('reason')}"
        return [CheckResult(c.name, c.param, None, 1.0, SKIPPED, why, {}, UPPER, CORRECTNESS)
                for c in planned]
    layer_items = {int(c.param.split("-", 1)[1]) for c in planned if c.param.startswith("layer-")}
    out = []
    for cid in planned:
        if cid.param == OTHER:
            group = [e for e in tensors if e["layer"] not in layer_items]
            out.append(_item(cid, "outside the decoder layers (embeddings, output layer, final norm)",
                             None, group, ctx.bounds, _notes(m, None, layer_items)))
        else:
            i = int(cid.param.split("-", 1)[1])
            out.append(_item(cid, f"of decoder layer {i}", i, [e for e in tensors if e["layer"] == i], ctx.bounds,
                             _notes(m, i, layer_items)))
    _judge_conventions(out, m, any(c.name == "runtime" for c in ctx.plan or ()))
    return out


FAMILY = CheckFamily(NAME, 7, plan, evaluate, BOUNDS,
                     doc="every tensor of B against A's, against the error its storage type gives",
                     needs_outputs=False, measure=measure, measure_apart=True,
                     code=tuple(m.__name__ for m in (dequant, pairing, tensors, conventions, weight_errors, twin, replay,
                                                   imatrix, ggml, gguf_header)),
                     libraries=("llama-cpp-python", "gguf"))
