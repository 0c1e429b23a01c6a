"""``config[<field>]``: B's model configuration against A's, field by field, with no forward pass.

A converter that writes a wrong rope base, drops rope scaling or the chat template, or puts the wrong
EOS id in the metadata produces a model that loads and runs; the numerical checks see some of these
only on long prompts or in chat use, and none of them say which key is wrong. These items read the
files (config.json and the tokenizer files; a GGUF's metadata through transformers' own mapping, the
header for the rest) before any model loads, and name the field, both values and where each came from:

    rope_theta: A 100000.0 (config.json rope_parameters.rope_theta) vs B 10000.0 (GGUF llama.rope.freq_base)

One item per field of a fixed list (the plan does not depend on what differs). A field absent on both
sides passes; absent on one side fails when the other has a value other than the field's default.
Floats compare with a relative tolerance of 1e-6 (GGUF stores float32), ids and sizes exactly. A side
with no configuration to read (a saved golden reference keeps only its model info) skips, with why.
"""

from __future__ import annotations

import math
from typing import Any

from ..core.results import CheckId, CheckResult
from . import _config_fields as cf
from .base import CheckFamily, EvalContext, PlanContext, result, skipped

NAME = "config"
REL_TOL = 1e-6  # float32 storage: 1e-5 comes back as 9.9999997e-06
FREQ_TOL = 1e-5  # rope frequency factors: a converter computes them in float32
_EQUIVALENT_ROPE = {"freq_factors": "llama3"}  # a GGUF keeps Llama 3 scaling only as rope_freqs.weight
_FACTOR_TABLES = {"freq_factors": "frequency factors", "long_factor": "LongRoPE long factors",
                  "short_factor": "LongRoPE short factors"}
# Scaling parameters every side of this type states (a GGUF converter writes them): one side without is a loss.
_WRITTEN = {"linear": ("factor",), "yarn": ("factor", "original_max_position_embeddings")}

HINTS = {
    "rope_theta": "A different rope base rotates every position differently; the error grows with distance.",
    "rope_scaling": "Rope scaling lost, added or misread is invisible below the original context length "
                    "and wrong beyond it (or everywhere, for linear scaling).",
    "norm_eps": "A different norm epsilon changes every normalised activation (most for small-norm rows).",
    "context_length": "llama.cpp sizes its default context (and some rope scaling) from it.",
    "sliding_window": "Sliding-window attention lost or wrong is invisible below the window and wrong beyond it.",
    "n_heads": "The conversion read another shape than the checkpoint's.",
    "n_kv_heads": "The conversion read another shape than the checkpoint's (grouped-query attention).",
    "head_dim": "The conversion read another shape than the checkpoint's.",
    "hidden_size": "The conversion read another shape than the checkpoint's.",
    "intermediate_size": "The conversion read another shape than the checkpoint's.",
    "n_layers": "The conversion read another shape than the checkpoint's.",
    "n_experts": "Expert routing differs.",
    "n_experts_used": "Expert routing differs: another number of experts per token.",
    "vocab_size": "The vocabularies differ: token ids may map to other tokens or rows.",
    "embedding_rows": "Token ids without an embedding row (vocabulary padding) or another vocabulary.",
    "logit_softcap": "Logit soft-capping lost or changed: greedy decoding may agree while the distribution (KL) does not.",
    "attn_softcap": "Attention soft-capping lost or changed: attention scores differ.",
    "tied_embeddings": "The output layer is not A's: an lm_head tied where A has its own, or a separate (possibly "
                       "untrained) one where A ties it to the embedding.",
    "bos_id": "Prompts start with another token.",
    "eos_id": "Generation stops at another token, or never (an instruct model's EOS must end its turns).",
    "eot_id": "Chat turns end with a token B does not stop at.",
    "pad_id": "Batched or padded inputs use another token.",
    "add_bos": "Every prompt's token ids differ by a leading BOS.",
    "add_eos": "Every prompt's token ids differ by a trailing EOS.",
}

_PATCHABLE = ("float", "int", "id")  # gguf-set-metadata parses a bool from any non-empty text as true


def plan(ctx: PlanContext) -> list[CheckId]:
    """Every field, always: the plan is known before any file is read."""
    return [CheckId(NAME, f.name) for f in cf.FIELDS]


# --------------------------------------------------------------------------- display


def show(v: Any, field: cf.Field | None = None) -> str:
    """A value as the message shows it."""
    if v is None:
        return "not set" + (f" (default {show(field.default)})" if field is not None and field.default is not None else "")
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(float(f"{v:.7g}"))
    if isinstance(v, dict) and "type" in v:  # rope scaling
        parts = [] if v["type"] == "freq_factors" else [str(v["type"])]  # a GGUF's rope_freqs.weight alone
        parts += [f"{k} {show(x)}" for k, x in v.items() if k != "type" and k not in _FACTOR_TABLES]
        for key, what in _FACTOR_TABLES.items():
            if v.get(key):
                parts.append(f"{len(v[key])} {what} {show(min(v[key]))}..{show(max(v[key]))}")
        return ", ".join(parts)
    if isinstance(v, dict) and "rows" in v:
        return f"{v['rows']} rows" + (f", {v['tokens']} token ids" if v.get("tokens") is not None else "")
    return str(v)


def _side_text(role: str, reading: dict[str, Any], field: cf.Field) -> str:
    return f"{role} {show(reading.get('value'), field)} ({reading.get('source')})"


# --------------------------------------------------------------------------- comparisons


def close(x: Any, y: Any, rel: float = REL_TOL) -> bool:
    """Floats within ``rel`` of the larger magnitude; everything else exactly."""
    if isinstance(x, bool) or isinstance(y, bool):
        return x == y
    if isinstance(x, (int, float)) and isinstance(y, (int, float)):
        if math.isnan(x) or math.isnan(y):
            return False
        return abs(x - y) <= rel * max(abs(x), abs(y))
    if isinstance(x, list) and isinstance(y, list):
        return len(x) == len(y) and all(close(a, b, rel) for a, b in zip(x, y, strict=True))
    return x == y


def same_value(field: cf.Field, va: Any, vb: Any) -> bool:
    """Whether two values of ``field`` agree, absent values standing for the field's default."""
    va = field.default if va is None else va
    vb = field.default if vb is None else vb
    if va is None or vb is None:
        return va is None and vb is None
    if field.kind == "float":
        return close(va, vb)
    if field.kind == "id" and isinstance(va, list) != isinstance(vb, list):  # config.json lists several EOS ids
        many, one = (va, vb) if isinstance(va, list) else (vb, va)
        return one in many
    if field.name in cf.PER_LAYER_HEADS and (isinstance(va, list) or isinstance(vb, list)):
        # a hybrid's attention layers: zeros mark layers without attention, which a scalar config leaves out
        def attn(v: Any) -> set[Any]:
            return {x for x in v if x} if isinstance(v, list) else {v}

        if isinstance(va, list) and isinstance(vb, list):
            return va == vb  # layer by layer: a layer whose heads went to 0 lost its attention
        return attn(va) == attn(vb)
    return va == vb


def rope_differences(a: dict[str, Any] | None, b: dict[str, Any] | None) -> list[str]:
    """What differs between two normalised rope-scaling records ([] when they agree)."""
    if a is None and b is None:
        return []
    if a is None or b is None:
        return [f"scaling {'absent' if a is None else show(a)} in A vs {'absent' if b is None else show(b)} in B"]
    ta, tb = (_EQUIVALENT_ROPE.get(x["type"], x["type"]) for x in (a, b))
    out = [] if ta == tb else [f"type {a['type']} vs {b['type']}"]
    for key in sorted(set(a) | set(b)):
        if key == "type":
            continue
        if key in _FACTOR_TABLES:
            if key in a and key in b and not close(a[key], b[key], FREQ_TOL):
                fa, fb = a[key], b[key]
                i = next((k for k, (x, y) in enumerate(zip(fa, fb, strict=False)) if not close(x, y, FREQ_TOL)),
                         min(len(fa), len(fb)))
                out.append(f"{_FACTOR_TABLES[key]} differ ({len(fa)} vs {len(fb)}; first at dimension pair {i}: "
                           f"{show(fa[i]) if i < len(fa) else '-'} vs {show(fb[i]) if i < len(fb) else '-'})")
            continue
        if key in a and key in b:
            if not close(a[key], b[key]):
                out.append(f"{key} {show(a[key])} vs {show(b[key])}")
        elif ta == tb and ta in _WRITTEN and key in _WRITTEN[ta]:  # a converter writes these for this type
            out.append(f"{key} {show(a.get(key))} vs {show(b.get(key))}")
    return out


def _fail(cid: CheckId, field: cf.Field, ra: dict[str, Any], rb: dict[str, Any], extra: str = "",
          count: int = 1, side_b: dict[str, Any] | None = None) -> CheckResult:
    msg = f"{field.name}: {_side_text('A', ra, field)} vs {_side_text('B', rb, field)}"
    if extra:
        msg += f"\n{extra}"
    msg += f"\nThe {field.what} differs. {HINTS.get(field.name, '')}".rstrip()
    src = str(rb.get("source") or "")
    if (side_b or {}).get("kind") == "gguf" and field.kind in _PATCHABLE and ra.get("value") is not None \
            and rb.get("value") is not None and src.startswith("GGUF ") and " " not in src[5:]:
        msg += (f"\nTo patch B in place: gguf-set-metadata {side_b['path']} {src[5:]} {show(ra['value'])} "
                "(gguf-py); better, re-convert.")
    return result(cid, float(count), False, msg, details={"a": ra, "b": rb})


def _ok(cid: CheckId, field: cf.Field, ra: dict[str, Any], rb: dict[str, Any], note: str = "") -> CheckResult:
    msg = f"{field.name}: {_side_text('A', ra, field)}, {_side_text('B', rb, field)}" + (f"; {note}" if note else "")
    return result(cid, 0.0, True, msg, details={"a": ra, "b": rb})


def _rows(cid: CheckId, field: cf.Field, ra: dict[str, Any], rb: dict[str, Any]) -> CheckResult:
    va, vb = ra.get("value") or {}, rb.get("value") or {}
    problems = []
    if va.get("rows") is not None and vb.get("rows") is not None and va["rows"] != vb["rows"]:
        problems.append(f"embedding rows A {va['rows']} vs B {vb['rows']}")
    for role, v in (("A", va), ("B", vb)):
        if v.get("rows") is not None and v.get("tokens") is not None and v["tokens"] > v["rows"]:
            problems.append(f"{role}'s tokenizer has {v['tokens']} ids but its embedding only {v['rows']} rows: "
                            f"ids {v['rows']}..{v['tokens'] - 1} have no embedding")
    if problems:
        return _fail(cid, field, ra, rb, "; ".join(problems), len(problems))
    if va.get("rows") is None or vb.get("rows") is None:
        role = "A" if va.get("rows") is None else "B"
        return skipped(cid, f"{role}'s embedding rows could not be read ({(ra if role == 'A' else rb).get('source')})")
    return _ok(cid, field, ra, rb)


def _eot(cid: CheckId, field: cf.Field, side_a: dict[str, Any], side_b: dict[str, Any], ra: dict[str, Any],
         rb: dict[str, Any]) -> CheckResult:
    """End of turn: equal when both name one; else B's must be one of A's stop ids (transformers configs
    have no end-of-turn field, their generation_config lists the stop ids), and A's must end B's turns."""
    va, vb = ra.get("value"), rb.get("value")
    stops_a = (side_a.get("stop_ids") or {}).get("value") or []
    stops_b = (side_b.get("stop_ids") or {}).get("value") or []
    src_a = (side_a.get("stop_ids") or {}).get("source") or "A"
    if va is not None and vb is not None:
        return _ok(cid, field, ra, rb) if va == vb else _fail(cid, field, ra, rb)
    if vb is not None:
        if vb in stops_a:
            return _ok(cid, field, ra, rb, f"B's end-of-turn id is one of A's stop ids {stops_a} ({src_a})")
        return _fail(cid, field, ra, rb, f"B's end-of-turn id {vb} is not one of A's stop ids {stops_a} ({src_a})")
    if va is not None:
        if va in stops_b:
            return _ok(cid, field, ra, rb, f"A's end-of-turn id is one of B's stop ids {stops_b}")
        return _fail(cid, field, ra, rb, f"B does not stop at A's end-of-turn id {va} (B's stop ids {stops_b})")
    return _ok(cid, field, ra, rb)


def _context(text: str, i: int, width: int = 40) -> str:
    start = max(0, i - width)
    return repr(text[start:i]) + " ▸ " + repr(text[i:i + width])


def first_difference(a: str, b: str) -> int:
    """Index of the first differing character (the shorter length when one is a prefix of the other)."""
    return next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _markers(cid: CheckId, chat: dict[str, Any], sa: Any, sb: Any) -> CheckResult | None:
    """A failure when a special token A's template emits is not special in B's vocabulary, or has another id."""
    found = (chat.get("special_tokens") or {}).get("problems") or []
    if not found:
        return None
    lines = [f"  {p['token']!r}: A id {p['a_id']}, B " + (f"id {p['b_id']}" if p["b_id"] is not None else
                                                         "has no such special token") for p in found]
    return result(cid, float(len(found)), False,
                  f"chat_template: {len(found)} special token(s) that A's template emits (from {sa}) are not special "
                  f"tokens in B's vocabulary with A's ids (B: {sb}):\n" + "\n".join(lines) + "\n"
                  "B then reads those turn or tool-call markers as plain text (or as another token): the model "
                  "never sees the token it was trained to see there. Re-convert with the tokenizer's added tokens.",
                  details={"special_tokens": found})


def _template(cid: CheckId, field: cf.Field, ra: dict[str, Any], rb: dict[str, Any], chat: dict[str, Any]) -> CheckResult:
    ta, tb = ra.get("value"), rb.get("value")
    sa, sb = ra.get("source"), rb.get("source")
    if ta is None or tb is None:  # a template dropped or added says more than its markers
        return _template_text(cid, ta, tb, sa, sb, chat)
    return _markers(cid, chat, sa, sb) or _template_text(cid, ta, tb, sa, sb, chat)


def _template_text(cid: CheckId, ta: Any, tb: Any, sa: Any, sb: Any, chat: dict[str, Any]) -> CheckResult:
    if ta is None and tb is None:
        return result(cid, 0.0, True, f"chat_template: neither model has one (A: {sa}; B: {sb})")
    if tb is None:
        return result(cid, 1.0, False,
                      f"chat_template: B has none: it was dropped (A: {len(ta)} characters from {sa}; B: {sb}).\n"
                      "Chat front ends then use a default template or none, and the model sees prompts in a format "
                      "it was not trained on. Re-convert with the tokenizer files next to the checkpoint.",
                      details={"a_source": sa, "b_source": sb})
    if ta is None:
        return result(cid, 1.0, False, f"chat_template: B has one ({len(tb)} characters from {sb}) where A has none "
                                      f"({sa}).", details={"a_source": sa, "b_source": sb})
    if ta == tb:
        return result(cid, 0.0, True, f"chat_template: identical ({len(ta)} characters; A {sa}, B {sb})")
    if not chat.get("jinja2", True):
        return result(cid, 1.0, False, f"chat_template: the templates' texts differ at character "
                                      f"{first_difference(ta, tb)} (A {sa}, B {sb}); install jinja2 to compare "
                                      "what they render.")
    renders = chat.get("renders") or []
    differing = [r for r in renders if r["a"] != r["b"]]
    if not differing:
        return result(cid, 0.0, True, f"chat_template: the texts differ (A {sa}, B {sb}) but render the "
                                      f"{len(renders)} test conversations identically (plain, system prompt, "
                                      "multi-turn, tools, a tool call and its result, reasoning)")
    r = differing[0]
    what = f"{r['name']} conversation, add_generation_prompt={r['add_generation_prompt']}"
    ra_, rb_ = r["a"], r["b"]
    if "text" in ra_ and "text" in rb_:
        i = first_difference(ra_["text"], rb_["text"])
        detail = (f"First difference ({what}) at character {i}:\n  A: {_context(ra_['text'], i)}\n"
                  f"  B: {_context(rb_['text'], i)}")
        if "ids_a" in r:
            ia, ib = r["ids_a"], r["ids_b"]
            k = next((n for n, (x, y) in enumerate(zip(ia, ib, strict=False)) if x != y), min(len(ia), len(ib)))
            pa, pb = (r.get("pieces") or {}).get("a"), (r.get("pieces") or {}).get("b")
            detail += (f"\n  in tokens ({chat.get('tokenizer')}): {len(ia)} vs {len(ib)} tokens, first difference at "
                       f"token {k}: A {ia[k] if k < len(ia) else '-'} {pa!r} vs B {ib[k] if k < len(ib) else '-'} {pb!r}")
    else:
        detail = (f"({what}) A: {ra_.get('text', '')[:80]!r}{' error ' + ra_['error'] if 'error' in ra_ else ''}; "
                  f"B: {rb_.get('text', '')[:80]!r}{' error ' + rb_['error'] if 'error' in rb_ else ''}")
    how = chat.get("rendered_as") or {}
    conversation = "\n".join("    " + line for line in (r.get("conversation") or "").splitlines())
    return result(cid, float(len(differing)), False,
                  f"chat_template: B's template (from {sb}, rendered as {how.get('b', 'transformers')} does) renders "
                  f"{len(differing)} of {len(renders)} test conversations differently from A's (from {sa}, rendered "
                  f"as {how.get('a', 'transformers')} does): "
                  + ", ".join(f"{d['name']}/gen={d['add_generation_prompt']}" for d in differing[:6])
                  + (" ..." if len(differing) > 6 else "") + f".\nThe conversation:\n{conversation}\n{detail}\n"
                  "Chat prompts reach B in another format than the one A was trained on.",
                  details={"differing": [f"{d['name']}/gen={d['add_generation_prompt']}" for d in differing]})


def _specials(cid: CheckId, sp: dict[str, Any]) -> CheckResult:
    if sp.get("skipped"):
        return skipped(cid, sp["skipped"] + "; special tokens are not compared.")
    problems = sp.get("problems") or []
    if not problems:
        return result(cid, 0.0, True, f"special_tokens: each of A's {sp.get('checked')} special tokens has its id in B "
                                      "and is special there; B marks no ordinary text of A's as a control token")
    lines = [f"  {p['token']!r} (id {p['id']}): {p['effect']}" for p in problems]
    return result(cid, float(len(problems)), False,
                  f"special_tokens: {len(problems)} of A's special tokens are not special in B, or B marks A's "
                  "text as control:\n" + "\n".join(lines)
                  + "\nllama.cpp reads each token's type from tokenizer.ggml.token_type; re-convert, or fix the types "
                    "(gguf-py's gguf_new_metadata.py). llama.cpp overrides a few end-of-turn texts it knows, with "
                    "a warning; other runtimes do not.", details={"problems": problems})


def _eog(cid: CheckId, e: dict[str, Any]) -> CheckResult:
    if e.get("skipped"):
        return skipped(cid, e["skipped"] + "; the end-of-generation set is not compared.")

    def name(x: dict[str, Any]) -> str:
        return f"{x['token']!r} (id {x['id']})" if x.get("token") is not None else f"id {x['id']}"

    bad = [f"A stops at {name(x)}, B's runtime does not: B's generation runs on past it" for x in e["missing"]]
    bad += [f"B's runtime stops at {name(x)}, which A's tokenizer treats as ordinary text: B stops mid-text"
            for x in e["extra"] if not x["special_in_a"]]
    also = [name(x) for x in e["extra"] if x["special_in_a"]]
    note = (f"; B also stops at {', '.join(also)} (special tokens of A's; llama.cpp ends generation at end-of-turn "
            "markers by their text)") if also else ""
    head = f"A's stop ids {e['a']} ({e['source_a']}), B's {e['b']} ({e['source_b']})"
    if not bad:
        return result(cid, 0.0, True, f"eog: {head}{note}")
    return result(cid, float(len(bad)), False, "eog: " + head + ":\n" + "\n".join(f"  {b}" for b in bad) + note
                  + "\nSet the end-of-turn or EOS id in the GGUF (tokenizer.ggml.eos_token_id / eot_token_id) to "
                    "A's, or re-convert.", details=e)


def check_field(field: cf.Field, m: dict[str, Any]) -> CheckResult:
    """One planned item from the measurement of both sides."""
    cid = CheckId(NAME, field.name)
    side_a, side_b = m["a"], m["b"]
    for role, side in (("A", side_a), ("B", side_b)):
        why = (side.get("unknown") or {}).get(field.name)
        if why:
            return skipped(cid, f"{role}: {why}; {field.name} is not compared.")
    missing = {"value": None, "source": "not read"}
    ra = side_a["fields"].get(field.name) or missing
    rb = side_b["fields"].get(field.name) or missing
    if field.kind == "template":
        return _template(cid, field, ra, rb, m.get("chat") or {})
    if field.kind == "specials":
        return _specials(cid, m.get("specials") or {"skipped": "not measured (a cache entry of an older version)"})
    if field.kind == "eog":
        return _eog(cid, m.get("eog") or {"skipped": "not measured (a cache entry of an older version)"})
    if field.kind == "rows":
        return _rows(cid, field, ra, rb)
    if field.kind == "eot":
        return _eot(cid, field, side_a, side_b, ra, rb)
    if field.kind == "rope":
        diffs = rope_differences(ra.get("value"), rb.get("value"))
        if diffs and (ra.get("value") is None or rb.get("value") is None):
            return _fail(cid, field, ra, rb)
        return _fail(cid, field, ra, rb, "; ".join(diffs), len(diffs)) if diffs else _ok(cid, field, ra, rb)
    if field.name in cf.DERIVED_WHEN_ABSENT and (ra.get("value") is None) != (rb.get("value") is None):
        silent, stated = ("A", rb) if ra.get("value") is None else ("B", ra)
        other = "B" if silent == "A" else "A"
        return skipped(cid, f"{silent}'s configuration does not state the {field.what} "
                            f"({(ra if silent == 'A' else rb).get('source')}); {other}'s "
                            f"{show(stated.get('value'), field)} ({stated.get('source')}) is "
                            + ("what the converter derived" if silent == "A" else "one the converter did not write")
                            + ", not compared. The tensors' shapes are compared by weights[*].")
    if field.name in cf.CODE_WHEN_ABSENT and ra.get("value") is None and rb.get("value") is not None:
        return skipped(cid, f"A's configuration does not state the {field.what} ({ra.get('source')}): A's code "
                            f"fixes it. B's {show(rb.get('value'), field)} ({rb.get('source')}) is not compared here; "
                            "runtime[*] runs A's code on B's weights against B's runtime and judges the value B's "
                            "runtime uses.")
    if (field.name == "context_length" and side_b.get("kind") == "gguf" and rb.get("value") == cf.NO_LIMIT_CONTEXT
            and ra.get("value") != cf.NO_LIMIT_CONTEXT):
        return skipped(cid, f"B states no context limit: {show(rb.get('value'), field)} ({rb.get('source')}) is the "
                            "value llama.cpp's converters write for a model without a position limit of its own "
                            f"(Mamba, RWKV, a hybrid without rope), not another training length. A's "
                            f"{show(ra.get('value'), field)} ({ra.get('source')}) is the length it was trained at; "
                            "set n_ctx when you serve B. What B computes at long positions is judged by runtime[*] "
                            "and position[*].")
    if same_value(field, ra.get("value"), rb.get("value")):
        return _ok(cid, field, ra, rb)
    return _fail(cid, field, ra, rb, side_b=side_b)


def evaluate(ctx: EvalContext) -> list[CheckResult]:
    planned = set(ctx.planned(NAME)) if ctx.plan is not None else set(plan(PlanContext(ctx.corpus, None, ctx.settings)))
    if not planned:
        return []
    m = ctx.measurement(FAMILY)
    return [check_field(f, m) for f in cf.FIELDS if CheckId(NAME, f.name) in planned]


FAMILY = CheckFamily(NAME, 5, plan, evaluate, doc="model configuration field by field, before any model loads",
                     needs_outputs=False, measure=cf.measure,
                     code=(cf.__name__, "pytest_convdiff.core.config_fields", "pytest_convdiff.backends.hf_config",
                           "pytest_convdiff.backends.gguf_config", "pytest_convdiff.backends.gguf_header",
                           "pytest_convdiff.backends.hfdir", "pytest_convdiff.store.reference"),
                     libraries=("transformers", "gguf", "jinja2"))
