"""``python -m pytest_convdiff merge``: the shards of a zoo run (``--convdiff-shard K/N``) joined into one report.

    python -m pytest_convdiff merge out/shard-*.json --json all.json --html all.html --summary summary.md

Each shard's JSON report holds whole pairs (a pair is never split across shards), so joining them is a
union: the pairs are read back (verdicts recomputed from their checks, never trusted), ordered by pair id,
and written as one JSON, one HTML and one GitHub step summary. The exit status is 0 when every pair
passed, 1 when one failed or errored, 2 on bad input (a missing or unreadable report, a pair in two shards).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .core.results import PairResult
from .errors import ConvdiffError


def merge(reports: list[Path]) -> list[PairResult]:
    """Every pair of the given reports, by pair id; ConvdiffError on an unreadable report or a pair id
    found in two of them (the shards overlapped: they came from different runs or shard counts)."""
    from .reporting import read_json

    seen: dict[str, Path] = {}
    pairs: list[PairResult] = []
    for path in reports:
        if not path.is_file():
            raise ConvdiffError(f"{path}: no such report. Pass the JSON files written by --convdiff-json.")
        for pair in read_json(path):
            if pair.id in seen:
                raise ConvdiffError(f"pair {pair.id!r} is in both {seen[pair.id]} and {path}: shards of one run "
                                    "never share a pair; were these reports made by different runs?")
            seen[pair.id] = path
            pairs.append(pair)
    return sorted(pairs, key=lambda p: p.id)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pytest_convdiff", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="join the JSON reports of a sharded run into one JSON, HTML and summary")
    m.add_argument("reports", nargs="+", type=Path, help="the shards' --convdiff-json reports")
    m.add_argument("--json", type=Path, help="write the joined JSON report here")
    m.add_argument("--html", type=Path, help="write the joined HTML report here")
    m.add_argument("--summary", type=Path, help="append the Markdown summary here (default: $GITHUB_STEP_SUMMARY)")
    args = parser.parse_args(argv)

    from .reporting import ReportFormatError, summary_lines, write_outputs

    try:
        pairs = merge(args.reports)
    except (ConvdiffError, ReportFormatError, OSError) as exc:
        print(f"convdiff merge: {exc}", file=sys.stderr)
        return 2
    if not pairs:
        print("convdiff merge: the reports hold no pair", file=sys.stderr)
        return 2
    summary = args.summary or os.environ.get("GITHUB_STEP_SUMMARY") or None
    messages = write_outputs(pairs, json_path=args.json, html_path=args.html, github_step_summary=summary)
    for line in summary_lines(pairs):
        print(line)
    for level, text in messages:
        print(f"convdiff: {text}", file=sys.stderr if level == "error" else sys.stdout)
    if any(level == "error" for level, _ in messages):
        return 2
    return 0 if pairs and all(p.verdict == "pass" for p in pairs) else 1


if __name__ == "__main__":
    sys.exit(main())
