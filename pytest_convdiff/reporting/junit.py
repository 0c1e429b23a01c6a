"""Per-item properties for ``--junitxml``: CI dashboards read values and bounds without parsing messages."""

from __future__ import annotations

import json

from ..core.results import CheckResult

PROPERTY = "convdiff"


def item_properties(check: CheckResult) -> list[tuple[str, str]]:
    """``convdiff_<name>`` (the value), ``convdiff_bound`` and ``convdiff`` (the whole result as JSON)."""
    props: list[tuple[str, str]] = []
    if check.value is not None:
        props.append((f"convdiff_{check.name}", repr(check.value)))
    if check.threshold is not None:
        props.append(("convdiff_bound", repr(check.threshold)))
    props.append((PROPERTY, json.dumps(check.to_dict(), separators=(",", ":"), default=str)))
    return props
