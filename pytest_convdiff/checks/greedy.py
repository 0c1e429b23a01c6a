"""``greedy``: A continues a few short prompts greedily and B is run on A's continuation; where B's
greedy choice first differs, each model's token must be in the other's top-N (vLLM's
check_logprobs_close). Catches generation that goes off the rails although logits look close.

A float or 8-bit conversion must stay within the top-N on every prompt (``greedy_off_path`` 0).
Below 8 bits the budget is 1, so the item reports and never fails: a correct Q5_K_M of the tiny
random-weight model leaves A's path on 2 of the 3 prompts of the default corpus and its Q4_0 on all 3
(flat distributions: a little noise reorders a top-5), and a correct Q3_K_M of a trained model failed
on greedy alone. With a few prompts the fraction moves in steps of a third, so no budget between 0 and
1 separates noise from a defect; the checks that do are the correctness families (docs/bounds.md).
Tighten it for a model you know with ``--convdiff-bound greedy_off_path=0.34``."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..backends.base import IncrementalDecoder, logits_from
from ..core import metrics
from ..core.bounds import BoundSpec
from ..core.results import UPPER, CheckId, CheckResult
from ..runner import ProduceContext
from .base import CheckFamily, EvalContext, PlanContext, judge, per_class, skipped

GREEDY = CheckId("greedy")
BOUNDS = (BoundSpec("greedy_off_path", UPPER, per_class(0.0, 0.0, 0.0, 1.0, 1.0, 1.0),
                    "fraction of greedy prompts where B leaves A's path beyond the top-N"),)


GREEDY_PROMPTS = 3
GREEDY_PREFIX = 48
GREEDY_TOPN = 5


def _chosen(corpus: Any) -> list[Any]:
    return [p for p in corpus if p.kind != "long"][:GREEDY_PROMPTS]


def _forced(feed: Any, corpus: Any) -> list[tuple[str, list[int], list[int]]]:
    """(prompt id, A's prefix, A's continuation) of each prompt A decoded: what B is teacher-forced on."""
    theirs = feed.meta.get("greedy") or {}
    return [(p.id, [int(t) for t in feed.inputs(p.id)][: theirs[p.id]["prefix_len"]], theirs[p.id]["generated"])
            for p in _chosen(corpus) if p.id in theirs]


def forced_prefixes(feed: Any, corpus: Any) -> list[list[int]]:
    """What B's run over the corpus keeps the state of, for ``produce``: each forced run's tokens before the
    position whose logits are first compared. B's run over the prompt computed those positions already (B is
    causal), so the forced run computes only A's continuation."""
    if feed is None:
        return []
    return [prefix[:-1] for _, prefix, _ in _forced(feed, corpus) if len(prefix) > 1]


def produce(ctx: ProduceContext) -> dict[str, Any]:
    """Greedy continuations of the first few non-long prompts, with each step's top-N token ids.

    A generates (incrementally on its KV cache when the backend has ``greedy_decode``, else one
    full forward per new token). B is teacher-forced on A's continuation in a single
    forward (from the state its run over the prompt kept, where the backend keeps one): up to
    the first step where they disagree that *is* B's own greedy path, and the check
    (vLLM's check_logprobs_close) stops comparing a prompt at its first disagreement anyway.
    """
    backend, feed, prompts, n_new = ctx.backend, ctx.feed, ctx.prompts, ctx.settings.greedy_tokens
    out: dict[str, Any] = {}
    chosen = _chosen(ctx.corpus)
    if feed is not None:
        for pid, prefix, forced in _forced(feed, ctx.corpus):
            # on the state B's run over the corpus kept after the prefix's first len - 1 tokens (``forced_prefixes``)
            logits = logits_from(backend, prefix + forced[:-1], len(prefix) - 1)
            tops = [[int(t) for t in row] for row in metrics.topk_indices(logits, GREEDY_TOPN)]
            out[pid] = {"prefix_len": len(prefix), "generated": [top[0] for top in tops], "top": tops,
                        "index": prompts.index(pid), "teacher_forced": True}
    else:
        prefixes = [[int(t) for t in backend.tokenize(p.text)][:GREEDY_PREFIX] for p in chosen]
        steps: list[list[list[int]]] = [[] for _ in chosen]

        def pick(i: int, logits: np.ndarray) -> int:
            top = [int(t) for t in metrics.topk_indices(np.asarray(logits)[None, :], GREEDY_TOPN)[0]]
            steps[i].append(top)
            return top[0]

        if isinstance(backend, IncrementalDecoder):
            backend.greedy_decode(prefixes, n_new, pick)  # incremental, on the backend's KV cache
        else:
            for i, prefix in enumerate(prefixes):
                ids = list(prefix)
                for _ in range(n_new):
                    ids.append(pick(i, np.asarray(backend.forward(ids, hidden_states=False).logits[-1])))
        for p, prefix, top in zip(chosen, prefixes, steps, strict=True):
            out[p.id] = {"prefix_len": len(prefix), "generated": [t[0] for t in top], "top": top,
                         "index": prompts.index(p.id)}
    ctx.progress(f"{ctx.label}  greedy: {len(out)} prompts x {n_new} tokens")
    return out



def plan(ctx: PlanContext) -> list[CheckId]:
    return [GREEDY] if ctx.settings.greedy_tokens else []


def evaluate(ctx: EvalContext) -> list[CheckResult]:
    ga, gb = ctx.a.meta.get("greedy"), ctx.b.meta.get("greedy")
    if ga is None and gb is None:
        return [skipped(GREEDY, "greedy continuations were not recorded")] if ctx.planned("greedy") else []
    if not ga or not gb:
        return [skipped(GREEDY, "greedy continuations were not recorded")]
    bad, lines, same = [], [], 0
    for pid, ra in ga.items():
        rb = gb.get(pid)
        if rb is None:
            continue
        for step, (ta, tb) in enumerate(zip(ra["generated"], rb["generated"], strict=False)):
            if ta == tb:
                continue
            in_b, in_a = ta in rb["top"][step], tb in ra["top"][step]
            lines.append(f"{pid!r}: first difference at generated token {step}: A {ta}, B {tb}; "
                         f"A's token {'in' if in_b else 'NOT in'} B's top-{len(rb['top'][step])}, "
                         f"B's token {'in' if in_a else 'NOT in'} A's top-{len(ra['top'][step])}")
            if not (in_a and in_b):
                bad.append(pid)
            break
        else:
            same += 1
    n = len(ga)
    if not n:
        return [skipped(GREEDY, "no greedy prompt was run")]
    frac = len(bad) / n
    if bad:
        where = (f"{len(bad)} of {n} prompts leave A's path beyond the top-N ({', '.join(map(repr, bad))})\n"
                 + "\n".join(lines))
    else:
        where = (f"{same} of {n} greedy continuations identical; the rest differ only between close candidates"
                 + (": " + "; ".join(lines) if lines else ""))
    return [judge(ctx, GREEDY, "greedy_off_path", frac, "fraction of greedy prompts off A's path", where,
                  details={"prompts": n, "off_path": bad})]


FAMILY = CheckFamily("greedy", 50, plan, evaluate, bounds=BOUNDS, doc="greedy generation stays on A's path",
                     produce=produce, produce_key="greedy", produce_when=lambda settings: settings.greedy_tokens > 0,
                     produce_prefixes=forced_prefixes)
