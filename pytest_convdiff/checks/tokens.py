"""``tokens[<prompt>]``: A's and B's token ids for every corpus prompt must be identical.

Logits are compared on A's ids whatever this finds, so a tokenizer bug fails here without hiding
how the logits compare.
"""

from __future__ import annotations

from ..core import metrics
from ..core.results import CheckId, CheckResult
from .base import CheckFamily, EvalContext, PlanContext, result


def piece(pieces: list[str] | None, i: int | None) -> str:
    """A token's text for a message; ``<end>`` past the end of the sequence."""
    if pieces is None or i is None or i >= len(pieces):
        return "<end>"
    return repr(pieces[i])


def plan(ctx: PlanContext) -> list[CheckId]:
    return [CheckId("tokens", p.id) for p in ctx.corpus]


def evaluate(ctx: EvalContext) -> list[CheckResult]:
    a, b = ctx.a, ctx.b
    out = []
    for p in ctx.corpus:
        cid = CheckId("tokens", p.id)
        ta, tb = a.own_tokens(p.id), b.own_tokens(p.id)
        d = metrics.compare_tokens(ta, tb)
        if d.equal:
            out.append(result(cid, 0.0, True, f"{len(ta)} token ids identical"))
            continue
        i = d.first_mismatch
        msg = (f"Token ids differ for prompt {p.id!r}: {d.mismatches} of {max(d.len_a, d.len_b)} positions "
               f"(A has {d.len_a} tokens, B {d.len_b}).\n"
               f"First mismatch at position {i}: A {d.id_a} {piece(a.pieces(p.id), i)} vs "
               f"B {d.id_b} {piece(b.pieces(p.id), i)}.\n"
               f"Context before it (A): {''.join(a.pieces(p.id)[max(0, i - 5):i])!r}\n"
               "Logits and hidden states are still compared on A's token ids. "
               "Token ids must match exactly; this check has no bound to change.")
        out.append(result(cid, float(d.mismatches), False, msg,
                          details={"first_mismatch": i, "id_a": d.id_a, "id_b": d.id_b}))
    return out


FAMILY = CheckFamily("tokens", 10, plan, evaluate, doc="token ids of every corpus prompt")
