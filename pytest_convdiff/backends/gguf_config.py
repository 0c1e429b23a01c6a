"""The ``config`` check's reader of a GGUF file's metadata.

``read_gguf`` turns a GGUF's header into the side record the config family compares (fields in
``core.config_fields``'s vocabulary, each with the GGUF key or tensor it came from). Nothing loads a
model or reads tensor data beyond the header and the tiny rope factor tensors.

The model fields go through transformers' own mapping from GGUF metadata to a config
(``load_gguf_checkpoint(return_tensors=False)``, which reads metadata only), so the values are the
ones ``from_pretrained(gguf_file=...)`` would use; what that mapping drops (rope scaling for Llama,
soft-caps, sliding window, end-of-turn id, add-BOS flags) is read from the header directly. Without
transformers (or for an architecture it does not know) the header alone is read with the GGUF spec's
key names. The llama.cpp backend declares it as its ``read_config``, the transformers backend for a
checkpoint loaded with ``gguf_file``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..core.config_fields import _num, _reading, normalise_config
from ..errors import ModelLoadError
from . import gguf_header
from .gguf_header import ARRAY_TYPE

__all__ = ["read_gguf"]

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
        from .hfdir import import_transformers, quiet_transformers

        transformers = import_transformers("modeling_gguf_pytorch_utils")
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
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
    # No head size from {arch}.rope.dimension_count: that is how many of a head's dimensions are rotated, the
    # whole head only without partial rotary embeddings (StableLM, Phi-2, GPT-NeoX rotate a quarter). llama.cpp
    # takes the head size from attention.key_length, else embedding_length / head_count, as the config check does.
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
        # the tokens the template may emit as markers, as B's vocabulary marks them (config check)
        "special_tokens": gguf_header.special_tokens(path, hdr),
        "notes": notes,
    }
