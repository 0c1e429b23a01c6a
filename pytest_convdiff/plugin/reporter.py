"""The hooks of a session where convdiff is in play: adding the pairs' items, shipping each item's
check through ``user_properties`` (so the controller sees every worker's results under xdist),
and writing the reports at the end of the session."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from ..core.results import ERROR, CheckResult, PairResult
from ..errors import ConvdiffError
from .items import ConvdiffItem, ConvdiffPairError, PairCollector
from .session import ConvdiffState, PairSpec

ITEM_PROPERTY = "convdiff_item"  # {"pair", "order", "check"}
HEADER_PROPERTY = "convdiff_pair_result"  # the pair's PairResult without its checks, once per pair and process
# The pair's models, sent once per pair and process while no item has a result to take the header from (every
# item errored first, e.g. on a bad convdiff_bounds marker): under xdist the controller never collects a
# manifest, so it cannot look those pairs up itself.
SPEC_PROPERTY = "convdiff_pair_spec"
UNKNOWN_MODEL = "(unknown: no item of the pair reported it)"


def _spec_header(pid: str, spec: PairSpec) -> dict[str, Any]:
    """A pair's header before any result exists: its id and models, as the pair spec gives them."""
    return {"id": pid, "model_a": spec.a.path, "model_b": spec.b.path,
            "backend_a": spec.a.backend, "backend_b": spec.b.backend}


class SessionPlugin:
    def __init__(self, config: pytest.Config, state: ConvdiffState) -> None:
        self.config = config
        self.state = state
        self.remaining: dict[str, int] = {}
        self.specs_sent: set[str] = set()  # pairs whose models this process has reported (SPEC_PROPERTY)
        self.pair_specs: dict[str, dict[str, Any]] = {}  # gathered SPEC_PROPERTY payloads, by pair id

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(self, session: pytest.Session, items: list[pytest.Item]) -> None:
        for pair in self.state.pairs:
            collector = PairCollector.from_parent(session, name=f"convdiff[{pair.id}]",
                                                  nodeid=f"convdiff[{pair.id}]", pair=pair)
            items.extend(collector.collect())

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
            name, _, param = item.check_id.partition("[")
            why = pr.error if pr is not None and pr.error else str(rep.longrepr or "")
            check = CheckResult(name, param.rstrip("]"), None, None, ERROR, why or "")
        props = list(item_properties(check))
        props.append((ITEM_PROPERTY, json.dumps({"pair": item.pair.id, "order": item.order,
                                                 "check": check.to_dict()})))
        if pr is not None and item.pair.id not in self.state.headers_sent:
            self.state.headers_sent.add(item.pair.id)
            props.append((HEADER_PROPERTY, json.dumps(pr.with_checks([]).to_dict())))
        elif pr is None and item.pair.id not in self.state.headers_sent and item.pair.id not in self.specs_sent:
            self.specs_sent.add(item.pair.id)
            props.append((SPEC_PROPERTY, json.dumps(_spec_header(item.pair.id, item.pair))))
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
        props = dict(report.user_properties or ())
        if ITEM_PROPERTY not in props:
            return
        payload = json.loads(props[ITEM_PROPERTY])
        check = payload["check"]
        key = str(CheckResult.from_dict(check).check_id)
        self.state.check_payloads.setdefault(payload["pair"], {})[key] = (payload["order"], check)
        if HEADER_PROPERTY in props:
            self.state.pair_headers[payload["pair"]] = json.loads(props[HEADER_PROPERTY])
        if SPEC_PROPERTY in props:
            self.pair_specs.setdefault(payload["pair"], json.loads(props[SPEC_PROPERTY]))

    def assemble(self) -> list[PairResult]:
        """Each pair's result from what its items reported, in the order the pairs were given."""
        state = self.state
        order = [p.id for p in state.all_pairs()]
        out = []
        for pid in order + [p for p in state.check_payloads if p not in order]:
            payloads = state.check_payloads.get(pid)
            if not payloads:
                continue
            header = state.pair_headers.get(pid) or self._header_without_result(pid)
            checks = [CheckResult.from_dict(c) for _, c in sorted(payloads.values(), key=lambda oc: oc[0])]
            out.append(PairResult.from_dict(header).with_checks(checks))
        return out

    def _header_without_result(self, pid: str) -> dict[str, Any]:
        """No item of the pair got as far as a result (each errored first): the pair is reported with its
        items' errors, its models named from the pair's spec here, else from the one a worker sent (the
        controller under xdist collects no manifest), else as unknown. Never a crash: the other pairs'
        reports are at stake."""
        spec = next((p for p in self.state.all_pairs() if p.id == pid), None)
        if spec is not None:
            return _spec_header(pid, spec)
        return self.pair_specs.get(pid) or {"id": pid, "model_a": UNKNOWN_MODEL, "model_b": UNKNOWN_MODEL,
                                            "backend_a": None, "backend_b": None}

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
