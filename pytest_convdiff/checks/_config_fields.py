"""Reading one model's configuration into a common vocabulary, for the ``config`` family.

Each side (a transformers or EXL2 directory, a GGUF file, a saved golden reference) becomes a
record of normalised fields, each value with the file and key it came from, so that a difference
can be reported as ``rope_theta: A 100000.0 (config.json rope_parameters.rope_theta) vs B 10000.0
(GGUF llama.rope.freq_base)``. Nothing here loads a model or reads tensor data beyond a few
header bytes: safetensors headers, the GGUF tensor table, and the tiny ``rope_freqs`` tensor.

A GGUF's model fields go through transformers' own mapping from GGUF metadata to a config
(``load_gguf_checkpoint(return_tensors=False)``, which reads metadata only), so the values are the
ones ``from_pretrained(gguf_file=...)`` would use; what that mapping drops (rope scaling for Llama,
soft-caps, sliding window, end-of-turn id, add-BOS flags) is read from the header directly. Without
transformers (or for an architecture it does not know) the header alone is read with the GGUF
spec's key names.

``measure`` is the family's cached measurement: the cache key covers this file's code, so a change
here re-reads the models.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..backends.gguf_header import ARRAY_TYPE
from ..errors import ConvdiffError, ModelLoadError

__all__ = ["CONVERSATIONS", "FIELDS", "Field", "compare_templates", "llama3_freq_factors", "measure",
           "normalise_config", "read_side", "render_template"]

MEASURE_VERSION = 1


@dataclass(frozen=True)
class Field:
    """One compared field: its item name, what it is, the value an absent field means, how to compare."""

    name: str
    what: str
    default: Any  # None: absent means "no such feature" (or no default: absent vs present fails)
    kind: str  # float | int | bool | id | rope | rows | eot | template


FIELDS: tuple[Field, ...] = (
    Field("rope_theta", "rope frequency base", 10000.0, "float"),
    Field("rope_scaling", "rope scaling", None, "rope"),
    Field("norm_eps", "norm epsilon", None, "float"),
    Field("context_length", "training context length", None, "int"),
    Field("sliding_window", "sliding-window size", None, "int"),
    Field("n_heads", "attention head count", None, "int"),
    Field("n_kv_heads", "key/value head count", None, "int"),
    Field("head_dim", "head dimension", None, "int"),
    Field("hidden_size", "hidden size", None, "int"),
    Field("intermediate_size", "MLP intermediate size", None, "int"),
    Field("n_layers", "decoder layer count", None, "int"),
    Field("n_experts", "expert count", None, "int"),
    Field("n_experts_used", "experts used per token", None, "int"),
    Field("vocab_size", "vocabulary size", None, "int"),
    Field("embedding_rows", "embedding rows", None, "rows"),
    Field("logit_softcap", "final logit soft-cap", None, "float"),
    Field("attn_softcap", "attention logit soft-cap", None, "float"),
    Field("tied_embeddings", "tying of the output layer to the token embedding", None, "bool"),
    Field("bos_id", "BOS token id", None, "id"),
    Field("eos_id", "EOS token id", None, "id"),
    Field("eot_id", "end-of-turn token id", None, "eot"),
    Field("pad_id", "padding token id", None, "id"),
    Field("add_bos", "BOS flag (whether the tokenizer adds BOS)", False, "bool"),
    Field("add_eos", "EOS flag (whether the tokenizer adds EOS)", False, "bool"),
    Field("chat_template", "chat template", None, "template"),
)
FIELD_NAMES = tuple(f.name for f in FIELDS)

# The conversations every chat template is rendered on (name, messages); each with and without the
# generation prompt.
CONVERSATIONS: tuple[tuple[str, list[dict[str, str]]], ...] = (
    ("system+user", [{"role": "system", "content": "You are a helpful assistant."},
                     {"role": "user", "content": "What is the capital of France?"}]),
    ("user", [{"role": "user", "content": "Write a haiku about rain."}]),
    ("multi-turn", [{"role": "user", "content": "Hi! Can you help me?"},
                    {"role": "assistant", "content": "Of course. What do you need?"},
                    {"role": "user", "content": "Tell me a joke about cats."}]),
)


def _reading(value: Any, source: str) -> dict[str, Any]:
    return {"value": value, "source": source}


# --------------------------------------------------------------------------- config dicts (HF style)


class _Cfg:
    """A transformers-style config dict with a label for each key (where a value came from).

    Multimodal configs keep the language model's fields under ``text_config``: those win."""

    def __init__(self, data: dict[str, Any], label: Callable[[str], str]) -> None:
        text = data.get("text_config")
        self.layers = [(text, "text_config.")] if isinstance(text, dict) else []
        self.layers.append((data, ""))
        self.label = label

    def get(self, *keys: str) -> tuple[Any, str | None]:
        """The first of ``keys`` with a non-null value, and its label; (None, None) if none is set."""
        for key in keys:
            for data, prefix in self.layers:
                if data.get(key) is not None:
                    return data[key], self.label(prefix + key)
        return None, None

    def has(self, key: str) -> bool:
        return any(key in data for data, _ in self.layers)


def _num(v: Any) -> Any:
    """JSON-friendly number: ints stay ints, integral floats of int-like fields are the caller's call."""
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, (int, float)):
        return v
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def _int_or_list(v: Any) -> Any:
    """An int, or a per-layer list collapsed to one int when every layer agrees."""
    if isinstance(v, (list, tuple)):
        vals = [int(x) for x in v]
        return vals[0] if vals and all(x == vals[0] for x in vals) else vals
    return int(v) if v is not None else None


def _none_if_zero(v: Any) -> Any:
    return None if v in (0, 0.0, None, False) else v


def llama3_freq_factors(theta: float, dim: int, factor: float, low: float, high: float, original: int) -> list[float]:
    """Llama 3.1's per-dimension rope frequency divisors (what a GGUF stores as ``rope_freqs.weight``).

    Wavelengths shorter than ``original / high`` keep their frequency, longer than ``original / low``
    are divided by ``factor``, and the band between is interpolated smoothly."""
    out = []
    for i in range(0, dim, 2):
        freq = 1.0 / (theta ** (i / dim))
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(float(factor))
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return out


_ROPE_TYPE_ALIASES = {"su": "longrope", "default": None, "none": None, "": None}
_ROPE_KEYS = ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor",
              "beta_fast", "beta_slow", "attention_factor", "extrapolation_factor", "long_factor", "short_factor")


def _rope_from_hf(cfg: _Cfg, theta: Any, head_dim: Any) -> dict[str, Any]:
    """rope scaling from ``rope_parameters`` (transformers 5) or ``rope_scaling`` (older configs)."""
    params, label = cfg.get("rope_parameters", "rope_scaling")
    if not isinstance(params, dict):
        return _reading(None, "config.json: no rope_parameters / rope_scaling" if label is None else label)
    if isinstance(params.get("full_attention"), dict):  # per layer type (Gemma 3): the global layers' rope
        params, label = params["full_attention"], f"{label}.full_attention"
    raw_type = params.get("rope_type", params.get("type"))
    rtype = _ROPE_TYPE_ALIASES.get(str(raw_type).lower(), str(raw_type).lower()) if raw_type is not None else None
    if rtype is None:
        return _reading(None, f"{label}.rope_type {raw_type!r}" if raw_type is not None else label)
    out: dict[str, Any] = {"type": rtype}
    for key in _ROPE_KEYS:
        v = params.get(key)
        if key == "attention_factor" and v is None:
            v = params.get("attn_factor")
        if v is None and key == "original_max_position_embeddings":
            v, _ = cfg.get("original_max_position_embeddings")
        if v is not None:
            out[key] = _num(v)
    if rtype == "llama3" and theta and head_dim and isinstance(head_dim, int):
        out["freq_factors"] = llama3_freq_factors(
            float(theta), head_dim, float(out.get("factor", 8.0)), float(out.get("low_freq_factor", 1.0)),
            float(out.get("high_freq_factor", 4.0)), int(out.get("original_max_position_embeddings", 8192)))
    return _reading(out, label or "config.json")


def normalise_config(data: dict[str, Any], label: Callable[[str], str], where: str = "config.json",
                     absent: Callable[[str], str] | None = None) -> dict[str, Any]:
    """The model fields of a transformers-style config dict, in this family's vocabulary.

    ``label(key)`` names where a key came from (``config.json rope_theta``, ``GGUF llama.rope.freq_base``);
    ``absent(key)`` says where a missing key was looked for (default ``"<where>: no <key>"``). Absent
    values are None with such a source; derived ones (head_dim, kv heads) say how they were derived."""
    cfg = _Cfg(data, label)
    out: dict[str, Any] = {}
    missing = absent or (lambda key: f"{where}: no {key}")

    def put(name: str, keys: tuple[str, ...], conv: Callable[[Any], Any] = _num) -> Any:
        v, lab = cfg.get(*keys)
        out[name] = _reading(conv(v) if v is not None else None, lab or missing(keys[0]))
        return out[name]["value"]

    params, plabel = cfg.get("rope_parameters")
    theta, tlabel = (None, None)
    if isinstance(params, dict):
        inner = params.get("full_attention") if isinstance(params.get("full_attention"), dict) else params
        if inner.get("rope_theta") is not None:
            theta = inner["rope_theta"]
            tlabel = f"{plabel}{'.full_attention' if inner is not params else ''}.rope_theta"
    if theta is None:
        theta, tlabel = cfg.get("rope_theta", "rotary_emb_base")
    out["rope_theta"] = _reading(_num(theta) if theta is not None else None, tlabel or missing("rope_theta"))
    put("norm_eps", ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps", "norm_epsilon"))
    put("context_length", ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"), _int_or_list)
    window, wlabel = cfg.get("sliding_window")
    if window is not None and cfg.get("use_sliding_window")[0] is False:
        out["sliding_window"] = _reading(None, f"{label('use_sliding_window')} false (sliding_window {window} unused)")
    else:
        out["sliding_window"] = _reading(_none_if_zero(_int_or_list(window)) if window is not None else None,
                                         wlabel or missing("sliding_window"))
    heads = put("n_heads", ("num_attention_heads", "n_head", "n_heads", "num_heads"), _int_or_list)
    kv = put("n_kv_heads", ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "n_head_kv"), _int_or_list)
    if kv is None and cfg.get("multi_query")[0] is True:
        out["n_kv_heads"] = _reading(1, label("multi_query"))
    elif kv is None and heads is not None:
        out["n_kv_heads"] = _reading(heads, f"{out['n_heads']['source']} ({where} sets no kv head count)")
    hidden = put("hidden_size", ("hidden_size", "n_embd", "d_model", "dim"), _int_or_list)
    hd = put("head_dim", ("head_dim",), _int_or_list)
    if hd is None and isinstance(hidden, int) and isinstance(heads, int) and heads:
        out["head_dim"] = _reading(hidden // heads, f"hidden_size / n_heads ({where} sets no head_dim)")
    put("intermediate_size", ("intermediate_size", "n_inner", "ffn_hidden_size", "ffn_dim"), _int_or_list)
    put("n_layers", ("num_hidden_layers", "n_layer", "num_layers", "n_layers"), _int_or_list)
    put("n_experts", ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"),
        lambda v: _none_if_zero(_int_or_list(v)))
    put("n_experts_used", ("num_experts_per_tok", "moe_top_k", "num_experts_per_token"),
        lambda v: _none_if_zero(_int_or_list(v)))
    put("vocab_size", ("vocab_size", "padded_vocab_size"), _int_or_list)
    put("logit_softcap", ("final_logit_softcapping",), lambda v: _none_if_zero(_num(v)))
    put("attn_softcap", ("attn_logit_softcapping",), lambda v: _none_if_zero(_num(v)))
    tied, tlab = cfg.get("tie_word_embeddings")
    out["tied_embeddings"] = _reading(bool(tied) if tied is not None else None, tlab or missing("tie_word_embeddings"))
    hd_val = out["head_dim"]["value"]
    out["rope_scaling"] = _rope_from_hf(cfg, theta, hd_val)
    return out


# --------------------------------------------------------------------------- transformers / EXL2 directories


def _json_file(path: Path) -> dict[str, Any] | None:
    """A JSON object file, None when it does not exist; ModelLoadError when it is broken."""
    if not path.is_file():
        return None
    from ..backends.hfdir import read_json

    return read_json(path)


def _token_content(v: Any) -> str | None:
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


class _Vocab:
    """Token text -> id from tokenizer.json (added tokens first), and the tokenizer's id count."""

    def __init__(self, tok: dict[str, Any] | None) -> None:
        self.ids: dict[str, int] = {}
        self.count: int | None = None
        if not tok:
            return
        model = tok.get("model") or {}
        vocab = model.get("vocab")
        if isinstance(vocab, dict):
            self.ids.update({str(k): int(v) for k, v in vocab.items()})
        elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
            self.ids.update({str(p[0]): i for i, p in enumerate(vocab) if isinstance(p, (list, tuple)) and p})
        for t in tok.get("added_tokens") or []:
            if isinstance(t, dict) and "id" in t and "content" in t:
                self.ids[str(t["content"])] = int(t["id"])
        self.count = max(self.ids.values()) + 1 if self.ids else None


def _safetensors_names(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from every safetensors header of a directory (headers only, no data)."""
    out: dict[str, list[int]] = {}
    for f in sorted(path.glob("*.safetensors")):
        try:
            with f.open("rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                if n > 100_000_000:
                    continue
                header = json.loads(fh.read(n).decode("utf-8"))
        except (OSError, ValueError, struct.error):
            continue
        for name, t in header.items():
            if name != "__metadata__" and isinstance(t, dict):
                out[name] = list(t.get("shape") or [])
    return out


_EMBED_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "tok_embeddings.weight",
                   "embed_in.weight", "embedding.weight")


def _special_id(name: str, tc: dict[str, Any], stm: dict[str, Any], vocab: _Vocab, cfg: dict[str, Any],
                gen: dict[str, Any]) -> dict[str, Any]:
    """A special token's id as a converter resolves it: the tokenizer's token (tokenizer_config.json,
    then special_tokens_map.json) looked up in tokenizer.json, then config.json, then generation_config.json."""
    for fname, d in (("tokenizer_config.json", tc), ("special_tokens_map.json", stm)):
        text = _token_content(d.get(f"{name}_token"))
        if text is not None:
            if text in vocab.ids:
                return {**_reading(vocab.ids[text], f"{fname} {name}_token {text!r}"), "text": text}
            return {**_reading(None, f"{fname} {name}_token {text!r} is not in tokenizer.json"), "text": text}
    for fname, d in (("config.json", cfg), ("generation_config.json", gen)):
        v = d.get(f"{name}_token_id")
        if v is None and isinstance(d.get("text_config"), dict):
            v = d["text_config"].get(f"{name}_token_id")
        if isinstance(v, list) and len(v) == 1:
            v = v[0]
        if v is not None:
            text = next((t for t, i in vocab.ids.items() if i == v), None) if isinstance(v, int) else None
            return {**_reading(v, f"{fname} {name}_token_id"), "text": text}
    return {**_reading(None, f"no {name} token in tokenizer_config.json, config.json or generation_config.json"),
            "text": None}


def _hf_template(path: Path, tc: dict[str, Any]) -> dict[str, Any]:
    """The default chat template: tokenizer_config.json, else chat_template.jinja, else chat_template.json."""
    t = tc.get("chat_template")
    if isinstance(t, list):  # named templates: the default one
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        return _reading(named.get("default"), "tokenizer_config.json chat_template (default)")
    if isinstance(t, str):
        return _reading(t, "tokenizer_config.json chat_template")
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return _reading(jinja.read_text(encoding="utf-8"), "chat_template.jinja")
    cj = _json_file(path / "chat_template.json")
    if cj and isinstance(cj.get("chat_template"), str):
        return _reading(cj["chat_template"], "chat_template.json")
    return _reading(None, "no chat_template in tokenizer_config.json, chat_template.jinja or chat_template.json")


def read_hf_dir(path: Path) -> dict[str, Any]:
    """A transformers (or EXL2) checkpoint directory: config.json, generation_config.json, the tokenizer
    files and the safetensors headers."""
    from ..backends import hfdir

    cfg = hfdir.read_json(path / "config.json")
    gen = _json_file(path / "generation_config.json") or {}
    tc = _json_file(path / "tokenizer_config.json") or {}
    stm = _json_file(path / "special_tokens_map.json") or {}
    tok = _json_file(path / "tokenizer.json")
    vocab = _Vocab(tok)
    fields = normalise_config(cfg, lambda k: f"config.json {k}")
    kind = "exl2" if hfdir.quant_method(cfg) == "exl2" else "transformers"

    tensors = _safetensors_names(path)
    embed = next((n for suffix in _EMBED_SUFFIXES for n in sorted(tensors) if n.endswith(suffix)), None)
    rows = tensors[embed][0] if embed and tensors[embed] else None
    fields["embedding_rows"] = _reading(
        {"rows": rows, "tokens": vocab.count},
        (f"safetensors {embed} shape {tensors[embed]}" if embed else "no embedding tensor in the safetensors headers")
        + ("; tokenizer.json" if vocab.count else ""))
    if fields["tied_embeddings"]["value"] is None and tensors:
        has_head = any(n.startswith("lm_head.") or ".lm_head." in n for n in tensors)
        fields["tied_embeddings"] = _reading(not has_head, "no tie_word_embeddings in config.json; "
                                             + ("an lm_head tensor is in the safetensors" if has_head
                                                else "no lm_head tensor in the safetensors"))

    specials = {n: _special_id(n, tc, stm, vocab, cfg, gen) for n in ("bos", "eos", "pad")}
    for n in ("bos", "eos", "pad"):
        fields[f"{n}_id"] = _reading(specials[n]["value"], specials[n]["source"])
    eot_text = _token_content(tc.get("eot_token"))
    fields["eot_id"] = _reading(vocab.ids.get(eot_text) if eot_text else None,
                                f"tokenizer_config.json eot_token {eot_text!r}" if eot_text
                                else "tokenizer_config.json: no eot_token")
    stops: set[int] = set()
    stop_sources = []
    for fname, v in (("tokenizer_config.json eos_token", specials["eos"]["value"]),
                     ("config.json eos_token_id", cfg.get("eos_token_id")),
                     ("generation_config.json eos_token_id", gen.get("eos_token_id")),
                     ("tokenizer_config.json eot_token", fields["eot_id"]["value"])):
        ids = [x for x in (v if isinstance(v, list) else [v]) if isinstance(x, int)]
        if ids:
            stops.update(ids)
            stop_sources.append(fname)
    add_bos, add_eos = hfdir.tokenizer_adds_special(path)
    template_ends = hfdir.template_ends((tok or {}).get("post_processor"))
    for flag, value in (("bos", add_bos), ("eos", add_eos)):
        if isinstance(tc.get(f"add_{flag}_token"), bool):
            src = f"tokenizer_config.json add_{flag}_token"
        elif template_ends is not None:
            src = "tokenizer.json post_processor"
        else:
            src = "not set (transformers adds nothing)"
        fields[f"add_{flag}"] = _reading(value, src)
    fields["chat_template"] = _hf_template(path, tc)
    return {
        "kind": kind, "path": str(path), "fields": fields, "unknown": {},
        "stop_ids": {"value": sorted(stops), "source": ", ".join(stop_sources)},
        "special_text": {"bos": specials["bos"]["text"], "eos": specials["eos"]["text"]},
        "tokenizer_json": str(path / "tokenizer.json") if tok else None,
        "notes": [],
    }


# --------------------------------------------------------------------------- GGUF files

# GGUF spec key (after "<arch>.") -> transformers config key: how a header alone is read.
_GGUF_GENERIC = {
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "rope.freq_base": "rope_theta",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "attention.layer_norm_epsilon": "layer_norm_eps",
    "attention.key_length": "head_dim",
    "attention.sliding_window": "sliding_window",
    "vocab_size": "vocab_size",
    "final_logit_softcapping": "final_logit_softcapping",
    "attn_logit_softcapping": "attn_logit_softcapping",
    "expert_count": "num_local_experts",
    "expert_used_count": "num_experts_per_tok",
}


def _gguf_headers(path: Path) -> tuple[Any, list[tuple[Path, Any]]]:
    """The first shard's header (metadata) and every shard's (tensor tables)."""
    from ..backends import gguf_header

    shards = gguf_header.shard_files(path) or [path]
    headers = [(p, gguf_header.read_header(p)) for p in shards]
    return headers[0][1], headers


class _Field:
    """One metadata key as transformers' GGUF loader reads a gguf-py ``ReaderField``: ``parts[i]`` for ``i`` in
    ``data``, parsed by ``types`` (scalars as one-element lists, strings as their UTF-8 bytes)."""

    __slots__ = ("data", "parts", "types")

    def __init__(self, types: tuple[int, ...], value: Any) -> None:
        self.types = list(types)
        items = value if types[0] == ARRAY_TYPE else [value]
        self.parts = [x.encode("utf-8") if isinstance(x, str) else [x] for x in items]
        self.data = list(range(len(self.parts)))


class _TensorName:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


class _HeaderReader:
    """Our header, shaped as the part of gguf-py's ``GGUFReader`` that ``load_gguf_checkpoint(...,
    return_tensors=False)`` reads: every metadata key except the arrays the header reader steps over (the
    tokenizer's tables, which go to transformers' tokenizer, not its config), and the tensor names.

    gguf-py's reader builds a numpy view per token and merge: 2-5 s for a 49k vocabulary, the largest cost of
    a cold run's config check. transformers' own mapping still turns the keys into the config."""

    def __init__(self, hdr: Any) -> None:
        self.fields = {k: _Field(hdr.types[k], v) for k, v in hdr.kv.items() if v is not None}
        self.tensors = [_TensorName(t[0]) for t in hdr.tensors]



@contextlib.contextmanager
def _reading_header(hdr: Any) -> Iterator[None]:
    """transformers' GGUF loader reads ``gguf.GGUFReader`` at call time: give it our header while it runs."""
    import gguf

    real = gguf.GGUFReader
    gguf.GGUFReader = lambda *_a, **_k: _HeaderReader(hdr)
    try:
        yield
    finally:
        gguf.GGUFReader = real


def _transformers_gguf(path: Path, hdr: Any | None = None) -> tuple[dict[str, Any] | None, str]:
    """transformers' config dict, tokenizer tables and tokenizer config for a GGUF (metadata only),
    or None and why not. With ``hdr`` (this file's ``gguf_header.read_header``) transformers' loader reads
    the header instead of gguf-py's reader: the same config, no tokenizer tables."""
    try:
        import transformers
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        from ..backends.hf import quiet_transformers
    except Exception as exc:  # noqa: BLE001 - transformers/torch/gguf missing or broken: read the header
        return None, f"transformers' GGUF loader is not available ({type(exc).__name__}: {exc})"
    try:
        with quiet_transformers(transformers), (_reading_header(hdr) if hdr is not None
                                                else contextlib.nullcontext()):
            out = load_gguf_checkpoint(str(path), return_tensors=False)
    except Exception as exc:  # noqa: BLE001 - e.g. an architecture transformers does not map
        return None, f"transformers' GGUF loader could not read it ({type(exc).__name__}: {exc})"
    config = out.get("config")
    if hdr is not None and isinstance(config, dict) and "vocab_size" not in config:
        # transformers' own fallback (the tokens' count), which needs the table the header reader skips
        n = hdr.array_len.get("tokenizer.ggml.tokens")
        if n:
            config["vocab_size"] = int(n)
    return out, ""


def _transformers_labels(arch: str) -> dict[str, str]:
    """transformers config key -> the GGUF key it maps from, for this architecture."""
    try:
        from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    except Exception:  # noqa: BLE001
        return {}
    out: dict[str, str] = {}
    for a in (arch, "mistral" if arch == "llama" else arch):
        for sub, hf_key in (GGUF_CONFIG_MAPPING.get(a) or {}).items():
            if isinstance(hf_key, str):
                out.setdefault(hf_key, f"{arch}.{sub}")
    return out


def _gguf_token_texts(path: Path, tf: dict[str, Any] | None, ids: list[int], hdr: Any = None) -> dict[int, str]:
    """Texts of a few token ids: transformers' tables if it read them, else the header's token array."""
    tokens = (tf or {}).get("tokenizer", {}).get("tokens") if tf else None
    if isinstance(tokens, list) and tokens:
        return {i: str(tokens[i]) for i in ids if 0 <= i < len(tokens)}
    from ..backends import gguf_header

    try:
        return gguf_header.token_texts(path, ids, hdr)
    except Exception:  # noqa: BLE001 - only for rendering templates; without it they get empty strings
        return {}


def _small_tensor(headers: list[tuple[Path, Any]], wanted: str) -> tuple[list[float] | None, bool]:
    """The values of a small F32/F16 tensor (rope factors: head_dim / 2 floats), and whether the file has it."""
    for p, hdr in headers:
        for name, ne, ttype, offset in hdr.tensors:
            if name != wanted:
                continue
            n = int(math.prod(ne))
            dtype = {0: "<f4", 1: "<f2"}.get(int(ttype))
            if dtype is None or n > 1 << 16:
                return None, True
            import numpy as np

            data = np.fromfile(p, dtype=dtype, count=n, offset=hdr.data_start + offset)
            return [float(x) for x in data], True
    return None, False


# rope tensors a converter writes instead of metadata -> the field of the normalised record
_ROPE_TENSORS = (("rope_freqs.weight", "freq_factors"), ("rope_factors_long.weight", "long_factor"),
                 ("rope_factors_short.weight", "short_factor"))


def _rope_from_gguf(kv: dict[str, Any], arch: str, headers: list[tuple[Path, Any]]) -> dict[str, Any]:
    """Rope scaling from ``<arch>.rope.scaling.*`` (or the old ``rope.scale_linear``) and the factor tensors
    (Llama 3 scaling is only ``rope_freqs.weight``; Phi-3's LongRoPE is ``rope_factors_long/short``)."""
    k = f"{arch}.rope.scaling."
    rtype = kv.get(k + "type")
    legacy = kv.get(f"{arch}.rope.scale_linear")
    keys = [key for key in kv if key.startswith(k) and kv[key] is not None]
    tensors: dict[str, list[float] | None] = {}
    found: list[str] = []
    for tname, field in _ROPE_TENSORS:
        values, present = _small_tensor(headers, tname)
        if present:
            found.append(tname)
            tensors[field] = values
    if rtype in (None, "none", "") and legacy is None and not found and not keys:
        return _reading(None, f"GGUF {k}type {rtype!r}" if rtype is not None else f"GGUF: no {k}type")
    out: dict[str, Any] = {}
    if rtype not in (None, "none", ""):
        out["type"] = str(rtype)
    elif legacy is not None:
        out["type"], out["factor"] = "linear", float(legacy)
        keys.append(f"{arch}.rope.scale_linear")
    elif "long_factor" in tensors or "short_factor" in tensors:
        out["type"] = "longrope"
    elif found:
        out["type"] = "freq_factors"
    elif kv.get(k + "factor") is not None:
        out["type"] = "linear"  # llama.cpp's scaling type when a factor comes without one
    else:  # only parameters of no scaling (e.g. an attention factor): nothing to apply
        return _reading(None, "GGUF " + ", ".join(sorted(keys)) + f" without {k}type")
    for gkey, name in (("factor", "factor"), ("original_context_length", "original_max_position_embeddings"),
                       ("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow"),
                       ("yarn_ext_factor", "extrapolation_factor"), ("attn_factor", "attention_factor"),
                       ("yarn_attn_factor", "attention_factor")):
        if kv.get(k + gkey) is not None:
            out[name] = _num(kv[k + gkey])
    out.update({f: v for f, v in tensors.items() if v is not None})
    parts = [", ".join(sorted(keys))] if keys else []
    parts += [f"tensor {t}" for t in found]
    return _reading(out, "GGUF " + " + ".join(parts))


def read_gguf(path: Path) -> dict[str, Any]:
    """A GGUF file: transformers' mapping for the model fields, the header for the rest."""
    hdr, headers = _gguf_headers(path)
    kv = hdr.kv
    arch = kv.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelLoadError(f"{path}: no general.architecture key in the GGUF metadata; re-convert it.")
    notes: list[str] = []

    # HF-style config: the header by the spec's key names, then transformers' own mapping on top.
    data: dict[str, Any] = {}
    labels: dict[str, str] = {}
    for sub, hf_key in _GGUF_GENERIC.items():
        if kv.get(f"{arch}.{sub}") is not None and hf_key not in data:
            data[hf_key] = kv[f"{arch}.{sub}"]
            labels[hf_key] = f"GGUF {arch}.{sub}"
    if "head_dim" not in data and kv.get(f"{arch}.rope.dimension_count") is not None:
        data["head_dim"] = kv[f"{arch}.rope.dimension_count"]
        labels["head_dim"] = f"GGUF {arch}.rope.dimension_count"
    tf, why = _transformers_gguf(path, hdr)
    if tf is not None:
        tmap = _transformers_labels(arch)
        for key, value in (tf.get("config") or {}).items():
            if key in ("tie_word_embeddings", "model_type", "_model_name_or_path", "architectures"):
                continue
            data[key] = value
            if key in tmap and kv.get(tmap[key]) is not None:
                labels[key] = f"GGUF {tmap[key]}"
            elif key == "vocab_size" and key not in labels:
                labels[key] = "GGUF tokenizer.ggml.tokens (its length, as transformers reads it)"
            else:
                labels[key] = labels.get(key, f"transformers' GGUF config {key}")
        via = "transformers' GGUF mapping + header"
    else:
        via = "GGUF header"
        notes.append(why)
    spec_key = {hf: f"{arch}.{sub}" for sub, hf in reversed(_GGUF_GENERIC.items())}
    fields = normalise_config(data, lambda key: labels.get(key, f"GGUF ({key})"), where="the GGUF metadata",
                              absent=lambda key: f"GGUF: no {spec_key.get(key, key)}")
    fields["rope_scaling"] = _rope_from_gguf(kv, arch, headers)

    tensors = {name: ne for _, h in headers for name, ne, _, _ in h.tensors}
    n_tokens = hdr.array_len.get("tokenizer.ggml.tokens")
    embd = tensors.get("token_embd.weight")
    rows = int(embd[1]) if embd is not None and len(embd) > 1 else None
    fields["embedding_rows"] = _reading(
        {"rows": rows, "tokens": n_tokens},
        (f"GGUF tensor token_embd.weight {list(embd)}" if embd is not None else "GGUF: no token_embd.weight tensor")
        + ("; tokenizer.ggml.tokens" if n_tokens is not None else ""))
    if fields["vocab_size"]["value"] is None and n_tokens is not None:
        fields["vocab_size"] = _reading(int(n_tokens), "GGUF tokenizer.ggml.tokens (length)")
    fields["tied_embeddings"] = _reading(
        "output.weight" not in tensors,
        "GGUF: no output.weight tensor (llama.cpp uses token_embd)" if "output.weight" not in tensors
        else "GGUF: output.weight tensor present")
    for name, key in (("bos_id", "bos_token_id"), ("eos_id", "eos_token_id"), ("eot_id", "eot_token_id"),
                      ("pad_id", "padding_token_id")):
        v = kv.get(f"tokenizer.ggml.{key}")
        fields[name] = _reading(int(v) if v is not None else None,
                                f"GGUF tokenizer.ggml.{key}" if v is not None else f"GGUF: no tokenizer.ggml.{key}")
    eom = kv.get("tokenizer.ggml.eom_token_id")
    for flag in ("bos", "eos"):
        v = kv.get(f"tokenizer.ggml.add_{flag}_token")
        fields[f"add_{flag}"] = _reading(bool(v) if v is not None else None,
                                         f"GGUF tokenizer.ggml.add_{flag}_token" if v is not None
                                         else f"GGUF: no tokenizer.ggml.add_{flag}_token; llama.cpp then "
                                              "decides by vocabulary type")
    template = kv.get("tokenizer.chat_template")
    fields["chat_template"] = _reading(template if isinstance(template, str) else None,
                                       "GGUF tokenizer.chat_template" if isinstance(template, str)
                                       else "GGUF: no tokenizer.chat_template")
    stops = sorted({int(v) for v in (fields["eos_id"]["value"], fields["eot_id"]["value"], eom) if v is not None})
    want = [i for i in (fields["bos_id"]["value"], fields["eos_id"]["value"]) if i is not None]
    texts = _gguf_token_texts(path, tf, want, hdr)
    return {
        "kind": "gguf", "path": str(path), "via": via, "fields": fields, "unknown": {},
        "stop_ids": {"value": stops, "source": "GGUF tokenizer.ggml.eos/eot/eom_token_id"},
        "special_text": {"bos": texts.get(fields["bos_id"]["value"]), "eos": texts.get(fields["eos_id"]["value"])},
        "tokenizer_json": None,
        "notes": notes,
    }


# --------------------------------------------------------------------------- golden references

# ModelInfo attribute / extra key -> field (a reference saved from a GGUF keeps some header fields).
_REFERENCE_INFO = {"num_layers": "n_layers", "vocab_size": "vocab_size", "hidden_size": "hidden_size"}
_REFERENCE_EXTRA = {"context_length": "context_length", "rope_freq_base": "rope_theta", "rms_norm_eps": "norm_eps",
                    "bos_token_id": "bos_id", "eos_token_id": "eos_id", "add_bos_token": "add_bos",
                    "add_eos_token": "add_eos"}


def read_reference(path: Path) -> dict[str, Any]:
    """A saved golden reference keeps the model info it was saved with, not the model's config files."""
    from ..store.reference import reference_info

    info = reference_info(path)
    of = info.extra.get("reference_of") or "?"
    fields: dict[str, Any] = {}
    for attr, name in _REFERENCE_INFO.items():
        v = getattr(info, attr, None)
        if v is not None:
            fields[name] = _reading(v, f"reference info {attr}")
    for key, name in _REFERENCE_EXTRA.items():
        v = info.extra.get(key)
        if v is not None:
            fields[name] = _reading(v, f"reference info {key}")
    why = (f"{path} is a saved golden reference (of {of}); it records only the model info it was saved with "
           f"({', '.join(sorted(fields)) or 'nothing comparable'})")
    unknown = {f.name: why for f in FIELDS if f.name not in fields}
    return {"kind": "reference", "path": str(path), "fields": fields, "unknown": unknown, "stop_ids": None,
            "special_text": {}, "tokenizer_json": None, "notes": []}


def _none_side(path: str, why: str) -> dict[str, Any]:
    return {"kind": "none", "path": path, "fields": {}, "unknown": {f.name: why for f in FIELDS},
            "stop_ids": None, "special_text": {}, "tokenizer_json": None, "notes": []}


def _is_gguf(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            return fh.read(4) == b"GGUF"
    except OSError:
        return False


def read_side(spec: Any) -> dict[str, Any]:
    """One model's normalised config record, whatever it is; a side with nothing to read says why."""
    if spec is None:
        return _none_side("", "no model spec was given to the check")
    path = Path(spec.path)
    options = getattr(spec, "options", None) or {}
    try:
        if spec.is_saved_reference():
            return read_reference(path)
        if path.is_dir() and options.get("gguf_file"):
            path = path / str(options["gguf_file"])
        if path.is_file() and _is_gguf(path):
            return read_gguf(path)
        if path.is_dir() and (path / "config.json").is_file():
            return read_hf_dir(path)
    except ConvdiffError:
        raise
    except Exception as exc:  # noqa: BLE001 - a reading bug must error the items readably, never crash the pair
        raise ConvdiffError(f"reading the configuration of {path} failed: {type(exc).__name__}: {exc}") from exc
    what = "does not exist" if not path.exists() else (
        "is a directory without config.json" if path.is_dir() else "is neither a GGUF nor a saved reference")
    return _none_side(str(path), f"{path} {what}: no configuration to read")


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


def render_template(template: str, messages: list[dict[str, str]], add_generation_prompt: bool,
                    bos_token: str | None, eos_token: str | None) -> dict[str, Any]:
    """``{"text": ...}`` or ``{"error": ...}`` (a template that raises, or does not parse)."""
    try:
        env = _environment()
        compiled = env.from_string(template)
        return {"text": compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=bos_token or "", eos_token=eos_token or "")}
    except Exception as exc:  # noqa: BLE001 - the template's own failure is what is compared
        return {"error": f"{type(exc).__name__}: {exc}"}


def _tokenizer(path: str | None) -> Any:
    if not path:
        return None
    try:
        from tokenizers import Tokenizer

        return Tokenizer.from_file(path)
    except Exception:  # noqa: BLE001 - token ids are extra detail; texts are compared without them
        return None


def compare_templates(side_a: dict[str, Any], side_b: dict[str, Any]) -> dict[str, Any]:
    """Render A's and B's chat templates on ``CONVERSATIONS`` (each with and without the generation
    prompt), each with its own BOS/EOS texts; token ids of differing renders with a tokenizer.json
    (A's, else B's) when one is at hand."""
    ta = (side_a.get("fields", {}).get("chat_template") or {}).get("value")
    tb = (side_b.get("fields", {}).get("chat_template") or {}).get("value")
    out: dict[str, Any] = {"renders": [], "identical_source": ta == tb, "jinja2": True, "tokenizer": None}
    if not (isinstance(ta, str) and isinstance(tb, str)) or ta == tb:
        return out
    try:
        import jinja2  # noqa: F401
    except ImportError:
        out["jinja2"] = False
        return out
    tok_path = side_a.get("tokenizer_json") or side_b.get("tokenizer_json")
    tok = _tokenizer(tok_path)
    if tok is not None:
        out["tokenizer"] = "A's tokenizer.json" if side_a.get("tokenizer_json") else "B's tokenizer.json"
    sa, sb = side_a.get("special_text") or {}, side_b.get("special_text") or {}
    for name, messages in CONVERSATIONS:
        for gen in (True, False):
            ra = render_template(ta, messages, gen, sa.get("bos"), sa.get("eos"))
            rb = render_template(tb, messages, gen, sb.get("bos"), sb.get("eos"))
            row: dict[str, Any] = {"name": name, "add_generation_prompt": gen, "a": ra, "b": rb}
            if tok is not None and "text" in ra and "text" in rb and ra["text"] != rb["text"]:
                ids_a = tok.encode(ra["text"], add_special_tokens=False).ids
                ids_b = tok.encode(rb["text"], add_special_tokens=False).ids
                row["ids_a"], row["ids_b"] = ids_a, ids_b
                i = next((k for k, (x, y) in enumerate(zip(ids_a, ids_b, strict=False)) if x != y), min(len(ids_a), len(ids_b)))
                row["pieces"] = {"a": tok.id_to_token(ids_a[i]) if i < len(ids_a) else None,
                                 "b": tok.id_to_token(ids_b[i]) if i < len(ids_b) else None}
            out["renders"].append(row)
    return out


# --------------------------------------------------------------------------- the measurement


def measure(ctx: Any) -> dict[str, Any]:
    """Both sides' normalised configs and the chat-template renders: JSON, cached per pair."""
    a = read_side(ctx.spec_a)
    b = read_side(ctx.spec_b)
    return {"version": MEASURE_VERSION, "a": a, "b": b, "chat": compare_templates(a, b)}
