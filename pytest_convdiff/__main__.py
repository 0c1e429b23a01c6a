"""``python -m pytest_convdiff merge``: the shards of a zoo run (``--convdiff-shard K/N``) joined into one report;
``python -m pytest_convdiff kld base|score``: llama-perplexity's KL-divergence files and statistics.

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


def kld(args: argparse.Namespace) -> int:
    """``kld base`` / ``kld score``: llama-perplexity's KL-divergence files and statistics (``perplexity``)."""
    from . import perplexity
    from .backends.options import parse_option_items
    from .store.atomic import write_json

    def progress(what: str) -> None:
        print(f"convdiff kld: {args.model}: {what}", file=sys.stderr)

    try:
        try:
            options = parse_option_items(args.option)
        except ValueError as exc:
            raise ConvdiffError(f"--option: {exc}") from None
        if args.kld_command == "base":
            from .store.reference import is_reference

            if is_reference(args.model):
                f = perplexity.write_base_from_reference(args.model, args.output, n_ctx=args.ctx, progress=progress)
            else:
                if args.text is None:
                    raise ConvdiffError(f"{args.model} is a model, not a saved reference: pass --text FILE to "
                                        "evaluate it on")
                try:
                    text = args.text.read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError) as exc:
                    raise ConvdiffError(f"--text {args.text}: cannot read it as UTF-8 text ({exc})") from None
                f = perplexity.write_base(args.model, text, args.output, n_ctx=args.ctx or perplexity.DEFAULT_CTX,
                                          n_chunks=args.chunks, backend=args.backend, options=options,
                                          progress=progress)
            print(f"wrote {f.path}: n_ctx={f.n_ctx}, n_vocab={f.n_vocab}, n_chunk={f.n_chunk} "
                  f"({f.n_chunk * (f.n_ctx - 1 - f.n_ctx // 2)} scored tokens)")
            return 0
        stats = perplexity.score(args.model, args.base, backend=args.backend, options=options, progress=progress)
    except (ConvdiffError, ValueError, OSError) as exc:
        print(f"convdiff kld: {exc}", file=sys.stderr)
        return 2
    for line in stats.report():
        print(line)
    if stats.count < 100:
        print(f"(only {stats.count} scored tokens: llama-perplexity prints no statistics below 100)")
    if args.json:
        write_json(args.json, stats.to_dict(), indent=1)
    failed = [f"{name} {value:.6g} > {bound:.6g}" for name, value, bound in (
        ("mean KLD", stats.kld_mean, args.max_kld), ("PPL ratio", stats.ppl_ratio, args.max_ppl_ratio))
        if bound is not None and not value <= bound]
    if args.min_same_top is not None and not stats.same_top >= args.min_same_top:
        failed.append(f"same top {stats.same_top:.6g} < {args.min_same_top:.6g}")
    for line in failed:
        print(f"convdiff kld: FAILED: {line}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pytest_convdiff", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    k = sub.add_parser("kld", help="llama-perplexity's KL-divergence base files and statistics, any backend")
    ksub = k.add_subparsers(dest="kld_command", required=True)
    kb = ksub.add_parser("base", help="write a --kl-divergence-base file from a model (e.g. the transformers A)")
    kb.add_argument("model", help="the base model (a transformers checkpoint, a .gguf, ...) or a golden reference "
                                  "saved with --convdiff-store full")
    kb.add_argument("--text", type=Path, help="the evaluation text (UTF-8), e.g. wiki.test.raw; not for a reference")
    kb.add_argument("-o", "--output", type=Path, required=True, help="the base file to write")
    kb.add_argument("-c", "--ctx", type=int, default=None,
                    help="tokens per chunk, as llama-perplexity's -c (512; for a reference: the length scoring most)")
    kb.add_argument("--chunks", type=int, default=None, help="at most this many chunks (default: all)")
    ks = ksub.add_parser("score", help="score a model against a base file, as llama-perplexity --kl-divergence")
    ks.add_argument("model", help="the model under test")
    ks.add_argument("--base", type=Path, required=True, help="a --kl-divergence-base file (ours or llama.cpp's)")
    ks.add_argument("--json", type=Path, help="write the statistics here as JSON")
    ks.add_argument("--max-kld", type=float, help="exit 1 when the mean KLD exceeds this")
    ks.add_argument("--max-ppl-ratio", type=float, help="exit 1 when PPL(Q)/PPL(base) exceeds this")
    ks.add_argument("--min-same-top", type=float, help="exit 1 when the same-top fraction is below this (0..1)")
    for p in (kb, ks):
        p.add_argument("--backend", help="the model's backend (default: detected from the path)")
        p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                       help="a backend option, as --convdiff-option-a (repeatable)")
    m = sub.add_parser("merge", help="join the JSON reports of a sharded run into one JSON, HTML and summary")
    m.add_argument("reports", nargs="+", type=Path, help="the shards' --convdiff-json reports")
    m.add_argument("--json", type=Path, help="write the joined JSON report here")
    m.add_argument("--html", type=Path, help="write the joined HTML report here")
    m.add_argument("--summary", type=Path, help="append the Markdown summary here (default: $GITHUB_STEP_SUMMARY)")
    args = parser.parse_args(argv)
    if args.command == "kld":
        return kld(args)

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
