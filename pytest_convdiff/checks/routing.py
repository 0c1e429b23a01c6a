"""``routing[flips]``: where a mixture-of-experts B sends tokens to other experts than A does.

A correct conversion flips a few routing decisions where A's router was nearly tied (``core.routing``):
those positions carry a whole expert's difference and would read as a defect to checks built for dense
models, so they are left out of ``position[*]`` and reported here, with A's margin at each flip against
how far B's routers move at all. The share of rerouted positions is quality, like KL: reported, and judged
against a bound the user sets (``--convdiff-bound routing_flips=0.02``). A wrong router, gate or expert
order is the weights family's to find (a tensor against its twin), and the runtime twin's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..backends.gguf_header import read_header
from ..core.bounds import BoundSpec
from ..core.results import BUDGET, UPPER, CheckId, CheckResult
from ..errors import ConvdiffError
from .base import CheckFamily, EvalContext, PlanContext, fmt, judge, per_class, skipped

NAME = "routing"
FLIPS = CheckId(NAME, "flips")
# the share of positions a router of B sends elsewhere; a precision class's default row (applied only when
# quality is judged): near ties are rare at F16 and common at 2-3 bits
BOUNDS = (BoundSpec("routing_flips", UPPER, per_class(0.01, 0.02, 0.05, 0.1, 0.2, 0.35),
                    "share of positions whose tokens B's routers send to other experts than A's"),)


# what configs call the expert count (core.config_fields' n_experts), and the GGUF key llama.cpp reads
_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def _experts(spec: Any) -> int | None:
    """The expert count a model's own file declares, from its config.json or GGUF header (no tokenizer, no
    weights): None for a dense model, or a file that cannot be read (config[*] says why)."""
    path = Path(spec.path)
    try:
        if path.is_dir() and (path / "config.json").is_file():
            cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
            cfg = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
            value = next((cfg[k] for k in _EXPERT_KEYS if isinstance(cfg.get(k), int)), None)
        elif path.is_file() and path.suffix == ".gguf":
            kv = read_header(path).kv
            value = kv.get(f"{kv.get('general.architecture')}.expert_count")
        else:
            return None
    except (OSError, ValueError, ConvdiffError):
        return None
    return value if isinstance(value, int) and value > 1 else None


def plan(ctx: PlanContext) -> list[CheckId]:
    if not ctx.settings.hidden_states or ctx.spec_a is None:
        return []
    return [FLIPS] if _experts(ctx.spec_a) or (ctx.spec_b is not None and _experts(ctx.spec_b)) else []


def _layer_line(layer: dict[str, Any]) -> str:
    first = layer["first_flips"]
    return (f"layer {layer['layer']}: {layer['flips']} flips of {layer['positions']} positions"
            + (f", {first} where no earlier layer had rerouted the token, A's margin there at most "
               f"{fmt(layer['max_flip_margin'])}" if first else "")
            + f" (A's median margin {fmt(layer['median_margin'])}; B's router error p99 "
              f"{fmt(layer['router_error_p99'])})")


def describe(r: Any) -> str:
    """What the routing metrics say, in lines (the message's body)."""
    lines = [f"{r.rerouted} of {r.positions} positions ({fmt(100 * r.share)} %) were sent to another set of "
             f"{r.k} experts at one layer or more."]
    lines += [_layer_line(layer) for layer in r.layers]
    if r.examples:
        lines.append("Widest margins among the flips: " + "; ".join(
            f"{e['prompt']!r} position {e['position']} layer {e['layer']} margin {fmt(e['margin'])}"
            + ("" if e["first"] else " (already rerouted at an earlier layer)") for e in r.examples))
    lines.append("These positions are left out of position[kl] and position[rfn], which judge growth with "
                 "position; every other metric keeps them.")
    return "\n".join(lines)


def evaluate(ctx: EvalContext) -> list[CheckResult]:
    planned = ctx.planned(NAME) if ctx.plan is not None else [FLIPS]
    if not planned:
        return []
    pm = ctx.pair_metrics
    r = pm.routing if pm is not None else None
    if r is None:
        return [skipped(FLIPS, "the runs hold no router logits: a backend that does not expose them (only "
                               "transformers and llama.cpp do), a run cached before they were recorded, or hidden "
                               "states turned off", threshold=ctx.bounds.routing_flips, kind=BUDGET)]
    value = r.share if r.positions else math.nan
    return [judge(ctx, FLIPS, "routing_flips", value,
                  "Share of positions that B's routers send to other experts than A's", describe(r),
                  kind=BUDGET, details={"routing": r.to_dict()})]


FAMILY = CheckFamily(
    name=NAME,
    order=75,
    plan=plan,
    evaluate=evaluate,
    bounds=BOUNDS,
    doc="share of positions a mixture of experts routes elsewhere in B, and A's margins there",
)
