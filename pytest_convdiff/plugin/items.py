"""Items: one per planned check of a pair, grouped under ``convdiff[<pair>]`` (from the command line
or a ``*.convdiff.toml`` manifest). An item asks its pair's ``Comparison`` for the result (the first
one runs the pair) and passes, fails or skips as its check did."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..core.results import ERROR, FAILED, SKIPPED, CheckResult, PairResult
from ..errors import ConvdiffError
from ..zoo import PairSpec
from .session import STASH, ConvdiffState


class ConvdiffCheckFailure(AssertionError):
    """A check outside its bound; the message is the whole report."""


class ConvdiffPairError(Exception):
    """The pair could not be run (a model that cannot be loaded, a backend crash): reported at setup."""


def progress_printer(config: pytest.Config):
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or hasattr(config, "workerinput") or config.option.verbose < 0:
        return lambda _msg: None

    capman = config.pluginmanager.get_plugin("capturemanager")

    def emit(msg: str) -> None:
        # Live progress goes to the terminal, not into the item's captured output.
        with capman.global_and_fixture_disabled() if capman is not None else _nothing():
            reporter.ensure_newline()
            reporter.write_line(f"convdiff: {msg}", cyan=True)

    return emit


@contextlib.contextmanager
def _nothing():
    yield


class PairCollector(pytest.Collector):
    """``convdiff[<pair>]``: the checks of one A/B pair."""

    def __init__(self, *, pair: PairSpec, **kw: Any) -> None:
        super().__init__(**kw)
        self.pair = pair

    def collect(self) -> Iterator[ConvdiffItem]:
        session = self.config.stash[STASH]
        plan = session.comparison(self.pair, progress_printer(self.config)).plan()
        for order, cid in enumerate(plan):
            item = ConvdiffItem.from_parent(self, name=str(cid), check_id=str(cid), order=order)
            item.add_marker(pytest.mark.convdiff)
            item.add_marker(pytest.mark.xdist_group(self.pair.id))
            for mark in self.pair.marks:
                item.add_marker(getattr(pytest.mark, mark))
            yield item


class ConvdiffItem(pytest.Item):
    def __init__(self, *, check_id: str, order: int, **kw: Any) -> None:
        super().__init__(**kw)
        self.check_id = check_id
        self.order = order
        self.result: CheckResult | None = None
        self.pair_result: PairResult | None = None

    @property
    def pair(self) -> PairSpec:
        return self.parent.pair  # type: ignore[attr-defined]

    def _marker_bounds(self) -> dict[str, float]:
        from .. import checks

        out: dict[str, float] = {}
        for mark in reversed(list(self.iter_markers("convdiff_bounds"))):
            out.update(checks.parse_bound_mapping(mark.kwargs, "@pytest.mark.convdiff_bounds"))
        return out

    def setup(self) -> None:
        # The first item of a pair runs it. A pair that cannot run errors each item at setup: the first
        # with the whole reason, the others with one line (the report hook swaps pytest's traceback for
        # repr_failure's text, so no item prints an internal traceback).
        session: ConvdiffState = self.config.stash[STASH]
        comparison = session.comparison(self.pair, progress_printer(self.config))
        try:
            overrides = self._marker_bounds()
        except ValueError as exc:
            raise ConvdiffError(str(exc)) from None
        pr = self.pair_result = comparison.result(overrides)
        self.result = pr.find(self.check_id)
        if pr.error and (self.result is None or self.result.outcome == ERROR):
            first = self.pair.id not in session.errors_shown
            session.errors_shown.add(self.pair.id)
            raise ConvdiffPairError(
                f"The pair could not be run:\n{pr.error}" if first else
                f"The pair could not be run (the first item of convdiff[{self.pair.id}] shows why): "
                f"{pr.error.splitlines()[0]}")

    def runtest(self) -> None:
        if self.result is None:
            raise ConvdiffError(f"check {self.check_id} was planned but not computed for pair {self.pair.id}")
        if self.result.outcome == SKIPPED:
            pytest.skip(self.result.message)
        if self.result.outcome in (FAILED, ERROR):
            raise ConvdiffCheckFailure(self.result.message)

    def repr_failure(self, excinfo, style=None):  # type: ignore[override]
        if isinstance(excinfo.value, ConvdiffPairError) and excinfo.value.args[0].startswith("The pair could not be "
                                                                                          "run (the first"):
            return str(excinfo.value)  # the first item of the pair showed the whole reason
        if isinstance(excinfo.value, (ConvdiffCheckFailure, ConvdiffPairError, ConvdiffError)):
            head = f"convdiff {self.pair.id} :: {self.name}\n  A: {self.pair.a.path}\n  B: {self.pair.b.path}\n"
            rerun = ""
            if isinstance(excinfo.value, ConvdiffCheckFailure):
                rerun = f"\nRerun just this check: pytest ... -k '{self.name}'"
            return head + str(excinfo.value) + rerun
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        return Path(self.pair.b.path), None, f"convdiff[{self.pair.id}]::{self.name}"


class ManifestFile(pytest.File):
    """A model-zoo manifest: each ``[[pair]]`` entry becomes a pair of checks, like --model-a/--model-b."""

    def collect(self):
        from ..manifest import load_manifest
        from ..zoo import manifest_pair

        session = self.config.stash[STASH]
        try:
            entries = load_manifest(self.path)
        except ConvdiffError as exc:
            raise self.CollectError(str(exc)) from None
        for entry in entries:
            for mark in entry.marks:
                self.config.addinivalue_line("markers", f"{mark}: set by {self.path.name}")
            try:
                pair = manifest_pair(entry, self.path, session.bound_overrides)
                session.add_manifest_pair(pair)
            except ConvdiffError as exc:
                raise self.CollectError(str(exc)) from None
            yield PairCollector.from_parent(self, name=f"convdiff[{pair.id}]", pair=pair)
