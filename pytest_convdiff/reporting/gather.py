"""Pair results put back together from what each item reported.

Under pytest-xdist the controller runs no pair: each worker's items carry their check (and, once per pair
and process, the pair's header) as report properties, and the controller rebuilds every ``PairResult``
from them. The same path is taken without xdist, so the reports never depend on how the run was spread.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from ..core.results import ERROR, CheckResult, PairResult

__all__ = ["HEADER_PROPERTY", "ITEM_PROPERTY", "SPEC_PROPERTY", "Gathered", "error_check", "item_payload",
           "spec_header"]

ITEM_PROPERTY = "convdiff_item"  # {"pair", "order", "check"}
HEADER_PROPERTY = "convdiff_pair_result"  # the pair's PairResult without its checks, once per pair and process
# The pair's models, sent once per pair and process while no item has a result to take the header from (every
# item errored first, e.g. on a bad convdiff_bounds marker): under xdist the controller never collects a
# manifest, so it cannot look those pairs up itself.
SPEC_PROPERTY = "convdiff_pair_spec"
UNKNOWN_MODEL = "(unknown: no item of the pair reported it)"


def spec_header(pid: str, model_a: str, model_b: str, backend_a: str | None, backend_b: str | None) -> dict[str, Any]:
    """A pair's header before any result exists: its id and models."""
    return {"id": pid, "model_a": model_a, "model_b": model_b, "backend_a": backend_a, "backend_b": backend_b}


def error_check(check_id: str, why: str) -> CheckResult:
    """The result of an item whose pair could not run (or that has no result): an error saying why."""
    name, _, param = check_id.partition("[")
    return CheckResult(name, param.rstrip("]"), None, None, ERROR, why)


def item_payload(pair_id: str, order: int, check: CheckResult) -> tuple[str, str]:
    return ITEM_PROPERTY, json.dumps({"pair": pair_id, "order": order, "check": check.to_dict()})


class Gathered:
    """Every item's check, each pair's header and the models of pairs that got no result, as reported."""

    def __init__(self) -> None:
        self.checks: dict[str, dict[str, tuple[int, dict[str, Any]]]] = {}
        self.headers: dict[str, dict[str, Any]] = {}
        self.specs: dict[str, dict[str, Any]] = {}

    def add(self, properties: Iterable[tuple[str, Any]]) -> None:
        """One item report's properties (those that are not convdiff's are ignored)."""
        props = dict(properties or ())
        if ITEM_PROPERTY not in props:
            return
        payload = json.loads(props[ITEM_PROPERTY])
        check = payload["check"]
        key = str(CheckResult.from_dict(check).check_id)
        self.checks.setdefault(payload["pair"], {})[key] = (payload["order"], check)
        if HEADER_PROPERTY in props:
            self.headers[payload["pair"]] = json.loads(props[HEADER_PROPERTY])
        if SPEC_PROPERTY in props:
            self.specs.setdefault(payload["pair"], json.loads(props[SPEC_PROPERTY]))

    def results(self, order: list[str], local_specs: dict[str, dict[str, Any]]) -> list[PairResult]:
        """Each pair's result, pairs in ``order`` first. A pair whose items all errored before a result
        existed is reported with those errors and its models from ``local_specs`` (this process's pairs),
        else from a worker's spec, else as unknown: never a crash, the other pairs' reports are at stake."""
        out = []
        for pid in order + [p for p in self.checks if p not in order]:
            payloads = self.checks.get(pid)
            if not payloads:
                continue
            header = self.headers.get(pid) or local_specs.get(pid) or self.specs.get(pid) or spec_header(
                pid, UNKNOWN_MODEL, UNKNOWN_MODEL, None, None)
            checks = [CheckResult.from_dict(c) for _, c in sorted(payloads.values(), key=lambda oc: oc[0])]
            out.append(PairResult.from_dict(header).with_checks(checks))
        return out
