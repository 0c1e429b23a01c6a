"""transformers backend: a checkpoint directory run with torch.

Options: ``dtype`` (auto | float32 | float16 | bfloat16; default: the checkpoint's
own), ``device`` (cpu | cuda | cuda:N; default cpu), ``gguf_file`` (load a GGUF
through transformers' dequantising loader), ``trust_remote_code`` (default false).

Hidden states: transformers returns L+1 tensors whose last one is *after* the
final norm; the last layer's pre-norm output is taken with a forward hook on the
final norm's input, so index i is always "output of decoder layer i".
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ContextLengthError, MissingDependencyError, ModelLoadError
from .base import ForwardOutput, ModelInfo, info_from_hf_config, installed_version, special_token_flags

NAME = "transformers"
_DTYPES = ("auto", "float32", "float16", "bfloat16")


def library_version() -> str | None:
    return installed_version("transformers")


def _weight_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")) + sorted(path.glob("*.gguf"))
    return files


def fingerprint_files(path: Path) -> list[Path]:
    """Files whose content identifies the model (weights, config, tokenizer)."""
    names = ("config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "generation_config.json")
    extra = [path / n for n in names if (path / n).is_file()] if path.is_dir() else []
    return _weight_files(path) + extra


def probe(path: Path, options: dict[str, Any] | None = None) -> ModelInfo:
    options = options or {}
    cfg_path = path / "config.json"
    if options.get("gguf_file"):
        from .llamacpp import probe as gguf_probe

        info = gguf_probe(path / options["gguf_file"])
        return ModelInfo(str(path), NAME, info.architecture, info.num_layers, info.vocab_size,
                         info.hidden_size, "float32", library_version(), None)
    if not cfg_path.is_file():
        raise ModelLoadError(f"{path}: not a transformers checkpoint (no config.json).")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{cfg_path}: not valid JSON ({exc}); is the checkpoint complete?") from exc
    if not _weight_files(path):
        raise ModelLoadError(
            f"{path}: has config.json but no weights (*.safetensors or *.bin); "
            "the download or conversion is incomplete."
        )
    qc = cfg.get("quantization_config") or {}
    return info_from_hf_config(
        path, NAME, cfg,
        dtype=str(options.get("dtype") or cfg.get("dtype") or cfg.get("torch_dtype") or "float32"),
        library_version=library_version(),
        quantization=qc.get("quant_method") if isinstance(qc, dict) else None,
    )


def _torch_dtype(torch, name: str | None):
    if name in (None, "", "auto"):
        return "auto"
    if name not in _DTYPES:
        raise ModelLoadError(f"transformers backend: dtype must be one of {', '.join(_DTYPES)}, not {name!r}.")
    return getattr(torch, name)


class TransformersBackend:
    """A causal LM from transformers, in eval mode, on one device."""

    def __init__(self, path: Path, options: dict[str, Any]) -> None:
        try:
            import torch
            import transformers
        except ImportError as exc:
            raise MissingDependencyError("transformers", "transformers and torch", "transformers") from exc
        self._torch = torch
        self.path = path
        self.options = options
        device = str(options.get("device") or "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ModelLoadError(f"{path}: device {device!r} asked for, but torch sees no CUDA GPU.")
        self.device = torch.device(device)
        dtype = _torch_dtype(torch, options.get("dtype"))
        kwargs: dict[str, Any] = {"dtype": dtype}
        if options.get("gguf_file"):
            kwargs["gguf_file"] = options["gguf_file"]
        if options.get("trust_remote_code"):
            kwargs["trust_remote_code"] = True
        transformers.logging.set_verbosity_error()
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        with contextlib.suppress(Exception):
            transformers.utils.logging.disable_progress_bar()
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), **{
                k: v for k, v in kwargs.items() if k in ("gguf_file", "trust_remote_code")})
            self.model = transformers.AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
        except torch.cuda.OutOfMemoryError as exc:
            raise ModelLoadError(f"{path}: out of GPU memory while loading ({exc}). "
                                 "Use a smaller dtype (dtype=bfloat16) or another GPU.") from exc
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise ModelLoadError(f"{path}: transformers could not load it: {exc}") from exc
        self.model.to(self.device).eval()
        cfg = self.model.config
        text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        self.num_layers = int(text_cfg.num_hidden_layers)
        self.max_positions = getattr(text_cfg, "max_position_embeddings", None)
        self._final_norm = self._find_final_norm()
        self.info = ModelInfo(
            path=str(path), backend=NAME,
            architecture=(cfg.architectures or [cfg.model_type])[0],
            num_layers=self.num_layers, vocab_size=int(self.model.get_output_embeddings().weight.shape[0]),
            hidden_size=int(text_cfg.hidden_size), dtype=str(self.model.dtype).replace("torch.", ""),
            library_version=transformers.__version__,
        )

    def _find_final_norm(self):
        base = getattr(self.model, self.model.base_model_prefix, None) or self.model.model
        for name in ("norm", "final_layernorm", "ln_f"):
            mod = getattr(base, name, None)
            if mod is not None:
                return mod
        raise ModelLoadError(f"{self.path}: cannot find the final norm module to read the last layer's pre-norm output.")

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def decode_piece(self, token_id: int) -> str:
        return self.tokenizer.decode([int(token_id)])

    def special_tokens(self) -> dict[str, Any]:
        tok = self.tokenizer
        return special_token_flags(tok.bos_token_id, tok.eos_token_id,
                                   list(tok("a", add_special_tokens=True)["input_ids"]),
                                   list(tok("a", add_special_tokens=False)["input_ids"]))

    def forward(self, tokens: Sequence[int], *, hidden_states: bool = True,
                inject: dict[int, np.ndarray] | None = None) -> ForwardOutput:
        """One sequence. ``inject`` maps layer i to a ``[T, H]`` state that replaces layer i's output
        (layer-swap analysis: feed A's states into B for the first k layers)."""
        torch = self._torch
        if self.max_positions and len(tokens) > self.max_positions:
            raise ContextLengthError(
                f"{self.path}: a prompt of {len(tokens)} tokens is longer than the model's "
                f"max_position_embeddings ({self.max_positions}); shorten it or use --convdiff-max-tokens."
            )
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=self.device)
        captured: dict[str, Any] = {}
        handles = []
        if hidden_states:
            handles.append(self._final_norm.register_forward_pre_hook(
                lambda _m, args: captured.__setitem__("last", args[0].detach())))
        layers = self._layers()
        subs: dict[str, list[Any]] = {"attn": [None] * len(layers), "mlp": [None] * len(layers)}
        if hidden_states:
            for li, layer in enumerate(layers):
                for sub, attr in (("attn", "self_attn"), ("mlp", "mlp")):
                    mod = getattr(layer, attr, None)
                    if mod is None:
                        continue

                    def grab(_m, _args, output, sub=sub, li=li):
                        value = output[0] if isinstance(output, tuple) else output
                        subs[sub][li] = value.detach()

                    handles.append(mod.register_forward_hook(grab))
        for idx, state in (inject or {}).items():
            value = torch.as_tensor(state, device=self.device)

            def replace(_m, _args, output, value=value):
                if isinstance(output, tuple):
                    return (value.to(output[0].dtype).unsqueeze(0),) + tuple(output[1:])
                return value.to(output.dtype).unsqueeze(0)

            handles.append(layers[idx].register_forward_hook(replace))
        try:
            with torch.inference_mode():
                out = self.model(input_ids=ids, output_hidden_states=hidden_states, use_cache=False)
        except torch.cuda.OutOfMemoryError as exc:
            raise ModelLoadError(f"{self.path}: out of GPU memory on a {len(tokens)}-token prompt. "
                                 "Lower --convdiff-max-tokens or use dtype=bfloat16.") from exc
        finally:
            for h in handles:
                h.remove()
        logits = out.logits[0].float().cpu().numpy()
        hidden = None
        if hidden_states:
            hs = out.hidden_states
            per_layer = [hs[i + 1][0] for i in range(self.num_layers - 1)] + [captured["last"][0]]
            hidden = torch.stack([h.float() for h in per_layer]).cpu().numpy()
            for idx, state in (inject or {}).items():
                # What flows on from an injected layer is the injected state; transformers may record
                # the layer's own output before the replacing hook runs.
                hidden[idx] = np.asarray(state, dtype=np.float32)
        sublayers = {
            name: torch.stack([v[0].float() for v in values]).cpu().numpy()
            for name, values in subs.items() if hidden_states and all(v is not None for v in values)
        }
        return ForwardOutput(logits=logits, hidden=hidden, sublayers=sublayers)

    def greedy_decode(self, sequences: Sequence[Sequence[int]], steps: int,
                      pick: Callable[[int, np.ndarray], int]) -> None:
        """Greedy decoding of several prefixes at once on the KV cache: one batched forward over the
        left-padded prefixes, then one batched token per step (``steps`` forwards in all, not
        ``steps x len(sequences)`` nor a whole-prefix forward per token).

        ``pick(i, logits)`` gets sequence i's next-token logits (float32 ``[V]``) and returns the
        token to append. Padding is masked out and positions count from each prefix's first token,
        so a sequence's logits are those it has alone, up to floating-point reassociation.
        """
        torch = self._torch
        seqs = [[int(t) for t in s] for s in sequences]
        if not seqs or steps <= 0:
            return
        width = max(len(s) for s in seqs)
        ids = torch.zeros((len(seqs), width), dtype=torch.long, device=self.device)
        mask = torch.zeros((len(seqs), width), dtype=torch.long, device=self.device)
        for i, s in enumerate(seqs):
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
            for step in range(steps):
                rows = out.logits[:, -1].float().cpu().numpy()
                chosen = [int(pick(i, rows[i])) for i in range(len(seqs))]
                if step == steps - 1:
                    break
                mask = torch.cat([mask, torch.ones((len(seqs), 1), dtype=torch.long, device=self.device)], dim=1)
                positions = positions[:, -1:] + 1
                nxt = torch.tensor(chosen, dtype=torch.long, device=self.device)[:, None]
                out = self.model(input_ids=nxt, attention_mask=mask, position_ids=positions,
                                 past_key_values=out.past_key_values, use_cache=True)

    def _layers(self):
        base = getattr(self.model, self.model.base_model_prefix, None) or self.model.model
        return base.layers

    def close(self) -> None:
        torch = self._torch
        self.model = None
        self.tokenizer = None
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def load(path: Path, options: dict[str, Any]) -> TransformersBackend:
    return TransformersBackend(path, options)
