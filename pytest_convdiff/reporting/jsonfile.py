"""The JSON report file: ``report_document`` written atomically, and read back into ``PairResult``s.

Reading back is what lets a later job re-render (HTML, plots, a summary) from a file an earlier one
wrote, so a file that is not a convdiff report must say which file and why, not raise a KeyError.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..core.results import JSON_VERSION, PairResult, pairs_from_document, report_document
from ..errors import ConvdiffError
from ..store.atomic import write_json


class ReportFormatError(ConvdiffError, ValueError):
    """A file read as a convdiff JSON report is not one (or not this version)."""


def write(path: str | os.PathLike[str], pairs: list[PairResult]) -> Path:
    """Write the report; a reader sees the previous file or this one, never half of it."""
    path = Path(path)
    write_json(path, report_document(pairs), indent=2)
    return path


def read(path: str | os.PathLike[str]) -> list[PairResult]:
    """The pairs of a report written by :func:`write` (verdicts are recomputed, not trusted)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ReportFormatError(f"{path} is not a convdiff JSON report: not JSON ({exc}).") from exc
    try:
        return pairs_from_document(doc)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ReportFormatError(
            f"{path} is not a convdiff JSON report (version {JSON_VERSION}, as written by --convdiff-json): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
