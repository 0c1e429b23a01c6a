"""The check registry: every module of this package that defines ``FAMILY`` is a check family.

Adding a family means adding one module (and its tests): the plan, the bounds, the evaluation
and the messages all come from the families found here.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from functools import lru_cache
from importlib import metadata
from typing import Any

from ..core.bounds import Bounds, BoundTable, pair_class
from ..core.code_version import code_digest
from ..core.results import ERROR, CheckId, CheckResult
from ..errors import ConvdiffError
from ..runner import Producer
from .base import CheckFamily, EvalContext, Findings, PlanContext

__all__ = ["bound_table", "default_bounds", "evaluate_all", "families", "parse_bound_overrides", "plan_all"]


ENTRY_POINT_GROUP = "pytest_convdiff.checks"


def _is_family(obj: Any) -> bool:
    # Duck-typed, not isinstance: a module re-imported after sys.modules was restored (pytester's
    # in-process runs) carries its own copy of the CheckFamily class.
    return obj is not None and callable(getattr(obj, "plan", None)) and callable(getattr(obj, "evaluate", None))


@lru_cache(maxsize=1)
def families() -> tuple[CheckFamily, ...]:
    """Every check family: this package's modules, then those of installed packages (entry-point group
    ``pytest_convdiff.checks``, each entry a module exporting ``FAMILY`` or a ``CheckFamily``), in report order."""
    found = []
    for mod in pkgutil.iter_modules(__path__):
        if mod.name.startswith("_") or mod.name == "base":
            continue
        family = getattr(importlib.import_module(f"{__name__}.{mod.name}"), "FAMILY", None)
        if _is_family(family):
            found.append(family)
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as exc:  # a broken third-party family must say so, not vanish
            raise ConvdiffError(f"the check-family entry point {ep.name!r} ({ep.value}, group {ENTRY_POINT_GROUP}) "
                                f"cannot be loaded: {type(exc).__name__}: {exc}") from None
        family = getattr(obj, "FAMILY", obj)
        if not _is_family(family):
            raise ConvdiffError(f"the check-family entry point {ep.name!r} ({ep.value}) is not a CheckFamily nor a "
                                "module exporting FAMILY")
        found.append(family)
    names = [f.name for f in found]
    if len(set(names)) != len(names):
        raise ConvdiffError(f"two check families share a name: {sorted(names)}")
    return tuple(sorted(found, key=lambda f: (f.order, f.name)))


def producers() -> tuple[Producer, ...]:
    """What the families record from a loaded model, for ``runner.run_model(producers=...)``."""
    return tuple(Producer(f.produce_key or f.name, f.produce_when, f.produce,
                          code_digest((f.produce.__module__,)), f.produce_prefixes)
                 for f in families() if f.produce is not None)


@lru_cache(maxsize=1)
def bound_table() -> BoundTable:
    return BoundTable(spec for f in families() for spec in f.bounds)


def default_bounds(info_a: dict[str, Any], info_b: dict[str, Any]) -> tuple[str, Bounds]:
    """The precision class of the pair and its row of default bounds."""
    cls = pair_class(info_a, info_b)
    return cls, bound_table().row(cls)


def parse_bound_overrides(text: str, where: str = "--convdiff-bound") -> dict[str, float]:
    return bound_table().parse(text, where)


def parse_bound_mapping(values: Mapping[str, Any], where: str) -> dict[str, float]:
    return bound_table().parse_mapping(values, where)


def applies(family: CheckFamily, spec_a: Any) -> bool:
    """Whether the family has anything to judge against this model A: what A gives (``ModelSpec.can``) covers
    what the family reads. A llama-perplexity base file gives only scores, so only the families that read
    nothing else are run against one. Without a spec (a library call on runs alone) every family applies."""
    can = getattr(spec_a, "can", None)
    return can is None or can(*family.reads)


def plan_by_family(ctx: PlanContext) -> dict[str, list[CheckId]]:
    """Each family's items, families in report order (those that apply to this A)."""
    return {f.name: f.plan(ctx) for f in families() if applies(f, ctx.spec_a)}


def plan_all(ctx: PlanContext) -> list[CheckId]:
    """The union of every family's plan, in report order."""
    return [cid for ids in plan_by_family(ctx).values() for cid in ids]


def evaluate_all(ctx: EvalContext, plan: list[CheckId] | None = None, *,
                 outputs: bool | None = None, done: list[CheckResult] | None = None) -> list[CheckResult]:
    """Every family's results (``outputs``: only the families that need (True) or do not need (False)
    the models' outputs). ``done``: results already made for the families that need no outputs (before
    the models ran), kept as they are and in their family's place instead of evaluated again. With a
    ``plan``, a planned item of those families always gets a result: one a family did not produce becomes
    an error that says so (a bug, never a silent pass)."""
    ctx.specs = bound_table().specs
    out: list[CheckResult] = []
    ctx.result.checks = out  # filled as families run: a later family may read an earlier one's results
    chosen = [f for f in families() if (outputs is None or f.needs_outputs == outputs) and applies(f, ctx.spec_a)]
    for f in chosen:
        if done is not None and not f.needs_outputs:
            out += [c for c in done if c.name == f.name]
            continue
        try:
            if f.measure is not None and not f.measure_lazily:
                ctx.measurement(f)  # made (or read from the cache) once per pair
            found = f.evaluate(ctx)
            if isinstance(found, Findings):  # the pair-level findings go into the result, in family order
                found.assemble_into(ctx.result)
                found = found.checks
            out += found
        except ConvdiffError as exc:  # a family that cannot measure this pair: its items say why
            ids = (ctx.plan_families or {}).get(f.name) or []
            out += [CheckResult(c.name, c.param, None, None, ERROR, f"{f.name} checks could not run: {exc}")
                    for c in ids]
    if plan is not None:
        have = {c.id for c in out}
        by_family = ctx.plan_families or {}
        owned = set(plan) if outputs is None else {cid for f in chosen for cid in by_family.get(f.name, ())}
        for cid in plan:
            if cid in owned and str(cid) not in have:
                out.append(CheckResult(cid.name, cid.param, None, None, ERROR,
                                       f"check {cid} was planned but its family produced no result for this pair "
                                       f"(the models' outputs do not match what was planned at collection)."))
    return out
