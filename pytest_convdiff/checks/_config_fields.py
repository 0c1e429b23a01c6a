"""Reading both models' configurations for the ``config`` family, and rendering their chat templates.

Each side becomes a record of normalised fields (``core.config_fields``), each value with the file and
key it came from, so that a difference can be reported as ``rope_theta: A 100000.0 (config.json
rope_parameters.rope_theta) vs B 10000.0 (GGUF llama.rope.freq_base)``. The reading is the backend's:
each declares a ``read_config`` (``BackendSpec``): the transformers and EXL2 directories through
``backends/hf_config.py``, a GGUF through ``backends/gguf_config.py``. A saved golden reference is read
here (it keeps only the model info it was saved with); a side no backend reads says why.

``measure`` is the family's cached measurement: the cache key covers this file's code and the readers'
(``checks/config.py``: ``FAMILY.code``), so a change to any of them re-reads the models.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

from ..backends import gguf_header, registry
from ..core.config_fields import (
    CODE_WHEN_ABSENT,
    DERIVED_WHEN_ABSENT,
    FIELDS,
    NO_LIMIT_CONTEXT,
    PER_LAYER_HEADS,
    Field,
)
from ..errors import ConvdiffError

__all__ = ["CODE_WHEN_ABSENT", "CONVERSATIONS", "DERIVED_WHEN_ABSENT", "FIELDS", "NO_LIMIT_CONTEXT", "PER_LAYER_HEADS", "Field", "compare_templates", "measure", "read_side",
           "render_template"]


# The conversations every chat template is rendered on (name, messages); each with and without the
# generation prompt.
# A tool a template may be asked to declare, and one call of it with its result.
TOOLS: list[dict[str, Any]] = [{"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city's name."}},
                   "required": ["city"]}}}]
_CALL = {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}

# (name, messages, extra template variables): plain chats, a system prompt, several turns, tools declared,
# an assistant tool call with the tool's result, and reasoning (with and without thinking).
CONVERSATIONS: tuple[tuple[str, list[dict[str, Any]], dict[str, Any]], ...] = (
    ("system+user", [{"role": "system", "content": "You are a helpful assistant."},
                     {"role": "user", "content": "What is the capital of France?"}], {}),
    ("user", [{"role": "user", "content": "Write a haiku about rain."}], {}),
    ("multi-turn", [{"role": "user", "content": "Hi! Can you help me?"},
                    {"role": "assistant", "content": "Of course. What do you need?"},
                    {"role": "user", "content": "Tell me a joke about cats."}], {}),
    ("tools", [{"role": "system", "content": "You are a helpful assistant."},
               {"role": "user", "content": "What is the weather in Paris?"}], {"tools": TOOLS}),
    ("tool-call", [{"role": "user", "content": "What is the weather in Paris?"},
                   {"role": "assistant", "content": "", "tool_calls": [_CALL]},
                   {"role": "tool", "tool_call_id": "call_0", "name": "get_weather",
                    "content": '{"temperature": 18, "sky": "clear"}'},
                   {"role": "assistant", "content": "It is 18 degrees and clear in Paris."},
                   {"role": "user", "content": "And tomorrow?"}], {"tools": TOOLS}),
    ("reasoning", [{"role": "user", "content": "What is 2 + 2?"},
                   {"role": "assistant", "content": "4.", "reasoning_content": "Two plus two is four."},
                   {"role": "user", "content": "And 3 + 3?"}], {"enable_thinking": True}),
    ("no-thinking", [{"role": "user", "content": "What is 2 + 2?"}], {"enable_thinking": False}),
)


def describe_conversation(messages: list[dict[str, Any]], extra: dict[str, Any]) -> str:
    """One line per message, for a failure message: who said what (tool calls by name and arguments)."""
    lines = []
    if extra.get("tools"):
        lines.append("tools: " + ", ".join(t["function"]["name"] for t in extra["tools"]))
    if "enable_thinking" in extra:
        lines.append(f"enable_thinking={extra['enable_thinking']}")
    for m in messages:
        text = str(m.get("content") or "")
        if m.get("reasoning_content"):
            text = f"[reasoning: {m['reasoning_content']}] {text}"
        for call in m.get("tool_calls") or []:
            fn = call["function"]
            text += f" [calls {fn['name']}({json.dumps(fn['arguments'])})]"
        lines.append(f"{m['role']}: {text.strip()}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- golden references

# ModelInfo attribute / extra key -> field (a reference saved from a GGUF keeps some header fields).
def _none_side(path: str, why: str) -> dict[str, Any]:
    return {"kind": "none", "path": path, "fields": {}, "unknown": {f.name: why for f in FIELDS},
            "stop_ids": None, "special_text": {}, "tokenizer_json": None, "notes": []}


def _backend(spec: Any, path: Path) -> tuple[registry.BackendSpec | None, str]:
    """The backend declaration that reads this side (the one named, else the one that claims the path),
    or None and why there is nothing to read."""
    if not path.exists():
        return None, f"{path} does not exist: no configuration to read"
    named = getattr(spec, "backend", None)
    if named:
        try:
            backend = registry.get(named)
        except ValueError as exc:
            return None, f"{path}: {exc}: no configuration to read"
    else:
        backend = registry.claimant(path)
    if backend is None:
        if not path.is_dir():
            what = "is neither a GGUF nor a saved reference"
        elif not (path / "config.json").is_file():
            what = "is a directory without config.json"
        else:
            what = "is a checkpoint directory no installed backend runs"
        return None, f"{path} {what}: no configuration to read"
    if backend.read_config is None:
        return None, f"{path}: the {backend.name} backend declares no configuration reader: no configuration to read"
    return backend, ""


def read_side(spec: Any) -> dict[str, Any]:
    """One model's normalised config record, read by its backend; a side with nothing to read says why."""
    if spec is None:
        return _none_side("", "no model spec was given to the check")
    path = Path(spec.path)
    options = getattr(spec, "options", None) or {}
    try:
        kind = spec.kind()
        if kind.read_config is not None:  # a stored source keeps its own record
            return kind.read_config(spec)
        backend, why = _backend(spec, path)
        if backend is not None:
            return backend.read_config(path, options)
    except ConvdiffError:
        raise
    except Exception as exc:  # noqa: BLE001 - a reading bug must error the items readably, never crash the pair
        raise ConvdiffError(f"reading the configuration of {path} failed: {type(exc).__name__}: {exc}") from exc
    return _none_side(str(path), why)


# --------------------------------------------------------------------------- chat templates


def _environment() -> Any:
    """A sandboxed jinja2 environment with what chat templates expect (as transformers renders them):
    trimmed blocks, loop controls, ``tojson``, ``raise_exception``, a fixed ``strftime_now`` (the same
    date on both sides) and a pass-through ``{% generation %}`` block."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(Extension):
        """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks: rendered as is."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime(2024, 1, 15, 12, 0).strftime(fmt)
    return env


def render_template(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool,
                    bos_token: str | None, eos_token: str | None, **extra: Any) -> dict[str, Any]:
    """As transformers renders a checkpoint's template: ``{"text": ...}`` or ``{"error": ...}`` (a template
    that raises, or does not parse)."""
    try:
        env = _environment()
        compiled = env.from_string(template)
        return {"text": compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=bos_token or "", eos_token=eos_token or "", **extra)}
    except Exception as exc:  # noqa: BLE001 - the template's own failure is what is compared
        return {"error": f"{type(exc).__name__}: {exc}"}


def render_template_llamacpp(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool,
                             bos_token: str | None, eos_token: str | None, **extra: Any) -> dict[str, Any]:
    """As llama-cpp-python renders a GGUF's template (its ``Jinja2ChatFormatter``), with the same fixed date as
    the other side; transformers' way where llama-cpp-python is not installed."""
    try:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    except ImportError:
        return render_template(template, messages, add_generation_prompt, bos_token, eos_token, **extra)
    try:
        fmt = Jinja2ChatFormatter(template, eos_token or "", bos_token or "", add_generation_prompt)
        fmt.strftime_now = lambda f: datetime.datetime(2024, 1, 15, 12, 0).strftime(f)  # type: ignore[method-assign]
        tools = extra.pop("tools", None)
        return {"text": fmt(messages=messages, tools=tools, **extra).prompt}
    except Exception as exc:  # noqa: BLE001
        return {"error": f"{type(exc).__name__}: {exc}"}


def _renderer(side: dict[str, Any]) -> Any:
    return render_template_llamacpp if side.get("kind") == "gguf" else render_template


def _tokenizer(path: str | None) -> Any:
    if not path:
        return None
    try:
        from tokenizers import Tokenizer

        return Tokenizer.from_file(path)
    except Exception:  # noqa: BLE001 - token ids are extra detail; texts are compared without them
        return None


def _renderer_name(side: dict[str, Any]) -> str:
    return "llama-cpp-python" if side.get("kind") == "gguf" else "transformers"


def template_markers(side_a: dict[str, Any], side_b: dict[str, Any], texts_a: list[str]) -> dict[str, Any]:
    """The special tokens A's template emits (its renders contain them: turn, tool-call and thinking markers)
    and whether B's vocabulary has each as a special token with A's id. A marker B lacks is tokenized as
    plain text, and the model never sees the token it was trained on."""
    specials_a, specials_b = side_a.get("special_tokens") or {}, side_b.get("special_tokens")
    if not specials_a or specials_b is None:
        return {"checked": [], "problems": [], "skipped": "no list of special tokens for "
                + ("A" if not specials_a else "B")}
    emitted = sorted(t for t in specials_a if t and any(t in x for x in texts_a))
    problems = [{"token": t, "a_id": specials_a[t], "b_id": specials_b.get(t)} for t in emitted
                if specials_b.get(t) != specials_a[t]]
    return {"checked": emitted, "problems": problems}


def compare_templates(side_a: dict[str, Any], side_b: dict[str, Any]) -> dict[str, Any]:
    """Render A's and B's chat templates on ``CONVERSATIONS`` (each with and without the generation
    prompt), each with its own BOS/EOS texts and as its runtime renders it (transformers for a checkpoint,
    llama-cpp-python for a GGUF); token ids of differing renders with a tokenizer.json (A's, else B's) when
    one is at hand; and the special tokens A's renders emit, looked up in B's vocabulary."""
    ta = (side_a.get("fields", {}).get("chat_template") or {}).get("value")
    tb = (side_b.get("fields", {}).get("chat_template") or {}).get("value")
    out: dict[str, Any] = {"renders": [], "identical_source": ta == tb, "jinja2": True, "tokenizer": None}
    if not isinstance(ta, str):
        return out
    try:
        import jinja2  # noqa: F401
    except ImportError:
        out["jinja2"] = False
        return out
    sa, sb = side_a.get("special_text") or {}, side_b.get("special_text") or {}
    render_a, render_b = _renderer(side_a), _renderer(side_b)
    texts_a: list[str] = []
    if not isinstance(tb, str) or ta == tb:  # nothing to compare; A's renders still name the markers it emits
        for _name, messages, extra in CONVERSATIONS:
            ra = render_a(ta, messages, True, sa.get("bos"), sa.get("eos"), **dict(extra))
            texts_a += [ra["text"]] if "text" in ra else []
        out["special_tokens"] = template_markers(side_a, side_b, texts_a)
        return out
    tok_path = side_a.get("tokenizer_json") or side_b.get("tokenizer_json")
    tok = _tokenizer(tok_path)
    if tok is not None:
        out["tokenizer"] = "A's tokenizer.json" if side_a.get("tokenizer_json") else "B's tokenizer.json"
    out["rendered_as"] = {"a": _renderer_name(side_a), "b": _renderer_name(side_b)}
    for name, messages, extra in CONVERSATIONS:
        for gen in (True, False):
            ra = render_a(ta, messages, gen, sa.get("bos"), sa.get("eos"), **dict(extra))
            rb = render_b(tb, messages, gen, sb.get("bos"), sb.get("eos"), **dict(extra))
            texts_a += [ra["text"]] if "text" in ra else []
            row: dict[str, Any] = {"name": name, "add_generation_prompt": gen, "a": ra, "b": rb,
                                   "conversation": describe_conversation(messages, extra)}
            if tok is not None and "text" in ra and "text" in rb and ra["text"] != rb["text"]:
                ids_a = tok.encode(ra["text"], add_special_tokens=False).ids
                ids_b = tok.encode(rb["text"], add_special_tokens=False).ids
                row["ids_a"], row["ids_b"] = ids_a, ids_b
                i = next((k for k, (x, y) in enumerate(zip(ids_a, ids_b, strict=False)) if x != y), min(len(ids_a), len(ids_b)))
                row["pieces"] = {"a": tok.id_to_token(ids_a[i]) if i < len(ids_a) else None,
                                 "b": tok.id_to_token(ids_b[i]) if i < len(ids_b) else None}
            out["renders"].append(row)
    out["special_tokens"] = template_markers(side_a, side_b, texts_a)
    return out


# --------------------------------------------------------------------------- the measurement


# --------------------------------------------------------------------------- special tokens and stops

# the token types llama.cpp gives a special token: control and user-defined ones, and UNKNOWN for a SentencePiece
# vocabulary's <unk> (it is not text either)
_SPECIAL_TYPES = (gguf_header.TOKEN_CONTROL, gguf_header.TOKEN_USER_DEFINED, gguf_header.TOKEN_UNKNOWN)


def _a_vocab(side_a: dict[str, Any]) -> dict[str, int]:
    """A's token text -> id from its tokenizer.json (read only when B marks tokens A does not)."""
    path = side_a.get("tokenizer_json")
    if not path:
        return {}
    try:
        tok = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    vocab = (tok.get("model") or {}).get("vocab")
    return {str(k): int(v) for k, v in vocab.items()} if isinstance(vocab, dict) else {}


def compare_specials(side_a: dict[str, Any], side_b: dict[str, Any]) -> dict[str, Any]:
    """Every token A's tokenizer treats as special (its added tokens marked special) keeps its id in B and is
    special there (a GGUF: CONTROL or USER_DEFINED); no token A treats as ordinary text is a control token in B."""
    sa = side_a.get("special_tokens")
    if not sa:
        return {"skipped": "A lists no special tokens (no added tokens marked special in a tokenizer.json)"}
    stops = set((side_a.get("stop_ids") or {}).get("value") or [])
    problems: list[dict[str, Any]] = []
    if side_b.get("kind") != "gguf":
        sb = side_b.get("special_tokens")
        if sb is None:
            return {"skipped": "B lists no special tokens"}
        for text, i in sorted(sa.items(), key=lambda kv: kv[1]):
            if sb.get(text) != i:
                problems.append({"token": text, "id": i, "b": sb.get(text), "effect": "missing or moved in B"})
        problems += [{"token": t, "id": i, "b": i, "effect": "special in B only"} for t, i in sb.items() if t not in sa]
        return {"checked": len(sa), "problems": problems}
    path = Path(side_b["path"])
    ids = sorted(set(sa.values()))
    texts, types = gguf_header.token_texts(path, ids), gguf_header.token_types(path, ids)
    for text, i in sorted(sa.items(), key=lambda kv: kv[1]):
        tb, ty = texts.get(i), types.get(i)
        if tb is None:
            problems.append({"token": text, "id": i, "effect": "B has no token with this id"})
        elif tb != text:
            problems.append({"token": text, "id": i, "b_text": tb, "effect": f"B's id {i} is {tb!r}"})
        elif ty not in _SPECIAL_TYPES:
            effect = "special in A, typed " + gguf_header.TOKEN_TYPE_NAMES.get(ty, str(ty)) + " in B: its text in a prompt is " \
                     "split as ordinary text, and it is printed when generated"
            if i in stops:
                effect += "; a stop token of A's, so B's turns never end where A's do"
            problems.append({"token": text, "id": i, "type_b": gguf_header.TOKEN_TYPE_NAMES.get(ty, str(ty)),
                             "effect": effect})
    extra = {t: i for t, i in (side_b.get("special_tokens") or {}).items() if t not in sa}
    if extra:
        types_b = gguf_header.token_types(path, list(extra.values()))
        control = {t: i for t, i in extra.items() if types_b.get(i) == gguf_header.TOKEN_CONTROL}
        vocab = _a_vocab(side_a) if control else {}
        for t, i in sorted(control.items(), key=lambda kv: kv[1]):
            if vocab.get(t) == i:
                problems.append({"token": t, "id": i, "type_b": "CONTROL",
                                 "effect": "ordinary text in A, a control token in B: B never produces it from "
                                           "text and does not print it"})
    return {"checked": len(sa), "problems": problems}


def compare_eog(side_a: dict[str, Any], side_b: dict[str, Any]) -> dict[str, Any]:
    """A's stop ids (its tokenizer's EOS, config.json's and generation_config.json's eos_token_id, its end-of-turn
    token) against the ids that end generation in B's runtime. A stop B does not stop on fails, and so does a
    stop B adds on a token A treats as ordinary text; one B adds on a special token of A's (llama.cpp stops at
    end-of-turn markers by their text) is listed."""
    stops_a = (side_a.get("stop_ids") or {}).get("value")
    if stops_a is None:
        return {"skipped": "A's stop ids could not be read"}
    if side_b.get("kind") == "gguf":
        eog = side_b.get("eog") or {}
        if eog.get("value") is None:
            return {"skipped": eog.get("source") or "B's end-of-generation set could not be read"}
        stops_b, source_b = set(eog["value"]), eog.get("source")
    else:
        sb = (side_b.get("stop_ids") or {})
        if sb.get("value") is None:
            return {"skipped": "B's stop ids could not be read"}
        stops_b, source_b = set(sb["value"]), sb.get("source")
    special_a = {i: t for t, i in (side_a.get("special_tokens") or {}).items()}
    missing, extra = sorted(set(stops_a) - stops_b), sorted(stops_b - set(stops_a))
    texts = dict(special_a)
    if side_b.get("kind") == "gguf" and (missing or extra):
        texts.update({i: t for i, t in gguf_header.token_texts(Path(side_b["path"]), missing + extra).items()
                      if i not in texts})
    return {"a": sorted(stops_a), "b": sorted(stops_b), "source_a": (side_a.get("stop_ids") or {}).get("source"),
            "source_b": source_b,
            "missing": [{"id": i, "token": texts.get(i)} for i in missing],
            "extra": [{"id": i, "token": texts.get(i), "special_in_a": i in special_a} for i in extra]}


def measure(ctx: Any) -> dict[str, Any]:
    """Both sides' normalised configs, the chat-template renders, special tokens and stops: JSON, cached per pair."""
    a = read_side(ctx.spec_a)
    b = read_side(ctx.spec_b)
    return {"a": a, "b": b, "chat": compare_templates(a, b), "specials": compare_specials(a, b),
            "eog": compare_eog(a, b)}
