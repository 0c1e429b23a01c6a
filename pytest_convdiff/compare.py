"""Compare a reference model A with a converted model B: the library entry point.

    from pytest_convdiff import compare
    result = compare("ref-dir", "model-f16.gguf")
    print(result.verdict, result.first_divergent_layer)

``compare`` runs (or reads from the cache) A, then B on A's token ids, and turns
every metric into a ``CheckResult`` with a pass/fail outcome and a message in the
shape of torch.testing.assert_close: what was compared, how many failed, the
worst value and where, the bound, and how to change it. The pytest plugin only
wires these results to test items.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import metrics
from .bounds import Bounds, default_bounds
from .cache import Cache, make_key
from .corpus import Corpus, load_corpus
from .errors import ConvdiffError
from .runner import ModelRun, ModelSpec, RunSettings, run_model
from .tokenizer_cases import TOKENIZER_CASES

PASSED, FAILED, ERROR, SKIPPED = "passed", "failed", "error", "skipped"
OVERRIDE_HINT = "Change it with --convdiff-bound {name}=VALUE, the convdiff_bounds ini option, or @pytest.mark.convdiff_bounds({name}=VALUE)."


@dataclass
class CheckResult:
    name: str
    param: str
    value: float | None
    threshold: float | None
    outcome: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.name}[{self.param}]" if self.param else self.name

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "param": self.param, "value": _json_float(self.value),
                "threshold": self.threshold, "outcome": self.outcome, "message": self.message}


def _json_float(v: float | None) -> float | None:
    if v is None or (isinstance(v, float) and (math.isnan(v) or math.isinf(v))):
        return None
    return float(v)


@dataclass
class PairResult:
    id: str
    model_a: str
    model_b: str
    backend_a: str | None
    backend_b: str | None
    checks: list[CheckResult] = field(default_factory=list)
    error: str | None = None
    first_divergent_layer: int | None = None
    divergent_sublayer: str | None = None
    layers: list[dict[str, Any]] = field(default_factory=list)
    precision_class: str | None = None
    bounds: dict[str, float] = field(default_factory=dict)
    logits: dict[str, Any] | None = None
    info_a: dict[str, Any] = field(default_factory=dict)
    info_b: dict[str, Any] = field(default_factory=dict)
    from_cache: dict[str, bool] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        if self.error:
            return "error"
        if any(c.outcome in (FAILED, ERROR) for c in self.checks):
            return "fail"
        return "pass"

    def check(self, check_id: str) -> CheckResult:
        for c in self.checks:
            if c.id == check_id:
                return c
        raise KeyError(check_id)

    @property
    def failed(self) -> list[CheckResult]:
        return [c for c in self.checks if c.outcome in (FAILED, ERROR)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "model_a": self.model_a, "model_b": self.model_b,
            "backend_a": self.backend_a, "backend_b": self.backend_b,
            "verdict": self.verdict, "error": self.error,
            "first_divergent_layer": self.first_divergent_layer,
            "divergent_sublayer": self.divergent_sublayer,
            "precision_class": self.precision_class, "bounds": self.bounds,
            "layers": [{k: _json_float(v) if isinstance(v, float) else v for k, v in layer.items()}
                       for layer in self.layers],
            "checks": [c.to_dict() for c in self.checks],
            "metrics": _clean(self.logits),
            "from_cache": self.from_cache,
            "notes": self.notes,
        }


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float):
        return _json_float(obj)
    return obj


# --------------------------------------------------------------------------- planning


def plan_checks(corpus: Corpus, num_layers: int | None, settings: RunSettings | None = None) -> list[tuple[str, str]]:
    """The (name, param) of every check a pair will produce, known before any model runs.

    pytest collects one item per entry, so this must not need the models loaded.
    """
    settings = settings or RunSettings()
    plan: list[tuple[str, str]] = [("tokens", p.id) for p in corpus]
    if settings.tokenizer_cases:
        plan += [("tokenizer", cat) for cat in TOKENIZER_CASES] + [("tokenizer", "special")]
    plan += [("finite", ""), ("nmse", ""), ("topk", "1"), ("topk", "5"), ("kl", "mean"), ("kl", "p99"), ("ppl", "ratio")]
    if settings.hidden_states and num_layers:
        plan += [("rfn", f"layer-{i}") for i in range(num_layers)]
    if settings.greedy_tokens:
        plan += [("greedy", "")]
    if settings.causality:
        plan += [("causality", "A"), ("causality", "B")]
    return plan


# --------------------------------------------------------------------------- bound-independent metrics

PAIR_METRICS_VERSION = 1  # bump when what pair_metrics derives from the arrays changes


@dataclass
class PairMetrics:
    """What the arrays of a pair reduce to, before any bound is applied: the costly part of
    evaluation, stored in the cache so a warm run (or another set of bounds) reuses it."""

    logits: metrics.LogitMetrics | None = None  # None: the vocabularies differ
    layers: metrics.LayerMetrics | None = None  # None: no hidden states, or shapes that do not pair
    swap_rfn: list[float] | None = None  # per-layer rfn of the layer-swap run, when there is one

    def to_dict(self) -> dict[str, Any]:
        return {"logits": self.logits.to_dict() if self.logits else None,
                "layers": self.layers.to_dict() if self.layers else None, "swap_rfn": self.swap_rfn}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PairMetrics:
        return cls(metrics.LogitMetrics.from_dict(d["logits"]) if d.get("logits") else None,
                   metrics.LayerMetrics.from_dict(d["layers"]) if d.get("layers") else None, d.get("swap_rfn"))


_CODE_DIGEST: str | None = None


def _metrics_code_digest() -> str:
    """Stored pair metrics are reused only by the metric code that computed them."""
    global _CODE_DIGEST
    if _CODE_DIGEST is None:
        _CODE_DIGEST = hashlib.sha256(Path(metrics.__file__).read_bytes()).hexdigest()[:16]
    return _CODE_DIGEST


def pair_metrics_key(a: ModelRun, b: ModelRun, corpus: Corpus) -> str:
    return make_key({"pair_metrics": PAIR_METRICS_VERSION, "code": _metrics_code_digest(), "corpus": corpus.digest,
                     "a": a.entry.identity, "b": b.entry.identity})


def _vocab_mismatch(a: ModelRun, b: ModelRun, corpus: Corpus) -> str | None:
    va, vb = a.logits(corpus.prompts[0].id).shape[-1], b.logits(corpus.prompts[0].id).shape[-1]
    if va == vb:
        return None
    return (f"vocabulary sizes differ (A {va} vs B {vb}, reported {a.info.get('vocab_size')} vs "
            f"{b.info.get('vocab_size')}): logits cannot be compared position by position")


def _layer_mismatch(a: ModelRun, b: ModelRun, corpus: Corpus) -> str | None:
    first, first_b = a.hidden(corpus.prompts[0].id), b.hidden(corpus.prompts[0].id)
    if first is None or first_b is None:
        return f"model {'A' if first is None else 'B'}'s backend gave no hidden states"
    if first_b.shape[0] != first.shape[0] or first_b.shape[-1] != first.shape[-1]:
        return f"hidden-state shapes differ (A {tuple(first.shape)}, B {tuple(first_b.shape)}): layers cannot be paired"
    return None


def pair_metrics(a: ModelRun, b: ModelRun, corpus: Corpus, cache: Cache | None = None) -> PairMetrics:
    """Reduce both runs' arrays to metrics (streaming, prompt by prompt), or read them from ``cache``."""
    key = pair_metrics_key(a, b, corpus) if cache is not None else ""
    doc = cache.get_json(key) if cache is not None else None
    if doc is not None:
        with contextlib.suppress(KeyError, TypeError, ValueError):  # unreadable: recompute
            return PairMetrics.from_dict(doc["metrics"])
    out = PairMetrics()
    if _vocab_mismatch(a, b, corpus) is None:
        acc = metrics.LogitAccumulator()
        for p in corpus:
            acc.update(p.id, a.logits(p.id), b.logits(p.id), a.inputs(p.id))
        out.logits = acc.result()
    if _layer_mismatch(a, b, corpus) is None:
        n_layers = a.hidden(corpus.prompts[0].id).shape[0]
        lacc = metrics.LayerAccumulator(n_layers)
        for p in corpus:
            lacc.update(p.id, a.hidden(p.id), b.hidden(p.id), a.sublayers(p.id), b.sublayers(p.id))
        out.layers = lacc.result()
        if b.hidden_swap(corpus.prompts[0].id) is not None:
            swap_acc = metrics.LayerAccumulator(n_layers)
            for p in corpus:
                swap_acc.update(p.id, a.hidden(p.id), b.hidden_swap(p.id))
            out.swap_rfn = swap_acc.result().rfn
    if cache is not None:
        cache.put_json(key, {"metrics": out.to_dict(), "a": a.spec.path, "b": b.spec.path})
    return out


# --------------------------------------------------------------------------- evaluation


def _fmt(v: float | None) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return f"{v:.4g}"


def _upper(name: str, param: str, value: float, bound: float, what: str, extra: str = "",
           details: dict[str, Any] | None = None) -> CheckResult:
    """An upper-bound check. NaN never passes: ``not value <= bound`` is True for NaN."""
    ok = value <= bound
    if ok:
        msg = f"{what}: {_fmt(value)} <= {_fmt(bound)}"
    else:
        msg = (f"{what} is {_fmt(value)}, above the bound {_fmt(bound)}."
               + (f"\n{extra}" if extra else "") + "\n" + OVERRIDE_HINT.format(name=_bound_name(name, param)))
    return CheckResult(name, param, value, bound, PASSED if ok else FAILED, msg, details or {})


def _lower(name: str, param: str, value: float, bound: float, what: str, extra: str = "") -> CheckResult:
    ok = value >= bound
    if ok:
        msg = f"{what}: {_fmt(value)} >= {_fmt(bound)}"
    else:
        msg = (f"{what} is {_fmt(value)}, below the bound {_fmt(bound)}."
               + (f"\n{extra}" if extra else "") + "\n" + OVERRIDE_HINT.format(name=_bound_name(name, param)))
    return CheckResult(name, param, value, bound, PASSED if ok else FAILED, msg)


def _bound_name(name: str, param: str) -> str:
    return {("kl", "mean"): "kl_mean", ("kl", "p99"): "kl_p99", ("topk", "1"): "top1", ("topk", "5"): "top5",
            ("ppl", "ratio"): "ppl_ratio"}.get((name, param), name)


def _piece(pieces: list[str] | None, i: int | None) -> str:
    if pieces is None or i is None or i >= len(pieces):
        return "<end>"
    return repr(pieces[i])


def _token_checks(a: ModelRun, b: ModelRun, corpus: Corpus) -> list[CheckResult]:
    out = []
    for p in corpus:
        ta, tb = a.own_tokens(p.id), b.own_tokens(p.id)
        d = metrics.compare_tokens(ta, tb)
        if d.equal:
            out.append(CheckResult("tokens", p.id, 0.0, 0.0, PASSED, f"{len(ta)} token ids identical"))
            continue
        i = d.first_mismatch
        msg = (f"Token ids differ for prompt {p.id!r}: {d.mismatches} of {max(d.len_a, d.len_b)} positions "
               f"(A has {d.len_a} tokens, B {d.len_b}).\n"
               f"First mismatch at position {i}: A {d.id_a} {_piece(a.pieces(p.id), i)} vs "
               f"B {d.id_b} {_piece(b.pieces(p.id), i)}.\n"
               f"Context before it (A): {''.join(a.pieces(p.id)[max(0, i - 5):i])!r}\n"
               "Logits and hidden states are still compared on A's token ids. "
               "Token ids must match exactly; this check has no bound to change.")
        out.append(CheckResult("tokens", p.id, float(d.mismatches), 0.0, FAILED, msg,
                               {"first_mismatch": i, "id_a": d.id_a, "id_b": d.id_b}))
    return out


def _tokenizer_checks(a: ModelRun, b: ModelRun) -> list[CheckResult]:
    out = []
    ca, cb = a.tokenizer_cases, b.tokenizer_cases
    for cat in TOKENIZER_CASES:
        rows_a, rows_b = ca.get(cat), cb.get(cat)
        if rows_a is None or rows_b is None:
            out.append(CheckResult("tokenizer", cat, None, None, SKIPPED, "tokenizer cases were not recorded"))
            continue
        bad = []
        for ra, rb in zip(rows_a, rows_b, strict=True):
            if ra.get("ids") != rb.get("ids"):
                bad.append((ra, rb))
        if not bad:
            out.append(CheckResult("tokenizer", cat, 0.0, 0.0, PASSED, f"{len(rows_a)} strings tokenize identically"))
            continue
        ra, rb = bad[0]
        if ra.get("ids") is None or rb.get("ids") is None:
            first = (f"A: {ra.get('error') or ra.get('ids')}\nB: {rb.get('error') or rb.get('ids')}")
        else:
            d = metrics.compare_tokens(ra["ids"], rb["ids"])
            i = d.first_mismatch
            first = (f"first mismatch at position {i}: A {d.id_a} {_piece(ra.get('pieces'), i)} vs "
                     f"B {d.id_b} {_piece(rb.get('pieces'), i)}\n"
                     f"A ids {ra['ids']} pieces {ra.get('pieces')}\nB ids {rb['ids']} pieces {rb.get('pieces')}")
        msg = (f"Tokenizers disagree on {len(bad)} of {len(rows_a)} {cat} strings.\n"
               f"First: {ra['text']!r}: {first}")
        out.append(CheckResult("tokenizer", cat, float(len(bad)), 0.0, FAILED, msg,
                               {"failing_texts": [r[0]["text"] for r in bad]}))
    sa, sb = a.special, b.special
    problems = []
    for flag, what in (("adds_bos", "BOS"), ("adds_eos", "EOS")):
        if sa.get(flag) != sb.get(flag):
            problems.append(f"A {'adds' if sa.get(flag) else 'does not add'} {what}, "
                            f"B {'adds' if sb.get(flag) else 'does not add'} it")
    for key in ("bos_id", "eos_id"):
        if sa.get(key) is not None and sb.get(key) is not None and sa.get(key) != sb.get(key):
            problems.append(f"{key}: A {sa.get(key)} vs B {sb.get(key)}")
    if problems:
        msg = ("Special-token behaviour differs: " + "; ".join(problems) + ".\n"
               "For a GGUF, check tokenizer.ggml.add_bos_token / add_eos_token and the bos/eos ids against "
               "the original tokenizer_config.json.")
        out.append(CheckResult("tokenizer", "special", float(len(problems)), 0.0, FAILED, msg))
    else:
        out.append(CheckResult("tokenizer", "special", 0.0, 0.0, PASSED,
                               f"BOS/EOS behaviour identical (adds_bos={sa.get('adds_bos')}, adds_eos={sa.get('adds_eos')})"))
    return out


def _causality_checks(runs: Iterable[tuple[str, ModelRun]], bound: float) -> list[CheckResult]:
    out = []
    for role, run in runs:
        c = run.causality
        if not c:
            out.append(CheckResult("causality", role, None, bound, SKIPPED, "no prompt long enough for the probe"))
            continue
        value = c["nmse"] if c["nmse"] is not None else math.nan
        backend = run.info.get("backend")
        hint = ""
        if backend == "exllamav2":
            hint = (f"exllamav2 without flash-attn computes attention through SDPA without a causal mask; "
                    f"set its no_sdpa option: --convdiff-option-{role.lower()} no_sdpa=true.")
        extra = (f"Logits of the first {c['prefix_len']} tokens of {c['prompt']!r} change when the other "
                 f"{c['full_len'] - c['prefix_len']} tokens follow (max abs change {c['max_abs']:.4g} at position "
                 f"{c['worst_position']}): model {role} attends to future tokens.\n" + hint)
        out.append(_upper("causality", role, value, bound,
                          f"Causality of model {role} ({backend}): NMSE of prefix logits vs the full run",
                          extra.strip()))
    return out


def evaluate(a: ModelRun, b: ModelRun, corpus: Corpus, bounds: Bounds, *, pair_id: str = "",
             precision: str | None = None, pm: PairMetrics | None = None, cache: Cache | None = None) -> PairResult:
    """Every check for a pair whose two runs exist.

    ``pm``: the pair's metrics when already computed; else computed here (read from / stored in
    ``cache`` when one is given).
    """
    res = PairResult(pair_id, a.spec.path, b.spec.path, a.info.get("backend"), b.info.get("backend"),
                     precision_class=precision, bounds=bounds.to_dict(), info_a=a.info, info_b=b.info,
                     from_cache={"A": a.from_cache, "B": b.from_cache})
    checks = res.checks
    swap_info = b.meta.get("layer_swap") or {}
    if swap_info.get("error"):
        res.notes.append(f"layer swap (k={swap_info.get('k')}) not run: {swap_info['error']}")
    truncated = {**a.meta.get("truncated", {}), **b.meta.get("truncated", {})}
    if truncated:
        res.notes.append("prompts truncated by --convdiff-max-tokens: "
                         + ", ".join(f"{k} ({v} tokens)" for k, v in sorted(truncated.items())))
    checks += _token_checks(a, b, corpus)
    if a.tokenizer_cases or b.tokenizer_cases:
        checks += _tokenizer_checks(a, b)

    pm = pm if pm is not None else pair_metrics(a, b, corpus, cache)
    logit_names = [("finite", ""), ("nmse", ""), ("topk", "1"), ("topk", "5"), ("kl", "mean"), ("kl", "p99"),
                   ("ppl", "ratio")]
    if pm.logits is None:
        why = _vocab_mismatch(a, b, corpus) or "logits were not compared"
        checks += [CheckResult(n, p, None, None, SKIPPED, why) for n, p in logit_names]
    else:
        checks += _logit_checks(pm.logits, corpus, bounds, res)

    num_layers = a.info.get("num_layers")
    if pm.layers is not None:
        checks += _layer_checks(pm.layers, pm.swap_rfn, b, bounds, res)
    elif num_layers or a.hidden(corpus.prompts[0].id) is not None:
        why = _layer_mismatch(a, b, corpus) or "hidden states were not compared"
        first = a.hidden(corpus.prompts[0].id)
        n = first.shape[0] if first is not None else num_layers
        checks += [CheckResult("rfn", f"layer-{i}", None, bounds.rfn, SKIPPED, why) for i in range(n)]
    if a.meta.get("greedy") is not None or b.meta.get("greedy") is not None:
        checks.append(_greedy_check(a, b))
    if a.causality is not None or b.causality is not None:
        checks += _causality_checks((("A", a), ("B", b)), bounds.causality)
    return res


def _greedy_check(a: ModelRun, b: ModelRun) -> CheckResult:
    """vLLM's check_logprobs_close: where the greedy continuations first differ, each model's token must
    be in the other's top-N; after that the prompt is not compared further (the texts have diverged)."""
    ga, gb = a.meta.get("greedy") or {}, b.meta.get("greedy") or {}
    if not ga or not gb:
        return CheckResult("greedy", "", None, None, SKIPPED, "greedy continuations were not recorded")
    bad, lines, same = [], [], 0
    for pid, ra in ga.items():
        rb = gb.get(pid)
        if rb is None:
            continue
        for step, (ta, tb) in enumerate(zip(ra["generated"], rb["generated"], strict=False)):
            if ta == tb:
                continue
            ok = ta in rb["top"][step] and tb in ra["top"][step]
            lines.append(f"{pid!r}: first difference at generated token {step}: A {ta}, B {tb}; "
                         f"A's token {'in' if ta in rb['top'][step] else 'NOT in'} B's top-{len(rb['top'][step])}, "
                         f"B's token {'in' if tb in ra['top'][step] else 'NOT in'} A's top-{len(ra['top'][step])}")
            if not ok:
                bad.append(pid)
            break
        else:
            same += 1
    n = len(ga)
    if bad:
        return CheckResult("greedy", "", float(len(bad)), 0.0, FAILED,
                           f"Greedy generation diverges beyond the top-N tolerance in {len(bad)} of {n} prompts.\n"
                           + "\n".join(lines) + "\nThis check has no bound: a swapped token must be a close call.")
    return CheckResult("greedy", "", 0.0, 0.0, PASSED,
                       f"{same} of {n} greedy continuations identical; the rest differ only between close candidates"
                       + (": " + "; ".join(lines) if lines else ""))


def _logit_checks(m: metrics.LogitMetrics, corpus: Corpus, bounds: Bounds, res: PairResult) -> list[CheckResult]:
    res.logits = m.to_dict()
    worst_prompt = max(m.per_prompt.items(), key=lambda kv: (math.isnan(kv[1]["nmse"]), kv[1]["nmse"]))
    shape = f"{m.positions} positions of {len(corpus)} prompts, A's token ids fed to both"
    out = []
    if m.nonfinite_a or m.nonfinite_b:
        out.append(CheckResult("finite", "", float(m.nonfinite_a + m.nonfinite_b), 0.0, FAILED,
                               f"Non-finite logits: {m.nonfinite_a} in A, {m.nonfinite_b} in B; first at "
                               f"{m.nonfinite_where}. NaN or Inf never satisfies a bound."))
    else:
        out.append(CheckResult("finite", "", 0.0, 0.0, PASSED, f"all logits finite ({shape})"))
    out.append(_upper(
        "nmse", "", m.nmse, bounds.nmse,
        f"NMSE of B's logits against A's ({shape})",
        f"NMSE {_fmt(m.nmse)} = {_fmt(m.nmse_db)} dB ({m.nmse_label}); max abs difference {_fmt(m.max_abs)} at "
        f"{m.max_abs_where}; mean abs difference {_fmt(m.mean_abs)}.\n"
        f"Worst prompt: {worst_prompt[0]!r} (NMSE {_fmt(worst_prompt[1]['nmse'])}).",
    ))
    out[-1].details.update(nmse_db=m.nmse_db, label=m.nmse_label, max_abs=m.max_abs, mean_abs=m.mean_abs)
    for k, bound, field_ in ((1, bounds.top1, m.topk_ordered), (5, bounds.top5, m.topk_overlap)):
        value = field_[k]
        wp, wv = m.topk_worst_prompt.get(k, ("", math.nan))
        what = ("Top-1 agreement (same argmax)" if k == 1 else "Top-5 overlap (mean |top5(A) & top5(B)| / 5)")
        failing = round((1 - m.topk_ordered[k]) * m.positions)
        extra = (f"{failing} of {m.positions} positions have a different {'argmax' if k == 1 else 'ordered top-5'}; "
                 f"worst prompt {wp!r} ({_fmt(wv)} ordered agreement).\n"
                 f"Ordered top-K agreement K=1..5: {', '.join(_fmt(v) for v in m.topk_ordered.values())}.")
        out.append(_lower("topk", str(k), value, bound, what, extra))
    out.append(_upper("kl", "mean", m.kl_mean, bounds.kl_mean, f"Mean KL(P_A || P_B) over {m.positions} positions",
                      f"p99 {_fmt(m.kl_p99)}, max {_fmt(m.kl_max)} at {m.kl_max_where}."))
    out.append(_upper("kl", "p99", m.kl_p99, bounds.kl_p99, "99th percentile of per-position KL(P_A || P_B)",
                      f"max {_fmt(m.kl_max)} at {m.kl_max_where}; mean {_fmt(m.kl_mean)}."))
    out.append(_upper("ppl", "ratio", m.ppl_ratio, bounds.ppl_ratio, "Perplexity ratio PPL(B) / PPL(A) on the corpus",
                      f"PPL(A) {_fmt(m.ppl_a)}, PPL(B) {_fmt(m.ppl_b)}; mean change in the true token's "
                      f"probability {_fmt(m.delta_p_mean)} (RMS {_fmt(m.delta_p_rms)})."))
    return out


def _layer_checks(lm: metrics.LayerMetrics, swap: list[float] | None, b: ModelRun, bounds: Bounds,
                  res: PairResult) -> list[CheckResult]:
    n_layers = len(lm.rfn)
    fdl = metrics.first_divergent_layer(lm.rfn, bounds.rfn)
    anomalies = metrics.subblock_anomalies(lm.sublayers, bounds.subblock_jump, bounds.rfn / 10.0,
                                           inherited=[0.0] + list(lm.rfn[:-1]))
    by_layer: dict[int, list[tuple[str, float]]] = {}
    for layer, name, ratio in anomalies:
        by_layer.setdefault(layer, []).append((name, ratio))
    sub = None
    if anomalies and (fdl is None or anomalies[0][0] <= fdl):
        fdl = anomalies[0][0]
        sub = max(by_layer[fdl], key=lambda nr: nr[1])[0]
    elif fdl is not None and {"attn", "mlp"} <= set(lm.sublayers):
        prev = lm.rfn[fdl - 1] if fdl > 0 else 0.0
        attn = lm.sublayers["attn"][fdl]
        sub = "attn" if attn > max(bounds.rfn, 4.0 * prev) else "mlp"
    sub = {"attn": "attention", "mlp": "mlp"}.get(sub, sub) if sub else None
    res.first_divergent_layer = fdl
    res.divergent_sublayer = sub
    res.layers = [
        {"index": i, "rfn": lm.rfn[i], "worst_row_rfn": lm.worst_row_rfn[i],
         **{f"rfn_{k}": v[i] for k, v in lm.sublayers.items()},
         **{f"share_{k}": v[i] for k, v in lm.sub_contrib.items()},
         **({"rfn_swap": swap[i]} if swap is not None else {})}
        for i in range(n_layers)
    ]
    out = []
    for i, value in enumerate(lm.rfn):
        bad = lm.nonfinite_a[i] + lm.nonfinite_b[i]
        where = lm.worst_where[i]
        extra = f"Worst position: {where} (row rfn {_fmt(lm.worst_row_rfn[i])})."
        if bad:
            extra = (f"{lm.nonfinite_a[i]} non-finite values in A's hidden state, {lm.nonfinite_b[i]} in B's. " + extra)
        if fdl is not None:
            extra += f"\nFirst divergent layer: {fdl}" + (f" ({sub} diverges first)" if sub else "") + "."
            if i > fdl:
                extra += f" This layer inherits the error from layer {fdl}."
        curve = ", ".join(_fmt(v) for v in lm.rfn[: i + 1])
        extra += f"\nrfn by layer up to here: {curve}"
        if swap is not None:
            k = (b.meta.get("layer_swap") or {}).get("k")
            extra += (f"\nWith A's hidden states fed into B for layers < {k}: rfn {_fmt(swap[i])} "
                      "(error this layer adds given a correct input, when i >= k).")
        check = _upper("rfn", f"layer-{i}", value, bounds.rfn,
                       f"Relative Frobenius error of the hidden state after decoder layer {i}", extra)
        if check.outcome == PASSED and i in by_layer:
            parts = []
            for name, ratio in by_layer[i]:
                values = lm.sublayers[name]
                typical = sorted(v for v in values if not math.isnan(v))[len(values) // 2]
                parts.append(f"the {'attention' if name == 'attn' else name} output's relative error is "
                             f"{_fmt(values[i])}, {_fmt(ratio)}x the larger of that sub-block's median over the "
                             f"layers ({_fmt(typical)}) and the error already in the layer's input "
                             f"({_fmt(lm.rfn[i - 1] if i else 0.0)})")
            check = CheckResult(
                "rfn", f"layer-{i}", value, bounds.rfn, FAILED,
                f"Decoder layer {i} has a local defect although its rfn {_fmt(value)} is within the bound "
                f"{_fmt(bounds.rfn)}: " + "; ".join(parts) + f", above the allowed {_fmt(bounds.subblock_jump)}x.\n"
                + extra + "\n" + OVERRIDE_HINT.format(name="subblock_jump"))
        out.append(check)
    return out


# --------------------------------------------------------------------------- the entry point


def default_cache_dir() -> Path:
    return Path(os.environ.get("CONVDIFF_CACHE_DIR") or Path(tempfile.gettempdir()) / "convdiff-cache")


def error_result(pair_id: str, spec_a: ModelSpec, spec_b: ModelSpec, plan: list[tuple[str, str]], error: str) -> PairResult:
    res = PairResult(pair_id, spec_a.path, spec_b.path, spec_a.backend, spec_b.backend, error=error)
    res.checks = [CheckResult(n, p, None, None, ERROR, error) for n, p in plan]
    return res


def compare(model_a: str | os.PathLike[str] | ModelSpec, model_b: str | os.PathLike[str] | ModelSpec, *,
            corpus: Corpus | str | None = None, bounds: dict[str, float] | Bounds | None = None,
            cache_dir: str | os.PathLike[str] | None = None, refresh: bool = False,
            settings: RunSettings | None = None, progress: Callable[[str], None] | None = None,
            pair_id: str | None = None) -> PairResult:
    """Run A and B (or read them from the cache) and evaluate every check.

    ``bounds``: a Bounds, or overrides applied on top of the default row for B's precision.
    A model that cannot be loaded gives a result with ``verdict == "error"`` and the reason in ``error``.
    """
    spec_a = model_a if isinstance(model_a, ModelSpec) else ModelSpec(str(model_a))
    spec_b = model_b if isinstance(model_b, ModelSpec) else ModelSpec(str(model_b))
    corpus = corpus if isinstance(corpus, Corpus) else load_corpus(corpus)
    settings = settings or RunSettings()
    cache = Cache(Path(cache_dir) if cache_dir else default_cache_dir(), read=not refresh)
    pid = pair_id or f"{Path(spec_a.path).name}--{Path(spec_b.path).name}"
    try:
        run_a = run_model(spec_a, corpus, cache, settings=settings, progress=progress or (lambda _m: None),
                          label="[A] ")
        run_b = run_model(spec_b, corpus, cache, feed=run_a, settings=settings,
                          progress=progress or (lambda _m: None), label="[B] ")
    except ConvdiffError as exc:
        return error_result(pid, spec_a, spec_b, plan_checks(corpus, None, settings), str(exc))
    if isinstance(bounds, Bounds):
        cls, chosen = None, bounds
    else:
        cls, chosen = default_bounds(run_a.info, run_b.info)
        chosen = chosen.with_overrides(dict(bounds or {}))
    return evaluate(run_a, run_b, corpus, chosen, pair_id=pid, precision=cls, cache=cache)
