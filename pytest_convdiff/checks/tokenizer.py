"""``tokenizer[<category>]`` and ``tokenizer[special]``: both tokenizers on built-in tricky strings
(whitespace, digits, emoji, CJK, ...) and their BOS/EOS behaviour: tokenizer bugs the corpus does
not happen to contain."""

from __future__ import annotations

from typing import Any

from ..core import metrics
from ..core.results import CheckId, CheckResult
from ..core.tokenizer_cases import TOKENIZER_CASES
from ..runner import ProduceContext
from .base import CheckFamily, EvalContext, PlanContext, result, skipped
from .tokens import piece

SPECIAL = "special"


def produce(ctx: ProduceContext) -> dict[str, list[dict[str, Any]]]:
    """Each built-in tricky string as the loaded model tokenizes it (a tokenizer that raises is a finding)."""
    cases: dict[str, list[dict[str, Any]]] = {}
    for category, texts in TOKENIZER_CASES.items():
        rows = []
        for text in texts:
            try:
                ids = ctx.backend.tokenize(text)
                rows.append({"text": text, "ids": ids, "pieces": [ctx.piece(t) for t in ids]})
            except Exception as exc:  # noqa: BLE001 - a tokenizer that chokes is a finding, not a crash
                rows.append({"text": text, "ids": None, "error": f"{type(exc).__name__}: {exc}"})
        cases[category] = rows
    return cases


def plan(ctx: PlanContext) -> list[CheckId]:
    if not ctx.settings.tokenizer_cases:
        return []
    return [CheckId("tokenizer", cat) for cat in TOKENIZER_CASES] + [CheckId("tokenizer", SPECIAL)]


def _category(cid: CheckId, rows_a: list[dict], rows_b: list[dict]) -> CheckResult:
    bad = [(ra, rb) for ra, rb in zip(rows_a, rows_b, strict=True) if ra.get("ids") != rb.get("ids")]
    if not bad:
        return result(cid, 0.0, True, f"{len(rows_a)} strings tokenize identically")
    ra, rb = bad[0]
    if ra.get("ids") is None or rb.get("ids") is None:
        first = f"A: {ra.get('error') or ra.get('ids')}\nB: {rb.get('error') or rb.get('ids')}"
    else:
        d = metrics.compare_tokens(ra["ids"], rb["ids"])
        i = d.first_mismatch
        first = (f"first mismatch at position {i}: A {d.id_a} {piece(ra.get('pieces'), i)} vs "
                 f"B {d.id_b} {piece(rb.get('pieces'), i)}\n"
                 f"A ids {ra['ids']} pieces {ra.get('pieces')}\nB ids {rb['ids']} pieces {rb.get('pieces')}")
    msg = f"Tokenizers disagree on {len(bad)} of {len(rows_a)} {cid.param} strings.\nFirst: {ra['text']!r}: {first}"
    return result(cid, float(len(bad)), False, msg, details={"failing_texts": [r[0]["text"] for r in bad]})


def _special(cid: CheckId, sa: dict, sb: dict) -> CheckResult:
    problems = []
    for flag, what in (("adds_bos", "BOS"), ("adds_eos", "EOS")):
        if sa.get(flag) != sb.get(flag):
            problems.append(f"A {'adds' if sa.get(flag) else 'does not add'} {what}, "
                            f"B {'adds' if sb.get(flag) else 'does not add'} it")
    for key in ("bos_id", "eos_id"):
        if sa.get(key) is not None and sb.get(key) is not None and sa.get(key) != sb.get(key):
            problems.append(f"{key}: A {sa.get(key)} vs B {sb.get(key)}")
    if problems:
        return result(cid, float(len(problems)), False,
                      "Special-token behaviour differs: " + "; ".join(problems) + ".\n"
                      "For a GGUF, check tokenizer.ggml.add_bos_token / add_eos_token and the bos/eos ids against "
                      "the original tokenizer_config.json.")
    return result(cid, 0.0, True, f"BOS/EOS behaviour identical (adds_bos={sa.get('adds_bos')}, "
                                  f"adds_eos={sa.get('adds_eos')})")


def evaluate(ctx: EvalContext) -> list[CheckResult]:
    ca, cb = ctx.a.tokenizer_cases, ctx.b.tokenizer_cases
    planned = ctx.planned("tokenizer") if ctx.plan is not None else plan(PlanContext(ctx.corpus, None, ctx.settings))
    if not planned and not (ca or cb):
        return []
    out = []
    for cat in TOKENIZER_CASES:
        cid = CheckId("tokenizer", cat)
        rows_a, rows_b = ca.get(cat), cb.get(cat)
        if rows_a is None or rows_b is None:
            out.append(skipped(cid, "tokenizer cases were not recorded"))
        else:
            out.append(_category(cid, rows_a, rows_b))
    out.append(_special(CheckId("tokenizer", SPECIAL), ctx.a.special, ctx.b.special))
    return out


FAMILY = CheckFamily("tokenizer", 20, plan, evaluate, doc="tricky strings and BOS/EOS behaviour",
                     produce=produce, produce_key="tokenizer_cases",
                     produce_when=lambda settings: settings.tokenizer_cases)
