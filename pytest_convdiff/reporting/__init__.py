"""Reports a person reads, all drawn from the same ``PairResult`` objects and the same rows.

* :func:`summary_lines` -- the terminal ``convdiff summary`` (:mod:`.terminal`).
* :func:`write_outputs` -- the files: JSON (:mod:`.jsonfile`), plots (:mod:`.plots`), HTML
  (:mod:`.html`) and the GitHub Actions step summary (:mod:`.markdown`).
* :func:`item_properties` -- JUnit XML properties of one item (:mod:`.junit`).

Importing this package loads neither matplotlib nor pytest: plots import matplotlib when drawn.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..core.results import CheckResult, PairResult
from ..errors import ConvdiffError
from . import html, jsonfile, markdown, plots
from .jsonfile import ReportFormatError
from .jsonfile import read as read_json
from .jsonfile import write as write_json
from .junit import item_properties
from .plots import PlotDependencyError
from .terminal import summary_lines

INFO, WARNING, ERROR = "info", "warning", "error"
Message = tuple[str, str]  # (level, text) for the plugin to print

__all__ = [
    "CheckResult",
    "Message",
    "PairResult",
    "PlotDependencyError",
    "ReportFormatError",
    "item_properties",
    "read_json",
    "summary_lines",
    "write_json",
    "write_outputs",
]


def _failure(what: str, path: str | os.PathLike[str], exc: BaseException) -> Message:
    """One line naming the output, the path and the cause; a bug's exception type is kept in view."""
    cause = str(exc) if isinstance(exc, (OSError, ConvdiffError)) else f"{type(exc).__name__}: {exc}"
    return ERROR, f"could not write the {what} {path}: {cause}"


def _plots_in_memory(pairs: list[PairResult]) -> tuple[dict[str, plots.PlotSource], Message | None]:
    """Plots for an HTML page when no plot directory was asked for: the page promises them."""
    try:
        return {p.id: plots.render_png(p) for p in pairs}, None
    except PlotDependencyError as exc:
        return {}, (WARNING, f"the HTML report has no plots: {exc}")
    except Exception as exc:  # noqa: BLE001 - a plot must not cost the page
        return {}, (WARNING, f"the HTML report has no plots: {type(exc).__name__}: {exc}")


def write_outputs(pairs: list[PairResult], *, json_path: str | os.PathLike[str] | None = None,
                  html_path: str | os.PathLike[str] | None = None,
                  plot_dir: str | os.PathLike[str] | None = None,
                  github_step_summary: str | os.PathLike[str] | None = None) -> list[Message]:
    """Write every output asked for; returns ``(level, message)`` lines (``info``/``warning``/``error``).

    One output failing (a full disk, a bad path, a renderer bug) is reported and the others are
    still written: the JSON report matters most and is written first. JSON, HTML and plots are
    written atomically (the old file survives a failure); the step summary is appended to, as other
    steps of the job write there too.
    """
    out: list[Message] = []
    if json_path is not None:
        try:
            jsonfile.write(json_path, pairs)
            out.append((INFO, f"JSON report written to {json_path}"))
        except Exception as exc:  # noqa: BLE001 - reported; the other outputs still get written
            out.append(_failure("JSON report", json_path, exc))
    figures: dict[str, plots.PlotSource] = {}
    plots_tried = False
    if plot_dir is not None:
        plots_tried = True
        try:
            paths = plots.plot_pairs(pairs, plot_dir)
            figures = {p.id: path for p, path in zip(pairs, paths, strict=True)}
            out.append((INFO, f"{len(paths)} plot(s) written to {plot_dir}"))
        except PlotDependencyError as exc:
            out.append((WARNING, str(exc)))
        except Exception as exc:  # noqa: BLE001
            out.append(_failure("plots in", plot_dir, exc))
    if html_path is not None:
        if not plots_tried and pairs:
            figures, warning = _plots_in_memory(pairs)
            if warning:
                out.append(warning)
        try:
            html.write(html_path, pairs, figures or None)
            out.append((INFO, f"HTML report written to {html_path}"))
        except Exception as exc:  # noqa: BLE001
            out.append(_failure("HTML report", html_path, exc))
    if github_step_summary:
        try:
            markdown.append(github_step_summary, pairs)
            out.append((INFO, "summary appended to $GITHUB_STEP_SUMMARY"))
        except Exception as exc:  # noqa: BLE001
            out.append(_failure("step summary", Path(github_step_summary), exc))
    return out
