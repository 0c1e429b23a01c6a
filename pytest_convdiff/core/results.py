"""The report schema: one typed structure for a pair's result, serialised in one place.

Every renderer (terminal, JSON, JUnit properties, Markdown step summary, HTML, plots) reads a
``PairResult``; the JSON report is ``PairResult.to_dict()`` and reads back with
``PairResult.from_dict``, so a report can be re-rendered from a file written earlier. The verdict
is computed here and nowhere else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

PASSED, FAILED, ERROR, SKIPPED = "passed", "failed", "error", "skipped"
OUTCOMES = (PASSED, FAILED, ERROR, SKIPPED)
UPPER, LOWER = "upper", "lower"  # a bound's direction: the value must stay at or below / at or above it
# What a failing check says about the conversion: a correctness check fails on a defect whatever the
# precision (tokens, config, causality, a layer anomaly); a budget check fails on too much numeric error.
CORRECTNESS, BUDGET = "correctness", "budget"
JSON_VERSION = 1


@dataclass(frozen=True)
class CheckId:
    """``name[param]``: the one place a check's id is spelled (item names, JSON, -k selection)."""

    name: str
    param: str = ""

    def __str__(self) -> str:
        return f"{self.name}[{self.param}]" if self.param else self.name

    @classmethod
    def parse(cls, text: str) -> CheckId:
        name, _, rest = text.partition("[")
        return cls(name, rest[:-1] if rest.endswith("]") else rest)


def json_float(v: Any) -> Any:
    """JSON has no NaN/Inf: they become null (a NaN never satisfies a bound, and the outcome says so)."""
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    return v


def clean(obj: Any) -> Any:
    """A JSON-safe deep copy (string keys, no NaN/Inf, lists for tuples)."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and not isinstance(obj, (str, bytes)):
        try:
            obj = obj.item()  # numpy scalars
        except (TypeError, ValueError):
            return str(obj)
    return json_float(obj)


@dataclass
class CheckResult:
    """One item's outcome: what was compared, the value, the bound and its direction, the message."""

    name: str
    param: str
    value: float | None
    threshold: float | None
    outcome: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)
    direction: str | None = None  # UPPER / LOWER for a bounded check, None for an exact one
    kind: str = CORRECTNESS

    @property
    def id(self) -> str:
        return str(CheckId(self.name, self.param))

    @property
    def check_id(self) -> CheckId:
        return CheckId(self.name, self.param)

    @property
    def not_passed(self) -> bool:
        return self.outcome in (FAILED, ERROR)

    def bound_text(self) -> str:
        """``≤ 0.02`` / ``≥ 0.9`` / ``-``: the bound as a reader needs it."""
        if self.threshold is None:
            return "-"
        op = {UPPER: "≤ ", LOWER: "≥ "}.get(self.direction or "", "")
        return f"{op}{self.threshold:.3g}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "param": self.param, "value": json_float(self.value),
                "threshold": json_float(self.threshold), "direction": self.direction, "kind": self.kind,
                "outcome": self.outcome, "message": self.message, "details": clean(self.details)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CheckResult:
        return cls(d["name"], d.get("param") or "", d.get("value"), d.get("threshold"), d["outcome"],
                   d.get("message") or "", dict(d.get("details") or {}), d.get("direction"),
                   d.get("kind") or CORRECTNESS)


@dataclass
class PairResult:
    """Everything known about one A/B pair: its checks and the pair-level findings behind them."""

    id: str
    model_a: str
    model_b: str
    backend_a: str | None
    backend_b: str | None
    checks: list[CheckResult] = field(default_factory=list)
    error: str | None = None
    first_divergent_layer: int | None = None
    divergent_sublayer: str | None = None
    layers: list[dict[str, Any]] = field(default_factory=list)  # {"index", "rfn", "rfn_attn", "rfn_swap", ...}
    precision_class: str | None = None
    bounds: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, Any] | None = None  # the logit metrics (nmse, kl_mean, ppl_a, ...)
    info_a: dict[str, Any] = field(default_factory=dict)
    info_b: dict[str, Any] = field(default_factory=dict)
    from_cache: dict[str, bool] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    baseline_rfn: list[float | None] | None = None  # the stored rfn curve, in regression mode

    @property
    def verdict(self) -> str:
        """``error`` (the pair could not be run or a check errored), ``fail`` or ``pass``."""
        if self.error or any(c.outcome == ERROR for c in self.checks):
            return "error"
        if any(c.outcome == FAILED for c in self.checks):
            return "fail"
        return "pass"

    @property
    def failed(self) -> list[CheckResult]:
        return [c for c in self.checks if c.not_passed]

    def failed_kinds(self) -> list[str]:
        """Which kinds of check failed (correctness, budget), for the report's one-line reason."""
        return sorted({c.kind for c in self.failed})

    def check(self, check_id: str | CheckId) -> CheckResult:
        key = str(check_id)
        for c in self.checks:
            if c.id == key:
                return c
        raise KeyError(key)

    def find(self, check_id: str | CheckId) -> CheckResult | None:
        try:
            return self.check(check_id)
        except KeyError:
            return None

    def with_checks(self, checks: list[CheckResult]) -> PairResult:
        return replace(self, checks=list(checks))

    # Kept for code written against the first version's name.
    @property
    def logits(self) -> dict[str, Any] | None:
        return self.metrics

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = [c.to_dict() for c in value] if f.name == "checks" else clean(value)
        out["verdict"] = self.verdict
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PairResult:
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known and k != "checks"}
        return cls(**kw, checks=[CheckResult.from_dict(c) for c in d.get("checks") or []])


def report_document(pairs: list[PairResult]) -> dict[str, Any]:
    """The JSON report: ``{"version": 1, "pairs": [...]}``."""
    return {"version": JSON_VERSION, "pairs": [p.to_dict() for p in pairs]}


def pairs_from_document(doc: dict[str, Any]) -> list[PairResult]:
    if not isinstance(doc, dict) or doc.get("version") != JSON_VERSION or not isinstance(doc.get("pairs"), list):
        raise ValueError(f"not a convdiff JSON report (version {JSON_VERSION})")
    return [PairResult.from_dict(p) for p in doc["pairs"]]
