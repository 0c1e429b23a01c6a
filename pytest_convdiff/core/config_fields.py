"""The ``config`` family's vocabulary: what each compared field means, and the HF-style normalisation.

A model's configuration (a transformers ``config.json``, or the config transformers maps a GGUF's
metadata to) becomes a record of normalised fields, each value with the file and key it came from
(``_reading``), so that a difference can be reported as ``rope_theta: A 100000.0 (config.json
rope_parameters.rope_theta) vs B 10000.0 (GGUF llama.rope.freq_base)``. The backends' readers
(``backends/hf_config.py``, ``backends/gguf_config.py``) fill such records; the check
(``checks/config.py``) compares them. Pure code: no file is read here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["FIELDS", "FIELD_NAMES", "Field", "llama3_freq_factors", "normalise_config"]


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
    Field("special_tokens", "special tokens", None, "specials"),
    Field("eog", "end-of-generation set", None, "eog"),
)
FIELD_NAMES = tuple(f.name for f in FIELDS)
# Fields a converter derives when the checkpoint's config leaves them out (Bloom's MLP size is 4 x hidden, an
# ALiBi model has no position limit): A's silence there is "not stated", not "no such feature", so B's
# value is not compared; the tensors' shapes are (weights[*]).
DERIVED_WHEN_ABSENT = frozenset({"context_length", "n_heads", "n_kv_heads", "head_dim", "hidden_size",
                                 "intermediate_size", "n_layers", "vocab_size"})
# Runtime constants that a model's code may fix instead of its configuration (OLMo's LayerNorm epsilon): A's
# silence is "its code decides", so B's written value is not compared here; the runtime twin (runtime[*]), which
# runs A's code on B's weights against B's runtime, judges whether B's runtime uses a value A's code agrees with.
CODE_WHEN_ABSENT = frozenset({"norm_eps"})
# The context length llama.cpp's converters write for a model with no position limit of its own (Mamba, RWKV, a
# hybrid without rope: "arbitrary value; for those who use the default", conversion/mamba.py, granite.py, rwkv.py).
# Such a B states no limit, not another training length: A's is not compared with it, and what B computes at
# long positions is what runtime[*] and position[*] judge.
NO_LIMIT_CONTEXT = 2 ** 20
# Per-layer head counts where 0 marks a layer without attention (a recurrent or convolution layer of a hybrid)
PER_LAYER_HEADS = frozenset({"n_heads", "n_kv_heads"})


def _reading(value: Any, source: str) -> dict[str, Any]:
    """One field of a side's record: its value and where it came from (file and key)."""
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
    types = cfg.get("layer_types")[0]
    if window is not None and cfg.get("use_sliding_window")[0] is False:
        out["sliding_window"] = _reading(None, f"{label('use_sliding_window')} false (sliding_window {window} unused)")
    elif window is not None and isinstance(types, list) and types and not any("sliding" in str(t) for t in types):
        out["sliding_window"] = _reading(None, f"{label('layer_types')} has no sliding layer (sliding_window "
                                               f"{window} unused)")
    else:
        out["sliding_window"] = _reading(_none_if_zero(_int_or_list(window)) if window is not None else None,
                                         wlabel or missing("sliding_window"))
    heads = put("n_heads", ("num_attention_heads", "n_head", "n_heads", "num_heads"), _int_or_list)
    kv = put("n_kv_heads", ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "n_head_kv"), _int_or_list)
    if cfg.get("multi_query")[0] is True:  # one key/value head whatever else the config says (GPT-BigCode)
        out["n_kv_heads"] = _reading(1, label("multi_query"))
    elif kv is None and heads is not None:
        out["n_kv_heads"] = _reading(heads, f"{out['n_heads']['source']} ({where} sets no kv head count)")
    hidden = put("hidden_size", ("hidden_size", "n_embd", "d_model", "dim"), _int_or_list)
    hd = put("head_dim", ("head_dim",), _int_or_list)
    if hd is None and isinstance(hidden, int) and isinstance(heads, int) and heads:
        out["head_dim"] = _reading(hidden // heads, f"hidden_size / n_heads ({where} sets no head_dim)")
    # the dense MLP's size: a mixture of experts that also has dense layers may call that one
    # ``intermediate_size_mlp`` and its experts' ``intermediate_size`` (Llama 4); GGUF's feed_forward_length is the former
    put("intermediate_size", ("intermediate_size_mlp", "intermediate_size", "n_inner", "ffn_hidden_size", "ffn_dim"),
        _int_or_list)
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

