"""The hooks of a session where convdiff is in play: adding the pairs' items, shipping each item's
check through ``user_properties`` (so the controller sees every worker's results under xdist),
and writing the reports at the end of the session."""

from __future__ import annotations

import json
import os

import pytest

from ..core.results import ERROR, PairResult
from ..errors import ConvdiffError
from ..reporting.gather import HEADER_PROPERTY, SPEC_PROPERTY, error_check, item_payload, spec_header
from .items import ConvdiffItem, ConvdiffPairError, PairCollector
from .session import ConvdiffState


class SessionPlugin:
    def __init__(self, config: pytest.Config, state: ConvdiffState) -> None:
        self.config = config
        self.state = state
        self.remaining: dict[str, int] = {}
        self.specs_sent: set[str] = set()  # pairs whose models this process has reported (SPEC_PROPERTY)

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(self, session: pytest.Session, items: list[pytest.Item]) -> None:
        for pair in self.state.pairs:
            collector = PairCollector.from_parent(session, name=f"convdiff[{pair.id}]",
                                                  nodeid=f"convdiff[{pair.id}]", pair=pair)
            collected = list(collector.collect())
            items.extend(collected)
            # reported as collected, so "collected N items" counts the pair's items (pytest's own count
            # comes from collect reports, and these items are made after collection proper)
            self.config.hook.pytest_collectreport(report=pytest.CollectReport(collector.nodeid, "passed", None,
                                                                              collected))
        if self.state.shard is not None:
            k, n = self.state.shard
            ids = sorted({item.pair.id for item in items if isinstance(item, ConvdiffItem)})
            mine = set(ids[k - 1::n])
            other = [i for i in items if isinstance(i, ConvdiffItem) and i.pair.id not in mine]
            if other:
                self.config.hook.pytest_deselected(items=other)
                items[:] = [i for i in items if not (isinstance(i, ConvdiffItem) and i.pair.id not in mine)]

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]):
        outcome = yield
        if not isinstance(item, ConvdiffItem):
            return
        rep = outcome.get_result()
        if call.when == "setup" and rep.failed and call.excinfo is not None:
            if isinstance(call.excinfo.value, (ConvdiffPairError, ConvdiffError)):
                rep.longrepr = item.repr_failure(call.excinfo)  # pytest renders setup errors as tracebacks
        if not (call.when == "call" or (call.when == "setup" and rep.failed)):
            return
        from ..reporting.junit import item_properties

        check, pr = item.result, item.pair_result
        if check is None or (pr is not None and pr.error and check.outcome == ERROR):
            check = error_check(item.check_id, (pr.error if pr is not None and pr.error else str(rep.longrepr or "")))
        props = [*item_properties(check), item_payload(item.pair.id, item.order, check)]
        if pr is not None and item.pair.id not in self.state.headers_sent:
            self.state.headers_sent.add(item.pair.id)
            props.append((HEADER_PROPERTY, json.dumps(pr.with_checks([]).to_dict())))
        elif pr is None and item.pair.id not in self.state.headers_sent and item.pair.id not in self.specs_sent:
            self.specs_sent.add(item.pair.id)
            props.append((SPEC_PROPERTY, json.dumps(_header(item.pair))))
        rep.user_properties.extend(props)
        item.user_properties.extend(props)  # junitxml writes properties from the item's list

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        """How many items of each pair this process holds, so the pair's runs are let go after its last."""
        selected: dict[str, list[str]] = {}
        for item in session.items:
            if isinstance(item, ConvdiffItem):
                self.remaining[item.pair.id] = self.remaining.get(item.pair.id, 0) + 1
                selected.setdefault(item.pair.id, []).append(item.check_id)
        for pair_id, ids in selected.items():
            comparison = self.state.comparisons.get(pair_id)
            if comparison is not None and not comparison.needs_outputs(ids):
                comparison.static_only = True  # e.g. -k weights: no model is loaded
    def pytest_runtest_teardown(self, item: pytest.Item) -> None:
        if isinstance(item, ConvdiffItem) and item.pair.id in self.remaining:
            self.remaining[item.pair.id] -= 1
            comparison = self.state.comparisons.get(item.pair.id)
            if self.remaining[item.pair.id] <= 0 and comparison is not None:
                comparison.close()  # its cache entries are no longer in use: the budget may evict them

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Gather every item's check (on the controller, reports from xdist workers arrive here too)."""
        self.state.gathered.add(report.user_properties)

    def assemble(self) -> list[PairResult]:
        """Each pair's result from what its items reported, in the order the pairs were given."""
        pairs = self.state.all_pairs()
        return self.state.gathered.results([p.id for p in pairs], {p.id: _header(p) for p in pairs})

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        for comparison in self.state.comparisons.values():
            comparison.close()
        if hasattr(self.config, "workerinput"):
            return
        from .. import reporting

        state = self.state
        pairs = state.final_pairs = self.assemble()
        if pairs:
            state.report_lines = reporting.write_outputs(
                pairs, json_path=state.json_path, html_path=state.html_path, plot_dir=state.plot_dir,
                github_step_summary=os.environ.get("GITHUB_STEP_SUMMARY") or None)
        if state.baseline is not None and state.baseline.update:
            from ..store import baseline_file

            try:
                written = baseline_file.update(state.baseline.path, pairs)
                state.report_lines.append(("info", f"baseline {state.baseline.path} updated for "
                                                   f"{len(written)} pair(s)"))
            except Exception as exc:  # noqa: BLE001 - reported; the run's own outcome stands
                state.report_lines.append(("error", f"could not update the baseline {state.baseline.path}: {exc}"))

    def pytest_terminal_summary(self, terminalreporter) -> None:
        state = self.state
        if hasattr(self.config, "workerinput"):
            return
        if state.final_pairs:
            from ..reporting.terminal import summary_lines

            terminalreporter.write_sep("=", "convdiff summary")
            for line in summary_lines(state.final_pairs):
                terminalreporter.write_line(line)
        for level, message in state.report_lines:
            terminalreporter.write_line(f"convdiff: {message}", red=level == "error", yellow=level == "warning")


def _header(pair) -> dict:
    return spec_header(pair.id, pair.a.path, pair.b.path, pair.a.backend, pair.b.backend)
