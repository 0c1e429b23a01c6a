"""The ``config`` check's reader of a transformers (or EXL2) checkpoint directory.

``read_hf_dir`` turns config.json, generation_config.json, the tokenizer files and the safetensors
headers into the side record the config family compares (fields in ``core.config_fields``'s
vocabulary, each with the file and key it came from). Headers only: no tensor data, no model, no
transformers import. The transformers and exllamav2 backends declare it as their ``read_config``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from ..core.config_fields import _reading, normalise_config
from . import hfdir

__all__ = ["read_hf_dir"]


def _json_file(path: Path) -> dict[str, Any] | None:
    """A JSON object file, None when it does not exist; ModelLoadError when it is broken."""
    if not path.is_file():
        return None
    return hfdir.read_json(path)


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
    unknown: dict[str, str] = {}
    if (cfg.get("text_config") or cfg).get("kv_lora_rank"):
        # latent attention: keys and values come from one compressed latent per token, which llama.cpp stores as a
        # single key/value head of the latent's width; the two configs describe the heads differently
        why = ("latent attention (kv_lora_rank in config.json): the key/value heads and their size are not "
               "described alike by transformers and llama.cpp; the tensors' shapes are compared by weights[*]")
        unknown = {"n_kv_heads": why, "head_dim": why}
    return {
        "kind": kind, "path": str(path), "fields": fields, "unknown": unknown,
        "stop_ids": {"value": sorted(stops), "source": ", ".join(stop_sources)},
        "special_text": {"bos": specials["bos"]["text"], "eos": specials["eos"]["text"]},
        "tokenizer_json": str(path / "tokenizer.json") if tok else None,
        "special_tokens": {str(t["content"]): int(t["id"]) for t in (tok or {}).get("added_tokens") or []
                           if isinstance(t, dict) and t.get("special") and "content" in t and "id" in t},
        "notes": [],
    }
