"""``runtime[logits]``, ``runtime[layers]``: B's runtime against its runtime twin, A's code run with B's weights.

A GGUF B and its twin T (A's transformers architecture loaded with B's own dequantised tensors) share
every weight, so only the runtime separates them: how llama.cpp reads the metadata (rope base and scaling,
norm epsilon, sliding windows, soft-caps, attention scale) and its kernels. The kernels' own precision is
measured on the files under test too: T8 is T with what llama.cpp's CPU kernels round rounded the same
way (each matmul's input to its weight type's activation type, 8-bit blocks for quantised weights, F16
for F16 ones; the KV cache to F16). B may be at most ``runtime_ratio`` times as far from T as T8 is:

- ``runtime[layers]``: per decoder layer, rfn(B, T) over rfn(T8, T); the first layer above the bound is
  where B's runtime leaves its twin;
- ``runtime[logits]``: sqrt of KL(T || B) over KL(T || T8), mean and 99th percentile (sqrt: KL grows
  with the square of a perturbation, so the ratio reads on rfn's scale).

A correct runtime gives ratios of about 1 at every type, F16 to Q2_K (docs/twins.md), a wrong rope base
30×, so one bound serves every type. The three runs (T, T8, B) cover the corpus's first three prompts and
its longest, each cut to ``TWIN_TOKENS`` positions (growth with position is the ``position`` check's,
which asks T for its own profile over the long prompts when B's grows). B runs without flash attention
unless asked (``backends.llamacpp.flash_default``): its F16 accumulator is a rounding T8 does not emulate,
which made an F16 file's KL at positions 1k-4k 20x its early level with identical weights. One model in
memory at a time, as for A and B; the runs are cached like theirs.

B is not run twice: when B is about to run over the corpus, T runs first (``companions``), and B's main run
reduces its outputs at the twin prompts' first positions against T as well, writing the twin's B entry (a
causal model's outputs at a prompt's first n positions are those of a run over those n tokens). The twin's B
run then comes from the cache; it runs by itself only when B's main run was already stored.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from ..backends.base import TWIN_GUEST, TWIN_HOST
from ..core.bounds import BoundSpec
from ..core.corpus import Corpus
from ..core.results import CORRECTNESS, FAILED, PASSED, UPPER, CheckId, CheckResult
from ..runner import TWIN_LOADING
from .base import OVERRIDE_HINT, CheckFamily, EvalContext, Findings, PlanContext, fmt, per_class, skipped

NAME = "runtime"
LOGITS, LAYERS = CheckId(NAME, "logits"), CheckId(NAME, "layers")
BOUNDS = (BoundSpec("runtime_ratio", UPPER, per_class(*[3.0] * 6),
                    "B's distance from its runtime twin (A's code, B's weights) over the distance llama.cpp's "
                    "own roundings give (the same twin with them emulated)"),)
TWIN_TOKENS = 1024  # positions per prompt in the twin runs
FLOOR_RFN = 1e-6  # below float32's resolution of a ratio: an exact twin
FLOOR_KL = 1e-12


def _applies(spec_a: Any, spec_b: Any) -> str | None:
    """Why there is no runtime twin for this pair, or None."""
    if spec_a is None or spec_b is None:
        return "no models named"
    try:
        ba, bb = spec_a.resolved_backend(), spec_b.resolved_backend()
        guest, host, b_hosts = spec_b.can(TWIN_GUEST), spec_a.can(TWIN_HOST), spec_b.can(TWIN_HOST)
    except Exception as exc:  # noqa: BLE001 - an unrecognised model errors the pair elsewhere
        return str(exc)
    if not guest:  # B on a host's backend runs the very code a twin would: there is no other runtime to test
        return (f"B runs on {bb}: its runtime is A's own" if b_hosts
                else f"B runs on {bb}, whose weights this check cannot load into A's architecture")
    if not host:
        return f"A runs on {ba}, whose architecture cannot run B's weights (the twin needs a host's code)"
    return None


def unavailable(ctx: EvalContext | PlanContext) -> str | None:
    """Why this pair has no runtime twin (turned off, or the backends cannot make one), or None."""
    if ctx.settings.runtime_twin == "off":
        return "the runtime twin is off (--convdiff-runtime-twin=off)"
    return _applies(ctx.spec_a, ctx.spec_b)


def outputs_only(settings: Any) -> Any:
    """The run settings of a twin run: the pair's, recording only outputs (no greedy continuations, tokenizer
    cases, causality probe or layer swap), and reduced against A as they come."""
    return replace(settings, greedy_tokens=0, tokenizer_cases=False, causality=False, layer_swap=0, keep_b=False)


def twin_spec(a: Any, b: Any, *, emulate: bool = False) -> Any:
    """T: A's architecture, on A's own backend (a ``TWIN_HOST``), loaded with B's weights (T8 with ``emulate``:
    llama.cpp's roundings)."""
    from ..runner import ModelSpec

    base = {k: v for k, v in (a.options or {}).items() if k not in ("weights_from", "emulate")}
    return ModelSpec(a.path, a.resolved_backend(), {**base, "weights_from": str(b.path),
                                                    **({"emulate": "llama.cpp"} if emulate else {})})


def with_cache(ctx: EvalContext, fn: Any) -> Any:
    """``fn(cache)`` on the pair's cache, or (a library call without one) on a scratch cache removed afterwards."""
    if ctx.cache is not None:
        return fn(ctx.cache)
    import tempfile
    from pathlib import Path

    from ..store.cache import Cache

    with tempfile.TemporaryDirectory(prefix="convdiff-twin-") as tmp:
        return fn(Cache(Path(tmp)))


def plan(ctx: PlanContext) -> list[CheckId]:
    if unavailable(ctx) is not None:
        return []
    return [LOGITS, LAYERS] if ctx.settings.hidden_states and ctx.num_layers else [LOGITS]


def subset(corpus: Corpus) -> Corpus:
    """The corpus's first three prompts and its longest: short and long positions, a fraction of the cost."""
    prompts = list(corpus)
    if len(prompts) <= 4:
        return corpus
    longest = max(prompts, key=lambda p: len(p.text))
    keep = prompts[:3] + ([longest] if longest not in prompts[:3] else [])
    return Corpus(tuple(keep), f"{corpus.source}:twin-subset")


def twin_settings(settings: Any) -> Any:
    """The twin runs' settings: outputs only, float32, each prompt cut to ``TWIN_TOKENS``."""
    return replace(outputs_only(settings), cache_dtype="float32",
                   max_tokens=min(settings.max_tokens or TWIN_TOKENS, TWIN_TOKENS))


def twin_corpus(corpus: Corpus, settings: Any) -> Corpus:
    return corpus if settings.runtime_twin == "full" else subset(corpus)


def companions(spec_a: Any, spec_b: Any, corpus: Corpus, settings: Any, cache: Any, progress: Any) -> list[Any]:
    """Before B runs over the corpus: T (which ``measure`` runs first anyway), and the twin's B run as a
    companion of B's main run (``runner.Companion``), so that B is loaded once. Nothing when the pair has no
    twin, and nothing on any failure: ``measure`` then runs (and reports) the twin as it always did."""
    if settings.runtime_twin == "off" or cache is None or _applies(spec_a, spec_b) is not None:
        return []
    from ..runner import Companion, run_model

    tw_settings, tw_corpus = twin_settings(settings), twin_corpus(corpus, settings)
    with _one_load(spec_a):
        try:
            run_t = run_model(twin_spec(spec_a, spec_b), tw_corpus, cache, settings=tw_settings, progress=progress,
                              label="twin ")
        except Exception:  # noqa: BLE001 - measure reports it, as an item of this family, never as the pair's error
            return []
        try:  # T8 right after T, on T's model (``measure`` finds it stored; it runs it itself if this failed)
            run_model(twin_spec(spec_a, spec_b, emulate=True), tw_corpus, cache, feed=run_t, settings=tw_settings,
                      progress=progress, label="twin8 ")
        except Exception:  # noqa: BLE001
            pass
    return [Companion(tw_corpus, run_t, tw_settings)]


def _one_load(spec_a: Any) -> Any:
    """T and T8 are one checkpoint with one file's weights: loaded once where A's backend can keep a model between
    runs (``sharing_weights``), else each loads its own."""
    import contextlib

    from ..backends import backend_module

    share = getattr(backend_module(spec_a.resolved_backend()), "sharing_weights", None)
    return share() if share is not None else contextlib.nullcontext()


def measure(ctx: EvalContext) -> dict[str, Any]:
    """Run T, T8 (fed T's tokens) and B (fed T's tokens) on the subset; B's and T8's metrics against T.

    Nothing runs when the twin is off: no item of this family is planned then, and its three runs would be
    the pair's most expensive work, thrown away."""
    why = unavailable(ctx)
    if why:
        return {"status": "skipped", "reason": why}
    from ..pair import PairMetrics

    # T is stored as A is (compact by default: a few kB per token); T8 and B are reduced against it as they run
    settings, corpus = twin_settings(ctx.settings), twin_corpus(ctx.corpus, ctx.settings)
    twin, twin8 = twin_spec(ctx.spec_a, ctx.spec_b), twin_spec(ctx.spec_a, ctx.spec_b, emulate=True)
    from ..backends.hf import TwinUnavailable

    try:
        run_t, run_8, run_b = with_cache(ctx, lambda cache: _runs(cache, twin, twin8, ctx.spec_b, corpus, settings))
    except TwinUnavailable as exc:  # not a verdict on B: the other checks judge the pair, and say so
        return {"status": "skipped", "reason": f"no runtime twin for this pair: {exc}"}
    pm_b = PairMetrics.from_dict(run_b.meta["pair_metrics"])
    pm_8 = PairMetrics.from_dict(run_8.meta["pair_metrics"])
    out: dict[str, Any] = {"status": "ok", "prompts": [p.id for p in corpus], "max_tokens": settings.max_tokens,
                           "positions": pm_b.logits.positions if pm_b.logits else 0}
    # a mixture of experts: positions where B's (or T8's) routers chose other experts than T's at a near-tie
    # are left out of both items (judged by ``routing[flips]``); one such position is a whole expert's output
    rerouted = {side: pm.routing.rerouted for side, pm in (("b", pm_b), ("t8", pm_8)) if pm.routing is not None}
    if any(rerouted.values()):
        out["rerouted"] = rerouted
    if pm_b.logits is not None and pm_8.logits is not None:
        out["logits"] = {side: {"kl_mean": _kept(m.kl_mean, m.kl_mean_kept), "kl_p99": _kept(m.kl_p99, m.kl_p99_kept),
                                "kl_max": m.kl_max, "kl_max_where": str(m.kl_max_where), "top1": m.topk_ordered[1],
                                "nmse": m.nmse}
                         for side, m in (("b", pm_b.logits), ("t8", pm_8.logits))}
    if pm_b.layers is not None and pm_8.layers is not None:
        out["layers"] = {"b": list(pm_b.layers.rfn_kept or pm_b.layers.rfn),
                         "t8": list(pm_8.layers.rfn_kept or pm_8.layers.rfn),
                         "b_sub": {k: list(v) for k, v in pm_b.layers.sublayers.items()},
                         "t8_sub": {k: list(v) for k, v in pm_8.layers.sublayers.items()}}
    return out


def _kept(all_positions: float, kept: float | None) -> float:
    """A figure over the positions no router sent elsewhere, when some were; else over all of them."""
    return all_positions if kept is None else kept


def _rerouted_note(m: dict[str, Any]) -> str:
    r = m.get("rerouted") or {}
    if not r:
        return ""
    return (f"; left out: the positions where the routers chose other experts than T's at a near-tie ({r.get('b', 0)} "
            f"in B, {r.get('t8', 0)} in T8; routing[flips] judges them)")


def _runs(cache: Any, twin: Any, twin8: Any, b: Any, corpus: Corpus, settings: Any) -> tuple[Any, Any, Any]:
    """T first; T8 and B are fed T's tokens and reduced against T as they run, one model in memory at a time."""
    from ..runner import run_model

    run_t = run_model(twin, corpus, cache, settings=settings, label="twin ")
    run_8 = run_model(twin8, corpus, cache, feed=run_t, settings=settings, label="twin8 ")
    run_b = run_model(b, corpus, cache, feed=run_t, settings=settings, label="B ")
    return run_t, run_8, run_b


def _ratio(b: float, t8: float, floor: float) -> float:
    if math.isnan(b) or math.isnan(t8):
        return math.nan
    return b / max(t8, floor)


def _logits(m: dict[str, Any], bound: float) -> CheckResult:
    lb, l8 = m["logits"]["b"], m["logits"]["t8"]
    r_mean = math.sqrt(max(_ratio(lb["kl_mean"], l8["kl_mean"], FLOOR_KL), 0.0))
    r_p99 = math.sqrt(max(_ratio(lb["kl_p99"], l8["kl_p99"], FLOOR_KL), 0.0))
    value = max(r_mean, r_p99) if not (math.isnan(r_mean) or math.isnan(r_p99)) else math.nan
    text = (f"B's logits against its runtime twin (A's code, B's weights; {m['positions']} positions of "
            f"{len(m['prompts'])} prompts, up to {m['max_tokens']} tokens): KL(T || B) mean {fmt(lb['kl_mean'])}, p99 "
            f"{fmt(lb['kl_p99'])}, same top-1 {100 * lb['top1']:.2f} %; llama.cpp's own roundings give KL mean "
            f"{fmt(l8['kl_mean'])}, p99 {fmt(l8['kl_p99'])}. sqrt of the ratio: mean {fmt(r_mean)}, p99 {fmt(r_p99)}"
            f"{_rerouted_note(m)}")
    ok = value <= bound
    if ok:
        return CheckResult(NAME, "logits", value, bound, PASSED, f"{text}; within {fmt(bound)}.", m["logits"], UPPER,
                           CORRECTNESS)
    msg = (f"{text}, above the bound {fmt(bound)}: B's runtime computes something other than A's architecture "
           f"does with the same weights (metadata read differently, or a kernel). Worst position: "
           f"{lb['kl_max_where']} (KL {fmt(lb['kl_max'])}).\n" + OVERRIDE_HINT.format(name="runtime_ratio"))
    return CheckResult(NAME, "logits", value, bound, FAILED, msg, m["logits"], UPPER, CORRECTNESS)


def _layers(m: dict[str, Any], bound: float) -> tuple[CheckResult, tuple[int, str | None] | None]:
    """The layers item, and where B leaves its twin (a first divergent layer and sub-block) when it does."""
    lb, l8 = m["layers"]["b"], m["layers"]["t8"]
    ratios = [_ratio(x, y, FLOOR_RFN) for x, y in zip(lb, l8, strict=False)]
    value = math.nan if any(math.isnan(r) for r in ratios) else max(ratios, default=0.0)
    first = next((i for i, r in enumerate(ratios) if not r <= bound), None)
    curve = ", ".join(f"{fmt(r)}" for r in ratios)
    details = {"ratios": ratios, "rfn_b": lb, "rfn_t8": l8, "first_layer": first}
    if first is None:
        return CheckResult(NAME, "layers", value, bound, PASSED,
                           f"Every decoder layer of B stays with its runtime twin: rfn(B, T) over llama.cpp's own "
                           f"rounding at most {fmt(value)} (bound {fmt(bound)}); by layer: {curve}"
                           f"{_rerouted_note(m)}.", details, UPPER,
                           CORRECTNESS), None
    sub = ""
    bs, s8 = m["layers"].get("b_sub") or {}, m["layers"].get("t8_sub") or {}
    subs = {k: _ratio(bs[k][first], s8[k][first], FLOOR_RFN) for k in bs if k in s8 and first < len(bs[k])}
    if subs:
        worst = max(subs, key=lambda k: subs[k])
        sub = f" ({'attention' if worst == 'attn' else worst} output {fmt(subs[worst])}× the runtime's own rounding)"
    where = (first, ("attention" if max(subs, key=lambda k: subs[k]) == "attn" else "mlp") if subs else None)
    msg = (f"B's runtime leaves its twin at decoder layer {first}{sub}: rfn(B, T) {fmt(lb[first])} is "
           f"{fmt(ratios[first])}× the {fmt(l8[first])} that llama.cpp's own roundings give, above the bound "
           f"{fmt(bound)}. B and T share every weight, so the runtime differs: how it reads the metadata (rope, "
           f"epsilon, windows, soft-caps, attention scale) or a kernel.\nBy layer: {curve}{_rerouted_note(m)}.\n"
           + OVERRIDE_HINT.format(name="runtime_ratio"))
    return CheckResult(NAME, "layers", value, bound, FAILED, msg, details, UPPER, CORRECTNESS), where


def evaluate(ctx: EvalContext) -> list[CheckResult] | Findings:
    planned = ctx.planned(NAME) if ctx.plan is not None else None
    if planned is not None and not planned:
        return []
    ids = planned or [LOGITS, LAYERS]
    try:
        m = ctx.measurement(FAMILY)
    except Exception as exc:  # noqa: BLE001 - a twin that cannot run errors these items, never the pair's others
        from ..errors import describe_failure

        return [CheckResult(c.name, c.param, None, None, "error",
                            "the runtime twin could not run: " + describe_failure(exc, "running the runtime twin"))
                for c in ids]
    if m.get("status") != "ok":
        return [skipped(c, f"no runtime twin: {m.get('reason')}") for c in ids]
    bound = ctx.bounds.runtime_ratio
    out, where = [], None
    for cid in ids:
        if cid == LOGITS:
            out.append(_logits(m, bound) if "logits" in m else skipped(cid, "the logits were not compared"))
        elif cid == LAYERS and "layers" in m:
            item, where = _layers(m, bound)
            out.append(item)
        elif cid == LAYERS:
            out.append(skipped(cid, "no hidden states to compare"))
    return Findings(out, divergence=where)


FAMILY = CheckFamily(NAME, 45, plan, evaluate, BOUNDS,
                     doc="B's runtime against A's architecture run with B's weights", measure=measure,
                     companions=companions,
                     code=(*TWIN_LOADING, "pytest_convdiff.pair"),
                     libraries=("transformers", "torch", "llama-cpp-python"))
